import sys

from keyboard_model.cli import main

sys.exit(main())
