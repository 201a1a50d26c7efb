"""`accelerate launch` as train.launch and `make logits NPROC=` run it, less torchrun's report of
bad input.

A process that ends on bad input prints its one line and records status 2 (common/status.py).
Under torchrun's agent (every launch of several processes) the agent then logs the failure and
raises a ChildFailedError whose 40-line report follows the user's one line (accelerate's `--quiet`
covers its plain launcher only). Here that report is left out when a user error is recorded; any
other failure keeps it, since a crash's report is what its user needs. Run directly (`make logits
NPROC=`), with no status file named by train.launch, it names its own and exits with the status
recorded there, 2 for bad input, as the one-process command does.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from accelerate.commands.launch import main as accelerate_launch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from common.status import (
    EXIT_STATUS_ENV,
    launch_status_file,
    read_exit_status,
    user_error_recorded,
)

# The agent's logger for a worker's failure and the SIGTERM it then sends the others.
AGENT_LOG = "torch.distributed.elastic.multiprocessing.api"


def asks_for_logs(argv: list[str]) -> bool:
    """Whether `accelerate launch` options (those before the module or script) name a log folder
    or ask for the processes' output in files."""
    options = argv[: argv.index("-m")] if "-m" in argv else argv
    return any(arg.split("=")[0] in ("--log_dir", "--tee", "-t") for arg in options)


def launch() -> int:
    logging.getLogger(AGENT_LOG).addFilter(lambda record: not user_error_recorded())
    # torchrun's agent makes a folder for its processes' logs in /tmp and leaves it behind, one a
    # launch, empty unless logs are asked for: then it stays where they go, else it is the launch's.
    with tempfile.TemporaryDirectory(prefix="torchelastic-", ignore_cleanup_errors=True) as logs:
        if not asks_for_logs(sys.argv[1:]):
            sys.argv[1:1] = ["--log_dir", logs]
        try:
            accelerate_launch()
        except ChildFailedError:
            if not user_error_recorded():
                raise
            return 1  # the launcher exits with the status recorded
    return 0


def main() -> int:
    if os.environ.get(EXIT_STATUS_ENV):  # under train.launch, which reads the status itself
        return launch()
    with launch_status_file() as status_file:
        os.environ[EXIT_STATUS_ENV] = status_file
        code = launch()
        recorded = read_exit_status(status_file)
    return recorded if code != 0 and recorded is not None else code


if __name__ == "__main__":
    sys.exit(main())
