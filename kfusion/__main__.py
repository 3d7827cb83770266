"""`python -m kfusion ...` runs the `kfusion` command."""

import sys

from kfusion.cli import main

sys.exit(main())
