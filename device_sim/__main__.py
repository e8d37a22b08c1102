import sys

from device_sim.cli import main

sys.exit(main())
