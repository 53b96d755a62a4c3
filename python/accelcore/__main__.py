import sys

from accelcore.cli import main

sys.exit(main())
