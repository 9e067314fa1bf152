/* _core.c - the one binding file: Python objects around csrc/hp_endpoint.c.
 *
 * Owns: the Endpoint type, buffer protocol access, GIL release around every wait,
 * and errno/status -> exception mapping. The exception classes are hyperpipe's own,
 * handed over once by _shm_transport via _set_errors().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "hp_copy.h"
#include "hp_endpoint.h"
#include "hp_sockio.h"

#include <errno.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

enum { KIND_DATA = 1, KIND_OOB = 2 }; /* frame kinds (_shm_transport) */

/* A KIND_OOB frame's payload (_shm_transport's module docstring): the head <QQqI> (size,
 * block size, heap offset or OOB_MEMFD, buffer count), then one span <QQ> (offset, size)
 * per buffer and one for the pickle stream (offset OOB_INLINE: it follows in the frame). */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the frame layout is read as little-endian"
#endif
enum { FLAG_SHARED = 1, OOB_HEAD_SIZE = 28, OOB_SPAN_SIZE = 16 };
#define OOB_INLINE UINT64_MAX
#define OOB_MEMFD (-1)

typedef struct {
    uint64_t size, total, nbuf, stream_at, stream_len, end;
    int64_t base;
    const unsigned char *spans; /* nbuf (offset, size) pairs, unaligned */
} oob_layout;

static inline uint64_t load_u64(const unsigned char *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}


/* The Connection methods an endpoint can do in C (Endpoint_send_bytes and below). */
enum { FAST_SEND, FAST_RECV, FAST_SEND_MANY, FAST_RECV_MANY, FAST_NMETHODS };
static const char *const fast_names[FAST_NMETHODS] = {"send_bytes", "recv_bytes", "send_bytes_many",
                                                      "recv_bytes_many"};

static PyObject *Err_Timeout, *Err_Closed, *Err_PeerClosed, *Err_BrokenPipe, *Err_Protocol,
    *Err_TooLong, *Err_BufferTooShort;

/* A mapping of one heap region (hp_heap.h). Outlives the Endpoint while blocks use it. */
typedef struct {
    PyObject_HEAD
    hp_heap heap;
    pid_t pid; /* blocks free their granules only in the process that received them */
} HeapMapObject;

/* A block of a heap: a buffer exporter holding one reference to the block (hp_heap.h),
 * dropped when it dies. Received blocks are views of the peer's heap; writable blocks of
 * our own heap come from allocate_buffer. */
typedef struct {
    PyObject_HEAD
    HeapMapObject *map;
    uint64_t offset, nbytes;
    int readonly;
} HeapBlockObject;

typedef struct {
    PyObject_HEAD
    hp_endpoint ep;
    int opened;
    int release_pending; /* closed while a call was inside: the last to leave releases */
    int in_recv; /* a thread waits in hp_recv_wait with the GIL released (see fileno) */
    int in_send; /* a thread is in hp_send with the GIL released (see Endpoint_send_bytes) */
    /* the Connection's hot methods (Endpoint_send_bytes): */
    PyObject *conn_ref;              /* weakref.ref to the Connection */
    PyObject *slow[FAST_NMETHODS];   /* the Connection's own methods (functions) */
    uint64_t inline_max;             /* bigger payloads go out of band: the slow way */
    char sending, receiving;         /* the Connection may still send / receive */
    HeapMapObject *tx_heap, *rx_heap; /* mapped on first use */
    uint64_t heap_received;           /* messages received in a block of the peer's heap */
} EndpointObject;

static PyTypeObject HeapMapType, HeapBlockType;

static void HeapMap_dealloc(HeapMapObject *self) {
    hp_heap_unmap(&self->heap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static void HeapBlock_dealloc(HeapBlockObject *self) {
    if (self->map) {
        if (self->map->pid == getpid()) hp_heap_release(&self->map->heap, self->offset);
        Py_DECREF(self->map);
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int HeapBlock_getbuffer(HeapBlockObject *self, Py_buffer *view, int flags) {
    return PyBuffer_FillInfo(view, (PyObject *)self, self->map->heap.data + self->offset,
                             (Py_ssize_t)self->nbytes, self->readonly, flags);
}

static Py_ssize_t HeapBlock_len(HeapBlockObject *self) { return (Py_ssize_t)self->nbytes; }

static PyBufferProcs HeapBlock_as_buffer = {(getbufferproc)HeapBlock_getbuffer, NULL};
static PySequenceMethods HeapBlock_as_sequence = {.sq_length = (lenfunc)HeapBlock_len};

static PyTypeObject HeapMapType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hyperpipe._core.HeapMap",
    .tp_basicsize = sizeof(HeapMapObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A mapping of one heap region of a pipe's segment.",
    .tp_dealloc = (destructor)HeapMap_dealloc,
};

static PyTypeObject HeapBlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hyperpipe._core.HeapBlock",
    .tp_basicsize = sizeof(HeapBlockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A received buffer in the pipe's shared heap; freed when the last view dies.",
    .tp_dealloc = (destructor)HeapBlock_dealloc,
    .tp_as_buffer = &HeapBlock_as_buffer,
    .tp_as_sequence = &HeapBlock_as_sequence,
};

static int64_t to_deadline_ns(PyObject *deadline, int *ok) {
    *ok = 1;
    if (deadline == NULL || deadline == Py_None) return -1;
    double d = PyFloat_AsDouble(deadline);
    if (d == -1.0 && PyErr_Occurred()) {
        *ok = 0;
        return 0;
    }
    if (d <= 0) return 1; /* already passed: do not wait, but not "no limit" */
    if (d > 9.0e9) return -1;
    return (int64_t)(d * 1e9);
}

/* Set the Python exception for an hp status of `self`; returns NULL for convenience. */
static PyObject *raise_status(EndpointObject *self, int rc) {
    switch (rc) {
    case HP_TIMEOUT: PyErr_SetNone(Err_Timeout ? Err_Timeout : PyExc_TimeoutError); break;
    case HP_CLOSED: PyErr_SetString(Err_Closed ? Err_Closed : PyExc_OSError, "handle is closed"); break;
    case HP_EOF: PyErr_SetNone(Err_PeerClosed ? Err_PeerClosed : PyExc_EOFError); break;
    case HP_EPIPE: PyErr_SetNone(Err_BrokenPipe ? Err_BrokenPipe : PyExc_BrokenPipeError); break;
    case HP_ECORRUPT: {
        const char *why = atomic_load_explicit(&self->ep.corrupt, memory_order_relaxed);
        PyErr_Format(Err_Protocol ? Err_Protocol : PyExc_OSError,
                     "shared-memory connection unusable: %s", why ? why : "corrupt frame");
        break;
    }
    case HP_ETOOBIG: PyErr_SetString(PyExc_ValueError, "frame too large for the ring"); break;
    default: PyErr_SetFromErrno(PyExc_OSError); break;
    }
    return NULL;
}

/* OSError(errnum, "what: strerror"), with its errno attribute, as the stdlib raises them. */
static PyObject *raise_oserror(int errnum, const char *what) {
    PyObject *e = PyObject_CallFunction(PyExc_OSError, "is", errnum, what);
    if (e) {
        PyObject *msg = PyUnicode_FromFormat("%s: %s", what, strerror(errnum));
        if (msg) PyObject_SetAttrString(e, "strerror", msg);
        Py_XDECREF(msg);
        PyErr_SetObject((PyObject *)Py_TYPE(e), e);
        Py_DECREF(e);
    }
    return NULL;
}

static int check_open(EndpointObject *self) {
    if (!self->opened || !hp_enter(&self->ep)) {
        raise_status(self, HP_CLOSED);
        return 0;
    }
    return 1;
}

/* Leave a call (hp_leave). The last call out of an endpoint closed while it was inside
 * releases it. Calls enter, leave and close with the GIL held, so this needs no more. */
static void leave(EndpointObject *self) {
    hp_leave(&self->ep);
    if (self->release_pending && atomic_load(&self->ep.active) == 0) {
        self->release_pending = 0;
        hp_endpoint_release(&self->ep);
    }
}

/* check_open plus the direction: 'r' needs the incoming ring, 'w' the outgoing one. */
static int check_dir(EndpointObject *self, char dir) {
    if (!check_open(self)) return 0;
    if (dir == 'r' ? self->ep.has_rx : self->ep.has_tx) return 1;
    leave(self);
    PyErr_SetString(PyExc_OSError, dir == 'r' ? "connection is write-only" : "connection is read-only");
    return 0;
}

/* -- construction ----------------------------------------------------------------- */

static int Endpoint_init(EndpointObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"memfd", "sock", "rx_efd", "tx_efd", "rx_index", "tx_index", NULL};
    int memfd, sock, rx_efd, tx_efd, rx_index, tx_index;
    if (self->opened) {
        PyErr_SetString(PyExc_RuntimeError, "Endpoint already initialised");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "iiiiii", kwlist, &memfd, &sock, &rx_efd, &tx_efd,
                                     &rx_index, &tx_index))
        return -1;
    const char *err = NULL;
    if (hp_endpoint_open(&self->ep, memfd, sock, rx_efd, tx_efd, rx_index, tx_index, &err) < 0) {
        if (err) PyErr_SetString(Err_Protocol ? Err_Protocol : PyExc_ValueError, err);
        else PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->opened = 1;
    return 0;
}

static void Endpoint_dealloc(EndpointObject *self) {
    Py_CLEAR(self->conn_ref);
    for (int i = 0; i < FAST_NMETHODS; i++) Py_CLEAR(self->slow[i]);
    Py_CLEAR(self->tx_heap);
    Py_CLEAR(self->rx_heap);
    if (self->opened || self->release_pending) { /* pending: forked while a call was inside */
        hp_endpoint_shutdown(&self->ep);
        hp_endpoint_release(&self->ep);
        self->opened = self->release_pending = 0;
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Endpoint_configure(EndpointObject *self, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"spin_ns", "max_inflight_bytes", "max_inflight_fds", NULL};
    long long spin = -1, bytes = -1, fds = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|LLL", kwlist, &spin, &bytes, &fds)) return NULL;
    if (spin >= 0) {
        self->ep.spin_max_ns = (uint64_t)spin;
        self->ep.spin_min_ns = (uint64_t)(spin < 2000 ? spin : 2000);
        self->ep.spin_ns = (uint64_t)spin;
    }
    if (bytes > 0) self->ep.max_inflight_bytes = (uint64_t)bytes;
    if (fds > 0) self->ep.max_inflight_msgs = (uint64_t)fds;
    Py_RETURN_NONE;
}

/* Returns an hp status, or -1 with a Python exception set (a signal handler raised). */
static int wait_frame(EndpointObject *self, int64_t deadline, hp_frame *frame) {
    int rc;
    if (hp_ring_readable(&self->ep.rx) || deadline == 1)
        return hp_recv_wait(&self->ep, deadline == 1 ? 0 : deadline, frame);
    for (;;) {
        self->in_recv = 1; /* both written with the GIL held */
        Py_BEGIN_ALLOW_THREADS
        rc = hp_recv_wait(&self->ep, deadline, frame);
        Py_END_ALLOW_THREADS
        self->in_recv = 0;
        if (rc != HP_EINTR) return rc;
        if (PyErr_CheckSignals() < 0) return -1; /* e.g. KeyboardInterrupt */
    }
}

/* hp_send with the GIL released, running signal handlers between sleeps. */
static int send_blocking(EndpointObject *self, uint8_t kind, uint16_t flags, const void *const *parts,
                         const uint64_t *lens, int nparts, const int *fds, int nfds,
                         uint64_t oob_bytes, int64_t deadline) {
    int rc;
    for (;;) {
        self->in_send = 1; /* both written with the GIL held */
        Py_BEGIN_ALLOW_THREADS
        rc = hp_send(&self->ep, kind, flags, parts, lens, nparts, fds, nfds, oob_bytes, deadline);
        Py_END_ALLOW_THREADS
        self->in_send = 0;
        if (rc != HP_EINTR) return rc;
        if (PyErr_CheckSignals() < 0) return -1;
    }
}

/* -- sending ---------------------------------------------------------------------- */

static PyObject *Endpoint_send(EndpointObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "send(data, deadline=None)");
        return NULL;
    }
    int ok;
    int64_t deadline = to_deadline_ns(nargs > 1 ? args[1] : NULL, &ok);
    if (!ok) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0) return NULL;
    if (!check_dir(self, 'w')) {
        PyBuffer_Release(&view);
        return NULL;
    }
    const void *parts[1] = {view.buf};
    uint64_t lens[1] = {(uint64_t)view.len};
    int rc = hp_try_send(&self->ep, KIND_DATA, 0, parts, lens, 1);
    if (rc == HP_TIMEOUT && deadline != 1) {
        rc = send_blocking(self, KIND_DATA, 0, parts, lens, 1, NULL, 0, 0, deadline);
    }
    leave(self);
    PyBuffer_Release(&view);
    if (rc == -1) return NULL;
    if (rc != HP_OK) return raise_status(self, rc);
    Py_RETURN_NONE;
}

/* send_many(frames, deadline): every frame inline, in order; stops at the first error
 * (frames before it were sent). Returns the number sent. */
static PyObject *Endpoint_send_many(EndpointObject *self, PyObject *args) {
    PyObject *seq, *deadline_obj = Py_None;
    if (!PyArg_ParseTuple(args, "O|O", &seq, &deadline_obj)) return NULL;
    int ok;
    int64_t deadline = to_deadline_ns(deadline_obj, &ok);
    if (!ok) return NULL;
    PyObject *fast = PySequence_Fast(seq, "send_many() needs a sequence of buffers");
    if (!fast) return NULL;
    if (!check_dir(self, 'w')) {
        Py_DECREF(fast);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), i;
    int rc = HP_OK;
    for (i = 0; i < n && rc == HP_OK; i++) {
        Py_buffer view;
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, i), &view, PyBUF_SIMPLE) < 0) {
            rc = -1;
            break;
        }
        const void *parts[1] = {view.buf};
        uint64_t lens[1] = {(uint64_t)view.len};
        rc = hp_try_send(&self->ep, KIND_DATA, 0, parts, lens, 1);
        if (rc == HP_TIMEOUT && deadline != 1) {
            rc = send_blocking(self, KIND_DATA, 0, parts, lens, 1, NULL, 0, 0, deadline);
        }
        PyBuffer_Release(&view);
        if (rc != HP_OK) break;
    }
    leave(self);
    Py_DECREF(fast);
    if (rc == -1) return NULL;
    if (rc != HP_OK) return raise_status(self, rc);
    return PyLong_FromSsize_t(i);
}

/* send_parts(kind, flags, head, body, fds, oob_bytes, deadline): one frame whose payload
 * is head + body (body may be None), preceded on the socket by fds. */
static PyObject *Endpoint_send_parts(EndpointObject *self, PyObject *args) {
    int kind, flags;
    Py_buffer head, body = {0};
    PyObject *body_obj, *fds_obj, *deadline_obj;
    unsigned long long oob_bytes;
    if (!PyArg_ParseTuple(args, "iiy*OOKO", &kind, &flags, &head, &body_obj, &fds_obj, &oob_bytes, &deadline_obj))
        return NULL;
    int ok, fds[HP_MAX_FDS], nfds = 0, have_body = 0;
    PyObject *ret = NULL;
    int64_t deadline = to_deadline_ns(deadline_obj, &ok);
    if (!ok) goto done;
    if (kind < 1 || kind > 254) {
        PyErr_SetString(PyExc_ValueError, "bad frame kind");
        goto done;
    }
    if (body_obj != Py_None) {
        if (PyObject_GetBuffer(body_obj, &body, PyBUF_SIMPLE) < 0) goto done;
        have_body = 1;
    }
    PyObject *fast = PySequence_Fast(fds_obj, "fds must be a sequence");
    if (!fast) goto done;
    nfds = (int)PySequence_Fast_GET_SIZE(fast);
    if (nfds > HP_MAX_FDS) {
        Py_DECREF(fast);
        PyErr_SetString(PyExc_ValueError, "too many fds for one frame");
        goto done;
    }
    for (int i = 0; i < nfds; i++) fds[i] = (int)PyLong_AsLong(PySequence_Fast_GET_ITEM(fast, i));
    Py_DECREF(fast);
    if (PyErr_Occurred()) goto done;
    if (!check_dir(self, 'w')) goto done;
    const void *parts[2] = {head.buf, have_body ? body.buf : NULL};
    uint64_t lens[2] = {(uint64_t)head.len, have_body ? (uint64_t)body.len : 0};
    int rc;
    rc = send_blocking(self, (uint8_t)kind, (uint16_t)flags, parts, lens, 2, fds, nfds, oob_bytes,
                       deadline);
    leave(self);
    if (rc == HP_OK) ret = Py_NewRef(Py_None);
    else if (rc != -1) raise_status(self, rc);
done:
    PyBuffer_Release(&head);
    if (have_body) PyBuffer_Release(&body);
    return ret;
}

/* -- receiving -------------------------------------------------------------------- */

/* Wait for a frame with the GIL released only when one is not already there. */
/* Non-DATA frames start with their logical size (u64): what maxlength is checked
 * against, and what counts toward the in-flight byte cap. */
static uint64_t frame_logical_size(const hp_frame *f) {
    uint64_t n = 0;
    if (f->kind != KIND_DATA && f->len >= 8) memcpy(&n, f->payload, 8);
    return n;
}

static uint64_t frame_oob_bytes(const hp_frame *f) { return frame_logical_size(f); }

