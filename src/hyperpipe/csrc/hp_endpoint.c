/* hp_endpoint.c - waits, wakes and fd passing around the rings of hp_ring.c. */
#include "hp_endpoint.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

int64_t hp_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* -- spinning ------------------------------------------------------------------ */

/* A spinning waiter and its peer can be put on the same CPU by the scheduler (a third
 * task took the other one, or a wake-up was affine), and stay there for milliseconds.
 * Spinning there only delays the peer until our time slice ends, so each side tells
 * the other where it waits (producer_cpu / consumer_cpu, a hint), and a waiter that
 * finds the peer on its own CPU hands the CPU over at once. This is what bounds the
 * round trip's tail on a small or busy machine. */
static uint32_t publish_cpu(hp_endpoint *ep) {
    int cpu = sched_getcpu(); /* glibc reads it from rseq: no system call */
    uint32_t mine = cpu < 0 ? 0 : (uint32_t)cpu + 1;
    if (mine != ep->published_cpu) { /* store only on change: the line is shared */
        ep->published_cpu = mine;
        if (ep->has_rx) atomic_store_explicit(&ep->rx.ctrl->consumer_cpu, mine, memory_order_relaxed);
        if (ep->has_tx) atomic_store_explicit(&ep->tx.ctrl->producer_cpu, mine, memory_order_relaxed);
    }
    return mine;
}

static int peer_on_my_cpu(hp_endpoint *ep) {
    uint32_t mine = publish_cpu(ep);
    uint32_t peer = ep->has_rx ? atomic_load_explicit(&ep->rx.ctrl->producer_cpu, memory_order_relaxed)
                               : atomic_load_explicit(&ep->tx.ctrl->consumer_cpu, memory_order_relaxed);
    return mine != 0 && peer == mine;
}

/* One round of a spin: look at `ready` up to 64 times between pauses, or, when the peer
 * waits on this CPU, only once before yielding it. Returns 1 as soon as ready. */
#define HP_SPIN_ROUND(ep, ready)                                                           \
    do {                                                                                   \
        if (peer_on_my_cpu(ep)) {                                                          \
            if (ready) return_ready = 1;                                                   \
            else {                                                                         \
                (ep)->shared_cpu_yields++;                                                 \
                sched_yield();                                                             \
            }                                                                              \
        } else {                                                                           \
            for (int i_ = 0; i_ < 64 && !return_ready; i_++) {                            \
                if (ready) return_ready = 1;                                               \
                else hp_cpu_relax();                                                       \
            }                                                                              \
            /* a third task may be runnable here: let the kernel decide */                 \
            if (!return_ready) sched_yield();                                              \
        }                                                                                  \
    } while (0)

static void close_fd(int *fd) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
}

/* Milliseconds for poll() until the deadline, rounded up, capped at `cap_ms`. */
static int poll_timeout_ms(int64_t deadline_ns, int cap_ms) {
    if (deadline_ns < 0) return cap_ms;
    int64_t left = deadline_ns - hp_now_ns();
    if (left <= 0) return 0;
    int64_t ms = (left + 999999) / 1000000;
    return ms > cap_ms && cap_ms >= 0 ? cap_ms : (int)ms;
}

static void efd_signal(int fd) {
    uint64_t one = 1;
    ssize_t r;
    do r = write(fd, &one, sizeof one); while (r < 0 && errno == EINTR);
}

static void efd_drain(int fd) {
    uint64_t v;
    ssize_t r;
    do r = read(fd, &v, sizeof v); while (r < 0 && errno == EINTR);
}

static int futex_wait(_Atomic uint32_t *addr, uint32_t expected, int64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000LL), (long)(timeout_ns % 1000000000LL)};
    return (int)syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT, expected, &ts, NULL, 0);
}

static void futex_wake(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
}

/* The same on a word of this process only (no timeout). */
static void futex_wait_private(_Atomic uint32_t *addr, uint32_t expected) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

