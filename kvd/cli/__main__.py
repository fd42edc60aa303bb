"""`python -m kvd.cli` and the `kvd` console script."""

import sys

from kvd.cli.app import main


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
