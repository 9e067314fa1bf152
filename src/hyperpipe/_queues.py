"""Native queues: ``multiprocessing.queues`` over hyperpipe connections.

The standard library's ``Queue``, ``JoinableQueue`` and ``SimpleQueue`` classes stay the
classes (``ProcessPoolExecutor``'s ``_SafeQueue``, loky and mpire subclass them). What
changes, for a queue whose pipe is a hyperpipe one and only for it, is how items move:

- ``put`` pickles the object (protocol 5, buffers of 64 KiB or more out of band through
  shared memory) and sends it straight from the calling thread while the ring has room and
  nothing of this process is still waiting to go; otherwise it queues the item for a feeder
  thread that sends in order, in batches (per-producer order holds either way). Over shared
  memory the frame goes to the transport directly (a reused C pickler carrying
  ``ForkingPickler``'s reducers), over other transports through ``Connection.send``;
- ``get`` takes the item off the pipe under the read lock and, over shared memory,
  unpickles it once the lock is free, as the standard library does (out-of-band buffers
  arrive without a copy into a bytes object); a Pool task whose pickle names its
  functions up front has them found by name once per run of tasks (``_loads_task``);
- a contended queue lock is retried after a few ``sched_yield()`` before sleeping on it;
- the feeder's flush at exit (unless ``cancel_join_thread()``) runs at ``exitpriority=11``,
  before anything closes a connection at exit (10 and lower), so nothing put is lost;
- a pickled queue carries a marker that applies these patches in the process it arrives in.

A subclass that overrides ``_start_thread``/``_feed`` (its own serialization, e.g. loky's
reducers) keeps the standard library's item path, over hyperpipe connections.
``patch()`` is idempotent; the patched methods fall back to the originals for every other
queue, so nothing changes for queues built on the standard library's pipes.
"""

from __future__ import annotations

import atexit
import copyreg
import errno
import functools
import itertools
import os
import pickle
import sys
import threading
import time
import weakref
from multiprocessing import queues as mpq
from multiprocessing.reduction import ForkingPickler
from multiprocessing.util import Finalize, debug, is_exiting
from queue import Empty, Full
from typing import Any, Callable, Optional

from . import errors
from ._connection import Connection
from ._pipe import Pipe
from ._shm_transport import ShmTransport
from ._transport import PASSED, Deadline

try:
    from ._core import QF_SLOW_PUT, QF_TO_FEEDER, QueueFast
    from ._core import _queue_encode as _encode_plain
except ImportError:  # no C core: no shared memory either, so no queue takes that path
    QueueFast = None  # type: ignore[assignment,misc]

# The standard library's private hooks (_feed, _sentinel, _finalize_*) are not in typeshed.
_Queue: Any = mpq.Queue
_sentinel: Any = getattr(mpq, "_sentinel")

_original: dict[str, Any] = {}
_patch_lock = threading.Lock()

#: classes whose items take the native path (no custom ``_feed``/``_start_thread``)
_native_classes: "weakref.WeakKeyDictionary[type, bool]" = weakref.WeakKeyDictionary()

#: when the feeder's flush runs at exit: before the queue's own close (10, which only
#: tells the feeder to stop) and before connections are closed at exit (10 and lower)
FLUSH_PRIORITY = 11

#: how long put() waits for the queue's write lock and for ring space before it hands the
#: item to the feeder thread: a producer faster than its consumers is slowed to their pace
#: instead of filling a buffer that a second thread then drains under the GIL
DIRECT_WAIT = 0.001

#: how a queue's items move in this process (``_mode``)
NOT_NATIVE, NATIVE, NATIVE_SHM = 0, 1, 2

#: at most this many items go out under one take of the write lock by the feeder thread
FEED_BATCH = 64

#: how many times a process yields the CPU, trying a queue's lock after each, before it
#: sleeps on it
LOCK_YIELDS = 40

#: exceptions of a receive that consumed nothing (anything else happened after the item
#: was taken off the ring, e.g. while unpickling it)
_NOT_CONSUMED = (EOFError, TimeoutError, errors.ConnectionClosedError)


def is_hyperpipe_queue(queue: Any) -> bool:
    """True if ``queue`` (a ``multiprocessing`` queue) moves its items over hyperpipe."""
    return isinstance(getattr(queue, "_writer", None), Connection)


