"""``python -m hyperpipe``: what this installation uses and, when the C core is missing, why."""

from __future__ import annotations

import platform
import sys

from . import info
from ._core_status import CORE_ERROR, explanation


def main() -> int:
    print(f"python: {platform.python_implementation()} {platform.python_version()} ({sys.executable})")
    print(f"platform: {platform.platform()}")
    for key, value in info().items():
        print(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    if CORE_ERROR is not None:
        print()
        print(explanation())
    return 0


if __name__ == "__main__":
    sys.exit(main())
