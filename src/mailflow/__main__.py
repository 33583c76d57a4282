"""`python -m mailflow ...`: the same as the `mailflow` console script."""

import sys

from mailflow.cli import main

if __name__ == "__main__":
    sys.exit(main())