def _native(queue: Any) -> bool:
    """True if ``queue``'s items take the native path in this process."""
    return _mode(queue) != NOT_NATIVE


def _mode(queue: Any) -> int:
    """How this process moves ``queue``'s items: ``NOT_NATIVE`` (the standard library's
    methods), ``NATIVE`` (``Connection.send``/``recv``) or ``NATIVE_SHM`` (the same frames,
    straight to the shared-memory transport). Worked out once per queue and process."""
    try:
        return queue._hp_mode
    except AttributeError:
        pass
    mode = NOT_NATIVE
    if isinstance(queue._writer, Connection):
        cls = type(queue)
        native = _native_classes.get(cls)
        if native is None:
            native = cls._start_thread is _Queue._start_thread and cls._feed is _Queue._feed
            _native_classes[cls] = native
        if native:
            mode = _pipe_mode(queue)
    queue._hp_mode = mode
    return mode


def _pipe_mode(queue: Any) -> int:
    """``NATIVE_SHM`` when the ends of a queue's hyperpipe pipe still open in this process
    are shared-memory ones without a codec (frames go straight to the transport), else
    ``NATIVE``. A closed end does not count: a Pool worker closes the end of each queue it
    does not use before its first ``get``/``put`` (under spawn and forkserver that is when
    the mode is worked out)."""
    ends = [conn for conn in (queue._writer, queue._reader) if conn._transport is not None]
    shm = bool(ends) and all(isinstance(conn._transport, ShmTransport) and conn._codec is None for conn in ends)
    return NATIVE_SHM if shm else NATIVE


# -- building: which queues get hyperpipe pipes ---------------------------------------------

#: decides, from the queue's ``ctx``, whether a queue built on the stdlib's pipe gets ours
_wants_hyperpipe: Callable[[Any], bool] = lambda ctx: False  # noqa: E731


def _use_hyperpipe_pipe(queue: Any, ctx: Any) -> None:
    """Give a queue just built by the standard library a hyperpipe pipe instead of its own."""
    if isinstance(queue._reader, Connection) or not _wants_hyperpipe(ctx):
        return
    queue._reader.close()
    queue._writer.close()
    queue._reader, queue._writer = Pipe(duplex=False)
    queue._poll = queue._reader.poll
    if isinstance(queue, _Queue):
        queue._send_bytes = queue._writer.send_bytes
        queue._recv_bytes = queue._reader.recv_bytes


def _queue_init(self: Any, maxsize: int = 0, *, ctx: Any) -> None:
    _original["Queue.__init__"](self, maxsize, ctx=ctx)
    _use_hyperpipe_pipe(self, ctx)


def _simple_init(self: Any, *, ctx: Any) -> None:
    _original["SimpleQueue.__init__"](self, ctx=ctx)
    _use_hyperpipe_pipe(self, ctx)


# -- travelling: a queue that arrives in another process brings the patches along ---------


