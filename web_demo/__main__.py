import sys

from web_demo.cli import main

sys.exit(main())
