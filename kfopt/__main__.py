"""The ``kfopt`` command (also ``python -m kfopt``); its one subcommand is ``compare``."""

from __future__ import annotations

import argparse
import sys

from kfopt.compare.cli import add_arguments, run_compare


def main(argv: list[str] | None = None) -> int:
    """Run ``kfopt`` with ``argv`` (default: the process's arguments); returns the exit status.
    Bad arguments exit with status 2 and a usage message."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="kfopt", description="kfopt: second-order optimizers for PyTorch.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    compare = commands.add_parser("compare", help="train a model with every optimizer and compare them")
    add_arguments(compare)
    args = parser.parse_args(argv)
    try:
        return run_compare(args, compare, ["kfopt"] + argv)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
