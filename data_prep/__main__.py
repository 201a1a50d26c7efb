"""`python -m data_prep <source> [--out DIR] ...`: build a dataset in the layout of `layout.py`.

Sources: `imagenet` (the VIPriors ImageNet subset), `fashion` (the embedded Fashion-MNIST
benchmark, the default of `make data`) and `folder` (a user's own class folders). Each source
module offers `add_arguments(parser)` and `run(args)`.
"""

from __future__ import annotations

import argparse

from common.errors import cli_main
from data_prep import fashion, folder, imagenet

SOURCES = {
    "imagenet": (imagenet, "the VIPriors ImageNet subset from an ImageNet-1k copy"),
    "fashion": (fashion, "the embedded benchmark: Fashion-MNIST, 50 + 50 per class"),
    "folder": (folder, "your own class folders, split stratified and seeded"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="source", required=True, metavar="SOURCE")
    for name, (module, help_text) in SOURCES.items():
        module.add_arguments(
            sub.add_parser(
                name,
                help=help_text,
                description=module.__doc__,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            )
        )
    return parser.parse_args(argv)


@cli_main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    SOURCES[args.source][0].run(args)


if __name__ == "__main__":
    main()
