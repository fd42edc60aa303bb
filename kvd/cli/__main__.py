"""`python -m kvd.cli` and the `kvd` console script."""

import sys

from kvd.allocator import reexec_with_mimalloc
from kvd.cli.app import main


def entry() -> None:
    reexec_with_mimalloc(sys.argv[1:])
    sys.exit(main())


if __name__ == "__main__":
    entry()
