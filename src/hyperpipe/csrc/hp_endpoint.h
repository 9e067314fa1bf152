/* hp_endpoint.h - one end of a shared-memory pipe: rings + wait/wake + fd passing.
 *
 * Pure C11 + POSIX/Linux, no Python. A duplex end owns:
 *   memfd     the segment (kept so the end can be passed to another process)
 *   sock      its end of an AF_UNIX SOCK_SEQPACKET socketpair: carries out-of-band
 *             buffer fds (SCM_RIGHTS) and reports the peer's death/close as HUP
 *   rx_efd    eventfd shared with the peer: readable <=> our incoming ring has data
 *   tx_efd    the peer's rx_efd (we signal it when we publish and it is armed)
 *   close_efd a process-local eventfd that close() from another thread signals
 *   epoll_fd  created on first fileno(): rx_efd (IN) + sock (RDHUP), for select/poll users
 *   space_efd created on first writer_fileno(): a process-local eventfd that a watcher
 *             thread signals when an armed writer may have room (event loops)
 * The wakeup protocol is described in docs/design.md ("Wakeup protocol").
 */
#ifndef HP_ENDPOINT_H
#define HP_ENDPOINT_H

#include "hp_heap.h"
#include "hp_ring.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>

enum {
    HP_OK = 0,
    HP_TIMEOUT = 1,   /* deadline passed; nothing consumed or sent */
    HP_CLOSED = 2,    /* this end was closed (possibly from another thread) */
    HP_EOF = 3,       /* peer gone and the ring is empty */
    HP_EPIPE = 4,     /* sending to a peer that is gone */
    HP_ECORRUPT = 5,  /* the segment or the control socket holds something impossible:
                         sticky, every later call on the end fails too (ep->corrupt says why) */
    HP_ETOOBIG = 6,   /* payload larger than the ring can ever hold */
    HP_ERRNO = 7,     /* a system call failed: errno is set */
    HP_EINTR = 8,     /* a signal interrupted a sleep: let the caller run handlers, retry */
};

#define HP_MAX_FDS 8
#define HP_PEER_CHECK_NS 10000000LL /* a sender looks at the peer's liveness every 10 ms */

typedef struct hp_endpoint {
    void *base;
    uint64_t map_size;
    int memfd, sock, rx_efd, tx_efd, close_efd, epoll_fd, space_efd;
    int has_rx, has_tx;
    int owner_pid;             /* the process whose close_efd this is */
    int rx_index, tx_index;
    uint64_t heap_size, heap_offset; /* per-ring heap regions (hp_heap.h), 0: none */
    hp_ring rx, tx;
    _Atomic int closed;        /* process-local: set by close() */
    _Atomic int active;        /* process-local: calls inside the endpoint (close waits) */
    int pending_signal;        /* reader-local: rx_efd holds (or is about to hold) a count */
    int holds_token;           /* reader-local: reader_armed is HP_TOKEN_READER by our hand */
    int lazy_held;             /* reader-local: left a call without restoring the fd invariant */
    int announced;             /* sender-local: busy_until is set */
    int rings_populated;       /* process-local: the rings' page tables were filled here */
    _Atomic int readiness_exposed; /* process-local: fileno() was asked for (hp_reader_sync) */
    int peer_eof;              /* reader-local: sock reported HUP */
    _Atomic(const char *) corrupt; /* process-local, sticky: why the segment cannot be trusted */
    int64_t last_peer_check;   /* sender-local */
    int peer_gone;             /* sender-local, sticky */
    uint32_t seen_consumer_closes; /* sender-local */
    uint64_t spin_ns, spin_min_ns, spin_max_ns;
    uint32_t published_cpu;    /* process-local: 1 + the CPU last written to the rings */
    uint64_t max_inflight_bytes, max_inflight_msgs;
    _Atomic uint32_t armed;    /* process-local: 1 + the payload size an armed writer waits to
                                  send (capped), 0 when nothing is armed, UINT32_MAX when the
                                  watcher must end; the private futex an idle watcher sleeps on */
    pthread_t watcher;         /* process-local: turns space_seq wake-ups into space_efd counts */
    int watcher_running;
    /* statistics, process-local */
    uint64_t msgs_sent, msgs_recv, bytes_sent, bytes_recv;
    uint64_t sleeps, wakes_sent, writer_waits, oob_sent, oob_recv, shared_cpu_yields;
} hp_endpoint;

