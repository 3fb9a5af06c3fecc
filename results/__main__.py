"""``snapproof results show | matrix | gate | plots`` (see results/cli.py)."""

import sys

from snapproof.results.cli import main

sys.exit(main())