/* A non-DATA frame -> (kind, flags, payload, [fds]); consumes it. */
static PyObject *special_frame(EndpointObject *self, hp_frame *frame) {
    int fds[HP_MAX_FDS]; /* hp_recv_peek checked nfds <= HP_MAX_FDS */
    if (frame->len < 8) return raise_status(self, hp_corrupt(&self->ep, "a frame is too short for its kind"));
    if (frame->nfds && !hp_fd_slots_free(&self->ep, frame->nfds)) {
        int err = errno;
        hp_reader_exit(&self->ep); /* not consumed: the frame and its descriptors wait */
        if (err != EMFILE && err != ENFILE) {
            errno = err;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        return raise_oserror(err, "no free descriptor to receive an out-of-band buffer; the message "
                                  "stays queued: close some descriptors and receive again");
    }
    int rc = frame->nfds ? hp_take_fds(&self->ep, frame->nfds, fds) : HP_OK;
    uint64_t oob = frame_oob_bytes(frame);
    PyObject *payload = PyBytes_FromStringAndSize((const char *)frame->payload, frame->len);
    hp_recv_finish(&self->ep, frame, oob); /* consumed even on error: the stream stays in step */
    if (rc != HP_OK || !payload) {
        if (rc == HP_OK)
            for (int i = 0; i < frame->nfds; i++) close(fds[i]);
        Py_XDECREF(payload);
        if (rc == HP_ERRNO && errno == EMFILE)
            return raise_oserror(EMFILE, "no free descriptor to receive an out-of-band buffer (the table "
                                         "filled while receiving), the message is lost");
        return rc != HP_OK ? raise_status(self, rc) : NULL;
    }
    PyObject *list = PyList_New(frame->nfds);
    for (int i = 0; i < frame->nfds; i++) {
        PyObject *v = list ? PyLong_FromLong(fds[i]) : NULL;
        if (!v) { /* no leak even when out of memory */
            for (int j = i; j < frame->nfds; j++) close(fds[j]);
            Py_XDECREF(list);
            Py_DECREF(payload);
            return NULL;
        }
        PyList_SET_ITEM(list, i, v);
    }
    return Py_BuildValue("(iiNN)", frame->kind, frame->flags, payload, list);
}

static PyObject *Endpoint_recv(EndpointObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Py_ssize_t maxlength = -1;
    if (nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "recv(maxlength=None, deadline=None)");
        return NULL;
    }
    if (nargs > 0 && args[0] != Py_None) {
        maxlength = PyLong_AsSsize_t(args[0]);
        if (maxlength == -1 && PyErr_Occurred()) return NULL;
    }
    int ok;
    int64_t deadline = to_deadline_ns(nargs > 1 ? args[1] : NULL, &ok);
    if (!ok) return NULL;
    if (!check_dir(self, 'r')) return NULL;
    hp_frame frame;
    PyObject *ret = NULL;
    int rc = wait_frame(self, deadline, &frame);
    if (rc != HP_OK) {
        if (rc != -1) raise_status(self, rc);
    } else {
        uint64_t size = frame.kind == KIND_DATA ? frame.len : frame_logical_size(&frame);
        if (maxlength >= 0 && size > (uint64_t)maxlength) {
            hp_reader_exit(&self->ep); /* not consumed */
            PyErr_SetString(Err_TooLong ? Err_TooLong : PyExc_OSError, "bad message length");
        } else if (frame.kind == KIND_DATA) {
            ret = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
            if (ret) hp_recv_finish(&self->ep, &frame, 0);
            else hp_reader_exit(&self->ep);
        } else {
            ret = special_frame(self, &frame);
        }
    }
    leave(self);
    return ret;
}

/* recv_many(maxcount, deadline): waits for one frame, then takes every DATA frame
 * already there (up to maxcount). Never returns a non-DATA frame: it stops before it. */
static PyObject *Endpoint_recv_many(EndpointObject *self, PyObject *args) {
    Py_ssize_t maxcount;
    PyObject *deadline_obj = Py_None;
    if (!PyArg_ParseTuple(args, "n|O", &maxcount, &deadline_obj)) return NULL;
    int ok;
    int64_t deadline = to_deadline_ns(deadline_obj, &ok);
    if (!ok) return NULL;
    if (maxcount < 1) {
        PyErr_SetString(PyExc_ValueError, "maxcount must be >= 1");
        return NULL;
    }
    if (!check_dir(self, 'r')) return NULL;
    hp_frame frame;
    PyObject *list = PyList_New(0);
    int rc = list ? wait_frame(self, deadline, &frame) : -1;
    while (rc == HP_OK) {
        if (frame.kind != KIND_DATA) {
            if (PyList_GET_SIZE(list) == 0) { /* the caller gets it alone, as a tuple */
                PyObject *sp = special_frame(self, &frame);
                if (!sp || PyList_Append(list, sp) < 0) Py_CLEAR(list);
                Py_XDECREF(sp);
            } else {
                hp_reader_exit(&self->ep);
            }
            break;
        }
        PyObject *b = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
        if (!b || PyList_Append(list, b) < 0) {
            Py_XDECREF(b);
            hp_reader_exit(&self->ep);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(b);
        hp_recv_finish(&self->ep, &frame, 0);
        if (PyList_GET_SIZE(list) >= maxcount) break;
        if (hp_recv_peek(&self->ep, &frame) != HP_OK) break; /* a corrupt one fails the next call */
    }
    leave(self);
    if (rc != HP_OK) {
        Py_XDECREF(list);
        return rc == -1 ? NULL : raise_status(self, rc);
    }
    return list;
}

static PyObject *Endpoint_recv_into(EndpointObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t offset;
    PyObject *deadline_obj = Py_None;
    if (!PyArg_ParseTuple(args, "w*n|O", &buf, &offset, &deadline_obj)) return NULL;
    int ok;
    PyObject *ret = NULL;
    int64_t deadline = to_deadline_ns(deadline_obj, &ok);
    if (!ok) goto out;
    if (offset < 0 || offset > buf.len) {
        PyErr_SetString(PyExc_ValueError, "offset out of range");
        goto out;
    }
    if (!check_dir(self, 'r')) goto out;
    hp_frame frame;
    int rc = wait_frame(self, deadline, &frame);
    if (rc != HP_OK) {
        if (rc != -1) raise_status(self, rc);
    } else if (frame.kind != KIND_DATA) {
        ret = special_frame(self, &frame);
    } else if ((uint64_t)offset + frame.len > (uint64_t)buf.len) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
        if (b) {
            hp_recv_finish(&self->ep, &frame, 0);
            PyErr_SetObject(Err_BufferTooShort ? Err_BufferTooShort : PyExc_ValueError, b);
            Py_DECREF(b);
        } else {
            hp_reader_exit(&self->ep);
        }
    } else {
        memcpy((char *)buf.buf + offset, frame.payload, frame.len);
        ret = PyLong_FromUnsignedLong(frame.len);
        hp_recv_finish(&self->ep, &frame, 0);
    }
    leave(self);
out:
    PyBuffer_Release(&buf);
    return ret;
}

static PyObject *Endpoint_poll(EndpointObject *self, PyObject *const *args, Py_ssize_t nargs) {
    int ok;
    int64_t deadline = to_deadline_ns(nargs > 0 ? args[0] : NULL, &ok);
    if (!ok) return NULL;
    if (!check_dir(self, 'r')) return NULL;
    hp_frame frame;
    int rc = wait_frame(self, deadline, &frame);
    /* A poll consumes nothing and may run beside a receive in another process that shares
       this end (Queue.empty() takes no lock): leave the token armed or signalled, never
       held, or that receiver's wake-up is lost. */
    if (rc == HP_OK) hp_reader_exit(&self->ep);
    leave(self);
    if (rc == HP_OK || rc == HP_EOF || rc == HP_ECORRUPT) Py_RETURN_TRUE;
    if (rc == HP_TIMEOUT) Py_RETURN_FALSE;
    return rc == -1 ? NULL : raise_status(self, rc);
}

/* catch_incoming(max_seconds): if the peer announced a big message it is copying, spin
 * (GIL released, never sleeping) until it lands, at most max_seconds; True if a frame
 * waits. For an event loop, which must not sleep here but may wait this briefly. */
static PyObject *Endpoint_catch_incoming(EndpointObject *self, PyObject *arg) {
    double seconds = PyFloat_AsDouble(arg);
    if (seconds == -1.0 && PyErr_Occurred()) return NULL;
    if (!(seconds >= 0 && seconds <= 1.0)) {
        PyErr_SetString(PyExc_ValueError, "max_seconds must be between 0 and 1");
        return NULL;
    }
    if (!check_dir(self, 'r')) return NULL;
    int ready = hp_ring_readable(&self->ep.rx);
    int64_t eta = ready ? 0 : hp_incoming_eta_ns(&self->ep);
    if (eta > 0) {
        int64_t ns = (int64_t)(seconds * 1e9);
        Py_BEGIN_ALLOW_THREADS
        ready = hp_spin_readable(&self->ep, eta < ns ? eta : ns);
        Py_END_ALLOW_THREADS
    }
    leave(self);
    return PyBool_FromLong(ready);
}

/* -- the shared heap ------------------------------------------------------------------- */

/* The heap of ring `index`, mapped on first use. Caller is inside (hp_enter). */
static HeapMapObject *get_heap(EndpointObject *self, HeapMapObject **slot, int index) {
    if (*slot) return *slot;
    if (!self->ep.heap_size || index < 0) {
        PyErr_SetString(PyExc_ValueError, "this pipe has no shared heap");
        return NULL;
    }
    HeapMapObject *m = PyObject_New(HeapMapObject, &HeapMapType);
    if (!m) return NULL;
    uint64_t off = self->ep.heap_offset + (uint64_t)index * (hp_heap_meta_size(self->ep.heap_size) + self->ep.heap_size);
    if (hp_heap_map(&m->heap, self->ep.memfd, off, self->ep.heap_size) < 0) {
        m->heap.map = NULL;
        m->heap.touched = NULL;
        Py_DECREF(m);
        return (HeapMapObject *)PyErr_SetFromErrno(PyExc_OSError);
    }
    m->pid = getpid();
    *slot = m;
    return m;
}

/* reserve_block for a caller already inside (hp_enter). */
static int reserve_inside(EndpointObject *self, uint64_t nbytes, int announce, int64_t *off, HeapMapObject **map) {
    *off = -1;
    *map = NULL;
    if (!self->ep.heap_size) return 0;
    *map = get_heap(self, &self->tx_heap, self->ep.tx_index);
    if (!*map) return -1;
    if ((*off = hp_heap_alloc(&(*map)->heap, nbytes)) == -2) {
        raise_oserror(errno, "cannot allocate shared heap pages for an out-of-band buffer");
        return -1;
    }
    if (*off >= 0 && announce) hp_announce(&self->ep, nbytes);
    return 0;
}

/* Reserve a block of our heap for `arg` bytes: 0 with *off its data offset (-1: no
 * heap, or no room) and *map the heap's mapping, or -1 with an exception set. With
 * `announce`, a copy into it starts now (hp_announce). */
static int reserve_block(EndpointObject *self, PyObject *arg, int announce, int64_t *off, HeapMapObject **map) {
    unsigned long long nbytes = PyLong_AsUnsignedLongLong(arg);
    *off = -1;
    *map = NULL;
    if (PyErr_Occurred() || !check_dir(self, 'w')) return -1;
    int rc = reserve_inside(self, nbytes, announce, off, map);
    leave(self);
    return rc;
}

/* heap_alloc(nbytes): the data offset of a block for a message about to be copied in. */
static PyObject *Endpoint_heap_alloc(EndpointObject *self, PyObject *arg) {
    int64_t off;
    HeapMapObject *map;
    if (reserve_block(self, arg, 1, &off, &map) < 0) return NULL;
    return PyLong_FromLongLong(off);
}

/* Copy `n` buffers to `dst` + their offsets (hp_copy: a big one past the caches), with the
 * GIL released when it is a lot. */
static void copy_out(unsigned char *dst, const Py_buffer *bufs, const uint64_t *at, Py_ssize_t n, uint64_t total) {
    if (total >= (1 << 20)) {
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) hp_copy(dst + at[i], bufs[i].buf, (size_t)bufs[i].len);
        Py_END_ALLOW_THREADS
    } else {
        for (Py_ssize_t i = 0; i < n; i++) memcpy(dst + at[i], bufs[i].buf, (size_t)bufs[i].len);
    }
}

/* copy_out into our heap block for the peer, the copy announced (hp_announce): from its
 * start when it is small enough, else only its last HP_ANNOUNCE_TAIL_BYTES. `at` ascends. */
static void copy_to_peer(hp_endpoint *ep, unsigned char *dst, const Py_buffer *bufs, const uint64_t *at, Py_ssize_t n,
                         uint64_t total) {
    if (total <= HP_ANNOUNCE_MAX_BYTES) { /* announced by reserve_inside */
        copy_out(dst, bufs, at, n, total);
        return;
    }
    uint64_t mark = total - HP_ANNOUNCE_TAIL_BYTES;
    int told = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        const unsigned char *src = bufs[i].buf;
        uint64_t len = (uint64_t)bufs[i].len, done = 0;
        int streamed = len >= hp_copy_stream_min(); /* decided by the whole buffer's size */
        if (!told && at[i] + len > mark) {
            done = at[i] < mark ? mark - at[i] : 0;
            if (streamed) hp_copy_stream(dst + at[i], src, done);
            else memcpy(dst + at[i], src, done);
            hp_announce(ep, total - at[i] - done);
            told = 1;
        }
        if (streamed) hp_copy_stream(dst + at[i] + done, src + done, len - done);
        else memcpy(dst + at[i] + done, src + done, len - done);
    }
    Py_END_ALLOW_THREADS
}

/* heap_write(offset, buffer): copy into our heap (for tests that publish frames by hand). */
static PyObject *Endpoint_heap_write(EndpointObject *self, PyObject *args) {
    unsigned long long offset;
    Py_buffer src;
    if (!PyArg_ParseTuple(args, "Ky*", &offset, &src)) return NULL;
    PyObject *ret = NULL;
    if (check_dir(self, 'w')) {
        HeapMapObject *m = self->tx_heap;
        if (!m || offset > self->ep.heap_size || (uint64_t)src.len > self->ep.heap_size - offset) {
            PyErr_SetString(PyExc_ValueError, "heap_write out of range");
        } else {
            uint64_t at = offset;
            Py_INCREF(m); /* close() from another thread drops the endpoint's reference */
            copy_out(m->heap.data, &src, &at, 1, (uint64_t)src.len);
            Py_DECREF(m);
            ret = Py_NewRef(Py_None);
        }
        leave(self);
    }
    PyBuffer_Release(&src);
    return ret;
}

/* heap_release(offset): drop the reference a frame that was never sent held. */
static PyObject *Endpoint_heap_release(EndpointObject *self, PyObject *arg) {
    unsigned long long offset = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    if (self->tx_heap) hp_heap_release(&self->tx_heap->heap, offset);
    if (self->opened && hp_enter(&self->ep)) { /* that message will not come */
        hp_unannounce(&self->ep);
        leave(self);
    }
    Py_RETURN_NONE;
}

static HeapBlockObject *new_block(HeapMapObject *m, uint64_t offset, uint64_t nbytes, int readonly) {
    HeapBlockObject *b = PyObject_New(HeapBlockObject, &HeapBlockType);
    if (b) {
        b->map = (HeapMapObject *)Py_NewRef(m);
        b->offset = offset;
        b->nbytes = nbytes;
        b->readonly = readonly;
    }
    return b;
}

/* heap_buffer(nbytes): a writable block of our heap (allocate_buffer), or None when the
 * heap has no room. Its reference is dropped when it dies; sends take their own. */
static PyObject *Endpoint_heap_buffer(EndpointObject *self, PyObject *arg) {
    int64_t off;
    HeapMapObject *m;
    if (reserve_block(self, arg, 0, &off, &m) < 0) return NULL;
    if (off < 0) Py_RETURN_NONE;
    PyObject *ret = (PyObject *)new_block(m, (uint64_t)off, PyLong_AsUnsignedLongLong(arg), 0);
    if (!ret) hp_heap_release(&m->heap, (uint64_t)off);
    return ret;
}

/* heap_share(block, data): if `block` is a live buffer of our heap made in this process
 * and `data` (a contiguous buffer) lies inside it, take a reference for a frame that
 * will carry it and return (block offset, data's offset in the block); else None. */
static PyObject *Endpoint_heap_share(EndpointObject *self, PyObject *args) {
    PyObject *obj;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*", &obj, &data)) return NULL;
    PyObject *ret = NULL;
    if (!check_dir(self, 'w')) goto out;
    HeapBlockObject *b = (HeapBlockObject *)obj;
    if (!PyObject_TypeCheck(obj, &HeapBlockType) || !self->tx_heap || b->map != self->tx_heap ||
        b->map->pid != getpid() || b->readonly) {
        ret = Py_NewRef(Py_None);
    } else {
        const unsigned char *start = b->map->heap.data + b->offset, *p = (const unsigned char *)data.buf;
        if (p < start || (uint64_t)(p - start) > b->nbytes || (uint64_t)data.len > b->nbytes - (uint64_t)(p - start)) {
            ret = Py_NewRef(Py_None);
        } else {
            hp_heap_retain(&b->map->heap, b->offset);
            ret = Py_BuildValue("(KK)", (unsigned long long)b->offset, (unsigned long long)(p - start));
        }
    }
    leave(self);
out:
    PyBuffer_Release(&data);
    return ret;
}

/* send_copy(flags, stream, buffers, inline_max, deadline): send a KIND_OOB frame whose
 * buffers (contiguous) are copied into one block, each at a page boundary: a block of our
 * heap (announced to the receiver before the copy), else, when the heap is off or full, a
 * fresh memfd passed with the frame. The stream goes in the frame when the frame stays
 * within inline_max bytes, else into the block after the buffers. Returns True if the
 * block was in the heap. Nothing runs in Python between the copy and the publication. */
