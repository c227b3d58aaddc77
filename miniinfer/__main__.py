"""``python -m miniinfer ...``: the same command line as the ``miniinfer`` console script."""

import sys

from miniinfer.cli import main

if __name__ == "__main__":
    sys.exit(main())
