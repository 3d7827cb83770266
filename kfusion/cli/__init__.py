"""The `kfusion` command: demo, train from a spec, inspect, export.

Errors a user can fix (a missing file, a malformed spec, data that does not match) print one
line on stderr and exit with code 2, with no traceback and nothing half-written at the
destination. The command checks its arguments, paths and spec before Keras and TensorFlow
load (`kfusion._startup`), so such errors are answered at once, and TensorFlow's start-up
log stays quiet unless `TF_CPP_MIN_LOG_LEVEL` says otherwise.
"""

import argparse
import sys

from kfusion.cli import demo, export, inspect, train
from kfusion.cli._common import EXIT_USAGE, UserError

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
