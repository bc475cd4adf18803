"""`python -m simulator`: the command line of bin/simulate."""

import sys

from simulator.cli import main

if __name__ == "__main__":  # not when merely imported (.ci/import_check.py imports every module)
    sys.exit(main())
