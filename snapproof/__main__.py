"""``python -m snapproof``: the snapproof command (snapproof/cli.py)."""

import sys

from snapproof.cli import main

sys.exit(main())