static void futex_wake_private(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* -- segment ----------------------------------------------------------------- */

/* What an end requires of a memfd before it maps it: its size is fixed. A peer that
 * truncated a mapped memfd would make our next access to the lost pages a SIGBUS. */
#define HP_SIZE_SEALS (F_SEAL_SHRINK | F_SEAL_GROW)

int hp_memfd_create(const char *name, uint64_t size, uint64_t allocate) {
    int fd = memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING);
    if (fd < 0) return -1;
    int rc = ftruncate(fd, (off_t)size);
    if (rc == 0 && allocate) {
        rc = posix_fallocate(fd, 0, (off_t)allocate);
        if (rc > 0) {
            errno = rc;
            rc = -1;
        }
    }
    /* F_SEAL_SEAL: nobody adds a write seal later, which would fail a writable mapping */
    if (rc == 0) rc = fcntl(fd, F_ADD_SEALS, HP_SIZE_SEALS | F_SEAL_SEAL);
    if (rc != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

const char *hp_memfd_check(int fd, uint64_t size) {
    struct stat st;
    int seals = fcntl(fd, F_GET_SEALS);
    if (seals < 0 || (seals & HP_SIZE_SEALS) != HP_SIZE_SEALS)
        return "memfd not sealed against shrinking and growing";
    if (fstat(fd, &st) < 0 || size == 0 || (uint64_t)st.st_size < size) return "memfd smaller than announced";
    return 0;
}

int hp_segment_create(uint64_t capacity, uint32_t nrings, uint64_t heap_size) {
    if (capacity < HP_MIN_CAPACITY || capacity > HP_MAX_CAPACITY || (capacity & (capacity - 1)) ||
        nrings < 1 || nrings > 2 || heap_size > HP_MAX_HEAP || heap_size % HP_HEAP_GRANULE) {
        errno = EINVAL;
        return -1;
    }
    uint64_t rings = hp_segment_rings_size(capacity, nrings);
    /* Allocate the rings and heap bitmaps now; heap data pages are allocated on first use
       (within the sealed size, which F_SEAL_GROW allows). */
    int fd = hp_memfd_create("hyperpipe-ring", hp_segment_size(capacity, nrings, heap_size), rings);
    if (fd < 0) return -1;
    int rc = 0;
    for (uint32_t i = 0; rc == 0 && heap_size && i < nrings; i++)
        rc = posix_fallocate(fd, (off_t)hp_segment_heap_offset(capacity, nrings, heap_size, i),
                             (off_t)hp_heap_meta_size(heap_size));
    if (rc > 0) {
        errno = rc;
        rc = -1;
    }
    void *base = rc == 0 ? mmap(NULL, rings, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : MAP_FAILED;
    if (base == MAP_FAILED) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    hp_segment_init(base, capacity, nrings, heap_size);
    munmap(base, rings);
    return fd;
}

/* -- lifetime ---------------------------------------------------------------- */

int hp_endpoint_open(hp_endpoint *ep, int memfd, int sock, int rx_efd, int tx_efd,
                     int rx_index, int tx_index, const char **err) {
    memset(ep, 0, sizeof *ep);
    ep->memfd = memfd;
    ep->sock = sock;
    ep->rx_efd = rx_efd;
    ep->tx_efd = tx_efd;
    ep->close_efd = -1;
    ep->epoll_fd = -1;
    ep->space_efd = -1;
    ep->base = MAP_FAILED;
    *err = 0;
    /* the header first, to learn how much to map */
    hp_seg_header head;
    ssize_t got = pread(memfd, &head, sizeof head, 0);
    if (got < 0) goto fail;
    if (got != (ssize_t)sizeof head) {
        *err = "segment smaller than its header";
        goto fail;
    }
    /* checked on a private copy: the peer cannot change what we go on to use */
    if ((*err = hp_segment_check(&head, UINT64_MAX)) != 0) goto fail;
    /* and the memfd can never become smaller than what we map */
    if ((*err = hp_memfd_check(memfd, head.total_size)) != 0) goto fail;
    uint64_t rings = hp_segment_rings_size(head.capacity, head.nrings);
    ep->base = mmap(NULL, rings, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    if (ep->base == MAP_FAILED) goto fail;
    ep->map_size = rings;
    uint32_t nrings = head.nrings;
    if (rx_index >= (int)nrings || tx_index >= (int)nrings || (rx_index < 0 && tx_index < 0) ||
        (rx_index >= 0 && rx_efd < 0) || (tx_index >= 0 && tx_efd < 0)) {
        *err = "ring index out of range for this segment";
        goto fail;
    }
    ep->rx_index = rx_index;
    ep->tx_index = tx_index;
    ep->heap_size = head.heap_size;
    ep->heap_offset = head.heap_offset;
    if (rx_index >= 0) {
        ep->has_rx = 1;
        hp_ring_attach(&ep->rx, ep->base, &head, (uint32_t)rx_index);
    }
    if (tx_index >= 0) {
        ep->has_tx = 1;
        hp_ring_attach(&ep->tx, ep->base, &head, (uint32_t)tx_index);
    }
    ep->close_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (ep->close_efd < 0) goto fail;
    ep->owner_pid = getpid();
    ep->spin_min_ns = 2000;
    ep->spin_max_ns = 50000;
    ep->spin_ns = ep->spin_max_ns;
    ep->max_inflight_bytes = UINT64_C(1) << 29;
    ep->max_inflight_msgs = 64;
    ep->last_peer_check = hp_now_ns();
    if (ep->has_tx) ep->seen_consumer_closes = atomic_load(&ep->tx.ctrl->consumer_closes);
    return 0;
fail:;
    int saved = errno;
    hp_endpoint_release(ep);
    errno = saved;
    return -1;
}

/* `armed` value that tells the watcher thread to end (a word it may be asleep on). */
#define HP_ARMED_STOP UINT32_MAX

static void stop_watcher(hp_endpoint *ep) {
    atomic_store_explicit(&ep->armed, HP_ARMED_STOP, memory_order_release);
    futex_wake_private(&ep->armed);
    if (ep->has_tx) futex_wake(&ep->tx.ctrl->space_seq);
}

void hp_endpoint_shutdown(hp_endpoint *ep) {
    if (atomic_exchange(&ep->closed, 1)) return;
    /* close_efd is inherited across fork until hp_endpoint_after_fork replaces it:
       never wake another process's threads */
    if (ep->close_efd >= 0 && getpid() == ep->owner_pid) efd_signal(ep->close_efd);
    if (ep->has_tx) futex_wake(&ep->tx.ctrl->space_seq);
    stop_watcher(ep);
}

void hp_endpoint_release(hp_endpoint *ep) {
    atomic_store(&ep->closed, 1);
    if (ep->watcher_running) { /* before the mapping goes: it reads the ring */
        stop_watcher(ep);
        pthread_join(ep->watcher, NULL);
        ep->watcher_running = 0;
    }
    close_fd(&ep->sock);
    /* after the socket: a producer that sees the new count and polls sees our HUP too
       (when this was the last copy of our end) */
    if (ep->has_rx) atomic_fetch_add_explicit(&ep->rx.ctrl->consumer_closes, 1, memory_order_release);
    if (ep->base != MAP_FAILED && ep->base != NULL) munmap(ep->base, ep->map_size);
    ep->base = MAP_FAILED;
    ep->has_rx = ep->has_tx = 0;
    close_fd(&ep->memfd);
    close_fd(&ep->sock);
    close_fd(&ep->rx_efd);
    close_fd(&ep->tx_efd);
    close_fd(&ep->close_efd);
    close_fd(&ep->epoll_fd);
    close_fd(&ep->space_efd);
}

int hp_endpoint_after_fork(hp_endpoint *ep) {
    /* The parent's threads do not exist here; its close_efd and epoll are shared
       kernel objects that a close() in the parent would signal, so make our own. */
    atomic_store(&ep->active, 0);
    ep->holds_token = 0; /* take it again through the shared word (parent and child share it) */
    ep->lazy_held = 0;
    ep->rings_populated = 0; /* fork copied no page tables of the shared mapping */
    close_fd(&ep->close_efd);
    close_fd(&ep->epoll_fd);
    /* the parent's watcher does not run here, and it signals the parent's space_efd */
    ep->watcher_running = 0;
    atomic_store(&ep->armed, 0);
    close_fd(&ep->space_efd);
    ep->owner_pid = getpid();
    if (atomic_load(&ep->closed)) return 0;
    ep->close_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return ep->close_efd < 0 ? -1 : 0;
}

/* The ring pages exist from hp_segment_create on (fallocate), but each process maps
 * them lazily, and fork() does not copy a shared mapping's page tables: without this,
 * the first pass through a ring takes a page fault every 4 KiB on each side (one round
 * trip in 57 of 64 bytes, at several µs each). One madvise per process maps them all. */
static void populate_rings(hp_endpoint *ep) {
    ep->rings_populated = 1;
#ifdef MADV_POPULATE_WRITE
    if (madvise(ep->base, ep->map_size, MADV_POPULATE_WRITE) == 0) return;
#endif
    /* older kernels (< 5.14): read one byte a page; shmem maps a shared writable page
       on a read fault, so the writer takes no fault later */
    const volatile unsigned char *p = (const volatile unsigned char *)ep->base;
    for (uint64_t off = 0; off < ep->map_size; off += 4096) (void)p[off];
}

int hp_enter(hp_endpoint *ep) {
    atomic_fetch_add_explicit(&ep->active, 1, memory_order_acq_rel);
    if (atomic_load_explicit(&ep->closed, memory_order_acquire)) {
        atomic_fetch_sub_explicit(&ep->active, 1, memory_order_acq_rel);
        return 0;
    }
    if (!ep->rings_populated) populate_rings(ep);
    return 1;
}

void hp_leave(hp_endpoint *ep) { atomic_fetch_sub_explicit(&ep->active, 1, memory_order_acq_rel); }

int hp_fileno(hp_endpoint *ep) {
    if (ep->epoll_fd >= 0) return ep->epoll_fd;
    int fd = epoll_create1(EPOLL_CLOEXEC);
    if (fd < 0) return -1;
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    if (ep->has_rx) {
        ev.events = EPOLLIN;
        if (epoll_ctl(fd, EPOLL_CTL_ADD, ep->rx_efd, &ev) < 0) goto fail;
    }
    ev.events = EPOLLRDHUP; /* HUP/ERR are always reported */
    if (epoll_ctl(fd, EPOLL_CTL_ADD, ep->sock, &ev) < 0) goto fail;
    ep->epoll_fd = fd;
    return fd;
fail:;
    int saved = errno;
    close(fd);
    errno = saved;
    return -1;
}

/* -- peer liveness --------------------------------------------------------- */

/* 1 if the socket reports that every copy of the peer's end is closed. */
static int sock_hup(int sock) {
    struct pollfd p = {sock, POLLRDHUP, 0};
    int r;
    do r = poll(&p, 1, 0); while (r < 0 && errno == EINTR);
    return r > 0 && (p.revents & (POLLHUP | POLLRDHUP | POLLERR | POLLNVAL));
}

static int sender_peer_gone(hp_endpoint *ep, int force) {
    if (ep->peer_gone) return 1;
    uint32_t closes = atomic_load_explicit(&ep->tx.ctrl->consumer_closes, memory_order_relaxed);
    if (closes != ep->seen_consumer_closes) {
        ep->seen_consumer_closes = closes;
        force = 1;
    }
    int64_t now = hp_now_ns();
    if (!force && now - ep->last_peer_check < HP_PEER_CHECK_NS) return 0;
    ep->last_peer_check = now;
    ep->peer_gone = sock_hup(ep->sock);
    return ep->peer_gone;
}

/* -- sending ------------------------------------------------------------------ */

/* 1 when the out-of-band caps let this frame go, 0 when not yet, HP_RING_CORRUPT when
 * the consumer claims to have taken more messages than were sent. The byte counts are
 * only a cap: the consumer counts a frame's logical size, which for a part of a shared
 * block is the block's, so its count may pass ours (read as nothing in flight). */
static int inflight_ok(const hp_endpoint *ep, uint64_t oob_bytes, int nfds) {
    if (!oob_bytes && !nfds) return 1;
    const hp_ring_ctrl *c = ep->tx.ctrl;
    uint64_t bytes_sent = atomic_load_explicit(&c->oob_bytes_sent, memory_order_relaxed);
    uint64_t bytes_recv = atomic_load_explicit(&c->oob_bytes_recv, memory_order_acquire);
    uint64_t msgs_sent = atomic_load_explicit(&c->oob_msgs_sent, memory_order_relaxed);
    uint64_t msgs_recv = atomic_load_explicit(&c->oob_msgs_recv, memory_order_acquire);
    if (msgs_recv > msgs_sent) return HP_RING_CORRUPT;
    uint64_t bytes = bytes_recv > bytes_sent ? 0 : bytes_sent - bytes_recv, msgs = msgs_sent - msgs_recv;
    if (msgs == 0 && bytes == 0) return 1; /* one message always goes, whatever its size */
    return bytes + oob_bytes <= ep->max_inflight_bytes && msgs + 1 <= ep->max_inflight_msgs;
}

/* 1 with *head when the frame can go now, 0 when not yet, HP_RING_CORRUPT. */
static int writable(const hp_endpoint *ep, uint32_t len, uint64_t oob_bytes, int nfds, uint64_t *head) {
    int room = hp_ring_can_write(&ep->tx, len, head);
    return room > 0 ? inflight_ok(ep, oob_bytes, nfds) : room;
}

static const char *const bad_outgoing = "the peer corrupted the outgoing ring's indices or counters";

static int wait_writable(hp_endpoint *ep, uint32_t len, uint64_t oob_bytes, int nfds,
                         int64_t deadline_ns, uint64_t *head) {
    hp_ring_ctrl *c = ep->tx.ctrl;
    int w;
    int64_t spin_end = hp_now_ns() + (int64_t)ep->spin_ns;
    if (deadline_ns >= 0 && deadline_ns < spin_end) spin_end = deadline_ns; /* spin no longer than allowed */
    while (hp_now_ns() < spin_end) {
        int return_ready = 0;
        HP_SPIN_ROUND(ep, (w = writable(ep, len, oob_bytes, nfds, head)) != 0);
        if (return_ready) return w > 0 ? HP_OK : hp_corrupt(ep, bad_outgoing);
        if (atomic_load_explicit(&ep->closed, memory_order_relaxed)) return HP_CLOSED;
    }
    ep->writer_waits++;
    for (;;) {
        atomic_store_explicit(&c->writer_waiting, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst); /* Dekker pair with hp_ring_release */
        uint32_t seq = atomic_load_explicit(&c->space_seq, memory_order_acquire);
        w = writable(ep, len, oob_bytes, nfds, head);
        if (w != 0) return w > 0 ? HP_OK : hp_corrupt(ep, bad_outgoing);
        if (atomic_load(&ep->closed)) return HP_CLOSED;
        if (sender_peer_gone(ep, 1)) return HP_EPIPE;
        int64_t slice = HP_PEER_CHECK_NS;
        if (deadline_ns >= 0) {
            int64_t left = deadline_ns - hp_now_ns();
            if (left <= 0) return HP_TIMEOUT;
            if (left < slice) slice = left;
        }
        if (futex_wait(&c->space_seq, seq, slice) < 0 && errno == EINTR) return HP_EINTR;
    }
}

static int send_fds(hp_endpoint *ep, const int *fds, int nfds, int64_t deadline_ns) {
    char byte = 'F';
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int) * HP_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    memset(&ctl, 0, sizeof ctl);
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
    struct cmsghdr *cm = CMSG_FIRSTHDR(&msg);
    cm->cmsg_level = SOL_SOCKET;
    cm->cmsg_type = SCM_RIGHTS;
    cm->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
    memcpy(CMSG_DATA(cm), fds, sizeof(int) * nfds);
    for (;;) {
        ssize_t r = sendmsg(ep->sock, &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r >= 0) return HP_OK;
        if (errno == EINTR) continue;
        if (errno == EPIPE || errno == ECONNRESET || errno == ENOTCONN) {
            ep->peer_gone = 1;
            return HP_EPIPE;
        }
        if (errno != EAGAIN) return HP_ERRNO;
        struct pollfd p[2] = {{ep->sock, POLLOUT, 0}, {ep->close_efd, POLLIN, 0}};
        int ms = poll_timeout_ms(deadline_ns, 10);
        if (deadline_ns >= 0 && ms == 0 && hp_now_ns() >= deadline_ns) return HP_TIMEOUT;
        if (poll(p, 2, ms) < 0 && errno != EINTR) return HP_ERRNO;
        if (atomic_load(&ep->closed)) return HP_CLOSED;
    }
}

/* How long a receiver may spin for a message announced as being copied: the estimate
 * assumes 2 GB/s (copies here run at 10-25), and the cap bounds what a stalled or dead
 * sender can cost the receiver before it sleeps as usual. */
#define HP_ANNOUNCE_SLACK_NS 100000LL
#define HP_ANNOUNCE_SPIN_MAX_NS 10000000LL

void hp_announce(hp_endpoint *ep, uint64_t nbytes) {
    if (nbytes > HP_ANNOUNCE_MAX_BYTES) return;
    int64_t until = hp_now_ns() + HP_ANNOUNCE_SLACK_NS + (int64_t)(nbytes / 2);
    atomic_store_explicit(&ep->tx.ctrl->busy_until, until, memory_order_relaxed);
    ep->announced = 1;
    /* A reader asleep now would sleep through the copy and then pay a wake-up: wake it
       now instead, so that its wake-up overlaps the copy (it then spins for the frame).
       The token protocol is publish's; the early count is a spurious wake-up at worst. */
    if (hp_ring_take_reader_token(&ep->tx)) {
        efd_signal(ep->tx_efd);
        ep->wakes_sent++;
    }
}

void hp_unannounce(hp_endpoint *ep) {
    if (!ep->announced) return;
    atomic_store_explicit(&ep->tx.ctrl->busy_until, 0, memory_order_relaxed);
    ep->announced = 0;
}

static void publish(hp_endpoint *ep, uint64_t head, uint8_t kind, uint8_t nfds, uint16_t flags,
                    const void *const *parts, const uint64_t *lens, int nparts) {
    hp_ring_write(&ep->tx, head, kind, nfds, flags, parts, lens, nparts);
    hp_unannounce(ep);
    if (hp_ring_take_reader_token(&ep->tx)) {
        efd_signal(ep->tx_efd);
        ep->wakes_sent++;
    }
    ep->msgs_sent++;
}

static uint64_t total_len(const uint64_t *lens, int nparts) {
    uint64_t n = 0;
    for (int i = 0; i < nparts; i++) n += lens[i];
    return n;
}

int hp_try_send(hp_endpoint *ep, uint8_t kind, uint16_t flags, const void *const *parts,
                const uint64_t *lens, int nparts) {
    uint64_t len = total_len(lens, nparts), head;
    if (atomic_load_explicit(&ep->corrupt, memory_order_relaxed)) return HP_ECORRUPT;
    if (len > hp_ring_max_payload(&ep->tx)) return HP_ETOOBIG;
    if (sender_peer_gone(ep, 0)) return HP_EPIPE;
    int room = hp_ring_can_write(&ep->tx, (uint32_t)len, &head);
    if (room <= 0) return room == 0 ? HP_TIMEOUT : hp_corrupt(ep, bad_outgoing);
    publish(ep, head, kind, 0, flags, parts, lens, nparts);
    ep->bytes_sent += len;
    return HP_OK;
}

int hp_send(hp_endpoint *ep, uint8_t kind, uint16_t flags, const void *const *parts,
            const uint64_t *lens, int nparts, const int *fds, int nfds, uint64_t oob_bytes,
            int64_t deadline_ns) {
    uint64_t len = total_len(lens, nparts), head;
    if (atomic_load_explicit(&ep->corrupt, memory_order_relaxed)) return HP_ECORRUPT;
    if (len > hp_ring_max_payload(&ep->tx) || nfds > HP_MAX_FDS || nfds < 0) return HP_ETOOBIG;
    if (sender_peer_gone(ep, nfds > 0)) return HP_EPIPE;
    int w = writable(ep, (uint32_t)len, oob_bytes, nfds, &head);
    if (w < 0) return hp_corrupt(ep, bad_outgoing);
    if (w == 0) {
        if (deadline_ns == 0) return HP_TIMEOUT;
        int rc = wait_writable(ep, (uint32_t)len, oob_bytes, nfds, deadline_ns, &head);
        if (rc != HP_OK) return rc;
    }
    hp_ring_ctrl *c = ep->tx.ctrl;
    if (nfds > 0) {
        int rc = send_fds(ep, fds, nfds, deadline_ns);
        if (rc != HP_OK) return rc;
        /* producer-owned counters; the consumer only reads its own *_recv ones */
        atomic_store_explicit(&c->oob_msgs_sent,
                              atomic_load_explicit(&c->oob_msgs_sent, memory_order_relaxed) + 1,
                              memory_order_relaxed);
        ep->oob_sent++;
    }
    if (oob_bytes)
        atomic_store_explicit(&c->oob_bytes_sent,
                              atomic_load_explicit(&c->oob_bytes_sent, memory_order_relaxed) + oob_bytes,
                              memory_order_relaxed);
    publish(ep, head, kind, (uint8_t)nfds, flags, parts, lens, nparts);
    ep->bytes_sent += len + oob_bytes;
    return HP_OK;
}

/* -- room to write, for event loops ---------------------------------------------- */

/* Whether a frame with an `nbytes` payload may go now. Conservative, since the caller's
 * choice of inline or out of band is not known here: room for the frame inline (at most
 * the largest inline payload) and under the in-flight caps as if it went out of band.
 * Once the consumer has taken everything both hold, so an armed writer always wakes. */
static int arm_fits(const hp_endpoint *ep, uint64_t nbytes) {
    uint64_t head, max = hp_ring_max_payload(&ep->tx);
    return writable(ep, (uint32_t)(nbytes < max ? nbytes : max), nbytes, 1, &head);
}

/* Sleeps while nothing is armed; while armed, waits as a blocked sender does (writer_waiting,
 * FUTEX_WAIT on space_seq in slices that look at the peer's liveness), then disarms and
 * signals space_efd. */
static void *watch_space(void *arg) {
    hp_endpoint *ep = arg;
    hp_ring_ctrl *c = ep->tx.ctrl;
    for (;;) {
        uint32_t want = atomic_load_explicit(&ep->armed, memory_order_acquire);
        if (want == HP_ARMED_STOP) break;
        if (want == 0) {
            futex_wait_private(&ep->armed, 0);
            continue;
        }
        atomic_store_explicit(&c->writer_waiting, 1, memory_order_relaxed);
        atomic_thread_fence(memory_order_seq_cst); /* Dekker pair with hp_ring_release */
        uint32_t seq = atomic_load_explicit(&c->space_seq, memory_order_acquire);
        if (arm_fits(ep, want - 1) != 0 || sock_hup(ep->sock)) { /* room, corrupt or peer gone */
            if (atomic_compare_exchange_strong_explicit(&ep->armed, &want, 0, memory_order_acq_rel,
                                                        memory_order_relaxed))
                efd_signal(ep->space_efd);
            continue;
        }
        futex_wait(&c->space_seq, seq, HP_PEER_CHECK_NS);
    }
    efd_signal(ep->space_efd); /* closing: a waiting event loop finds out */
    return NULL;
}

int hp_writer_fileno(hp_endpoint *ep) {
    if (ep->space_efd < 0) ep->space_efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    return ep->space_efd;
}

int hp_arm_writer(hp_endpoint *ep, uint64_t nbytes) {
    if (atomic_load_explicit(&ep->corrupt, memory_order_relaxed)) return HP_ECORRUPT;
    int fits = arm_fits(ep, nbytes);
    if (fits < 0) return hp_corrupt(ep, bad_outgoing);
    if (fits || sender_peer_gone(ep, 0)) return HP_OK;
    if (hp_writer_fileno(ep) < 0) return HP_ERRNO;
    if (!ep->watcher_running) {
        int rc = pthread_create(&ep->watcher, NULL, watch_space, ep);
        if (rc != 0) {
            errno = rc;
            return HP_ERRNO;
        }
        ep->watcher_running = 1;
        pthread_setname_np(ep->watcher, "hp-room-watch"); /* for ps, gdb and the tests */
    }
    efd_drain(ep->space_efd); /* a count from an earlier arming is stale */
    uint32_t want = nbytes >= HP_ARMED_STOP - 2 ? HP_ARMED_STOP - 2 : (uint32_t)nbytes;
    atomic_store_explicit(&ep->armed, want + 1, memory_order_release);
    futex_wake_private(&ep->armed);
    /* Room that came before the watcher looked is seen by its first check; this one only
       spares the caller a round through its event loop. */
    uint32_t armed = want + 1;
    if (arm_fits(ep, nbytes) > 0 &&
        atomic_compare_exchange_strong_explicit(&ep->armed, &armed, 0, memory_order_acq_rel, memory_order_relaxed))
        return HP_OK;
    return HP_TIMEOUT;
}

/* -- receiving ---------------------------------------------------------------- */

/* Take the wake token so that the writer does not signal while we are active. */
static void reader_enter(hp_endpoint *ep) {
    if (ep->holds_token) return; /* kept since the last call: no shared write at all */
    _Atomic uint32_t *armed = &ep->rx.ctrl->reader_armed;
    if (atomic_exchange_explicit(armed, HP_TOKEN_READER, memory_order_acq_rel) == HP_TOKEN_WRITER)
        ep->pending_signal = 1; /* the writer took it: rx_efd has (or will have) a count */
    ep->holds_token = 1;
}

/* Leave the invariant for sleepers outside of recv: ring non-empty <=> rx_efd readable;
 * ring empty <=> token armed and rx_efd drained. */
void hp_reader_exit(hp_endpoint *ep) {
    _Atomic uint32_t *armed = &ep->rx.ctrl->reader_armed;
    ep->lazy_held = 0;
    if (hp_ring_readable(&ep->rx)) {
        if (!ep->pending_signal) efd_signal(ep->rx_efd);
        ep->pending_signal = 1;
        return; /* the token stays taken */
    }
    if (ep->pending_signal) {
        efd_drain(ep->rx_efd);
        ep->pending_signal = 0;
    }
    atomic_store_explicit(armed, HP_TOKEN_ARMED, memory_order_relaxed);
    ep->holds_token = 0;
    atomic_thread_fence(memory_order_seq_cst); /* Dekker pair with hp_ring_take_reader_token */
    if (hp_ring_readable(&ep->rx)) {
        if (atomic_exchange_explicit(armed, HP_TOKEN_READER, memory_order_acq_rel) == HP_TOKEN_ARMED)
            efd_signal(ep->rx_efd);
        ep->pending_signal = 1; /* ours, or the writer's who took the token first */
        ep->holds_token = 1;
    }
}

void hp_reader_leave(hp_endpoint *ep) {
    if (atomic_load_explicit(&ep->readiness_exposed, memory_order_acquire)) hp_reader_exit(ep);
    else ep->lazy_held = 1;
}

void hp_reader_sync(hp_endpoint *ep) {
    atomic_store_explicit(&ep->readiness_exposed, 1, memory_order_release);
    if (ep->lazy_held) hp_reader_exit(ep);
}

int hp_corrupt(hp_endpoint *ep, const char *why) {
    const char *none = 0; /* the first reason stays */
    atomic_compare_exchange_strong_explicit(&ep->corrupt, &none, why, memory_order_relaxed, memory_order_relaxed);
    return HP_ECORRUPT;
}

int hp_recv_peek(hp_endpoint *ep, hp_frame *frame) {
    int r = hp_ring_peek(&ep->rx, frame);
    if (r == HP_RING_EMPTY) return HP_TIMEOUT;
    if (r == HP_RING_CORRUPT) return hp_corrupt(ep, "the peer corrupted the incoming ring (impossible index or frame)");
    if (frame->nfds > HP_MAX_FDS) return hp_corrupt(ep, "a frame announces more descriptors than a frame can carry");
    return HP_OK;
}

int hp_recv_try(hp_endpoint *ep, uint8_t kind, hp_frame *frame) {
    if (atomic_load_explicit(&ep->corrupt, memory_order_relaxed)) return HP_ECORRUPT;
    int rc = hp_recv_peek(ep, frame);
    if (rc != HP_OK) return rc;
    if (frame->kind != kind) return HP_TIMEOUT;
    reader_enter(ep); /* after the peek: the frame stays there, nobody else consumes */
    return HP_OK;
}

/* HP_OK or HP_ECORRUPT, else -1 (nothing yet). */
static int peek_or_eof(hp_endpoint *ep, hp_frame *frame) {
    int rc = hp_recv_peek(ep, frame);
    return rc == HP_TIMEOUT ? -1 : rc;
}

/* After a spin that failed: if the frame came soon after all, spinning a little longer
 * would have caught it (and spared two system calls), so spin the full window again;
 * if it came late (an idle peer), spin less, so an idle receiver burns little. A rule
 * that only shrank the window on failure could lock both sides of a ping-pong into
 * sleeping, each too slow for the other's shorter window. */
static void adapt_spin(hp_endpoint *ep, int64_t wait_start) {
    if (wait_start == 0) return;
    if (hp_now_ns() - wait_start < 4 * (int64_t)ep->spin_max_ns) ep->spin_ns = ep->spin_max_ns;
    else ep->spin_ns = ep->spin_ns / 2 < ep->spin_min_ns ? ep->spin_min_ns : ep->spin_ns / 2;
}

int64_t hp_incoming_eta_ns(hp_endpoint *ep) {
    int64_t until = atomic_load_explicit(&ep->rx.ctrl->busy_until, memory_order_relaxed);
    int64_t left = until - hp_now_ns();
    return until > 0 && left > 0 ? left : 0;
}

/* Spin for a frame until `end`: 1 when one is readable, 0 at `end`, -1 when closed. */
static int spin_for_frame(hp_endpoint *ep, int64_t end) {
    do {
        int return_ready = 0;
        HP_SPIN_ROUND(ep, hp_ring_readable(&ep->rx));
        if (return_ready) return 1;
        if (atomic_load_explicit(&ep->closed, memory_order_relaxed)) return -1;
    } while (hp_now_ns() < end);
    return 0;
}

int hp_spin_readable(hp_endpoint *ep, int64_t ns) { return spin_for_frame(ep, hp_now_ns() + ns) == 1; }

/* How long a waiting receiver may go on spinning for a copy announced to it: the
 * producer's estimate, at most HP_ANNOUNCE_SPIN_MAX_NS past `since`, never past the
 * deadline (< 0: none). 0 when nothing is announced. */
static int64_t copy_spin_budget(hp_endpoint *ep, int64_t since, int64_t deadline_ns) {
    int64_t now = hp_now_ns(), eta = hp_incoming_eta_ns(ep);
    int64_t cap = since + HP_ANNOUNCE_SPIN_MAX_NS - now;
    if (eta > cap) eta = cap;
    if (deadline_ns > 0 && eta > deadline_ns - now) eta = deadline_ns - now;
    return eta > 0 ? eta : 0;
}

int hp_recv_wait(hp_endpoint *ep, int64_t deadline_ns, hp_frame *frame) {
    int64_t wait_start = 0;
    if (atomic_load_explicit(&ep->corrupt, memory_order_relaxed)) return HP_ECORRUPT;
    reader_enter(ep);
    int rc = peek_or_eof(ep, frame);
    if (rc >= 0) return rc;
    if (ep->peer_eof) goto eof;
    int64_t start = hp_now_ns();
    if (deadline_ns > 0 && start >= deadline_ns) deadline_ns = 0; /* passed: look once, no spin */
    if (deadline_ns != 0) {
        /* spin: the sender is often microseconds away */
        int64_t spin_end = start + (int64_t)ep->spin_ns;
        if (deadline_ns > 0 && deadline_ns < spin_end) spin_end = deadline_ns;
        int spun = spin_for_frame(ep, spin_end);
        if (spun == 0) { /* past the window: stay awake through a copy announced to us */
            int64_t budget = copy_spin_budget(ep, start, deadline_ns);
            if (budget > 0) spun = spin_for_frame(ep, hp_now_ns() + budget);
        }
        if (spun > 0) {
            /* success: grow the window back toward its maximum */
            ep->spin_ns = ep->spin_ns * 2 > ep->spin_max_ns ? ep->spin_max_ns : ep->spin_ns * 2;
            rc = peek_or_eof(ep, frame);
            return rc >= 0 ? rc : HP_ECORRUPT;
        }
        if (spun < 0) {
            hp_reader_exit(ep);
            return HP_CLOSED;
        }
        wait_start = start;
    }
    for (;;) {
        hp_reader_exit(ep); /* arms the token (or signals) with a re-check of the ring */
        if (ep->pending_signal) { /* the ring got data meanwhile */
            rc = peek_or_eof(ep, frame);
            if (rc >= 0) return rc;
        }
        if (atomic_load(&ep->closed)) return HP_CLOSED;
        int ms = poll_timeout_ms(deadline_ns, -1);
        struct pollfd p[3] = {{ep->rx_efd, POLLIN, 0}, {ep->sock, POLLRDHUP, 0}, {ep->close_efd, POLLIN, 0}};
        int n = 0;
        if (deadline_ns != 0 && !(deadline_ns > 0 && ms == 0)) ep->sleeps++;
        else ms = 0; /* no time to sleep: still look, so that a stale wake-up count is
                        drained (else fileno() stays readable with nothing to read and
                        outside pollers spin) and a hang-up is seen */
        n = poll(p, 3, ms);
        if (n < 0 && errno != EINTR) return HP_ERRNO;
        reader_enter(ep);
        if (n < 0) { /* EINTR */
            rc = peek_or_eof(ep, frame);
            if (rc >= 0) return rc;
            hp_reader_exit(ep);
            return HP_EINTR;
        }
        if (n > 0 && (p[0].revents & POLLIN)) adapt_spin(ep, wait_start);
        if (n > 0 && (p[0].revents & POLLIN)) ep->pending_signal = 1; /* drain even a stale count */
        if (atomic_load(&ep->closed) || (n > 0 && (p[2].revents & POLLIN))) {
            hp_reader_exit(ep);
            return HP_CLOSED;
        }
        rc = peek_or_eof(ep, frame);
        if (rc >= 0) return rc;
        if (n > 0 && (p[0].revents & POLLIN) && deadline_ns != 0) {
            /* Woken early by a sender that announced a big copy: spin until it lands
               rather than sleep through it (bounded by the estimate and the deadline). */
            int64_t budget = copy_spin_budget(ep, hp_now_ns(), deadline_ns);
            if (budget > 0 && hp_spin_readable(ep, budget)) {
                rc = peek_or_eof(ep, frame);
                if (rc >= 0) return rc;
            }
        }
        if (sock_hup(ep->sock)) {
            ep->peer_eof = 1;
            goto eof;
        }
        if (deadline_ns == 0 || (deadline_ns > 0 && hp_now_ns() >= deadline_ns)) {
            hp_reader_exit(ep);
            return HP_TIMEOUT;
        }
    }
eof:
    /* Everything the peer published happened before its sockets closed. */
    rc = peek_or_eof(ep, frame);
    if (rc >= 0) return rc;
    hp_reader_exit(ep);
    return HP_EOF;
}

void hp_recv_finish(hp_endpoint *ep, const hp_frame *frame, uint64_t oob_bytes) {
    hp_ring_ctrl *c = ep->rx.ctrl;
    /* consumer-owned counters, read by the producer (acquire) for its caps */
    if (oob_bytes)
        atomic_store_explicit(&c->oob_bytes_recv,
                              atomic_load_explicit(&c->oob_bytes_recv, memory_order_relaxed) + oob_bytes,
                              memory_order_release);
    if (frame->nfds) {
        atomic_store_explicit(&c->oob_msgs_recv,
                              atomic_load_explicit(&c->oob_msgs_recv, memory_order_relaxed) + 1,
                              memory_order_release);
        ep->oob_recv++;
    }
    ep->msgs_recv++;
    ep->bytes_recv += frame->len + oob_bytes;
    if (hp_ring_release(&ep->rx, frame)) {
        atomic_fetch_add_explicit(&c->space_seq, 1, memory_order_release);
        futex_wake(&c->space_seq);
    }
    hp_reader_leave(ep);
}

int hp_fd_slots_free(hp_endpoint *ep, int n) {
    int probe[HP_MAX_FDS];
    int k = 0;
    while (k < n && k < HP_MAX_FDS && (probe[k] = fcntl(ep->sock, F_DUPFD_CLOEXEC, 0)) >= 0) k++;
    int ok = k >= n, saved = errno;
    while (k > 0) close(probe[--k]);
    errno = saved;
    return ok;
}

int hp_take_fds(hp_endpoint *ep, int n, int *out) {
    char byte;
    struct iovec iov = {&byte, 1};
    union {
        char buf[CMSG_SPACE(sizeof(int) * HP_MAX_FDS)];
        struct cmsghdr align;
    } ctl;
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctl.buf;
    msg.msg_controllen = sizeof ctl.buf;
    ssize_t r;
    do r = recvmsg(ep->sock, &msg, MSG_DONTWAIT | MSG_CMSG_CLOEXEC); while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EAGAIN) return HP_ERRNO;
    int got = 0;
    if (r > 0) {
        for (struct cmsghdr *cm = CMSG_FIRSTHDR(&msg); cm; cm = CMSG_NXTHDR(&msg, cm)) {
            if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS) continue;
            int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
            int tmp[HP_MAX_FDS];
            memcpy(tmp, CMSG_DATA(cm), sizeof(int) * (size_t)(k > HP_MAX_FDS ? HP_MAX_FDS : k));
            for (int i = 0; i < k && i < HP_MAX_FDS; i++) {
                if (got < n) out[got++] = tmp[i];
                else close(tmp[i]);
            }
        }
    }
    if (got != n || (msg.msg_flags & MSG_CTRUNC)) {
        for (int i = 0; i < got; i++) close(out[i]);
        /* Fewer than announced and cut short: the kernel had no descriptor slot for the
           rest here (RLIMIT_NOFILE). More than fit, or none at all: the peer's doing. */
        if ((msg.msg_flags & MSG_CTRUNC) && got < n) {
            errno = EMFILE;
            return HP_ERRNO;
        }
        return hp_corrupt(ep, "the descriptors before a frame are not the ones it announces");
    }
    return HP_OK;
}
