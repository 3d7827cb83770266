"""The `kfusion` command: demo, train from a spec, inspect, export.

Errors a user can fix (a missing file, a malformed spec, data that does not match) print one
line on stderr and exit with code 2, with no traceback and nothing half-written at the
destination.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from kfusion.cli import demo, export, inspect, train  # noqa: E402
from kfusion.cli._common import EXIT_USAGE, UserError  # noqa: E402

COMMANDS = (demo, train, inspect, export)


def build_parser():
    """The argument parser of the `kfusion` command."""
    parser = argparse.ArgumentParser(
        prog="kfusion", description="Multi-branch deep learning models for Keras 3."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None):
    """Entry point of the `kfusion` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"kfusion {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"kfusion {args.command}: interrupted", file=sys.stderr)
        return 130
