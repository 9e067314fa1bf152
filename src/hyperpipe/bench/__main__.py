"""Entry point of ``python -m hyperpipe.bench`` and of the ``hyperpipe-bench`` console script."""

import sys

from ._cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
