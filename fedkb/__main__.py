import sys

from fedkb.cli import main

sys.exit(main())