int64_t hp_now_ns(void);

/* A memfd of `size` bytes sealed against shrinking and growing (not against writes), its
 * first `allocate` bytes allocated now (ENOSPC here, never SIGBUS later); -1 (errno). */
int hp_memfd_create(const char *name, uint64_t size, uint64_t allocate);
/* 0 when `fd` is a memfd sealed against resizing and at least `size` (> 0) bytes long,
 * so a mapping of `size` bytes can never fault; else why not (a static message). */
const char *hp_memfd_check(int fd, uint64_t size);

/* Create a zeroed, initialised segment; returns its memfd or -1 (errno). */
int hp_segment_create(uint64_t capacity, uint32_t nrings, uint64_t heap_size);

/* Map and check `memfd`, take ownership of every fd passed (also on failure: they are
 * closed). rx_index/tx_index: ring numbers or -1. Returns 0, or -1 with *err set
 * (a static message) or errno (when *err is NULL). */
int hp_endpoint_open(hp_endpoint *ep, int memfd, int sock, int rx_efd, int tx_efd,
                     int rx_index, int tx_index, const char **err);
/* Mark closed, wake blocked calls (callable from another thread). */
void hp_endpoint_shutdown(hp_endpoint *ep);
/* Release everything; call once no other thread is inside (active == 0). */
void hp_endpoint_release(hp_endpoint *ep);
/* In a forked child: fresh close_efd/epoll, no thread inside. */
int hp_endpoint_after_fork(hp_endpoint *ep);

/* Enter/leave guards for close(): enter returns 0 if closed. The first enter in a
 * process also fills the page tables of the rings (see hp_endpoint.c). */
int hp_enter(hp_endpoint *ep);
void hp_leave(hp_endpoint *ep);

/* Sender: one frame made of `nparts` parts, preceded on the socket by `nfds` fds.
 * `oob_bytes` (the frame's out-of-band size, heap or memfd) counts toward the in-flight
 * byte cap until the consumer takes the frame; frames with fds toward the fd cap.
 * Blocks (spin then sleep) for space. */
int hp_send(hp_endpoint *ep, uint8_t kind, uint16_t flags, const void *const *parts,
            const uint64_t *lens, int nparts, const int *fds, int nfds, uint64_t oob_bytes,
            int64_t deadline_ns);
/* Sender: non-blocking attempt; HP_TIMEOUT when it would block. */
int hp_try_send(hp_endpoint *ep, uint8_t kind, uint16_t flags, const void *const *parts,
                const uint64_t *lens, int nparts);

/* Sender, for event loops: a process-local fd that poll() sees readable when the outgoing
 * ring may have room for what hp_arm_writer armed, or the peer is gone or the end closed
 * (spurious readiness allowed); -1 (errno). */
int hp_writer_fileno(hp_endpoint *ep);
/* Sender: HP_OK when a frame with an `nbytes` payload fits now (also when the peer is gone:
 * the send reports it); else arm the watcher to signal hp_writer_fileno() once the consumer
 * frees space, with stale readiness cleared and the room checked again after arming (no
 * lost wake-up): HP_TIMEOUT. HP_CLOSED, HP_ECORRUPT or HP_ERRNO on error. */
int hp_arm_writer(hp_endpoint *ep, uint64_t nbytes);