class _Arriving:
    """Wraps a queue's reader in its pickled state: unpickling it patches the arriving process."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __reduce__(self) -> tuple:
        return (_arrive, (self.conn,))


def _arrive(conn: Connection) -> Connection:
    patch()
    return conn


def _queue_getstate(self: Any) -> tuple:
    state = _original["Queue.__getstate__"](self)
    if isinstance(self._reader, Connection):
        state = state[:2] + (_Arriving(self._reader),) + state[3:]
    return state


def _simple_getstate(self: Any) -> tuple:
    state = _original["SimpleQueue.__getstate__"](self)
    if isinstance(self._reader, Connection):
        state = (_Arriving(self._reader),) + state[1:]
    return state


# -- Queue / JoinableQueue ------------------------------------------------------------------


def _new_pickler(file: Any, buffer_callback: Callable[[pickle.PickleBuffer], bool]) -> pickle.Pickler:
    """The C pickler (protocol 5) with ``ForkingPickler``'s reducers, as the standard
    library's feeder pickles: as fast as ``pickle.dumps``, where a ``ForkingPickler`` (a
    Python subclass) costs twice as much per item."""
    pickler = pickle.Pickler(file, 5, buffer_callback=buffer_callback)
    dispatch = copyreg.dispatch_table.copy()
    dispatch.update(getattr(ForkingPickler, "_extra_reducers"))
    pickler.dispatch_table = dispatch
    return pickler


class _ItemSender:
    """Sends one queue's items over its writer, for ``put`` and the feeder alike, always
    under the queue's write lock (which serializes every sender of that end). One per queue
    and process.

    Over shared memory it pickles the item itself and hands the frame to the transport:
    with the C pickler carrying ``ForkingPickler``'s reducers (as fast as ``pickle.dumps``;
    a ``ForkingPickler``, a Python subclass, costs twice as much per item), reused. Over
    any other transport: ``Connection.send``."""

    __slots__ = ("_conn", "_shm", "_chunks", "write", "_pickler", "_needs_oob", "_oob_threshold")

    def __init__(self, conn: Connection, mode: int) -> None:
        self._conn = conn
        transport: Any = conn._transport  # a ShmTransport when NATIVE_SHM: its own attributes
        self._shm = mode == NATIVE_SHM and transport is not None
        # the transport's threshold: the same buffers go out of band
        self._oob_threshold = transport._oob_threshold if self._shm else 0
        # The pickler's file: it writes a small pickle with one call at the end of dump()
        # (a big one in 64 KiB frames); a list takes them for less than a BytesIO.
        self._chunks: list[bytes] = []
        self.write = self._chunks.append
        self._reset()

    def _reset(self) -> None:
        self._pickler = _new_pickler(self, self._buffer_callback)
        self._needs_oob = False

    def _buffer_callback(self, buf: pickle.PickleBuffer) -> bool:
        with buf.raw() as raw:
            if raw.nbytes < self._oob_threshold:
                return True  # in band
        self._needs_oob = True  # the transport's own pickling sends it out of band
        return False

    def send(self, obj: Any, deadline: Deadline) -> None:
        """Send ``obj`` by ``deadline`` (None: wait for room); TimeoutError if it was not.
        An unpicklable item raises with nothing sent."""
        transport: Any = self._conn._transport
        if not self._shm or transport is None:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            self._conn.send(obj, timeout=timeout)
            return
        data = _encode_plain(obj)  # a plain item, pickled in C (else None)
        if data is None:
            data = self.dump(obj)
        if data is None:
            transport.send_object(obj, deadline)
        elif len(data) <= transport._inline:
            transport._send(data, deadline)  # send_frame's common case, one call less
        else:
            transport.send_frame(data, deadline)

    def dump(self, obj: Any, memo: Optional[dict] = None) -> Optional[bytes]:
        """``obj``'s pickle (protocol 5), or None when it has buffers to send out of band
        (the transport's own pickling sends those). An unpicklable object raises. ``memo``
        (``Pickler.memo``'s form) names objects the receiver's memo holds already."""
        chunks = self._chunks
        chunks.clear()
        pickler = self._pickler
        pickler.clear_memo()  # a fork in the middle of another thread's dump left it full
        if memo is not None:
            pickler.memo = memo
        self._needs_oob = False
        try:
            pickler.dump(obj)
        except BaseException:
            self._reset()  # a half-written pickler is not reusable
            raise
        finally:
            pickler.clear_memo()  # keep nothing of the caller's alive
        if self._needs_oob:
            chunks.clear()
            return None
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        return data


_STALE = object()  # QueueFast.get's "not done here"


class _Chunks(list):
    """A pickler's output for ``QueueFast``: the pickle's chunks, and a marker after them
    when a buffer is to go out of band (more than one entry: the Python path sends it)."""

    __slots__ = ("write", "_oob_threshold")

    def __init__(self, oob_threshold: int) -> None:
        super().__init__()
        self.write = self.append
        self._oob_threshold = oob_threshold

    def buffer_callback(self, buf: pickle.PickleBuffer) -> bool:
        with buf.raw() as raw:
            if raw.nbytes < self._oob_threshold:
                return True  # in band
        self.append(None)
        return False


def _fast(queue: Any) -> Any:
    """The queue's ``QueueFast`` for this process (put and get in one C call each), or None
    when its items do not go over shared memory here (they take the Python path)."""
    fast = None
    if QueueFast is not None and _mode(queue) == NATIVE_SHM:
        sender = _sender(queue, NATIVE_SHM)  # the Python path's, for what QueueFast hands back
        writer: Any = queue._writer._transport  # ShmTransports, or None when closed here
        reader: Any = queue._reader._transport
        chunks = _Chunks(sender._oob_threshold)
        fast = QueueFast(
            queue._sem, queue._wlock, queue._rlock,
            None if writer is None else writer._ep, None if reader is None else reader._ep,
            queue._reader._recv_lock, _new_pickler(chunks, chunks.buffer_callback), chunks,
            _unpickle, _loads, None if reader is None else functools.partial(_oob_item, reader),
            _NOT_CONSUMED, _STALE, Empty, 0 if writer is None else writer._inline, LOCK_YIELDS, DIRECT_WAIT,
        )
    queue._hp_fast = fast
    return fast


def _sender(queue: Any, mode: int) -> _ItemSender:
    try:
        return queue._hp_sender
    except AttributeError:
        sender = queue._hp_sender = _ItemSender(queue._writer, mode)
        return sender


def _acquire_contended(lock: Any, timeout: Optional[float]) -> bool:
    """Take a queue's cross-process lock that another holds. It is held for about a
    microsecond per item: yielding the CPU a few times usually finds it free, which spares
    this process a sleep in the kernel and the holder a wake-up call when it releases
    (queue items 4 -> 4 on 2 cores: 0.7 -> 1.0 M items/s in one interleaved run)."""
    # A yield can last a time slice of another process on a busy machine: the timeout bounds
    # the yielding too.
    deadline = None if timeout is None else time.monotonic() + timeout
    for _ in range(LOCK_YIELDS):
        os.sched_yield()
        if lock.acquire(False):
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
    return lock.acquire(True, None if deadline is None else max(0.0, deadline - time.monotonic()))


def _put_item(queue: Any, obj: Any, mode: int) -> None:
    """Send ``obj`` now if the ring has room and nothing of ours is queued; else queue it for
    the feeder. The caller has taken one count of ``queue._sem``."""
    # The feeder takes an item off the buffer only once it is sent, so an empty buffer means
    # everything this thread put before is out (a deque's truth needs no lock under the GIL).
    if not queue._buffer:
        wlock = queue._wlock
        if wlock.acquire(False) or _acquire_contended(wlock, DIRECT_WAIT):
            try:
                try:
                    sender = queue._hp_sender
                except AttributeError:
                    sender = _sender(queue, mode)
                try:
                    sender.send(obj, PASSED)
                except TimeoutError:  # no room right now: no clock read unless so
                    sender.send(obj, time.monotonic() + DIRECT_WAIT)
                return
            except TimeoutError:
                pass  # the ring stays full (or another thread is sending): the feeder waits
            except Exception as exc:
                _send_failed(queue._ignore_epipe, queue._on_queue_feeder_error, queue._sem, exc, obj)
                return
            finally:
                wlock.release()
    _to_feeder(queue, obj)


def _to_feeder(queue: Any, obj: Any) -> None:
    """Queue ``obj`` (its place taken) for the feeder thread, starting it if needed."""
    notempty = queue._notempty
    notempty.acquire()  # the lock's C method: ``with`` costs two Python frames per item
    try:
        if queue._thread is None:
            _start_feeder(queue)
        queue._buffer.append(obj)
        if notempty._waiters:  # the feeder sleeps (notify() alone costs a lock probe)
            notempty.notify()
    finally:
        notempty.release()


def _send_failed(ignore_epipe: bool, onerror: Any, sem: Any, exc: Exception, obj: Any) -> None:
    """What the standard library's feeder does when sending an item failed."""
    if ignore_epipe and getattr(exc, "errno", 0) == errno.EPIPE:
        return
    # The item was not sent: as if it had been taken off the queue (the stdlib's choice).
    sem.release()
    onerror(exc, obj)


def _reserve(queue: Any, block: bool, timeout: Optional[float]) -> None:
    """Take the item's place in the queue, as the standard library's ``put`` does."""
    if queue._closed:
        raise ValueError(f"Queue {queue!r} is closed")
    if not queue._sem.acquire(block, timeout):
        raise Full


def _queue_put(self: Any, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
    try:
        fast = self._hp_fast
    except AttributeError:
        fast = _fast(self)
    if fast is not None and not self._closed:
        if self._buffer:  # items of this process wait for the feeder: this one goes after them
            if not self._sem.acquire(block, timeout):
                raise Full
            _to_feeder(self, obj)
            return
        # The common case in one C call: the item's place, the write lock, pickle, ring.
        done = fast.put(obj)
        if done is None:
            return
        if done == QF_TO_FEEDER:
            _to_feeder(self, obj)
            return
        if done == QF_SLOW_PUT:
            _put_item(self, obj, NATIVE_SHM)
            return
        if fast.stale:
            del self._hp_fast  # forked since, or its pickler failed: built anew next time
    try:
        mode = self._hp_mode
    except AttributeError:
        mode = _mode(self)
    if not mode:
        return _original["Queue.put"](self, obj, block, timeout)
    # _reserve, inlined: one call less per item
    if self._closed:
        raise ValueError(f"Queue {self!r} is closed")
    if not self._sem.acquire(block, timeout):
        raise Full
    _put_item(self, obj, mode)


def _joinable_put(self: Any, obj: Any, block: bool = True, timeout: Optional[float] = None) -> None:
    mode = _mode(self)
    if not mode:
        return _original["JoinableQueue.put"](self, obj, block, timeout)
    _reserve(self, block, timeout)
    # Counted before it can be received, so a consumer's task_done() never runs ahead.
    with self._cond:
        self._unfinished_tasks.release()
    _put_item(self, obj, mode)


def _queue_get(self: Any, block: bool = True, timeout: Optional[float] = None) -> Any:
    try:
        fast = self._hp_fast
    except AttributeError:
        fast = _fast(self)
    if fast is not None and not self._closed:
        item = fast.get(block, timeout)  # the read lock, the ring, the place freed, unpickled: one C call
        if item is not _STALE:
            return item
        if fast.stale:
            del self._hp_fast  # forked since: built anew next time
    try:
        mode = self._hp_mode
    except AttributeError:
        mode = _mode(self)
    if not mode:
        return _original["Queue.get"](self, block, timeout)
    if self._closed:
        raise ValueError(f"Queue {self!r} is closed")
    # acquire/release: the lock's own C methods (``with`` goes through two Python frames)
    rlock = self._rlock
    if block and timeout is None:
        if not rlock.acquire(False):
            _acquire_contended(rlock, None)
        deadline = None
    else:
        deadline = time.monotonic() + max(0.0, timeout or 0.0) if block else PASSED
        if not rlock.acquire(block, timeout):
            raise Empty
    try:
        item = _receive(self._reader, mode, deadline)
    except TimeoutError:
        raise Empty from None
    except _NOT_CONSUMED:
        raise
    except Exception:
        self._sem.release()  # taken off the ring, then found corrupt or unpicklable: it is gone
        raise
    finally:
        rlock.release()
    # Its place is freed and, over shared memory, it is unpickled once the lock is free, as
    # the standard library does: the next consumer receives meanwhile.
    self._sem.release()
    if mode != NATIVE_SHM:
        return item
    if type(item) is bytes:  # the common case, without a call to _loads
        return _unpickle(item)
    return _loads(item)


def _receive(conn: Connection, mode: int, deadline: Deadline) -> Any:
    """One item of a queue's reader, by ``deadline``. Over shared memory: its frame, for
    ``_loads`` (once the queue's read lock is free; the caller frees the item's place); otherwise: the object."""
    transport: Any = conn._transport  # a ShmTransport when NATIVE_SHM: its own attributes
    if mode == NATIVE_SHM and transport is not None:
        # Connection.recv minus its checks (a queue's reader is readable and has no
        # codec); its lock still keeps empty()'s poll in another thread apart.
        lock = conn._recv_lock
        lock.acquire()
        try:
            frame = transport._recv(None, deadline)
            return frame if type(frame) is bytes else _oob_item(transport, frame)
        finally:
            lock.release()
    return conn.recv(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))


def _oob_item(transport: Any, frame: tuple) -> tuple:
    """The item of an out-of-band frame, for ``_loads``: its buffers checked and mapped as
    the item's own (called under the reader's lock)."""
    return (frame[1], *transport._open_oob(frame, readonly=False))


_unpickle = ForkingPickler.loads

#: STACK_GLOBAL, MEMOIZE, POP: a function named into the unpickler's memo, off its stack
#: (``_pool._TaskSender`` starts a Pool task's pickle with one such name per function)
MEMOIZE_POP = b"\x93\x940"

#: a task pickle longer than this is unpickled as it is (the fast path copies it once)
TASK_FRONT_MAX = 2048


class _TaskFront:
    """The front of the last Pool task pickle a worker took (PROTO 5, then per function
    its module and name as SHORT_BINUNICODE, MEMOIZE_POP) and the functions it names."""

    __slots__ = ("front", "length", "names", "functions", "stand_in")

    def __init__(self, front: bytes, names: tuple, functions: tuple) -> None:
        self.front = front
        self.length = len(front)
        self.names = names  # (module, name, function) per function
        self.functions = functions
        # the same memo, filled from ``buffers=`` instead of by name: NEXT_BUFFER, MEMOIZE, POP
        self.stand_in = b"\x80\x05" + b"\x97\x940" * len(functions)


_task_front: Optional[_TaskFront] = None
_modules = sys.modules
_audit = sys.audit


def _learn_task_front(data: bytes) -> Optional[_TaskFront]:
    """The ``_TaskFront`` ``data`` starts with, its functions as this process's modules
    bind them now; None if it starts otherwise or a name does not lead to a function here
    yet (pickle imports the module)."""
    global _task_front
    if not data.startswith(b"\x80\x05"):  # the stand-in's PROTO
        return None
    names = []
    pos = 2
    try:
        while data[pos] == 0x8C:
            pair = []
            for _ in range(2):  # its module, its name
                if data[pos] != 0x8C:
                    return None
                end = pos + 2 + data[pos + 1]
                if end > len(data):
                    return None
                pair.append(data[pos + 2:end].decode("utf-8", "surrogatepass"))  # as pickle does
                pos = end
            if data[pos:pos + 3] != MEMOIZE_POP or "." in pair[1]:
                return None
            pos += 3
            function = getattr(sys.modules.get(pair[0]), pair[1], None)
            if function is None:
                return None
            names.append((pair[0], pair[1], function))
    except Exception:  # noqa: BLE001 - out of bounds, not UTF-8, a module's __getattr__: pickle's own outcome
        return None
    if not names:
        return None
    front = _task_front = _TaskFront(data[:pos], tuple(names), tuple(fn for _, _, fn in names))
    return front


def _loads_task(data: bytes) -> Any:
    """``pickle.loads(data)`` for a bytes item whose pickle may start with a task front:
    the functions it names are found by name once per front, then per task only checked
    (pickle's lookup, ``getattr`` of the module in ``sys.modules``, must still give that
    very function, and its audit event is raised), and the rest is unpickled with them
    standing in the memo (``NEXT_BUFFER`` of ``buffers=``) instead of found by name."""
    front = _task_front
    if len(data) > TASK_FRONT_MAX:
        return _unpickle(data)
    if front is None or not data.startswith(front.front):
        front = _learn_task_front(data)
        if front is None:
            return _unpickle(data)
    modules = _modules
    try:
        for module, name, function in front.names:
            if getattr(modules.get(module), name, None) is not function:  # rebound since
                front = _learn_task_front(data)
                if front is None:
                    return _unpickle(data)
                break
    except Exception:  # noqa: BLE001 - a module's __getattr__ raised: pickle's own outcome
        return _unpickle(data)
    for module, name, _ in front.names:
        _audit("pickle.find_class", module, name)
    try:
        return _unpickle(front.stand_in + data[front.length:], buffers=front.functions)
    except pickle.UnpicklingError as exc:
        if exc.args == _OUT_OF_BUFFERS:  # the rest asks for a buffer of its own
            raise pickle.UnpicklingError(*_NO_BUFFERS) from None  # as pickle.loads(data) does
        raise


def _pickle_error(**kwargs: Any) -> tuple:
    """The arguments of pickle's error for a pickle asking for one buffer (NEXT_BUFFER)."""
    try:
        _unpickle(b"\x80\x05\x97.", **kwargs)
    except pickle.UnpicklingError as exc:
        return exc.args
    return ()


_NO_BUFFERS = _pickle_error()
_OUT_OF_BUFFERS = _pickle_error(buffers=())


def _loads(item: Any) -> Any:
    """The object of a frame ``_receive`` took over shared memory."""
    if type(item) is bytes:
        return _unpickle(item)
    flags, stream, buffers = item
    if not stream:
        return _unpickle(buffers[0])  # a pickle too big for the ring, sent as raw bytes
    return ShmTransport._loads(flags, stream, buffers)  # a pickle, or a plain array's description


def _queue_close(self: Any) -> None:
    if _native(self) and self._close is None and hasattr(self, "_hp_sender"):
        # Everything went out directly (no feeder to close the ends, as the stdlib's does).
        self._closed = True
        self._reader.close()
        self._writer.close()
        return
    _original["Queue.close"](self)


def _start_feeder(queue: Any) -> None:
    """The standard library's ``_start_thread`` with our feeder and an earlier flush at exit."""
    debug("Queue._start_thread() (hyperpipe)")
    fast = _fast(queue)  # this process's (a feeder starts in the process that puts)
    queue._thread = threading.Thread(
        target=_feed,
        args=(queue._buffer, queue._notempty, _sender(queue, _mode(queue)).send, queue._wlock,
              queue._reader.close, queue._writer.close, queue._ignore_epipe,
              queue._on_queue_feeder_error, queue._sem, None if fast is None else fast.feed),
        name="QueueFeederThread",
        daemon=True,
    )
    try:
        queue._thread.start()
    except BaseException:
        queue._thread = None  # gh-109047: no thread during interpreter finalization
        raise
    if not queue._joincancelled:
        queue._jointhread = Finalize(queue._thread, _finalize_flush,
                                     [queue._buffer, queue._notempty, weakref.ref(queue._thread)],
                                     exitpriority=FLUSH_PRIORITY)
        _flush_first_at_exit(queue._jointhread)
    queue._close = Finalize(queue, _Queue._finalize_close, [queue._buffer, queue._notempty],
                            exitpriority=10)


_flushes: "weakref.WeakSet[Finalize]" = weakref.WeakSet()
_flush_hook_pid: Optional[int] = None


def _flush_first_at_exit(flush: Finalize) -> None:
    """Also run ``flush`` from an atexit hook registered after hyperpipe's own: atexit hooks
    run before multiprocessing's finalizers (in Python 3.12+ children too), and one that
    closed the connections first would cut the flush short."""
    global _flush_hook_pid
    _flushes.add(flush)
    if _flush_hook_pid != os.getpid():  # a forked child starts with no atexit hooks of ours
        _flush_hook_pid = os.getpid()
        atexit.register(_flush_all)


def _flush_all() -> None:
    for flush in list(_flushes):
        flush()  # a Finalize runs once: the registry's call later does nothing


def _finalize_flush(buffer: Any, notempty: Any, thread_ref: Any) -> None:
    """Let the feeder send what it holds, then end it: at exit (before any connection is
    closed) and from ``join_thread()``."""
    _Queue._finalize_close(buffer, notempty)
    _Queue._finalize_join(thread_ref)


def _feed(buffer: Any, notempty: Any, send: Any, wlock: Any, reader_close: Any, writer_close: Any,
          ignore_epipe: bool, onerror: Any, sem: Any, feed: Optional[Callable[[list, int, Any], int]]) -> None:
    """Send the buffered items in order, up to ``FEED_BATCH`` under one take of the write
    lock: plain items by ``feed`` (``QueueFast.feed``, when the queue has one), the others by
    ``send``. An item leaves the buffer only once it is sent, so ``put`` sends directly
    only when nothing is waiting here (order per producer)."""
    debug("starting thread to feed data to pipe")
    sentinel = _sentinel
    while True:
        with notempty:
            while not buffer:
                notempty.wait()
            batch = list(itertools.islice(buffer, FEED_BATCH))
        if batch[0] is sentinel:
            debug("feeder thread got sentinel -- exiting")
            reader_close()
            writer_close()
            return
        sent = 0
        try:
            if not wlock.acquire(False):
                _acquire_contended(wlock, None)
            try:
                while sent < len(batch):
                    if feed is not None:
                        sent = feed(batch, sent, sentinel)  # the plain items, in C
                        if sent == len(batch):
                            break
                    if batch[sent] is sentinel:
                        break
                    send(batch[sent], None)
                    sent += 1
            finally:
                wlock.release()
        except Exception as exc:
            if ignore_epipe and getattr(exc, "errno", 0) == errno.EPIPE:
                return
            if is_exiting():
                debug("error in queue thread: %s", exc)
                return
            with notempty:
                for _ in range(sent + 1):
                    buffer.popleft()
            _send_failed(False, onerror, sem, exc, batch[sent])  # in the except: it prints exc
            continue
        with notempty:
            for _ in range(sent):
                buffer.popleft()


# -- SimpleQueue ----------------------------------------------------------------------------


def _simple_mode(queue: Any) -> int:
    """``_mode`` for a SimpleQueue (no feeder to override: only its pipe decides)."""
    mode = _pipe_mode(queue) if isinstance(queue._writer, Connection) else NOT_NATIVE
    queue._hp_mode = mode
    return mode


def _simple_put(self: Any, obj: Any) -> None:
    try:
        mode = self._hp_mode
    except AttributeError:
        mode = _simple_mode(self)
    if not mode:
        return _original["SimpleQueue.put"](self, obj)
    wlock = self._wlock
    if not wlock.acquire(False):
        _acquire_contended(wlock, None)
    try:
        try:
            sender = self._hp_sender
        except AttributeError:
            sender = _sender(self, mode)
        sender.send(obj, None)
    finally:
        wlock.release()


def _simple_get(self: Any) -> Any:
    try:
        mode = self._hp_mode
    except AttributeError:
        mode = _simple_mode(self)
    if not mode:
        return _original["SimpleQueue.get"](self)
    rlock = self._rlock
    if not rlock.acquire(False):
        _acquire_contended(rlock, None)
    try:
        item = _receive(self._reader, mode, None)
    finally:
        rlock.release()
    # unpickled once the lock is free, as the standard library does
    if mode != NATIVE_SHM:
        return item
    if type(item) is bytes:
        # a Pool's task starts with PROTO 5 and a function's module name (no FRAME)
        return _loads_task(item) if item[2:3] == b"\x8c" else _unpickle(item)
    return _loads(item)


_PATCHES: dict[tuple[type, str], Callable[..., Any]] = {
    (mpq.Queue, "__init__"): _queue_init,
    (mpq.Queue, "__getstate__"): _queue_getstate,
    (mpq.Queue, "put"): _queue_put,
    (mpq.Queue, "get"): _queue_get,
    (mpq.Queue, "close"): _queue_close,
    (mpq.JoinableQueue, "put"): _joinable_put,
    (mpq.SimpleQueue, "__init__"): _simple_init,
    (mpq.SimpleQueue, "__getstate__"): _simple_getstate,
    (mpq.SimpleQueue, "put"): _simple_put,
    (mpq.SimpleQueue, "get"): _simple_get,
}


def patch() -> None:
    """Patch ``multiprocessing.queues`` (idempotent). Only queues over hyperpipe pipes change."""
    with _patch_lock:
        if not _original:
            patch_methods(_PATCHES, _original)


def patch_methods(patches: dict[tuple[type, str], Callable[..., Any]], original: dict[str, Any]) -> None:
    """Put each function of ``patches`` in its class as that method, keeping the method it
    replaces in ``original`` under ``"Class.name"``."""
    for (cls, name), function in patches.items():
        replaced = cls.__dict__[name]
        function.__name__ = name
        function.__qualname__ = f"{cls.__name__}.{name}"
        function.__doc__ = replaced.__doc__
        function.__wrapped__ = replaced  # type: ignore[attr-defined]
        original[f"{cls.__name__}.{name}"] = replaced
        setattr(cls, name, function)


def set_pipe_policy(wants_hyperpipe: Callable[[Any], bool]) -> None:
    """Which queues built from now on get a hyperpipe pipe, decided from their ``ctx``."""
    global _wants_hyperpipe
    _wants_hyperpipe = wants_hyperpipe
