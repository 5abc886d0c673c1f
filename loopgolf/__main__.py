"""`python -m loopgolf ...`: the `loopgolf` command, from a source tree with no install."""

import sys

from loopgolf.cli import main

sys.exit(main())