static PyObject *Endpoint_send_copy(EndpointObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "send_copy(flags, stream, buffers, inline_max, deadline)");
        return NULL;
    }
    long flags = PyLong_AsLong(args[0]);
    unsigned long long inline_max = PyLong_AsUnsignedLongLong(args[3]);
    int ok;
    int64_t deadline = to_deadline_ns(args[4], &ok);
    if (!ok || PyErr_Occurred()) return NULL;
    if (flags < 0 || flags > 0xffff) {
        PyErr_SetString(PyExc_ValueError, "bad frame flags");
        return NULL;
    }
    PyObject *fast = PySequence_Fast(args[2], "buffers must be a sequence");
    if (!fast) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast), got = 0;
    Py_buffer stream = {0}, *bufs = PyMem_New(Py_buffer, n + 1); /* + 1: never 0 bytes */
    uint64_t *at = PyMem_New(uint64_t, n + 1), head_len = OOB_HEAD_SIZE + OOB_SPAN_SIZE * ((uint64_t)n + 1);
    unsigned char *head = PyMem_Malloc(head_len);
    PyObject *ret = NULL;
    int have_stream = 0, inside = 0;
    if (!bufs || !at || !head) {
        PyErr_NoMemory();
        goto out;
    }
    if (PyObject_GetBuffer(args[1], &stream, PyBUF_SIMPLE) < 0) goto out;
    have_stream = 1;
    uint64_t total = 0;
    for (; got < n; got++) {
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, got), &bufs[got], PyBUF_SIMPLE) < 0) goto out;
        at[got] = (total + 4095) & ~(uint64_t)4095; /* page-aligned, as numpy likes them */
        total = at[got] + (uint64_t)bufs[got].len;
    }
    int stream_inline = head_len + (uint64_t)stream.len <= inline_max;
    uint64_t stream_at = stream_inline ? OOB_INLINE : total;
    if (!stream_inline) total += (uint64_t)stream.len;
    if (total == 0) total = 1;
    uint64_t size = stream.len ? total : (n ? (uint64_t)bufs[0].len : 0); /* as _oob_size */
    if (!check_dir(self, 'w')) goto out;
    inside = 1;
    int64_t off;
    HeapMapObject *map;
    if (reserve_inside(self, total, 1, &off, &map) < 0) goto out;
    unsigned char *dst;
    int fd = -1;
    if (off >= 0) {
        Py_INCREF(map); /* close() from another thread drops the endpoint's reference */
        dst = map->heap.data + off;
    } else {
        map = NULL;
        fd = hp_memfd_create("hyperpipe-buffer", total, total);
        if (fd < 0) {
            raise_oserror(errno, "cannot create shared memory for an out-of-band buffer");
            goto out;
        }
        dst = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (dst == MAP_FAILED) {
            PyErr_SetFromErrno(PyExc_OSError);
            close(fd);
            goto out;
        }
    }
    if (!stream_inline) {
        bufs[n] = stream;
        at[n] = stream_at;
    }
    if (map) copy_to_peer(&self->ep, dst, bufs, at, n + !stream_inline, total);
    else copy_out(dst, bufs, at, n + !stream_inline, total);
    if (fd >= 0) munmap(dst, total);
    int64_t base = off >= 0 ? off : OOB_MEMFD;
    uint32_t nbuf = (uint32_t)n;
    memcpy(head, &size, 8);
    memcpy(head + 8, &total, 8);
    memcpy(head + 16, &base, 8);
    memcpy(head + 24, &nbuf, 4);
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t len = (uint64_t)bufs[i].len;
        memcpy(head + OOB_HEAD_SIZE + OOB_SPAN_SIZE * i, &at[i], 8);
        memcpy(head + OOB_HEAD_SIZE + OOB_SPAN_SIZE * i + 8, &len, 8);
    }
    uint64_t stream_len = (uint64_t)stream.len;
    memcpy(head + OOB_HEAD_SIZE + OOB_SPAN_SIZE * n, &stream_at, 8);
    memcpy(head + OOB_HEAD_SIZE + OOB_SPAN_SIZE * n + 8, &stream_len, 8);
    const void *parts[2] = {head, stream.buf};
    uint64_t lens[2] = {head_len, stream_inline ? stream_len : 0};
    int rc = send_blocking(self, KIND_OOB, (uint16_t)flags, parts, lens, 2, fd >= 0 ? &fd : NULL, fd >= 0,
                           size, deadline);
    if (fd >= 0) close(fd); /* the receiver has its own (or the frame was not sent) */
    if (map) {
        if (rc != HP_OK) { /* the frame was not sent: its reference goes, and the announce */
            hp_heap_release(&map->heap, (uint64_t)off);
            hp_unannounce(&self->ep);
        }
        Py_DECREF(map);
    }
    if (rc == HP_OK) ret = Py_NewRef(off >= 0 ? Py_True : Py_False);
    else if (rc != -1) raise_status(self, rc);
out:
    if (inside) leave(self);
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&bufs[i]);
    if (have_stream) PyBuffer_Release(&stream);
    PyMem_Free(bufs);
    PyMem_Free(at);
    PyMem_Free(head);
    Py_DECREF(fast);
    return ret;
}

/* The received block at `offset` of the peer's heap, after checking that the frame names
 * a live block that covers `nbytes`; NULL with an exception set (a frame that does not
 * makes the end unusable). Caller is inside (hp_enter). */
static PyObject *received_block(EndpointObject *self, uint64_t offset, uint64_t nbytes, int readonly) {
    HeapMapObject *m = get_heap(self, &self->rx_heap, self->ep.rx_index);
    if (!m) return NULL;
    if (offset > self->ep.heap_size || nbytes > self->ep.heap_size - offset ||
        !hp_heap_check_block(&m->heap, offset, nbytes))
        return raise_status(self, hp_corrupt(&self->ep, "a frame refers to no live block of the peer's heap"));
    self->heap_received++;
    return (PyObject *)new_block(m, offset, nbytes, readonly);
}

/* Parse and check every field of a KIND_OOB payload that came with `nfds` descriptors
 * (it was copied out of shared memory: the peer cannot change it under us). NULL if it is
 * consistent, else why not. */
static const char *oob_parse(const unsigned char *p, uint64_t len, int nfds, oob_layout *o) {
    if (len < OOB_HEAD_SIZE) return "corrupt out-of-band frame";
    uint32_t nbuf;
    memcpy(&nbuf, p + 24, 4);
    o->size = load_u64(p);
    o->total = load_u64(p + 8);
    o->base = (int64_t)load_u64(p + 16);
    o->nbuf = nbuf;
    o->end = OOB_HEAD_SIZE + OOB_SPAN_SIZE * (o->nbuf + 1); /* < 2^37: no overflow */
    if (o->end > len) return "corrupt out-of-band frame";
    o->spans = p + OOB_HEAD_SIZE;
    o->stream_at = load_u64(o->spans + OOB_SPAN_SIZE * o->nbuf);
    o->stream_len = load_u64(o->spans + OOB_SPAN_SIZE * o->nbuf + 8);
    if (o->stream_at == OOB_INLINE) {
        if (o->stream_len != len - o->end) return "out-of-band frame with a stream of the wrong size";
    } else if (o->stream_len > o->total || o->stream_at > o->total - o->stream_len) {
        return "out-of-band stream beyond its block";
    }
    for (uint64_t i = 0; i < o->nbuf; i++) {
        uint64_t at = load_u64(o->spans + OOB_SPAN_SIZE * i), n = load_u64(o->spans + OOB_SPAN_SIZE * i + 8);
        if (n > o->total || at > o->total - n) return "out-of-band buffer beyond its block";
    }
    if (!o->stream_len && o->nbuf != 1) return "out-of-band buffer beyond its block";
    if (o->size != (o->stream_len ? o->total : load_u64(o->spans + 8))) return "out-of-band frame with the wrong size";
    if (nfds != (o->base == OOB_MEMFD ? 1 : 0)) return "out-of-band frame with the wrong descriptors";
    return NULL;
}

static void close_fd_list(PyObject *fds) {
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(fds); i++) {
        long fd = PyLong_AsLong(PyList_GET_ITEM(fds, i));
        if (fd >= 0) close((int)fd);
    }
    PyErr_Clear(); /* not an int: nothing of ours to close */
}

/* (stream, buffers) of the block a KIND_OOB frame refers to: a view of a heap block, or
 * of the memfd `mapper(fd, size, writable)` maps (it closes the fd). */
static PyObject *oob_views(EndpointObject *self, PyObject *payload, PyObject *fds, int flags, const oob_layout *o,
                           int readonly, PyObject *mapper) {
    int copy_out = (flags & FLAG_SHARED) && !readonly; /* the sender keeps writing: copy */
    PyObject *owner, *view, *stream = NULL, *buffers = NULL;
    if (o->base != OOB_MEMFD) {
        if (!check_dir(self, 'r')) return NULL;
        owner = received_block(self, (uint64_t)o->base, o->total, readonly);
        leave(self);
    } else {
        owner = PyObject_CallFunction(mapper, "OKO", PyList_GET_ITEM(fds, 0), (unsigned long long)o->total,
                                      readonly || (flags & FLAG_SHARED) ? Py_False : Py_True);
    }
    if (!owner) return NULL;
    view = PyMemoryView_FromObject(owner);
    Py_DECREF(owner);
    if (!view) return NULL;
    const char *data = PyMemoryView_GET_BUFFER(view)->buf;
    if (o->stream_at == OOB_INLINE)
        stream = PyBytes_FromStringAndSize(PyBytes_AS_STRING(payload) + o->end, (Py_ssize_t)o->stream_len);
    else
        stream = PySequence_GetSlice(view, (Py_ssize_t)o->stream_at, (Py_ssize_t)(o->stream_at + o->stream_len));
    buffers = stream ? PyList_New((Py_ssize_t)o->nbuf) : NULL;
    for (uint64_t i = 0; buffers && i < o->nbuf; i++) {
        uint64_t at = load_u64(o->spans + OOB_SPAN_SIZE * i), n = load_u64(o->spans + OOB_SPAN_SIZE * i + 8);
        PyObject *b = copy_out ? PyByteArray_FromStringAndSize(data + at, (Py_ssize_t)n)
                               : PySequence_GetSlice(view, (Py_ssize_t)at, (Py_ssize_t)(at + n));
        if (!b) Py_CLEAR(buffers);
        else PyList_SET_ITEM(buffers, (Py_ssize_t)i, b);
    }
    Py_DECREF(view);
    if (!buffers) {
        Py_XDECREF(stream);
        return NULL;
    }
    return Py_BuildValue("(NN)", stream, buffers);
}

/* open_oob(frame, readonly, mapper): (stream, buffers) of a received special frame
 * (kind, flags, payload, fds), every field checked first (ProtocolError, its descriptors
 * closed). `readonly`: views of the block; else buffers of our own (a heap block or
 * private memfd is ours alone once received; a shared one is copied). */
static PyObject *Endpoint_open_oob(EndpointObject *self, PyObject *args) {
    int kind, flags, readonly;
    PyObject *payload, *fds, *mapper;
    if (!PyArg_ParseTuple(args, "(iiSO!)pO", &kind, &flags, &payload, &PyList_Type, &fds, &readonly, &mapper))
        return NULL;
    oob_layout o;
    const char *why = kind != KIND_OOB ? NULL
                                       : oob_parse((const unsigned char *)PyBytes_AS_STRING(payload),
                                                   (uint64_t)PyBytes_GET_SIZE(payload), (int)PyList_GET_SIZE(fds), &o);
    if (kind != KIND_OOB || why) {
        close_fd_list(fds);
        if (why) return PyErr_Format(Err_Protocol ? Err_Protocol : PyExc_OSError, "%s", why);
        return PyErr_Format(Err_Protocol ? Err_Protocol : PyExc_OSError, "unknown shared-memory frame kind %d", kind);
    }
    return oob_views(self, payload, fds, flags, &o, readonly, mapper);
}

/* -- a Connection's hot methods, in C ------------------------------------------------ */

/* Endpoint.send_bytes / recv_bytes: the methods of the one Connection over this endpoint,
 * which it installs on itself (Transport.fast_path). The common call, one bytes, bytearray
 * or memoryview argument that fits inline with room in the ring, or no argument with a
 * DATA frame waiting, is done here with the GIL held throughout: that makes it atomic
 * with respect to the Connection's other threads as its lock would, as long as no thread
 * is inside this direction with the GIL released (in_send / in_recv), when the call goes
 * the slow way too. Every other call (arguments, timeouts, a full ring, an empty one, a big
 * or special frame, any error) is handed to the Connection's own method unchanged, which
 * checks, locks, waits and raises as usual; nothing was sent or consumed before that. The
 * Connection is held weakly: it must still die (and close) when its last reference goes. */

/* func(connection, *args, **kwargs): the Connection's own method. */
static PyObject *fast_slow_way(EndpointObject *self, PyObject *func, PyObject *const *args, size_t nargsf,
                               PyObject *kwnames) {
    PyObject *conn = NULL;
    if (self->conn_ref) {
#if PY_VERSION_HEX >= 0x030D0000
        if (PyWeakref_GetRef(self->conn_ref, &conn) < 0) return NULL;
#else
        conn = PyWeakref_GetObject(self->conn_ref);
        if (conn == Py_None) conn = NULL;
        Py_XINCREF(conn);
#endif
    }
    if (!conn || !func) return raise_status(self, HP_CLOSED); /* a bound method that outlived it */
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t n = nargs + (kwnames ? PyTuple_GET_SIZE(kwnames) : 0);
    PyObject *small[8], **stack = n < 8 ? small : PyMem_New(PyObject *, n + 1);
    PyObject *ret = NULL;
    if (!stack) {
        PyErr_NoMemory();
    } else {
        stack[0] = conn;
        if (n) memcpy(stack + 1, args, (size_t)n * sizeof *args);
        ret = PyObject_Vectorcall(func, stack, nargs + 1, kwnames);
        if (stack != small) PyMem_Free(stack);
    }
    Py_DECREF(conn);
    return ret;
}

static PyObject *Endpoint_send_bytes(EndpointObject *self, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    PyObject *buf = PyVectorcall_NARGS(nargsf) == 1 && !kwnames ? args[0] : NULL;
    if (buf && self->sending && self->opened && !self->in_send &&
        (PyBytes_CheckExact(buf) || PyByteArray_CheckExact(buf) || PyMemoryView_Check(buf))) {
        Py_buffer view;
        if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear(); /* e.g. not contiguous: the Connection raises its own error */
        } else {
            int rc = HP_TIMEOUT;
            if ((uint64_t)view.len <= self->inline_max && self->ep.has_tx && hp_enter(&self->ep)) {
                const void *parts[1] = {view.buf};
                uint64_t lens[1] = {(uint64_t)view.len};
                rc = hp_try_send(&self->ep, KIND_DATA, 0, parts, lens, 1);
                leave(self);
            }
            PyBuffer_Release(&view);
            if (rc == HP_OK) Py_RETURN_NONE;
        }
    }
    return fast_slow_way(self, self->slow[FAST_SEND], args, nargsf, kwnames);
}

static PyObject *Endpoint_recv_bytes(EndpointObject *self, PyObject *const *args, size_t nargsf,
                                     PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) == 0 && !kwnames && self->receiving && self->opened && !self->in_recv &&
        self->ep.has_rx && hp_ring_readable(&self->ep.rx) && hp_enter(&self->ep)) {
        hp_frame frame;
        PyObject *ret = NULL;
        if (hp_recv_try(&self->ep, KIND_DATA, &frame) == HP_OK) {
            ret = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
            if (ret) hp_recv_finish(&self->ep, &frame, 0);
            else hp_reader_exit(&self->ep); /* not consumed */
        }
        leave(self);
        if (ret || PyErr_Occurred()) return ret;
    }
    return fast_slow_way(self, self->slow[FAST_RECV], args, nargsf, kwnames);
}

/* Endpoint.send_bytes_many(bufs): the whole list in C when every buffer is a bytes,
 * bytearray or memoryview that fits inline and the ring has room for all of them now (so
 * the batch goes out whole, as under the Connection's lock); else the Connection's method. */
