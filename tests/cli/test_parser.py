"""The command's argument parser."""


def test_help_describes_every_argument():
    from kfusion.cli import build_parser

    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        for action in sub._actions:
            if action.dest != "help":
                assert action.help, f"kfusion {name}: {action.dest} has no help"
