"""``python -m nearfar`` is the ``nearfar`` command; ``torchrun -m nearfar train`` needs it."""

import sys

from nearfar.cli import main

if __name__ == "__main__":
    sys.exit(main())
