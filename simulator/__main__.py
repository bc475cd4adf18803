"""`python -m simulator`: the command line of bin/simulate."""

import sys

from simulator.cli import main

sys.exit(main())