static PyObject *Endpoint_send_bytes_many(EndpointObject *self, PyObject *const *args, size_t nargsf,
                                          PyObject *kwnames) {
    PyObject *seq = PyVectorcall_NARGS(nargsf) == 1 && !kwnames ? args[0] : NULL;
    Py_ssize_t n = seq && (PyList_CheckExact(seq) || PyTuple_CheckExact(seq)) ? PySequence_Fast_GET_SIZE(seq) : 0;
    if (n < 1 || n > 4096 || !self->sending || !self->opened || self->in_send || !self->ep.has_tx)
        return fast_slow_way(self, self->slow[FAST_SEND_MANY], args, nargsf, kwnames);
    Py_buffer small[64], *views = n <= 64 ? small : PyMem_New(Py_buffer, n);
    if (!views) return PyErr_NoMemory();
    Py_ssize_t got = 0; /* views taken */
    int all_inline = 1;
    uint64_t bound = 0, largest = 0; /* bytes the batch can take: every frame, and one wrap */
    for (; got < n && all_inline; got++) {
        PyObject *buf = PySequence_Fast_GET_ITEM(seq, got);
        if (!(PyBytes_CheckExact(buf) || PyByteArray_CheckExact(buf) || PyMemoryView_Check(buf))) break;
        if (PyObject_GetBuffer(buf, &views[got], PyBUF_SIMPLE) < 0) {
            PyErr_Clear(); /* e.g. not contiguous: the Connection raises its own error */
            break;
        }
        uint64_t len = (uint64_t)views[got].len, bytes = hp_ring_frame_bytes(len);
        all_inline = len <= self->inline_max;
        bound += bytes;
        largest = bytes > largest ? bytes : largest;
    }
    int rc = HP_TIMEOUT;
    Py_ssize_t sent = 0;
    uint64_t room;
    if (got == n && all_inline && hp_enter(&self->ep)) {
        if (hp_ring_free(&self->ep.tx, &room) == 1 && bound + largest <= room) {
            for (rc = HP_OK; sent < n && rc == HP_OK; sent += rc == HP_OK) {
                const void *parts[1] = {views[sent].buf};
                uint64_t lens[1] = {(uint64_t)views[sent].len};
                rc = hp_try_send(&self->ep, KIND_DATA, 0, parts, lens, 1);
            }
        }
        leave(self);
    }
    for (Py_ssize_t i = 0; i < got; i++) PyBuffer_Release(&views[i]);
    if (views != small) PyMem_Free(views);
    if (rc == HP_OK) return Py_NewRef(Py_None);
    if (sent == 0) return fast_slow_way(self, self->slow[FAST_SEND_MANY], args, nargsf, kwnames);
    if (rc != HP_TIMEOUT) /* the peer went away, or corrupted the ring: as the Connection's */
        return raise_status(self, rc); /* own method, the frames before stay sent */
    PyObject *rest = PySequence_GetSlice(seq, sent, n); /* room ran out after all: wait for it */
    if (!rest) return NULL;
    PyObject *ret = fast_slow_way(self, self->slow[FAST_SEND_MANY], &rest, 1, NULL);
    Py_DECREF(rest);
    return ret;
}

/* Endpoint.recv_bytes_many([maxcount]): the DATA frames already waiting, up to maxcount,
 * when there is at least one; else the Connection's method (which waits). */
static PyObject *Endpoint_recv_bytes_many(EndpointObject *self, PyObject *const *args, size_t nargsf,
                                          PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf), maxcount = 1024;
    if (nargs == 1) {
        maxcount = PyLong_CheckExact(args[0]) ? PyLong_AsSsize_t(args[0]) : 0;
        if (maxcount == -1 && PyErr_Occurred()) PyErr_Clear(); /* the slow way says what is wrong */
    }
    if (nargs <= 1 && !kwnames && maxcount >= 1 && self->receiving && self->opened && !self->in_recv &&
        self->ep.has_rx && hp_ring_readable(&self->ep.rx) && hp_enter(&self->ep)) {
        PyObject *list = PyList_New(0);
        hp_frame frame;
        while (list && PyList_GET_SIZE(list) < maxcount && hp_recv_try(&self->ep, KIND_DATA, &frame) == HP_OK) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
            if (!b || PyList_Append(list, b) < 0) {
                Py_XDECREF(b);
                hp_reader_exit(&self->ep); /* not consumed */
                Py_CLEAR(list);
                break;
            }
            Py_DECREF(b);
            hp_recv_finish(&self->ep, &frame, 0);
        }
        leave(self);
        if (!list || PyList_GET_SIZE(list) > 0) return list;
        Py_DECREF(list);
    }
    return fast_slow_way(self, self->slow[FAST_RECV_MANY], args, nargsf, kwnames);
}

/* fast_path(conn_ref, methods, inline_max) -> self, ready to do the methods above on
 * behalf of that Connection; `methods` maps their names to the Connection's own. */
static PyObject *Endpoint_fast_path(EndpointObject *self, PyObject *args) {
    PyObject *ref, *methods;
    unsigned long long inline_max;
    if (!PyArg_ParseTuple(args, "O!O!K", &_PyWeakref_RefType, &ref, &PyDict_Type, &methods, &inline_max))
        return NULL;
    PyObject *slow[FAST_NMETHODS];
    for (int i = 0; i < FAST_NMETHODS; i++) {
        slow[i] = PyDict_GetItemString(methods, fast_names[i]);
        if (!slow[i]) return PyErr_Format(PyExc_KeyError, "fast_path() needs the method %s", fast_names[i]);
    }
    for (int i = 0; i < FAST_NMETHODS; i++) Py_XSETREF(self->slow[i], Py_NewRef(slow[i]));
    Py_XSETREF(self->conn_ref, Py_NewRef(ref));
    self->inline_max = inline_max;
    self->sending = (char)self->ep.has_tx;
    self->receiving = (char)self->ep.has_rx;
    return Py_NewRef(self);
}

/* -- lifetime and introspection ------------------------------------------------------ */

static PyObject *Endpoint_fileno(EndpointObject *self, PyObject *unused) {
    if (!check_open(self)) return NULL;
    int fd = hp_fileno(&self->ep);
    /* Outside sleepers may now watch fd. A receive running in another thread (GIL
       released) restores the invariant itself when it leaves; otherwise do it here. */
    if (fd >= 0 && self->ep.has_rx && !self->in_recv) hp_reader_sync(&self->ep);
    else if (fd >= 0) atomic_store_explicit(&self->ep.readiness_exposed, 1, memory_order_release);
    leave(self);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyObject *Endpoint_writer_fileno(EndpointObject *self, PyObject *unused) {
    if (!check_dir(self, 'w')) return NULL;
    int fd = hp_writer_fileno(&self->ep);
    leave(self);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyObject *Endpoint_arm_writer(EndpointObject *self, PyObject *arg) {
    unsigned long long nbytes = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred() || !check_dir(self, 'w')) return NULL;
    int rc = hp_arm_writer(&self->ep, nbytes);
    leave(self);
    if (rc == HP_OK) Py_RETURN_TRUE;
    if (rc == HP_TIMEOUT) Py_RETURN_FALSE;
    return raise_status(self, rc);
}

static PyObject *Endpoint_close(EndpointObject *self, PyObject *unused) {
    if (!self->opened) Py_RETURN_NONE;
    hp_endpoint_shutdown(&self->ep); /* wakes blocked calls; no call can enter any more */
    self->opened = 0;
    /* A call still inside (woken, on its way out, or finishing the frame it is copying)
       releases when it leaves: never unmap under it, never wait for it here. */
    if (atomic_load(&self->ep.active) == 0) hp_endpoint_release(&self->ep);
    else self->release_pending = 1;
    Py_CLEAR(self->tx_heap); /* live blocks keep their own reference to the mapping */
    Py_CLEAR(self->rx_heap);
    Py_RETURN_NONE;
}

static PyObject *Endpoint_after_fork(EndpointObject *self, PyObject *unused) {
    /* New heap mappings here: blocks inherited from the parent stay the parent's to free. */
    Py_CLEAR(self->tx_heap);
    Py_CLEAR(self->rx_heap);
    self->in_recv = self->in_send = 0; /* the parent's threads are not here */
    if (self->opened && hp_endpoint_after_fork(&self->ep) < 0) return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *Endpoint_fds(EndpointObject *self, PyObject *unused) {
    if (!self->opened) return raise_status(self, HP_CLOSED);
    return Py_BuildValue("(iiii)", self->ep.memfd, self->ep.sock, self->ep.rx_efd, self->ep.tx_efd);
}

static PyObject *Endpoint_stats(EndpointObject *self, PyObject *unused) {
    hp_endpoint *ep = &self->ep;
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsK}", "messages_sent", ep->msgs_sent, "messages_received",
        ep->msgs_recv, "bytes_sent", ep->bytes_sent, "bytes_received", ep->bytes_recv, "sleeps",
        ep->sleeps, "wakeups_sent", ep->wakes_sent, "writer_waits", ep->writer_waits,
        "shared_cpu_yields", ep->shared_cpu_yields,
        "oob_sent", ep->oob_sent, "oob_received", ep->oob_recv, "spin_ns", ep->spin_ns,
        "ring_capacity", self->opened ? (ep->has_rx ? ep->rx.capacity : ep->tx.capacity) : 0ULL,
        "heap_received", self->heap_received);
}

static PyObject *Endpoint_get_max_payload(EndpointObject *self, void *unused) {
    if (!self->opened) return PyLong_FromLong(0);
    hp_ring *r = self->ep.has_tx ? &self->ep.tx : &self->ep.rx;
    return PyLong_FromUnsignedLongLong(hp_ring_max_payload(r));
}

static PyObject *Endpoint_get_closed(EndpointObject *self, void *unused) {
    return PyBool_FromLong(!self->opened);
}

