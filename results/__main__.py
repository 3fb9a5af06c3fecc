"""``python -m results show | matrix | gate | plots`` (see results/cli.py)."""

import sys

from results.cli import main

sys.exit(main())
