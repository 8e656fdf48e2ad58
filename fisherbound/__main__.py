"""``python -m fisherbound``: the command line."""

import sys

from fisherbound.cli import main

sys.exit(main())