static PyMethodDef Endpoint_methods[] = {
    {"configure", (PyCFunction)(void (*)(void))Endpoint_configure, METH_VARARGS | METH_KEYWORDS, NULL},
    {"send", (PyCFunction)(void (*)(void))Endpoint_send, METH_FASTCALL, NULL},
    {"send_many", (PyCFunction)Endpoint_send_many, METH_VARARGS, NULL},
    {"send_parts", (PyCFunction)Endpoint_send_parts, METH_VARARGS, NULL},
    {"send_copy", (PyCFunction)(void (*)(void))Endpoint_send_copy, METH_FASTCALL, NULL},
    {"recv", (PyCFunction)(void (*)(void))Endpoint_recv, METH_FASTCALL, NULL},
    {"recv_many", (PyCFunction)Endpoint_recv_many, METH_VARARGS, NULL},
    {"recv_into", (PyCFunction)Endpoint_recv_into, METH_VARARGS, NULL},
    {"poll", (PyCFunction)(void (*)(void))Endpoint_poll, METH_FASTCALL, NULL},
    {"fileno", (PyCFunction)Endpoint_fileno, METH_NOARGS, NULL},
    {"writer_fileno", (PyCFunction)Endpoint_writer_fileno, METH_NOARGS, NULL},
    {"arm_writer", (PyCFunction)Endpoint_arm_writer, METH_O, NULL},
    {"close", (PyCFunction)Endpoint_close, METH_NOARGS, NULL},
    {"after_fork", (PyCFunction)Endpoint_after_fork, METH_NOARGS, NULL},
    {"fds", (PyCFunction)Endpoint_fds, METH_NOARGS, NULL},
    {"heap_alloc", (PyCFunction)Endpoint_heap_alloc, METH_O, NULL},
    {"heap_write", (PyCFunction)Endpoint_heap_write, METH_VARARGS, NULL},
    {"heap_release", (PyCFunction)Endpoint_heap_release, METH_O, NULL},
    {"heap_buffer", (PyCFunction)Endpoint_heap_buffer, METH_O, NULL},
    {"heap_share", (PyCFunction)Endpoint_heap_share, METH_VARARGS, NULL},
    {"open_oob", (PyCFunction)Endpoint_open_oob, METH_VARARGS, NULL},
    {"catch_incoming", (PyCFunction)Endpoint_catch_incoming, METH_O, NULL},
    {"fast_path", (PyCFunction)Endpoint_fast_path, METH_VARARGS, NULL},
    {"send_bytes", (PyCFunction)(void (*)(void))Endpoint_send_bytes, METH_FASTCALL | METH_KEYWORDS,
     "send_bytes($self, buf, offset=0, size=None, *, timeout=None)\n--\n\n"
     "Send the bytes data from a bytes-like object (``buf[offset:offset+size]``)."},
    {"recv_bytes", (PyCFunction)(void (*)(void))Endpoint_recv_bytes, METH_FASTCALL | METH_KEYWORDS,
     "recv_bytes($self, maxlength=None, *, timeout=None)\n--\n\n"
     "Receive one message as ``bytes``; longer than ``maxlength`` -> OSError, as the stdlib."},
    {"send_bytes_many", (PyCFunction)(void (*)(void))Endpoint_send_bytes_many, METH_FASTCALL | METH_KEYWORDS,
     "send_bytes_many($self, bufs, *, timeout=None)\n--\n\n"
     "Send each buffer of ``bufs`` as its own message (fewer wake-ups than a loop)."},
    {"recv_bytes_many", (PyCFunction)(void (*)(void))Endpoint_recv_bytes_many, METH_FASTCALL | METH_KEYWORDS,
     "recv_bytes_many($self, maxcount=1024, *, timeout=None)\n--\n\n"
     "Wait for one message, then also take those already waiting, up to ``maxcount``."},
    {"stats", (PyCFunction)Endpoint_stats, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef Endpoint_members[] = {
    {"sending", T_BOOL, offsetof(EndpointObject, sending), 0, "send_bytes may send (False: the slow way)"},
    {"receiving", T_BOOL, offsetof(EndpointObject, receiving), 0, "recv_bytes may receive (False: the slow way)"},
    {NULL, 0, 0, 0, NULL},
};

static PyGetSetDef Endpoint_getset[] = {
    {"max_payload", (getter)Endpoint_get_max_payload, NULL, NULL, NULL},
    {"closed", (getter)Endpoint_get_closed, NULL, NULL, NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject EndpointType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hyperpipe._core.Endpoint",
    .tp_basicsize = sizeof(EndpointObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One end of a shared-memory pipe (rings, wakeups, fd passing).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Endpoint_init,
    .tp_dealloc = (destructor)Endpoint_dealloc,
    .tp_methods = Endpoint_methods,
    .tp_members = Endpoint_members,
    .tp_getset = Endpoint_getset,
};

/* -- module functions ----------------------------------------------------------------- */

static PyObject *core_segment_create(PyObject *mod, PyObject *args) {
    unsigned long long capacity, heap_size = 0;
    unsigned int nrings;
    if (!PyArg_ParseTuple(args, "KI|K", &capacity, &nrings, &heap_size)) return NULL;
    int fd = hp_segment_create(capacity, nrings, heap_size);
    if (fd < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(fd);
}

static PyObject *core_buffer_memfd(PyObject *mod, PyObject *arg) {
    unsigned long long nbytes = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    int fd = hp_memfd_create("hyperpipe-buffer", nbytes, nbytes);
    if (fd < 0) return raise_oserror(errno, "cannot create shared memory for an out-of-band buffer");
    return PyLong_FromLong(fd);
}

/* copy_stream_min(): from how many bytes a copy into shared memory streams past the caches. */
static PyObject *core_copy_stream_min(PyObject *mod, PyObject *unused) {
    return PyLong_FromUnsignedLongLong(hp_copy_stream_min());
}

/* _copy_stream(dst, src): hp_copy_stream of src into the start of dst (for tests). */
static PyObject *core_copy_stream(PyObject *mod, PyObject *args) {
    Py_buffer dst, src;
    if (!PyArg_ParseTuple(args, "w*y*", &dst, &src)) return NULL;
    PyObject *ret = NULL;
    if (src.len > dst.len) PyErr_SetString(PyExc_ValueError, "_copy_stream: dst is too small");
    else {
        hp_copy_stream(dst.buf, src.buf, (size_t)src.len);
        ret = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    return ret;
}

static PyObject *core_check_memfd(PyObject *mod, PyObject *args) {
    int fd;
    unsigned long long size;
    if (!PyArg_ParseTuple(args, "iK", &fd, &size)) return NULL;
    const char *why = hp_memfd_check(fd, size);
    if (why) return PyErr_Format(Err_Protocol ? Err_Protocol : PyExc_OSError, "out-of-band buffer refused: %s", why);
    Py_RETURN_NONE;
}

static PyObject *core_set_errors(PyObject *mod, PyObject *args) {
    PyObject *e[7];
    if (!PyArg_ParseTuple(args, "OOOOOOO", &e[0], &e[1], &e[2], &e[3], &e[4], &e[5], &e[6])) return NULL;
    PyObject **slots[7] = {&Err_Timeout, &Err_Closed, &Err_PeerClosed, &Err_BrokenPipe,
                           &Err_Protocol, &Err_TooLong, &Err_BufferTooShort};
    for (int i = 0; i < 7; i++) {
        Py_INCREF(e[i]);
        Py_XSETREF(*slots[i], e[i]);
    }
    Py_RETURN_NONE;
}

/* -- the socket transport's hot methods, in C (SocketFast) ----------------------------
 *
 * SocketTransport.fast_path makes one for a plain socket without max_message_size. Its
 * send_bytes(buf) of a small buffer and recv_bytes() with no other argument do what the
 * Python path does, minus its three call layers: the Connection's lock, then the
 * transport's gate for that direction, the same checks, the same system calls (hp_sockio.h:
 * one send per frame, which waits, GIL released, only if the socket's buffer is full; a
 * blocking read of the header, GIL released, and one of the payload that never waits),
 * the same release order (a close() that came meanwhile
 * releases the descriptor as the last call leaves). The locks are taken as the Python path
 * takes them with no timeout (waiting with the GIL released; a signal handler that raises
 * ends the wait). If the transport is not in its plain state then (closed, a frame half
 * read, a frame parked for the background flush, a broken stream), the call is handed
 * unchanged to the Connection's own method. Once bytes of a frame have moved,
 * whatever is not the common case (a short read or write, a signal, end of stream, an
 * error, a big or special frame) is finished under the same locks by the transport's
 * Python code (_rest_of_frame, _send_rest), given the bytes already moved: nothing is
 * lost, read ahead or sent twice. The locks are looked up on every call (a fork replaces
 * them); the Connection is held weakly (it must still die, and close, on its last
 * reference).
 *
 * send(obj) and recv() with no other argument do the same for objects, when the Connection
 * has no codec: an object _framing.dumps pickles without a ForkingPickler (a scalar, or a
 * short tuple or list of them: no reducer can run) is pickled here with pickle.dumps and
 * the protocol the transport would use, and goes out as send_bytes(pickled) would; any other
 * object goes to Connection.send. A received frame is unpickled with pickle.loads after
 * both locks are released (an out-of-band frame, from the Python path, by its own loads());
 * a big or special frame is finished by the Python path as above, as the frame was sent. */

/* The Connection methods a SocketFast does in C (send and recv last: see connection_methods). */
enum { SF_SEND_BYTES, SF_RECV_BYTES, SF_SEND_BYTES_MANY, SF_RECV_BYTES_MANY, SF_SEND, SF_RECV, SF_NMETHODS };
static const char *const sf_method_names[SF_NMETHODS] = {"send_bytes", "recv_bytes", "send_bytes_many",
                                                         "recv_bytes_many", "send", "recv"};

typedef struct {
    PyObject_HEAD
    PyObject *conn_ref;          /* weakref.ref to the Connection */
    PyObject *transport;         /* its SocketTransport */
    PyObject *slow[SF_NMETHODS]; /* the Connection's own methods (functions) */
    PyObject *dumps, *loads;     /* pickle's; NULL: send/recv always the Connection's (a codec) */
    PyObject *protocol;          /* the pickle protocol of sent objects */
    Py_ssize_t flat_max;         /* the longest tuple or list pickled here */
    int fd;
    Py_ssize_t send_limit; /* payloads up to this are sent here (header joined) */
    Py_ssize_t recv_limit; /* and up to this received here */
    char sending, receiving;       /* the Connection may still send / receive */
    int64_t spin_ns, spin_max_ns;  /* the receiver's spin window now and at most (0: never spins) */
} SocketFastObject;

/* The shortest spin window a receiver that spins at all keeps (as hp_endpoint.c's spin_min_ns). */
#define SF_SPIN_MIN_NS 2000

/* attribute and method names, interned once */
enum {
    N_SEND_LOCK, N_RECV_LOCK, N_TX_GATE, N_RX_GATE, N_CLOSED, N_PENDING, N_RX_BROKEN, N_READER, N_IN_FRAME,
    N_ACQUIRE, N_RELEASE, N_RELEASE_IF_IDLE, N_REST_OF_FRAME, N_SEND_REST, N_FEED, N_LOADS, N_COUNT
};
static const char *const sf_name_text[N_COUNT] = {
    "_send_lock", "_recv_lock", "_tx_gate", "_rx_gate", "_closed", "_pending", "_rx_broken", "_reader",
    "in_frame", "acquire", "release", "_release_if_idle", "_rest_of_frame", "_send_rest", "feed", "loads"};
static PyObject *sf_names[N_COUNT];

/* obj.name(*args) for a method of up to two arguments. */
static PyObject *sf_call(PyObject *obj, int name, PyObject *arg1, PyObject *arg2) {
    PyObject *stack[3] = {obj, arg1, arg2};
    return PyObject_VectorcallMethod(sf_names[name], stack, 1 + (arg1 != NULL) + (arg2 != NULL), NULL);
}

/* The exception being raised, set aside while more Python code runs, then put back. */
typedef struct {
    PyObject *type, *value, *tb;
} sf_error;

static sf_error sf_save_error(void) {
    sf_error e = {NULL, NULL, NULL};
#if PY_VERSION_HEX >= 0x030C0000
    e.value = PyErr_GetRaisedException();
#else
    PyErr_Fetch(&e.type, &e.value, &e.tb);
#endif
    return e;
}

static void sf_restore_error(sf_error e) {
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(e.value);
#else
    PyErr_Restore(e.type, e.value, e.tb);
#endif
}

/* lock.acquire(): 0, or -1 with the exception set (e.g. a signal handler's). */
static int sf_lock(PyObject *lock) {
    PyObject *r = sf_call(lock, N_ACQUIRE, NULL, NULL);
    Py_XDECREF(r);
    return r ? 0 : -1;
}

/* A new reference to the Connection; NULL once it died (an exception set only on error). */
static PyObject *sf_connection(SocketFastObject *self) {
    PyObject *conn = NULL;
    if (!self->conn_ref) return NULL; /* cleared by the garbage collector */
#if PY_VERSION_HEX >= 0x030D0000
    if (PyWeakref_GetRef(self->conn_ref, &conn) < 0) return NULL;
#else
    conn = PyWeakref_GetObject(self->conn_ref);
    conn = conn == Py_None ? NULL : Py_NewRef(conn);
#endif
    return conn;
}

/* obj.<name> is `expected`: 1, 0 if not, -1 error. */
static int sf_attr_is(PyObject *obj, int name, PyObject *expected) {
    PyObject *v = PyObject_GetAttr(obj, sf_names[name]);
    if (!v) return -1;
    int same = v == expected;
    Py_DECREF(v);
    return same;
}

/* Take the Connection's lock, then the transport's gate, of one direction: 1 with both
 * held (new references in *lock, *gate), 0 when the Connection is gone, -1 on an error
 * (nothing held in either case). */
static int sf_enter(SocketFastObject *self, int lock_name, int gate_name, PyObject **lock, PyObject **gate) {
    PyObject *conn = sf_connection(self);
    if (!conn) return PyErr_Occurred() ? -1 : 0;
    *lock = PyObject_GetAttr(conn, sf_names[lock_name]);
    Py_DECREF(conn);
    if (!*lock || sf_lock(*lock) < 0) {
        Py_XDECREF(*lock);
        return -1;
    }
    *gate = PyObject_GetAttr(self->transport, sf_names[gate_name]);
    if (*gate && sf_lock(*gate) == 0) return 1;
    Py_XDECREF(*gate);
    PyObject *r = sf_call(*lock, N_RELEASE, NULL, NULL);
    Py_XDECREF(r); /* releasing a lock we hold does not fail; the error reported is the one above */
    Py_DECREF(*lock);
    return -1;
}

/* Leave as the Python path does: the gate, the descriptor's release if close() came
 * meanwhile, the Connection's lock. An exception already set is kept; one from leaving
 * itself (a bug: releasing a lock we hold cannot fail) is reported as unraisable. */
static void sf_leave(SocketFastObject *self, PyObject *lock, PyObject *gate) {
    sf_error raised = sf_save_error();
    PyObject *r = sf_call(gate, N_RELEASE, NULL, NULL);
    if (r) {
        Py_DECREF(r);
        int closed = sf_attr_is(self->transport, N_CLOSED, Py_True);
        r = closed == 1 ? sf_call(self->transport, N_RELEASE_IF_IDLE, NULL, NULL) : closed ? NULL : Py_NewRef(Py_None);
    }
    if (!r) PyErr_WriteUnraisable(self->transport);
    Py_XDECREF(r);
    r = sf_call(lock, N_RELEASE, NULL, NULL);
    if (!r) PyErr_WriteUnraisable(lock);
    Py_XDECREF(r);
    Py_DECREF(lock);
    Py_DECREF(gate);
    sf_restore_error(raised);
}

/* The Connection's own method, for every call the fast path does not do. */
static PyObject *sf_slow_way(SocketFastObject *self, int which, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    PyObject *conn = sf_connection(self), *bound = NULL, *ret = NULL;
    if (!conn && PyErr_Occurred()) return NULL;
    if (!conn) /* a bound method that outlived its Connection */
        return PyErr_Format(Err_Closed ? Err_Closed : PyExc_OSError, "handle is closed");
    if (!self->slow[which]) { /* cleared by the garbage collector */
        Py_DECREF(conn);
        return PyErr_Format(Err_Closed ? Err_Closed : PyExc_OSError, "handle is closed");
    }
    bound = PyMethod_New(self->slow[which], conn);
    if (bound) ret = PyObject_Vectorcall(bound, args, nargsf, kwnames);
    Py_XDECREF(bound);
    Py_DECREF(conn);
    return ret;
}

/* The transport's state in which a frame may start here. */
static int sf_rx_plain(SocketFastObject *self) {
    int rc = sf_attr_is(self->transport, N_CLOSED, Py_False);
    if (rc == 1) rc = sf_attr_is(self->transport, N_RX_BROKEN, Py_None);
    if (rc == 1) {
        PyObject *reader = PyObject_GetAttr(self->transport, sf_names[N_READER]);
        rc = reader ? sf_attr_is(reader, N_IN_FRAME, Py_False) : -1;
        Py_XDECREF(reader);
    }
    return rc;
}

static int sf_tx_plain(SocketFastObject *self) {
    int rc = sf_attr_is(self->transport, N_CLOSED, Py_False);
    if (rc == 1) {
        PyObject *pending = PyObject_GetAttr(self->transport, sf_names[N_PENDING]);
        rc = pending ? PyList_CheckExact(pending) && PyList_GET_SIZE(pending) == 0 : -1;
        Py_XDECREF(pending);
    }
    return rc;
}

/* bytes of head[:hlen] + body[:blen] */
static PyObject *sf_join(const unsigned char *head, Py_ssize_t hlen, const char *body, Py_ssize_t blen) {
    PyObject *b = PyBytes_FromStringAndSize(NULL, hlen + blen);
    if (b) {
        memcpy(PyBytes_AS_STRING(b), head, (size_t)hlen);
        if (blen) memcpy(PyBytes_AS_STRING(b) + hlen, body, (size_t)blen);
    }
    return b;
}

/* The frame whose first bytes were read here, finished by the transport's general path
 * (it waits, reports end of stream or errors, takes big and special frames): as bytes,
 * or (`as_sent`, for recv) as the transport received it, an out-of-band frame included. */
static PyObject *sf_rest_of_frame(SocketFastObject *self, int as_sent, const unsigned char *head, Py_ssize_t hlen,
                                  const char *body, Py_ssize_t blen) {
    PyObject *moved = sf_join(head, hlen, body, blen);
    if (!moved) return NULL;
    PyObject *ret = sf_call(self->transport, N_REST_OF_FRAME, moved, as_sent ? Py_True : NULL);
    Py_DECREF(moved);
    return ret;
}

/* A receiver's spin before it blocks for a frame's header (hp_sock_read_spin: tries
 * that never wait, the CPU yielded between them). On this 2-vCPU guest a process blocked
 * in read() leaves its vCPU halted, and waking a halted vCPU costs 5-20 us per direction:
 * a round trip whose two ends spin takes ~8 us across the two CPUs against 25-45 us
 * (benchmarks.md, "Socket tuple round trip, sixth round"). The window adapts as the
 * shared-memory receiver's (hp_endpoint.c, adapt_spin): doubled up to spin_max_ns after a
 * spin that caught the frame; after one that did not, the full window again if the frame
 * came within 4 windows, else halved down to SF_SPIN_MIN_NS, so an idle or slow peer
 * costs little CPU. Only the thread holding the receive gate reads or writes spin_ns. */
static void sf_adapt_spin(SocketFastObject *self, int caught, int64_t start) {
    if (caught)
        self->spin_ns = self->spin_ns * 2 > self->spin_max_ns ? self->spin_max_ns : self->spin_ns * 2;
    else if (hp_now_ns() - start < 4 * self->spin_max_ns)
        self->spin_ns = self->spin_max_ns;
    else
        self->spin_ns = self->spin_ns / 2 < SF_SPIN_MIN_NS ? SF_SPIN_MIN_NS : self->spin_ns / 2;
}

static PyObject *sf_recv_frame(SocketFastObject *self, int as_sent) {
    unsigned char head[4];
    ssize_t n;
    int64_t spin = self->spin_ns, start = 0;
    for (;;) {
        Py_BEGIN_ALLOW_THREADS
        if (spin > 0) {
            start = hp_now_ns();
            n = hp_sock_read_spin(self->fd, head, sizeof head, spin);
        } else
            n = hp_sock_read(self->fd, head, sizeof head);
        Py_END_ALLOW_THREADS
        if (spin > 0) {
            spin = 0; /* one spin per call, then the blocking read */
            if (n != -EAGAIN && n != -EINTR) {
                sf_adapt_spin(self, 1, start);
                start = 0;
                break;
            }
            /* Nothing came: a signal handled meanwhile is run now, before the read blocks
             * (a handler that raises ends the wait, as it would have in the read). */
            n = -EINTR;
        }
        if (n != -EINTR) break;
        if (PyErr_CheckSignals() < 0) return NULL; /* nothing of a frame was read */
    }
    if (start) sf_adapt_spin(self, 0, start);
    if (n != (ssize_t)sizeof head) /* short, end of stream or an error: read or raised again there */
        return sf_rest_of_frame(self, as_sent, head, n > 0 ? n : 0, NULL, 0);
    int32_t size = hp_sock_frame_length(head);
    if (size < 0 || size > self->recv_limit) return sf_rest_of_frame(self, as_sent, head, sizeof head, NULL, 0);
    PyObject *payload = PyBytes_FromStringAndSize(NULL, size);
    if (!payload) { /* the header is kept for the next call, as the Python path does */
        sf_error raised = sf_save_error();
        PyObject *moved = sf_join(head, sizeof head, NULL, 0), *reader = NULL, *r = NULL;
        if (moved) reader = PyObject_GetAttr(self->transport, sf_names[N_READER]);
        if (reader) r = sf_call(reader, N_FEED, moved, NULL);
        if (!r) PyErr_WriteUnraisable(self->transport);
        Py_XDECREF(r);
        Py_XDECREF(reader);
        Py_XDECREF(moved);
        sf_restore_error(raised);
        return NULL;
    }
    /* Sent with its header in one write: it is almost always here already. */
    n = size ? hp_sock_read_ready(self->fd, PyBytes_AS_STRING(payload), (size_t)size) : 0;
    if (n == size) return payload;
    PyObject *ret = sf_rest_of_frame(self, as_sent, head, sizeof head, PyBytes_AS_STRING(payload), n > 0 ? n : 0);
    Py_DECREF(payload);
    return ret;
}

static PyObject *sf_send_frame(SocketFastObject *self, const Py_buffer *view) {
    ssize_t total = 4 + view->len;
    /* First without waiting, the GIL kept: a small frame nearly always fits the socket's
     * buffer, and giving the GIL up and taking it back costs more than such a send. */
    ssize_t n = hp_sock_send_frame(self->fd, view->buf, (uint32_t)view->len, 0);
    while (n == -EAGAIN) { /* no room: wait in the send, GIL released, as the stdlib does */
        Py_BEGIN_ALLOW_THREADS
        n = hp_sock_send_frame(self->fd, view->buf, (uint32_t)view->len, 1);
        Py_END_ALLOW_THREADS
        if (n != -EINTR) break; /* (-EAGAIN again: the fd was made non-blocking; below) */
        if (PyErr_CheckSignals() < 0) return NULL; /* nothing of the frame was written */
        n = -EAGAIN;
    }
    if (n == total) Py_RETURN_NONE;
    /* Cut short (a signal, a shutdown) or refused: the general path writes the rest, or
     * reports the error, as it would have. */
    unsigned char head[4] = {(unsigned char)(view->len >> 24), (unsigned char)(view->len >> 16),
                             (unsigned char)(view->len >> 8), (unsigned char)view->len};
    PyObject *frame = sf_join(head, sizeof head, view->buf, view->len);
    PyObject *written = frame ? PyLong_FromSsize_t(n > 0 ? n : 0) : NULL;
    PyObject *ret = written ? sf_call(self->transport, N_SEND_REST, frame, written) : NULL;
    Py_XDECREF(written);
    Py_XDECREF(frame);
    return ret;
}

static PyObject *SocketFast_send_bytes(SocketFastObject *self, PyObject *const *args, size_t nargsf,
                                       PyObject *kwnames) {
    PyObject *buf = PyVectorcall_NARGS(nargsf) == 1 && !kwnames ? args[0] : NULL, *lock, *gate, *ret = NULL;
    Py_buffer view;
    int viewed = 0, rc = 0;
    if (buf && self->sending &&
        (PyBytes_CheckExact(buf) || PyByteArray_CheckExact(buf) || PyMemoryView_Check(buf))) {
        viewed = PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) == 0;
        if (!viewed) PyErr_Clear(); /* e.g. not contiguous: the Connection raises its own error */
    }
    if (viewed && view.len <= self->send_limit) rc = sf_enter(self, N_SEND_LOCK, N_TX_GATE, &lock, &gate);
    if (rc == 1) {
        rc = sf_tx_plain(self);
        if (rc == 1) ret = sf_send_frame(self, &view);
        sf_leave(self, lock, gate);
    }
    if (viewed) PyBuffer_Release(&view);
    if (rc != 0) return ret;
    return sf_slow_way(self, SF_SEND_BYTES, args, nargsf, kwnames);
}

static PyObject *SocketFast_recv_bytes(SocketFastObject *self, PyObject *const *args, size_t nargsf,
                                       PyObject *kwnames) {
    PyObject *lock, *gate, *ret = NULL;
    int rc = 0;
    if (PyVectorcall_NARGS(nargsf) == 0 && !kwnames && self->receiving)
        rc = sf_enter(self, N_RECV_LOCK, N_RX_GATE, &lock, &gate);
    if (rc == 1) {
        rc = sf_rx_plain(self);
        if (rc == 1) ret = sf_recv_frame(self, 0);
        sf_leave(self, lock, gate);
    }
    if (rc != 0) return ret;
    return sf_slow_way(self, SF_RECV_BYTES, args, nargsf, kwnames);
}

/* An object _framing.dumps pickles with pickle.dumps (_framing._is_flat): of an exact type
 * whose pickling runs no Python code. */
static int sf_scalar(PyObject *o) {
    return PyBytes_CheckExact(o) || PyUnicode_CheckExact(o) || PyLong_CheckExact(o) || PyFloat_CheckExact(o) ||
           PyBool_Check(o) || o == Py_None;
}

static int sf_flat(SocketFastObject *self, PyObject *o) {
    if (sf_scalar(o)) return 1;
    if (!PyTuple_CheckExact(o) && !PyList_CheckExact(o)) return 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(o);
    if (n > self->flat_max) return 0;
    PyObject **items = PySequence_Fast_ITEMS(o);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!sf_scalar(items[i])) return 0;
    return 1;
}

static PyObject *SocketFast_send(SocketFastObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *obj = PyVectorcall_NARGS(nargsf) == 1 && !kwnames ? args[0] : NULL;
    if (!obj || !self->sending || !self->dumps || !sf_flat(self, obj))
        return sf_slow_way(self, SF_SEND, args, nargsf, kwnames);
    /* Pickled completely before anything is written, as Connection.send does. */
    PyObject *stack[2] = {obj, self->protocol};
    PyObject *pickled = PyObject_Vectorcall(self->dumps, stack, 2, NULL);
    if (!pickled) return NULL;
    /* What Connection.send does with it too: a closed end, a parked frame, a big pickle
     * go to Connection.send_bytes, which raises, waits and writes as send would. */
    PyObject *ret = SocketFast_send_bytes(self, &pickled, 1, NULL);
    Py_DECREF(pickled);
    return ret;
}

static PyObject *SocketFast_recv(SocketFastObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *lock, *gate, *frame = NULL;
    int rc = 0;
    if (PyVectorcall_NARGS(nargsf) == 0 && !kwnames && self->receiving && self->loads)
        rc = sf_enter(self, N_RECV_LOCK, N_RX_GATE, &lock, &gate);
    if (rc == 1) {
        rc = sf_rx_plain(self);
        if (rc == 1) frame = sf_recv_frame(self, 1);
        sf_leave(self, lock, gate);
    }
    if (rc == 0) return sf_slow_way(self, SF_RECV, args, nargsf, kwnames);
    if (!frame) return NULL;
    /* Unpickled with no lock held: the next message need not wait for it. */
    /* Any buffer (bytes, a bytearray, the anonymous mmap of a big frame) is a pickle; the
     * one frame that is not, OobFrame (pickle-5 buffers out of band), unpickles itself. */
    PyObject *ret = PyObject_CheckBuffer(frame) ? PyObject_CallOneArg(self->loads, frame)
                                                : sf_call(frame, N_LOADS, NULL, NULL);
    Py_DECREF(frame);
    return ret;
}

static PyObject *SocketFast_send_bytes_many(SocketFastObject *self, PyObject *const *args, size_t nargsf,
                                            PyObject *kwnames) {
    return sf_slow_way(self, SF_SEND_BYTES_MANY, args, nargsf, kwnames);
}

static PyObject *SocketFast_recv_bytes_many(SocketFastObject *self, PyObject *const *args, size_t nargsf,
                                            PyObject *kwnames) {
    return sf_slow_way(self, SF_RECV_BYTES_MANY, args, nargsf, kwnames);
}

/* The garbage collector sees what a SocketFast holds: the Connection's bound methods
 * hold it, and it holds the transport, so a Connection in a reference cycle (e.g. through
 * an exception kept on the transport, whose traceback holds the Connection's frames)
 * would otherwise never be freed, nor its buffers. */
static int SocketFast_traverse(SocketFastObject *self, visitproc visit, void *arg) {
    Py_VISIT(self->conn_ref);
    Py_VISIT(self->transport);
    for (int i = 0; i < SF_NMETHODS; i++) Py_VISIT(self->slow[i]);
    Py_VISIT(self->dumps);
    Py_VISIT(self->loads);
    Py_VISIT(self->protocol);
    return 0;
}

/* After this every call goes the slow way, which raises "handle is closed". */
static int SocketFast_clear(SocketFastObject *self) {
    self->sending = self->receiving = 0;
    Py_CLEAR(self->conn_ref);
    Py_CLEAR(self->transport);
    for (int i = 0; i < SF_NMETHODS; i++) Py_CLEAR(self->slow[i]);
    Py_CLEAR(self->dumps);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->protocol);
    return 0;
}

static void SocketFast_dealloc(SocketFastObject *self) {
    PyObject_GC_UnTrack(self);
    SocketFast_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef SocketFast_methods[] = {
    {"send_bytes", (PyCFunction)(void (*)(void))SocketFast_send_bytes, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"recv_bytes", (PyCFunction)(void (*)(void))SocketFast_recv_bytes, METH_FASTCALL | METH_KEYWORDS, NULL},
    {"send_bytes_many", (PyCFunction)(void (*)(void))SocketFast_send_bytes_many, METH_FASTCALL | METH_KEYWORDS,
     NULL},
    {"recv_bytes_many", (PyCFunction)(void (*)(void))SocketFast_recv_bytes_many, METH_FASTCALL | METH_KEYWORDS,
     NULL},
    {"send", (PyCFunction)(void (*)(void))SocketFast_send, METH_FASTCALL | METH_KEYWORDS,
     "send($self, obj, *, timeout=None)\n--\n\n"
     "Send a picklable object (or one the connection's codec can encode)."},
    {"recv", (PyCFunction)(void (*)(void))SocketFast_recv, METH_FASTCALL | METH_KEYWORDS,
     "recv($self, *, timeout=None, copy=True)\n--\n\nReceive one object."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SocketFast_members[] = {
    {"sending", T_BOOL, offsetof(SocketFastObject, sending), 0, "send_bytes/send may send (False: the slow way)"},
    {"spin_ns", T_LONGLONG, offsetof(SocketFastObject, spin_ns), READONLY,
     "how long the next receive with no deadline spins before it blocks (adapts)"},
    {"spin_max_ns", T_LONGLONG, offsetof(SocketFastObject, spin_max_ns), READONLY,
     "the longest spin of a receive (0: it never spins)"},
    {"receiving", T_BOOL, offsetof(SocketFastObject, receiving), 0,
     "recv_bytes/recv may receive (False: the slow way)"},
    {NULL, 0, 0, 0, NULL},
};

/* The Connection methods this object takes over (Connection.__init__ installs them):
 * send and recv only without a codec. */
static PyObject *SocketFast_get_connection_methods(SocketFastObject *self, void *unused) {
    int n = self->dumps ? SF_NMETHODS : SF_SEND;
    PyObject *names = PyTuple_New(n);
    for (int i = 0; names && i < n; i++) {
        PyObject *name = PyUnicode_FromString(sf_method_names[i]);
        if (!name) {
            Py_CLEAR(names);
            break;
        }
        PyTuple_SET_ITEM(names, i, name);
    }
    return names;
}

static PyGetSetDef SocketFast_getset[] = {
    {"connection_methods", (getter)SocketFast_get_connection_methods, NULL,
     "the Connection methods this object does (the Connection's own for what it hands on)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SocketFastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hyperpipe._core.SocketFast",
    .tp_basicsize = sizeof(SocketFastObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = (traverseproc)SocketFast_traverse,
    .tp_clear = (inquiry)SocketFast_clear,
    .tp_doc = "A socket Connection's send_bytes/recv_bytes/send/recv for small frames (socket_fast_path).",
    .tp_dealloc = (destructor)SocketFast_dealloc,
    .tp_methods = SocketFast_methods,
    .tp_members = SocketFast_members,
    .tp_getset = SocketFast_getset,
};

/* socket_fast_path(conn_ref, methods, transport, fd, send_limit, recv_limit, pickler, spin_ns) -> SocketFast;
 * pickler: (dumps, loads, protocol, flat_max), or None for a Connection with a codec;
 * spin_ns: the longest spin of a receiver before it blocks (0: none). */
static PyObject *core_socket_fast_path(PyObject *mod, PyObject *args) {
    PyObject *ref, *methods, *transport, *pickler, *dumps = NULL, *loads = NULL, *protocol = NULL;
    int fd;
    Py_ssize_t send_limit, recv_limit, flat_max = 0;
    long long spin_ns = 0;
    if (!PyArg_ParseTuple(args, "O!O!OinnO|L", &_PyWeakref_RefType, &ref, &PyDict_Type, &methods, &transport, &fd,
                          &send_limit, &recv_limit, &pickler, &spin_ns))
        return NULL;
    if (fd < 0 || send_limit < 0 || send_limit > INT32_MAX || recv_limit < 0 || recv_limit > INT32_MAX ||
        spin_ns < 0 || spin_ns > 10000000000LL)
        return PyErr_Format(PyExc_ValueError, "socket_fast_path(): bad descriptor, limits or spin");
    if (pickler != Py_None &&
        (!PyTuple_Check(pickler) ||
         !PyArg_ParseTuple(pickler, "OOO!n", &dumps, &loads, &PyLong_Type, &protocol, &flat_max) ||
         !PyCallable_Check(dumps) || !PyCallable_Check(loads) || flat_max < 0))
        return PyErr_Occurred() ? NULL : PyErr_Format(PyExc_TypeError, "socket_fast_path(): bad pickler");
    if (!(SocketFastType.tp_flags & Py_TPFLAGS_READY)) {
        /* The same signatures and docstrings as the Endpoint's versions of these methods. */
        for (PyMethodDef *m = SocketFast_methods; m->ml_name; m++)
            for (PyMethodDef *e = Endpoint_methods; e->ml_name; e++)
                if (!strcmp(m->ml_name, e->ml_name)) m->ml_doc = e->ml_doc;
        if (PyType_Ready(&SocketFastType) < 0) return NULL;
    }
    for (int i = 0; i < N_COUNT; i++)
        if (!sf_names[i] && !(sf_names[i] = PyUnicode_InternFromString(sf_name_text[i]))) return NULL;
    PyObject *slow[SF_NMETHODS];
    for (int i = 0; i < SF_NMETHODS; i++) {
        slow[i] = PyDict_GetItemString(methods, sf_method_names[i]);
        if (!slow[i])
            return PyErr_Format(PyExc_KeyError, "socket_fast_path() needs the method %s", sf_method_names[i]);
    }
    SocketFastObject *self = PyObject_GC_New(SocketFastObject, &SocketFastType);
    if (!self) return NULL;
    self->conn_ref = Py_NewRef(ref);
    self->transport = Py_NewRef(transport);
    for (int i = 0; i < SF_NMETHODS; i++) self->slow[i] = Py_NewRef(slow[i]);
    self->dumps = Py_XNewRef(dumps);
    self->loads = Py_XNewRef(loads);
    self->protocol = Py_XNewRef(protocol);
    self->flat_max = flat_max;
    self->fd = fd;
    self->send_limit = send_limit;
    self->recv_limit = recv_limit;
    self->sending = self->receiving = 1;
    self->spin_max_ns = self->spin_ns = spin_ns;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

/* -- for event loops: hyperpipe.asyncio's first try ------------------------------------
 *
 * An awaited send or receive first tries what the Connection's fast path does
 * (Endpoint.send_bytes / recv_bytes above) but never hands the call to the Connection's
 * own method, which could block the event loop: whatever these do not do (a full ring, a
 * big or special frame, EOF, a closed end, another thread inside) returns False / None,
 * and the caller goes its general way (a non-blocking attempt through the Connection,
 * then the loop's readiness), which sees the same state and raises or waits as usual.
 * Nothing is sent or consumed unless the call succeeds. The caller checks that the
 * Connection may send / receive at all (the endpoint's flags do not know a read-only or
 * write-only Connection). */

/* aio_try_send_bytes(endpoint, buf) -> True if buf went out as one DATA frame now. */
static PyObject *core_aio_try_send_bytes(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyObject_TypeCheck(args[0], &EndpointType))
        return PyErr_Format(PyExc_TypeError, "aio_try_send_bytes(endpoint, buf)");
    EndpointObject *self = (EndpointObject *)args[0];
    PyObject *buf = args[1];
    int rc = HP_TIMEOUT;
    if (self->sending && self->opened && !self->in_send && self->ep.has_tx &&
        (PyBytes_CheckExact(buf) || PyByteArray_CheckExact(buf) || PyMemoryView_Check(buf))) {
        Py_buffer view;
        if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Clear(); /* e.g. not contiguous: the general way raises its own error */
        } else {
            if ((uint64_t)view.len <= self->inline_max && hp_enter(&self->ep)) {
                const void *parts[1] = {view.buf};
                uint64_t lens[1] = {(uint64_t)view.len};
                rc = hp_try_send(&self->ep, KIND_DATA, 0, parts, lens, 1);
                leave(self);
            }
            PyBuffer_Release(&view);
        }
    }
    return PyBool_FromLong(rc == HP_OK);
}

/* aio_try_recv_bytes(endpoint, spin_seconds) -> the next DATA frame's bytes if one waits
 * or arrives within spin_seconds (spun with the GIL released, never sleeping: the loop
 * is blocked that long), else None. The wake-up token is not touched (as the fast path):
 * the general way arms it before the loop waits on fileno(). */
static PyObject *core_aio_try_recv_bytes(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyObject_TypeCheck(args[0], &EndpointType))
        return PyErr_Format(PyExc_TypeError, "aio_try_recv_bytes(endpoint, spin_seconds)");
    EndpointObject *self = (EndpointObject *)args[0];
    double seconds = PyFloat_AsDouble(args[1]);
    if (seconds == -1.0 && PyErr_Occurred()) return NULL;
    if (!(seconds >= 0 && seconds <= 1.0)) return PyErr_Format(PyExc_ValueError, "spin_seconds must be between 0 and 1");
    if (!(self->receiving && self->opened && !self->in_recv && self->ep.has_rx && hp_enter(&self->ep)))
        Py_RETURN_NONE;
    int ready = hp_ring_readable(&self->ep.rx);
    if (!ready && seconds > 0) {
        Py_BEGIN_ALLOW_THREADS
        ready = hp_spin_readable(&self->ep, (int64_t)(seconds * 1e9));
        Py_END_ALLOW_THREADS
    }
    PyObject *ret = NULL;
    hp_frame frame;
    /* Another thread may have come in while the GIL was released: check again. */
    if (ready && self->receiving && !self->in_recv && hp_recv_try(&self->ep, KIND_DATA, &frame) == HP_OK) {
        ret = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
        if (ret) hp_recv_finish(&self->ep, &frame, 0);
        else hp_reader_exit(&self->ep); /* not consumed */
    }
    leave(self);
    if (ret || PyErr_Occurred()) return ret;
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"segment_create", core_segment_create, METH_VARARGS,
     "segment_create(capacity, nrings, heap_size=0) -> memfd of a new, initialised segment"},
    {"buffer_memfd", core_buffer_memfd, METH_O,
     "buffer_memfd(nbytes) -> a memfd of nbytes, allocated, sealed against resizing"},
    {"copy_stream_min", core_copy_stream_min, METH_NOARGS,
     "copy_stream_min() -> from how many bytes a buffer is copied to the peer with non-temporal stores"},
    {"_copy_stream", core_copy_stream, METH_VARARGS, "_copy_stream(dst, src): a streamed copy (tests)"},
    {"check_memfd", core_check_memfd, METH_VARARGS,
     "check_memfd(fd, size): ProtocolError unless fd is a memfd sealed at >= size bytes"},
    {"_set_errors", core_set_errors, METH_VARARGS,
     "_set_errors(timeout, closed, peer_closed, broken_pipe, protocol, too_long, buffer_too_short)"},
    {"socket_fast_path", core_socket_fast_path, METH_VARARGS,
     "socket_fast_path(conn_ref, methods, transport, fd, send_limit, recv_limit, pickler, spin_ns=0) -> SocketFast"},
    {"aio_try_send_bytes", (PyCFunction)(void (*)(void))core_aio_try_send_bytes, METH_FASTCALL,
     "aio_try_send_bytes(endpoint, buf) -> True if sent now as the fast path would (never waits)"},
    {"aio_try_recv_bytes", (PyCFunction)(void (*)(void))core_aio_try_recv_bytes, METH_FASTCALL,
     "aio_try_recv_bytes(endpoint, spin_seconds) -> bytes of a DATA frame waiting or arriving within the spin, else None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef core_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "hyperpipe._core",
    .m_doc = "hyperpipe's shared-memory core.",
    .m_size = -1,
    .m_methods = core_methods,
};

static int queue_fast_add(PyObject *m); /* the queue's section, at the end */

PyMODINIT_FUNC PyInit__core(void) {
    if (PyType_Ready(&EndpointType) < 0 || PyType_Ready(&HeapMapType) < 0 ||
        PyType_Ready(&HeapBlockType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Endpoint", (PyObject *)&EndpointType) < 0 ||
        PyModule_AddObjectRef(m, "HeapBlock", (PyObject *)&HeapBlockType) < 0 ||
        PyModule_AddIntConstant(m, "HEAP_GRANULE", (long)HP_HEAP_GRANULE) < 0 ||
        PyModule_AddIntConstant(m, "HEAP_BLOCK_HEADER", (long)HP_HEAP_BLOCK_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "VERSION", HP_VERSION) < 0 ||
        PyModule_AddIntConstant(m, "MAX_FDS", HP_MAX_FDS) < 0 || queue_fast_add(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/* -- a queue's item in one call (_queues.py) ---------------------------------------------
 *
 * QueueFast does the common case of a hyperpipe multiprocessing.Queue's put and get over
 * shared memory in one C call: the queue's semaphore and locks (the stdlib's SemLocks,
 * called through their C methods), the reused C pickler, the ring. Anything else (no room
 * in time, a big or out-of-band pickle, an error) hands back to _queues.py's Python path
 * with what it took said by the return code, so the guarantees stay in one place there.
 * One QueueFast per queue and process: a fork makes every one stale (its locks and the
 * connection's lock are replaced in the child), and _queues.py builds a new one. */

#include <sched.h>
#include <pthread.h>
#include <time.h>

/* -- plain items without the pickler: the common case of both ends ------------------
 *
 * An item made only of None, bools, ints of 64 bits, floats, ASCII str, bytes, tuples,
 * lists and dicts of these (exact types; the pickler never consults reducers for them), at
 * most QF_DEPTH deep, with at most QF_SEEN strings and containers and QF_BUF bytes in all,
 * is written here as the protocol 5 pickle the pickler would write (without FRAME, which is
 * optional): strings and containers are memoized as pickle does, so one met twice comes
 * out as one object (BINGET); a tuple met again inside itself (through a list) goes to the
 * pickler, whose dance for it this does not copy. qf_decode reads exactly those opcodes
 * back, and the pickler's FRAME, APPEND and SETITEM (items the feeder thread sent); anything else, or anything out of place, goes to pickle.loads, whose result or
 * error is then the answer: the decoder never decides a pickle is bad. */

enum { QF_BUF = 4096, QF_DEPTH = 16, QF_SEEN = 64, QF_STACK = 256, QF_MARKS = 64 };

typedef struct {
    unsigned char *p, *end;
    PyObject *seen[QF_SEEN]; /* strings and containers met, in order */
    int memo[QF_SEEN];       /* each one's memo index, -1 while a tuple is being written */
    int nseen, nmemo;
} qf_enc;

static int qf_emit(qf_enc *e, const void *src, size_t n) {
    if ((size_t)(e->end - e->p) < n) return 0;
    memcpy(e->p, src, n);
    e->p += n;
    return 1;
}

static int qf_emit_op(qf_enc *e, unsigned char op) { return qf_emit(e, &op, 1); }

/* An opcode with a little-endian length of 1 byte (short) or 4 bytes, then the data. */
static int qf_emit_sized(qf_enc *e, unsigned char short_op, unsigned char long_op, const void *data, size_t n) {
    unsigned char h[5];
    size_t hn;
    if (n < 256) {
        h[0] = short_op;
        h[1] = (unsigned char)n;
        hn = 2;
    } else {
        uint32_t n32 = (uint32_t)n; /* n <= QF_BUF */
        h[0] = long_op;
        memcpy(h + 1, &n32, 4);
        hn = 5;
    }
    return qf_emit(e, h, hn) && qf_emit(e, data, n);
}

/* A string or container: 1 met first (its place in seen is *slot), 0 written already
 * (BINGET written), -1 not writable here (a tuple inside itself, too many). */
static int qf_first_time(qf_enc *e, PyObject *o, int *slot) {
    for (int i = 0; i < e->nseen; i++) {
        if (e->seen[i] != o) continue;
        unsigned char h[2] = {'h', (unsigned char)e->memo[i]}; /* BINGET: QF_SEEN < 256 */
        return e->memo[i] >= 0 && qf_emit(e, h, 2) ? 0 : -1;
    }
    if (e->nseen == QF_SEEN) return -1;
    *slot = e->nseen++;
    e->seen[*slot] = o;
    e->memo[*slot] = -1;
    return 1;
}

/* MEMOIZE the object just written (the next memo index, as the unpickler counts). */
static int qf_memoize(qf_enc *e, int slot) {
    e->memo[slot] = e->nmemo++;
    return qf_emit_op(e, 0x94);
}

/* 1: `o` written; 0: not a plain item (nothing raised; the pickler takes it). */
static int qf_encode(qf_enc *e, PyObject *o, int depth) {
    PyTypeObject *t = Py_TYPE(o);
    unsigned char h[10];
    if (o == Py_None) return qf_emit_op(e, 'N');
    if (o == Py_True || o == Py_False) return qf_emit_op(e, o == Py_True ? 0x88 : 0x89); /* NEWTRUE/NEWFALSE */
    if (t == &PyLong_Type) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
        if (overflow) return 0;
        if (v >= 0 && v < 256) { /* BININT1 */
            h[0] = 'K';
            h[1] = (unsigned char)v;
            return qf_emit(e, h, 2);
        }
        if (v >= 0 && v < 65536) { /* BININT2 */
            uint16_t v16 = (uint16_t)v;
            h[0] = 'M';
            memcpy(h + 1, &v16, 2);
            return qf_emit(e, h, 3);
        }
        if (v >= INT32_MIN && v <= INT32_MAX) { /* BININT */
            int32_t v32 = (int32_t)v;
            h[0] = 'J';
            memcpy(h + 1, &v32, 4);
            return qf_emit(e, h, 5);
        }
        h[0] = 0x8a; /* LONG1: 8 bytes of two's complement */
        h[1] = 8;
        memcpy(h + 2, &v, 8);
        return qf_emit(e, h, 10);
    }
    if (t == &PyFloat_Type) { /* BINFLOAT, big-endian */
        double d = PyFloat_AS_DOUBLE(o);
        uint64_t u;
        memcpy(&u, &d, 8);
        u = __builtin_bswap64(u);
        h[0] = 'G';
        memcpy(h + 1, &u, 8);
        return qf_emit(e, h, 9);
    }
    if (t == &PyUnicode_Type) {
#if PY_VERSION_HEX < 0x030C0000
        if (PyUnicode_READY(o) < 0) {
            PyErr_Clear();
            return 0;
        }
#endif
        if (!PyUnicode_IS_ASCII(o)) return 0;
    } else if (t == &PyTuple_Type && PyTuple_GET_SIZE(o) == 0) {
        return qf_emit_op(e, ')'); /* not memoized */
    } else if (t != &PyBytes_Type && t != &PyTuple_Type && t != &PyList_Type && t != &PyDict_Type) {
        return 0;
    }
    int slot, first = qf_first_time(e, o, &slot);
    if (first <= 0) return first == 0;
    if (t == &PyUnicode_Type) /* SHORT_BINUNICODE / BINUNICODE; ASCII is its own UTF-8 */
        return qf_emit_sized(e, 0x8c, 'X', PyUnicode_DATA(o), (size_t)PyUnicode_GET_LENGTH(o)) && qf_memoize(e, slot);
    if (t == &PyBytes_Type) /* SHORT_BINBYTES / BINBYTES */
        return qf_emit_sized(e, 'C', 'B', PyBytes_AS_STRING(o), (size_t)PyBytes_GET_SIZE(o)) && qf_memoize(e, slot);
    if (depth == QF_DEPTH) return 0;
    if (t == &PyTuple_Type) { /* memoized once built; met inside itself meanwhile: refused */
        Py_ssize_t n = PyTuple_GET_SIZE(o);
        if (n > 3 && !qf_emit_op(e, '(')) return 0;
        for (Py_ssize_t i = 0; i < n; i++)
            if (!qf_encode(e, PyTuple_GET_ITEM(o, i), depth + 1)) return 0;
        return qf_emit_op(e, n > 3 ? 't' : (unsigned char)(0x85 + n - 1)) && qf_memoize(e, slot); /* TUPLE, TUPLE1-3 */
    }
    if (t == &PyList_Type) { /* EMPTY_LIST, MEMOIZE, MARK, items, APPENDS */
        Py_ssize_t n = PyList_GET_SIZE(o);
        if (!qf_emit_op(e, ']') || !qf_memoize(e, slot)) return 0;
        if (n == 0) return 1;
        if (!qf_emit_op(e, '(')) return 0;
        for (Py_ssize_t i = 0; i < n; i++) /* no Python code runs here: the list cannot change */
            if (!qf_encode(e, PyList_GET_ITEM(o, i), depth + 1)) return 0;
        return qf_emit_op(e, 'e');
    }
    /* EMPTY_DICT, MEMOIZE, MARK, keys and values, SETITEMS */
    if (!qf_emit_op(e, '}') || !qf_memoize(e, slot)) return 0;
    if (PyDict_GET_SIZE(o) == 0) return 1;
    if (!qf_emit_op(e, '(')) return 0;
    Py_ssize_t pos = 0;
    PyObject *k, *v;
    while (PyDict_Next(o, &pos, &k, &v))
        if (!qf_encode(e, k, depth + 1) || !qf_encode(e, v, depth + 1)) return 0;
    return qf_emit_op(e, 'u');
}

/* The pickle of a plain item into buf (QF_BUF bytes): its length, or 0 when it is not one. */
static size_t qf_encode_item(PyObject *o, unsigned char *buf) {
    qf_enc e = {.p = buf, .end = buf + QF_BUF, .nseen = 0, .nmemo = 0};
    static const unsigned char proto[2] = {0x80, 5};
    if (!qf_emit(&e, proto, 2) || !qf_encode(&e, o, 0) || !qf_emit_op(&e, '.')) return 0;
    return (size_t)(e.p - buf);
}

/* Pop the values above `base` into a new tuple. */
static PyObject *qf_pop_tuple(PyObject **st, int *sp, int base) {
    PyObject *t = PyTuple_New(*sp - base);
    if (!t) return NULL;
    for (int i = base; i < *sp; i++) PyTuple_SET_ITEM(t, i - base, st[i]); /* steals */
    *sp = base;
    return t;
}

/* The object of `n` bytes of pickle (a private copy, not shared memory) when it uses only the
 * opcodes qf_encode writes, in a well-formed way; else NULL with *other set (nothing raised:
 * pickle.loads decides). NULL without *other: an exception (out of memory). */
static PyObject *qf_decode(const unsigned char *p, size_t n, int *other) {
    PyObject *st[QF_STACK], *memo[QF_SEEN];
    int marks[QF_MARKS];
    int sp = 0, mp = 0, nmemo = 0;
    size_t pos = 2;
    PyObject *v = NULL;
    *other = 1;
    if (n < 4 || p[0] != 0x80 || p[1] != 5) return NULL;
#define QF_NEED(k) if (n - pos < (size_t)(k)) goto out
#define QF_FLOOR (mp ? marks[mp - 1] : 0)
    for (;;) {
        QF_NEED(1);
        unsigned char op = p[pos++];
        uint32_t len;
        v = NULL;
        switch (op) {
        case 'N': v = Py_NewRef(Py_None); break;
        case 0x88: v = Py_NewRef(Py_True); break;
        case 0x89: v = Py_NewRef(Py_False); break;
        case 'K': case 'M': case 'J': { /* BININT1, BININT2 (unsigned), BININT (signed), little-endian */
            uint32_t k = op == 'K' ? 1 : op == 'M' ? 2 : 4, u = 0;
            QF_NEED(k);
            for (uint32_t i = 0; i < k; i++) u |= (uint32_t)p[pos + i] << (8 * i);
            pos += k;
            v = PyLong_FromLong(op == 'J' ? (long)(int32_t)u : (long)u);
            break;
        }
        case 0x8a: { /* LONG1 of at most 8 bytes, little-endian two's complement */
            QF_NEED(1);
            len = p[pos++];
            if (len > 8) goto out;
            QF_NEED(len);
            uint64_t u = 0;
            for (uint32_t i = 0; i < len; i++) u |= (uint64_t)p[pos + i] << (8 * i);
            if (len && len < 8 && (p[pos + len - 1] & 0x80)) u |= ~(uint64_t)0 << (8 * len); /* sign */
            pos += len;
            int64_t s;
            memcpy(&s, &u, 8);
            v = PyLong_FromLongLong(s);
            break;
        }
        case 'G': {
            uint64_t u;
            double d;
            QF_NEED(8);
            memcpy(&u, p + pos, 8);
            pos += 8;
            u = __builtin_bswap64(u);
            memcpy(&d, &u, 8);
            v = PyFloat_FromDouble(d);
            break;
        }
        case 0x8c: case 'C': case 'X': case 'B':
            if (op == 0x8c || op == 'C') {
                QF_NEED(1);
                len = p[pos++];
            } else {
                QF_NEED(4);
                memcpy(&len, p + pos, 4);
                pos += 4;
            }
            QF_NEED(len);
            v = op == 0x8c || op == 'X' ? PyUnicode_DecodeUTF8((const char *)p + pos, len, "surrogatepass")
                                        : PyBytes_FromStringAndSize((const char *)p + pos, len);
            pos += len;
            break;
        case ')': v = PyTuple_New(0); break;
        case ']': v = PyList_New(0); break;
        case '}': v = PyDict_New(); break;
        case 0x85: case 0x86: case 0x87: { /* TUPLE1-3 */
            int k = op - 0x85 + 1;
            if (sp - k < QF_FLOOR) goto out;
            v = qf_pop_tuple(st, &sp, sp - k);
            break;
        }
        case 0x94: /* MEMOIZE: the top of the stack, at the next index */
            if (sp == QF_FLOOR || nmemo == QF_SEEN) goto out;
            memo[nmemo++] = Py_NewRef(st[sp - 1]);
            continue;
        case 'h': /* BINGET */
            QF_NEED(1);
            if (p[pos] >= nmemo) goto out;
            v = Py_NewRef(memo[p[pos++]]);
            break;
        case '(':
            if (mp == QF_MARKS) goto out;
            marks[mp++] = sp;
            continue;
        case 't':
            if (!mp) goto out;
            v = qf_pop_tuple(st, &sp, marks[--mp]);
            break;
        case 0x95: { /* FRAME (the pickler's): only its length is checked, as pickle does */
            uint64_t frame_len;
            QF_NEED(8);
            memcpy(&frame_len, p + pos, 8);
            pos += 8;
            QF_NEED(frame_len);
            continue;
        }
        case 'a': case 's': { /* APPEND, SETITEM (the pickler's for one item) */
            int k = op == 'a' ? 1 : 2;
            if (sp - k - 1 < QF_FLOOR) goto out;
            PyObject *into = st[sp - k - 1];
            int ok;
            if (op == 'a' && PyList_CheckExact(into)) ok = PyList_Append(into, st[sp - 1]) == 0;
            else if (op == 's' && PyDict_CheckExact(into)) ok = PyDict_SetItem(into, st[sp - 2], st[sp - 1]) == 0;
            else goto out;
            for (int i = sp - k; i < sp; i++) Py_DECREF(st[i]);
            sp -= k;
            if (!ok) goto out;
            continue;
        }
        case 'e': case 'u': { /* APPENDS, SETITEMS: into the list or dict below the mark */
            if (!mp) goto out;
            int base = marks[--mp];
            if (base <= QF_FLOOR) goto out; /* no list or dict of this level below the mark */
            PyObject *into = st[base - 1];
            int ok = 1;
            if (op == 'e' && PyList_CheckExact(into)) {
                for (int i = base; i < sp && ok; i++) ok = PyList_Append(into, st[i]) == 0;
            } else if (op == 'u' && PyDict_CheckExact(into) && (sp - base) % 2 == 0) {
                for (int i = base; i < sp && ok; i += 2) ok = PyDict_SetItem(into, st[i], st[i + 1]) == 0;
            } else {
                goto out;
            }
            for (int i = base; i < sp; i++) Py_DECREF(st[i]);
            sp = base;
            if (!ok) goto out; /* e.g. an unhashable key: pickle.loads raises its own error */
            continue;
        }
        case '.':
            if (pos != n || sp != 1 || mp) goto out;
            *other = 0;
            for (int i = 0; i < nmemo; i++) Py_DECREF(memo[i]);
            return st[0];
        default:
            goto out;
        }
        if (!v) {
            if (!PyErr_ExceptionMatches(PyExc_MemoryError)) PyErr_Clear(); /* pickle.loads decides */
            else *other = 0;
            goto out;
        }
        if (sp == QF_STACK) {
            Py_DECREF(v);
            goto out;
        }
        st[sp++] = v;
    }
out:
    if (*other) PyErr_Clear();
    for (int i = 0; i < sp; i++) Py_DECREF(st[i]);
    for (int i = 0; i < nmemo; i++) Py_DECREF(memo[i]);
    return NULL;
#undef QF_NEED
#undef QF_FLOOR
}

/* qf_decode, else pickle.loads (`loads`) of those bytes. */
static PyObject *qf_loads(PyObject *loads, const unsigned char *p, size_t n) {
    int other;
    PyObject *obj = qf_decode(p, n, &other);
    if (obj || !other) return obj;
    PyObject *data = PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    if (!data) return NULL;
    obj = PyObject_CallOneArg(loads, data);
    Py_DECREF(data);
    return obj;
}

/* Test hooks: qf_encode's pickle of obj, or None when the pickler takes it ... */
static PyObject *core_queue_encode(PyObject *mod, PyObject *obj) {
    unsigned char buf[QF_BUF];
    size_t len = qf_encode_item(obj, buf);
    if (!len) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize((const char *)buf, (Py_ssize_t)len);
}

/* ... and (object, True) when qf_decode reads `data`, (None, False) when pickle.loads would. */
static PyObject *core_queue_decode(PyObject *mod, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    int other;
    PyObject *r = qf_decode(view.buf, (size_t)view.len, &other);
    PyBuffer_Release(&view);
    if (!r && !other) return NULL;
    return Py_BuildValue("(NO)", r ? r : Py_NewRef(Py_None), r ? Py_True : Py_False);
}

static PyMethodDef queue_codec_functions[] = {
    {"_queue_encode", core_queue_encode, METH_O, NULL},
    {"_queue_decode", core_queue_decode, METH_O, NULL},
    {NULL, NULL, 0, NULL},
};

/* put's return codes (besides None: sent) */
enum { QF_NOT_TAKEN = 0, QF_TO_FEEDER = 1, QF_SLOW_PUT = 2 };

static uint64_t qf_forks; /* process-local: bumped in the child of every fork */
static void qf_after_fork_child(void) { qf_forks++; }

typedef struct {
    PyObject_HEAD
    uint64_t forks;  /* qf_forks when built; UINT64_MAX: its pickler failed, build anew */
    PyObject *sem_acquire, *sem_release, *wlock_acquire, *wlock_release, *rlock_acquire, *rlock_release;
    EndpointObject *writer, *reader; /* NULL: that end is not open here (the Python path) */
    PyObject *recv_lock_acquire, *recv_lock_release; /* the reader Connection's thread lock */
    PyObject *dump, *clear_memo, *chunks;            /* a pickler writing into chunks */
    PyObject *loads, *loads_special, *special; /* bytes -> object, special item -> object, frame -> item */
    PyObject *not_consumed;                    /* exceptions of a receive that took nothing */
    PyObject *stale;                           /* get's "not done here" */
    PyObject *empty;                           /* queue.Empty */
    uint64_t inline_max;
    int lock_yields;
    int64_t direct_wait_ns;
} QueueFastObject;

static int64_t qf_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic's clock, as the endpoint's deadlines */
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Call a lock method with no argument or one; its truth, or -1 with an exception. */
static int qf_call_truth(PyObject *method, PyObject *arg) {
    PyObject *r = arg ? PyObject_CallOneArg(method, arg) : PyObject_CallNoArgs(method);
    if (!r) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* Call a release method keeping the exception being raised, if any. */
static int qf_release(PyObject *release) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallNoArgs(release);
    if (!r) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, tb);
    return 0;
}

/* _queues._acquire_contended in C: a queue lock is held for about a microsecond per item,
 * so yielding the CPU a few times usually finds it free (no sleep in the kernel, no
 * wake-up call at release). `wait_ns` -1: no limit. 1 taken, 0 not in time, -1. */
static int qf_acquire(QueueFastObject *self, PyObject *acquire, int64_t wait_ns) {
    int got = qf_call_truth(acquire, Py_False);
    if (got != 0) return got;
    int64_t deadline = wait_ns < 0 ? -1 : qf_now_ns() + wait_ns; /* the clock read only when contended */
    for (int i = 0; got == 0 && i < self->lock_yields; i++) {
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
        got = qf_call_truth(acquire, Py_False);
        if (got == 0 && deadline >= 0 && qf_now_ns() >= deadline) return 0;
    }
    if (got != 0) return got;
    PyObject *r;
    if (deadline < 0) {
        r = PyObject_CallOneArg(acquire, Py_True);
    } else {
        int64_t left = deadline - qf_now_ns();
        PyObject *timeout = PyFloat_FromDouble(left > 0 ? (double)left / 1e9 : 0.0);
        if (!timeout) return -1;
        PyObject *args[2] = {Py_True, timeout};
        r = PyObject_Vectorcall(acquire, args, 2, NULL);
        Py_DECREF(timeout);
    }
    if (!r) return -1;
    got = PyObject_IsTrue(r);
    Py_DECREF(r);
    return got;
}

/* The pickle of `obj` when it is one bytes object that fits the ring; NULL otherwise, with
 * an exception (BaseException that is not an Exception) or *slow set (anything else for the
 * Python path: an Exception while pickling, out-of-band buffers, too big). */
static PyObject *qf_pickle(QueueFastObject *self, PyObject *obj, int *slow) {
    PyObject *r = PyObject_CallOneArg(self->dump, obj);
    PyObject *data = NULL;
    if (r) {
        Py_DECREF(r);
        /* out-of-band buffers leave a marker after the pickle's chunk (_queues._Chunks) */
        if (PyList_GET_SIZE(self->chunks) == 1) {
            data = PyList_GET_ITEM(self->chunks, 0);
            if (PyBytes_CheckExact(data) && (uint64_t)PyBytes_GET_SIZE(data) <= self->inline_max) Py_INCREF(data);
            else data = NULL;
        }
        if (!data) *slow = 1;
    } else {
        self->forks = UINT64_MAX; /* a half-written pickler is not reused: build anew */
        if (PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear(); /* the Python path pickles it again and reports it as it does */
            *slow = 1;
        }
    }
    /* keep nothing of the caller's alive; an exception being raised stays */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int cleared = PyList_SetSlice(self->chunks, 0, PY_SSIZE_T_MAX, NULL) == 0;
    PyErr_Restore(type, value, tb);
    if (!cleared || qf_release(self->clear_memo) < 0) {
        Py_XDECREF(data); /* out of memory: nothing sent */
        *slow = 0;
        return NULL;
    }
    return data;
}

/* Send a pickle of this queue, waiting up to `wait_ns` for room (-1: no limit): HP_OK,
 * HP_TIMEOUT (no room in time), -1 (an exception) or another hp status. */
static int qf_send(QueueFastObject *self, const void *data, size_t len, int64_t wait_ns) {
    EndpointObject *ep = self->writer;
    if (!check_dir(ep, 'w')) return -1;
    const void *parts[1] = {data};
    uint64_t lens[1] = {(uint64_t)len};
    int rc = hp_try_send(&ep->ep, KIND_DATA, 0, parts, lens, 1);
    if (rc == HP_TIMEOUT)
        rc = send_blocking(ep, KIND_DATA, 0, parts, lens, 1, NULL, 0, 0, wait_ns < 0 ? -1 : qf_now_ns() + wait_ns);
    leave(ep);
    return rc;
}

/* put(obj): None (sent), QF_NOT_TAKEN (nothing done: the Python path), QF_TO_FEEDER (its
 * place in the queue is taken; the write lock or room did not come within DIRECT_WAIT:
 * queue it for the feeder) or QF_SLOW_PUT (its place is taken; send it the Python way).
 * The caller checked that the queue is open and nothing of this process waits to go. */
static PyObject *QueueFast_put(QueueFastObject *self, PyObject *obj) {
    if (self->forks != qf_forks || !self->writer) return PyLong_FromLong(QF_NOT_TAKEN);
    unsigned char plain[QF_BUF];
    size_t plain_len = qf_encode_item(obj, plain); /* before the locks: it needs none */
    int got = qf_call_truth(self->sem_acquire, Py_False);
    if (got <= 0) return got < 0 ? NULL : PyLong_FromLong(QF_NOT_TAKEN); /* full: put blocks the Python way */
    got = qf_acquire(self, self->wlock_acquire, self->direct_wait_ns);
    if (got <= 0) return got < 0 ? NULL : PyLong_FromLong(QF_TO_FEEDER);
    int slow = 0, code = -1;
    PyObject *data = plain_len ? NULL : qf_pickle(self, obj, &slow);
    if (plain_len || data) {
        int rc = plain_len ? qf_send(self, plain, plain_len, self->direct_wait_ns)
                           : qf_send(self, PyBytes_AS_STRING(data), (size_t)PyBytes_GET_SIZE(data),
                                     self->direct_wait_ns);
        Py_XDECREF(data);
        if (rc == HP_OK) code = -2;
        else if (rc == HP_TIMEOUT) code = QF_TO_FEEDER;
        else if (rc != -1 || PyErr_ExceptionMatches(PyExc_Exception)) {
            PyErr_Clear(); /* nothing sent: the Python path sends it again and reports the error */
            code = QF_SLOW_PUT;
        }
    } else if (slow) {
        code = QF_SLOW_PUT;
    }
    if (qf_release(self->wlock_release) < 0) return NULL;
    if (code == -1) return NULL;
    if (code == -2) Py_RETURN_NONE;
    return PyLong_FromLong(code);
}

/* feed(batch, start, sentinel): the feeder thread's sends, its write lock held: from
 * batch[start] on, each plain item, waiting for room as long as it takes. Returns the index
 * of the first item not sent here (the sentinel, another item, or a send that failed: the
 * Python path sends it and reports its error). */
static PyObject *QueueFast_feed(QueueFastObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_CheckExact(args[0])) {
        PyErr_SetString(PyExc_TypeError, "feed(batch: list, start, sentinel)");
        return NULL;
    }
    Py_ssize_t i = PyLong_AsSsize_t(args[1]);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (self->forks != qf_forks || !self->writer || i < 0) return PyLong_FromSsize_t(i);
    unsigned char buf[QF_BUF];
    for (; i < PyList_GET_SIZE(args[0]); i++) { /* only the feeder holds its batch */
        PyObject *obj = PyList_GET_ITEM(args[0], i);
        size_t len = obj == args[2] ? 0 : qf_encode_item(obj, buf);
        if (!len) break;
        int rc = qf_send(self, buf, len, -1);
        if (rc == HP_OK) continue;
        if (rc == -1 && !PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
        PyErr_Clear();
        break;
    }
    return PyLong_FromSsize_t(i);
}

/* Take one frame of the reader: a DATA frame of at most QF_BUF bytes is copied into buf
 * (*len set, returns Py_None: unpickled from this private copy once the locks are free);
 * a bigger one comes back as bytes, an out-of-band one as special(frame). Called with the
 * queue's read lock and the Connection's receive lock held. */
static PyObject *qf_receive(QueueFastObject *self, int64_t deadline, unsigned char *buf, size_t *len) {
    EndpointObject *ep = self->reader;
    if (!check_dir(ep, 'r')) return NULL;
    hp_frame frame;
    PyObject *item = NULL;
    int rc = wait_frame(ep, deadline, &frame);
    if (rc == HP_TIMEOUT) {
        PyErr_SetNone(self->empty); /* nothing taken */
    } else if (rc != HP_OK) {
        if (rc != -1) raise_status(ep, rc);
    } else if (frame.kind == KIND_DATA && frame.len <= QF_BUF) {
        memcpy(buf, frame.payload, frame.len); /* read once: the peer may rewrite the ring */
        *len = frame.len;
        hp_recv_finish(&ep->ep, &frame, 0);
        item = Py_NewRef(Py_None);
    } else if (frame.kind == KIND_DATA) {
        item = PyBytes_FromStringAndSize((const char *)frame.payload, frame.len);
        if (item) hp_recv_finish(&ep->ep, &frame, 0);
        else hp_reader_exit(&ep->ep);
    } else {
        PyObject *r = special_frame(ep, &frame);
        if (r) {
            item = PyObject_CallOneArg(self->special, r); /* its buffers mapped under the lock */
            Py_DECREF(r);
        }
    }
    leave(ep);
    return item;
}

/* get(block, timeout): the next item, queue.Empty as Queue.get raises it, or `stale` when
 * the Python path must do it (nothing taken). The item is unpickled once the locks are free. */
static PyObject *QueueFast_get(QueueFastObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "get(block, timeout)");
        return NULL;
    }
    if (self->forks != qf_forks || !self->reader) return Py_NewRef(self->stale);
    int block = PyObject_IsTrue(args[0]);
    if (block < 0) return NULL;
    int64_t wait_ns = -1, deadline = -1; /* no limit */
    if (!block) {
        wait_ns = 0;
        deadline = 1; /* passed: take what is there */
    } else if (args[1] != Py_None) {
        double timeout = PyFloat_AsDouble(args[1]);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        wait_ns = timeout > 0 ? (int64_t)(timeout > 9.0e9 ? 9.0e18 : timeout * 1e9) : 0;
        deadline = qf_now_ns() + wait_ns;
    }
    int got = block ? qf_acquire(self, self->rlock_acquire, wait_ns) : qf_call_truth(self->rlock_acquire, Py_False);
    if (got <= 0) {
        if (got == 0) PyErr_SetNone(self->empty);
        return NULL;
    }
    unsigned char buf[QF_BUF];
    size_t len = 0;
    PyObject *item = NULL;
    if (qf_call_truth(self->recv_lock_acquire, NULL) >= 0) {
        item = qf_receive(self, deadline, buf, &len);
        if (qf_release(self->recv_lock_release) < 0) Py_CLEAR(item);
    }
    if (qf_release(self->rlock_release) < 0) Py_CLEAR(item);
    if (!item) {
        /* taken off the ring, then found corrupt or unmappable: it is gone, so is its place */
        if (PyErr_ExceptionMatches(PyExc_Exception) && !PyErr_ExceptionMatches(self->not_consumed) &&
            !PyErr_ExceptionMatches(self->empty))
            qf_release(self->sem_release);
        return NULL;
    }
    if (qf_release(self->sem_release) < 0) {
        Py_DECREF(item);
        return NULL;
    }
    PyObject *obj;
    if (item == Py_None) obj = qf_loads(self->loads, buf, len);
    else obj = PyObject_CallOneArg(PyBytes_CheckExact(item) ? self->loads : self->loads_special, item);
    Py_DECREF(item);
    return obj;
}

#define QF_OBJECTS(X)                                                                              \
    X(sem_acquire) X(sem_release) X(wlock_acquire) X(wlock_release) X(rlock_acquire) X(rlock_release) \
    X(recv_lock_acquire) X(recv_lock_release) X(dump) X(clear_memo) X(chunks) X(loads)           \
    X(loads_special) X(special) X(not_consumed) X(stale) X(empty)

static int QueueFast_traverse(QueueFastObject *self, visitproc visit, void *arg) {
#define QF_VISIT(name) Py_VISIT(self->name);
    QF_OBJECTS(QF_VISIT)
    Py_VISIT(self->writer);
    Py_VISIT(self->reader);
    return 0;
}

static int QueueFast_clear(QueueFastObject *self) {
#define QF_CLEAR(name) Py_CLEAR(self->name);
    QF_OBJECTS(QF_CLEAR)
    Py_CLEAR(self->writer);
    Py_CLEAR(self->reader);
    return 0;
}

static void QueueFast_dealloc(QueueFastObject *self) {
    PyObject_GC_UnTrack(self);
    QueueFast_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject QueueFastType;

/* QueueFast(sem, wlock, rlock, writer, reader, recv_lock, pickler, chunks, loads,
 *           loads_special, special, not_consumed, stale, empty, inline_max, lock_yields,
 *           direct_wait)
 * writer/reader: an Endpoint, or None when that end is not open in this process. */
static PyObject *QueueFast_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *sem, *wlock, *rlock, *writer, *reader, *recv_lock, *pickler;
    unsigned long long inline_max;
    int lock_yields;
    double direct_wait;
    QueueFastObject *self = (QueueFastObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOO!OOOOOOKid:QueueFast", &sem, &wlock, &rlock, &writer, &reader,
                          &recv_lock, &pickler, &PyList_Type, &self->chunks, &self->loads,
                          &self->loads_special, &self->special, &self->not_consumed, &self->stale,
                          &self->empty, &inline_max, &lock_yields, &direct_wait)) {
        self->chunks = self->loads = self->loads_special = self->special = self->not_consumed =
            self->stale = self->empty = NULL;
        Py_DECREF(self);
        return NULL;
    }
    Py_INCREF(self->chunks);
    Py_INCREF(self->loads);
    Py_INCREF(self->loads_special);
    Py_INCREF(self->special);
    Py_INCREF(self->not_consumed);
    Py_INCREF(self->stale);
    Py_INCREF(self->empty);
    self->forks = qf_forks;
    self->inline_max = inline_max;
    self->lock_yields = lock_yields;
    self->direct_wait_ns = (int64_t)(direct_wait * 1e9);
    EndpointObject **ends[2] = {&self->writer, &self->reader};
    PyObject *given[2] = {writer, reader};
    for (int i = 0; i < 2; i++) {
        if (given[i] == Py_None) continue;
        if (!PyObject_TypeCheck(given[i], &EndpointType)) {
            PyErr_SetString(PyExc_TypeError, "QueueFast: an end is an Endpoint or None");
            Py_DECREF(self);
            return NULL;
        }
        *ends[i] = (EndpointObject *)Py_NewRef(given[i]);
    }
    if (!(self->sem_acquire = PyObject_GetAttrString(sem, "acquire")) ||
        !(self->sem_release = PyObject_GetAttrString(sem, "release")) ||
        !(self->wlock_acquire = PyObject_GetAttrString(wlock, "acquire")) ||
        !(self->wlock_release = PyObject_GetAttrString(wlock, "release")) ||
        !(self->rlock_acquire = PyObject_GetAttrString(rlock, "acquire")) ||
        !(self->rlock_release = PyObject_GetAttrString(rlock, "release")) ||
        !(self->recv_lock_acquire = PyObject_GetAttrString(recv_lock, "acquire")) ||
        !(self->recv_lock_release = PyObject_GetAttrString(recv_lock, "release")) ||
        !(self->dump = PyObject_GetAttrString(pickler, "dump")) ||
        !(self->clear_memo = PyObject_GetAttrString(pickler, "clear_memo"))) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static PyMethodDef QueueFast_methods[] = {
    {"put", (PyCFunction)QueueFast_put, METH_O, NULL},
    {"get", (PyCFunction)(void (*)(void))QueueFast_get, METH_FASTCALL, NULL},
    {"feed", (PyCFunction)(void (*)(void))QueueFast_feed, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static PyObject *QueueFast_get_stale(QueueFastObject *self, void *unused) {
    return PyBool_FromLong(self->forks != qf_forks);
}

static PyGetSetDef QueueFast_getset[] = {
    {"stale", (getter)QueueFast_get_stale, NULL, "forked since, or its pickler failed: build anew", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject QueueFastType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hyperpipe._core.QueueFast",
    .tp_basicsize = sizeof(QueueFastObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = QueueFast_new,
    .tp_dealloc = (destructor)QueueFast_dealloc,
    .tp_traverse = (traverseproc)QueueFast_traverse,
    .tp_clear = (inquiry)QueueFast_clear,
    .tp_methods = QueueFast_methods,
    .tp_getset = QueueFast_getset,
};

static int queue_fast_add(PyObject *m) {
    if (PyType_Ready(&QueueFastType) < 0) return -1;
    int err = pthread_atfork(NULL, NULL, qf_after_fork_child);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (PyModule_AddFunctions(m, queue_codec_functions) < 0 ||
        PyModule_AddIntConstant(m, "QF_TO_FEEDER", QF_TO_FEEDER) < 0 ||
        PyModule_AddIntConstant(m, "QF_SLOW_PUT", QF_SLOW_PUT) < 0)
        return -1;
    return PyModule_AddObjectRef(m, "QueueFast", (PyObject *)&QueueFastType);
}
