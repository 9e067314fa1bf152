"""Pickling for the wire: ``ForkingPickler`` into ``bytes``, never into a view of a BytesIO.

``ForkingPickler.dumps`` returns ``BytesIO.getbuffer()``. On CPython 3.12.0 and 3.12.1 such a
view that ends up in a reference cycle (a traceback's frame holding the pickled message, for
example) crashes the garbage collector (CPython gh-111211). ``getvalue()`` hands over the
BytesIO's own bytes, without a copy when no view of it exists.
"""

from __future__ import annotations

import io
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional


def dumps(obj: Any, protocol: Optional[int] = None) -> bytes:
    """``obj`` pickled as ``multiprocessing`` does (its reducers for connections, fds, ...)."""
    buf = io.BytesIO()
    ForkingPickler(buf, protocol).dump(obj)
    return buf.getvalue()
