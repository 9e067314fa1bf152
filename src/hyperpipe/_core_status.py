"""Whether the C core loaded, why not, and how the user hears of it.

Without ``hyperpipe._core`` everything still works, over the socket transport: at the
standard library's speed, not shared memory's. So that this is never silent, the first
``Pipe()`` that falls back warns once, ``python -m hyperpipe`` prints the reason, and
``HYPERPIPE_REQUIRE_CORE=1`` turns it into an ``ImportError`` at ``import hyperpipe``.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from typing import Optional

from ._select import TRANSPORT_ENV

#: set (to anything but "0") to make a missing C core an error, at build and at import
REQUIRE_ENV = "HYPERPIPE_REQUIRE_CORE"

FIX = (
    "install a C compiler and the Python headers (e.g. `apt install gcc python3-dev`), "
    "then reinstall hyperpipe from its source (`pip install --force-reinstall --no-cache-dir .`, "
    "or `pip install -e .` in a checkout); `python -m hyperpipe` shows the result"
)

#: written by setup.py next to this file when compiling the core failed
BUILD_ERROR_FILE = "_core_build_error.txt"


def _import_error() -> Optional[str]:
    try:
        # Not "from . import _core": while hyperpipe initializes, that would blame a circular import.
        importlib.import_module("hyperpipe._core")
    except ImportError as exc:
        reason = str(exc) or type(exc).__name__
    else:
        return None
    try:
        with open(os.path.join(os.path.dirname(__file__), BUILD_ERROR_FILE)) as f:
            return f"{reason}; compiling it failed: {f.read().strip()}"
    except OSError:
        return reason


#: why ``hyperpipe._core`` did not import, or None when it did
CORE_ERROR = _import_error()


def explanation() -> str:
    """What is missing, what it costs and how to fix it (only meaningful when CORE_ERROR is set)."""
    return (
        f"hyperpipe's C core did not load ({CORE_ERROR}), so Pipe() uses the socket transport: "
        f"as fast as multiprocessing.Pipe, not the shared-memory speed. To fix it, {FIX}."
    )


def require_core_if_asked() -> None:
    if CORE_ERROR is not None and os.environ.get(REQUIRE_ENV, "") not in ("", "0"):
        raise ImportError(
            f"hyperpipe's C core did not load ({CORE_ERROR}) and {REQUIRE_ENV} is set. To fix it, {FIX}."
        )


_warned = False
_warn_lock = threading.Lock()


def warn_on_fallback(requested: Optional[str]) -> None:
    """Warn once per process when ``Pipe()`` falls back for want of the C core.

    Not when the socket transport was asked for, by argument or environment.
    """
    global _warned
    if CORE_ERROR is None or _warned or (requested or os.environ.get(TRANSPORT_ENV)) not in (None, "", "auto"):
        return
    with _warn_lock:
        if _warned:
            return
        _warned = True
    # stacklevel 3: the line that called Pipe()
    warnings.warn(explanation(), RuntimeWarning, stacklevel=3)
