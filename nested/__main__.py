import sys

from nested.kvm_amd import main

sys.exit(main())
