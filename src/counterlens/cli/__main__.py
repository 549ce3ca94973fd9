"""``python -m counterlens.cli``: the ``counterlens`` command."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
