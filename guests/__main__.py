import sys

from guests import main

sys.exit(main())
