import sys

from snapproof.guests import main

sys.exit(main())
