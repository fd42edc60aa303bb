"""`python -m kvd.cli` and the `kvd` console script."""

import sys

from kvd.cli.app import main
from kvd.core.allocator import reexec_with_mimalloc


def entry() -> None:
    reexec_with_mimalloc(sys.argv[1:])
    sys.exit(main())


if __name__ == "__main__":
    entry()
