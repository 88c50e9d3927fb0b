"""`python -m mds`: the same as `clue-mds`."""

import sys

from mds.cli import main

sys.exit(main())