/* Sender: about to copy `nbytes` for the next frame (out of band). A receiver waiting
 * for it keeps spinning for about as long as the copy should take, instead of going to
 * sleep mid-copy and paying a wake-up. Cleared by the next send or hp_unannounce.
 * Copies of more than HP_ANNOUNCE_MAX_BYTES are not announced: they run from memory, not
 * cache, and a receiver spinning on the other CPU all that time slowed a 16 MiB copy by
 * 1.3-1.7x on the 2-vCPU VM (docs/benchmarks.md, "shm views"); such a copy announces its
 * last HP_ANNOUNCE_TAIL_BYTES instead, so that a receiver asleep wakes (~30-70 µs
 * there) while the copy ends, not after it (docs/benchmarks.md, "shm views, fifth
 * round"). */
#define HP_ANNOUNCE_MAX_BYTES (UINT64_C(4) << 20)
#define HP_ANNOUNCE_TAIL_BYTES (UINT64_C(1) << 20)
void hp_announce(hp_endpoint *ep, uint64_t nbytes);
void hp_unannounce(hp_endpoint *ep);

/* Receiver: how long until the frame the producer announced it is copying should be
 * published (ns, from the producer's estimate), 0 when none is announced. */
int64_t hp_incoming_eta_ns(hp_endpoint *ep);
/* Receiver: spin up to `ns` for the ring to become readable, never sleeping (no system
 * call unless the peer shares this CPU, then sched_yield): 1 if readable, 0 if not yet
 * (or closed). For callers that must not block long, e.g. an event loop. */
int hp_spin_readable(hp_endpoint *ep, int64_t ns);

/* Mark the end unusable because the peer broke the protocol; returns HP_ECORRUPT. */
int hp_corrupt(hp_endpoint *ep, const char *why);

/* Receiver: look at the next frame without waiting: HP_OK, HP_TIMEOUT (none) or
 * HP_ECORRUPT. */
int hp_recv_peek(hp_endpoint *ep, hp_frame *frame);
/* Receiver: take the next frame without waiting, only if it is of kind `kind`: HP_OK (it
 * is entered as by hp_recv_wait: consume it with hp_recv_finish), HP_TIMEOUT (none, or
 * another kind: nothing changed, no wake-up state touched) or HP_ECORRUPT. */
int hp_recv_try(hp_endpoint *ep, uint8_t kind, hp_frame *frame);
/* Receiver: wait for a frame (peeked, not consumed). HP_OK, HP_EOF, HP_TIMEOUT,
 * HP_CLOSED or HP_ECORRUPT. deadline_ns < 0: no limit; 0: do not wait. */
int hp_recv_wait(hp_endpoint *ep, int64_t deadline_ns, hp_frame *frame);
/* Receiver: consume a frame returned by hp_recv_wait; `oob_bytes` as the sender passed. */
void hp_recv_finish(hp_endpoint *ep, const hp_frame *frame, uint64_t oob_bytes);
/* Receiver: restore the wake protocol after a wait that consumed nothing. */
void hp_reader_exit(hp_endpoint *ep);
/* Receiver: take the `n` fds sent before the current frame. HP_ERRNO with errno EMFILE
 * when this process had no descriptor free for them (they are lost, the stream stays in
 * step), HP_ECORRUPT when the peer did not send what the frame announced. */
int hp_take_fds(hp_endpoint *ep, int n, int *out);
/* Receiver: 1 if `n` more descriptors fit in this process's table now, else 0 (errno).
 * The kernel drops passed descriptors it has no slot for, and the message with them: asking
 * first leaves the frame queued for a later call instead. */
int hp_fd_slots_free(hp_endpoint *ep, int n);

/* fd that select()/poll() see readable when a frame or EOF is pending. */
int hp_fileno(hp_endpoint *ep);
/* Leave a receive call. While nobody outside recv watches fileno() (no hp_reader_sync
 * yet), the wake token stays taken: the writer makes no system call for the next frame.
 * Once fileno() was exposed, restore the invariant for outside sleepers (hp_reader_exit). */
void hp_reader_leave(hp_endpoint *ep);
/* fileno() was handed out: from now on leave every call with the invariant restored, and
 * restore it now. Must not run while another thread is inside a receive call. */
void hp_reader_sync(hp_endpoint *ep);

#endif
