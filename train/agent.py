"""`accelerate launch` as train.launch runs it, less torchrun's report of bad input.

A training process that ends on bad input prints its one line and records status 2
(common/status.py). Under torchrun's agent (every run of several processes) the agent then logs
the failure and raises a ChildFailedError whose 40-line report follows the user's one line
(accelerate's `--quiet` covers its plain launcher only). Here that report is left out when a user
error is recorded; any other failure keeps it, since a crash's report is what its user needs.
"""

from __future__ import annotations

import logging
import sys

from accelerate.commands.launch import main as accelerate_launch
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from common.status import user_error_recorded

# The agent's logger for a worker's failure and the SIGTERM it then sends the others.
AGENT_LOG = "torch.distributed.elastic.multiprocessing.api"


def main() -> int:
    logging.getLogger(AGENT_LOG).addFilter(lambda record: not user_error_recorded())
    try:
        accelerate_launch()
    except ChildFailedError:
        if not user_error_recorded():
            raise
        return 1  # train.launch exits with the status recorded
    return 0


if __name__ == "__main__":
    sys.exit(main())
