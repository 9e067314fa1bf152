/* test_ring.c - plain-assert tests of the C core (no Python, no framework).
 *
 * Built and run by tests/c/test_c_core.py, also under -fsanitize=address / thread.
 * Usage: test_ring [count]   (messages per producer/consumer test, default 200000)
 */
#undef NDEBUG
#include "hp_endpoint.h"
#include "hp_heap.h"
#include "hp_ring.h"

#include <assert.h>
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static long count = 200000;

/* Two connected simplex endpoints over a fresh segment: r reads, w writes ring 0. */
static void make_pair(hp_endpoint *r, hp_endpoint *w, uint64_t capacity) {
    int memfd = hp_segment_create(capacity, 1, 0);
    assert(memfd >= 0);
    int sv[2];
    assert(socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, sv) == 0);
    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    assert(efd >= 0);
    const char *err = NULL;
    assert(hp_endpoint_open(r, memfd, sv[0], efd, -1, 0, -1, &err) == 0);
    assert(hp_endpoint_open(w, dup(memfd), sv[1], -1, dup(efd), -1, 0, &err) == 0);
}

/* Deterministic payload of message i: length and bytes derived from i. */
static uint32_t msg_len(long i) { return (uint32_t)((i * 7919) % 3000); }
static unsigned char msg_byte(long i, uint32_t k) { return (unsigned char)(i * 31 + k); }

static void send_msg(hp_endpoint *w, long i) {
    unsigned char buf[4096];
    uint32_t n = msg_len(i);
    for (uint32_t k = 0; k < n; k++) buf[k] = msg_byte(i, k);
    const void *parts[1] = {buf};
    uint64_t lens[1] = {n};
    int rc = hp_send(w, 1, 0, parts, lens, 1, NULL, 0, 0, -1);
    assert(rc == HP_OK);
}

static void recv_msg(hp_endpoint *r, long i) {
    hp_frame f;
    int rc = hp_recv_wait(r, -1, &f);
    assert(rc == HP_OK);
    assert(f.kind == 1);
    assert(f.len == msg_len(i));
    for (uint32_t k = 0; k < f.len; k++) assert(f.payload[k] == msg_byte(i, k));
    hp_recv_finish(r, &f, 0);
}

static void test_header_checks(void) {
    int memfd = hp_segment_create(8192, 2, 0);
    assert(memfd >= 0);
    uint64_t size = hp_segment_size(8192, 2, 0);
    void *base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
    assert(base != MAP_FAILED);
    assert(hp_segment_check(base, size) == NULL);
    assert(hp_segment_check(base, size - 1) != NULL); /* mapping too small */
    hp_seg_header *h = base;
    h->version++;
    assert(hp_segment_check(base, size) != NULL);
    h->version--;
    h->capacity = 12345; /* not a power of two */
    assert(hp_segment_check(base, size) != NULL);
    h->capacity = 8192;
    h->magic ^= 1;
    assert(hp_segment_check(base, size) != NULL);
    h->magic ^= 1;
    assert(hp_segment_check(base, size) == NULL);
    munmap(base, size);
    close(memfd);
    assert(hp_segment_create(1000, 1, 0) < 0 && errno == EINVAL);
    assert(hp_segment_create(4096, 1, 1000) < 0 && errno == EINVAL); /* heap not in granules */
    puts("ok header checks");
}

static void test_single_thread(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 4096);
    hp_frame f;
    assert(hp_recv_wait(&r, 0, &f) == HP_TIMEOUT); /* empty: no wait */
    /* fill until full, then drain: every byte in order, wrap markers exercised */
    for (int round = 0; round < 50; round++) {
        long sent = 0, got = 0;
        uint32_t refused = 0;
        for (;;) {
            unsigned char buf[600];
            uint32_t n = msg_len(round * 1000 + sent) % 600;
            for (uint32_t k = 0; k < n; k++) buf[k] = msg_byte(sent, k);
            const void *parts[1] = {buf};
            uint64_t lens[1] = {n};
            int rc = hp_try_send(&w, 1, 0, parts, lens, 1);
            if (rc == HP_TIMEOUT) {
                refused = n;
                break;
            }
            assert(rc == HP_OK);
            sent++;
        }
        assert(sent > 0);
        static unsigned char pad[600];
        assert(hp_send(&w, 1, 0, (const void *[]){pad}, (uint64_t[]){refused}, 1, NULL, 0, 0, 0) == HP_TIMEOUT);
        for (; got < sent; got++) {
            assert(hp_recv_wait(&r, 0, &f) == HP_OK);
            assert(f.len == msg_len(round * 1000 + got) % 600);
            for (uint32_t k = 0; k < f.len; k++) assert(f.payload[k] == msg_byte(got, k));
            hp_recv_finish(&r, &f, 0);
        }
        assert(hp_recv_wait(&r, 0, &f) == HP_TIMEOUT);
    }
    /* hp_recv_try: takes a frame of the kind asked for, leaves any other untouched */
    uint64_t room;
    assert(hp_ring_free(&w.tx, &room) == 1 && room == 4096);
    assert(hp_recv_try(&r, 1, &f) == HP_TIMEOUT); /* empty */
    assert(hp_try_send(&w, 2, 0, (const void *[]){"12345678"}, (uint64_t[]){8}, 1) == HP_OK);
    assert(hp_try_send(&w, 1, 0, (const void *[]){"abc"}, (uint64_t[]){3}, 1) == HP_OK);
    assert(hp_ring_free(&w.tx, &room) == 1 && room == 4096 - 16 - 16);
    uint32_t token = atomic_load(&r.rx.ctrl->reader_armed);
    assert(hp_recv_try(&r, 1, &f) == HP_TIMEOUT && r.holds_token == 0); /* kind 2 first */
    assert(atomic_load(&r.rx.ctrl->reader_armed) == token);
    assert(hp_recv_wait(&r, 0, &f) == HP_OK && f.kind == 2);
    hp_recv_finish(&r, &f, 0);
    assert(hp_recv_try(&r, 1, &f) == HP_OK && f.kind == 1 && f.len == 3 && memcmp(f.payload, "abc", 3) == 0);
    assert(r.holds_token == 1);
    hp_recv_finish(&r, &f, 0);
    assert(hp_recv_try(&r, 1, &f) == HP_TIMEOUT);
    assert(hp_ring_free(&w.tx, &room) == 1 && room == 4096);
    /* too big for the ring */
    static unsigned char big[4096];
    assert(hp_try_send(&w, 1, 0, (const void *[]){big}, (uint64_t[]){4096}, 1) == HP_ETOOBIG);
    /* a deadline in the past times out without sending */
    assert(hp_recv_wait(&r, hp_now_ns() - 1, &f) == HP_TIMEOUT);
    /* peer close: data first, then EOF; sending to a closed reader: EPIPE */
    send_msg(&w, 1);
    hp_endpoint_shutdown(&w);
    hp_endpoint_release(&w);
    recv_msg(&r, 1);
    assert(hp_recv_wait(&r, -1, &f) == HP_EOF);
    hp_endpoint_release(&r);

    make_pair(&r, &w, 4096);
    hp_endpoint_shutdown(&r);
    hp_endpoint_release(&r);
    usleep(1000);
    w.last_peer_check = 0; /* do not wait for the 10 ms check period */
    assert(hp_try_send(&w, 1, 0, (const void *[]){"x"}, (uint64_t[]){1}, 1) == HP_EPIPE);
    hp_endpoint_release(&w);
    puts("ok single thread");
}

static void *producer(void *arg) {
    hp_endpoint *w = arg;
    for (long i = 0; i < count; i++) send_msg(w, i);
    return NULL;
}

static void test_two_threads(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 8192); /* small ring: the producer waits for space often */
    w.spin_ns = w.spin_max_ns = 1000; /* and sleeps, exercising the futex path */
    r.spin_ns = r.spin_max_ns = 1000;
    pthread_t t;
    assert(pthread_create(&t, NULL, producer, &w) == 0);
    for (long i = 0; i < count; i++) recv_msg(&r, i);
    assert(pthread_join(t, NULL) == 0);
    hp_frame f;
    assert(hp_recv_wait(&r, 0, &f) == HP_TIMEOUT);
    hp_endpoint_release(&w);
    assert(hp_recv_wait(&r, -1, &f) == HP_EOF);
    hp_endpoint_release(&r);
    puts("ok two threads");
}

static void *consumer(void *arg) {
    hp_endpoint *r = arg;
    for (long i = 0; i < count; i++) recv_msg(r, i);
    return NULL;
}

/* An event loop's writer: try, else arm and poll writer_fileno, against a consumer thread. */
static void test_writer_readiness(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 8192);
    r.spin_ns = r.spin_max_ns = 1000; /* the consumer sleeps too */
    pthread_t t;
    assert(pthread_create(&t, NULL, consumer, &r) == 0);
    int fd = hp_writer_fileno(&w);
    assert(fd >= 0);
    long armed = 0;
    for (long i = 0; i < count; i++) {
        unsigned char buf[4096];
        uint32_t n = msg_len(i);
        for (uint32_t k = 0; k < n; k++) buf[k] = msg_byte(i, k);
        for (;;) {
            int rc = hp_try_send(&w, 1, 0, (const void *[]){buf}, (uint64_t[]){n}, 1);
            if (rc == HP_OK) break;
            assert(rc == HP_TIMEOUT);
            rc = hp_arm_writer(&w, n);
            if (rc == HP_OK) continue;
            assert(rc == HP_TIMEOUT);
            armed++;
            struct pollfd p = {fd, POLLIN, 0};
            assert(poll(&p, 1, 10000) == 1); /* never a lost wake-up */
        }
    }
    assert(pthread_join(t, NULL) == 0);
    assert(armed > 0);
    hp_endpoint_shutdown(&w);
    hp_endpoint_release(&w); /* joins the watcher */
    hp_endpoint_release(&r);
    puts("ok writer readiness");
}

static void *closer(void *arg) {
    usleep(20000);
    hp_endpoint_shutdown(arg);
    return NULL;
}

static void test_close_wakes_sleeper(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 4096);
    pthread_t t;
    assert(pthread_create(&t, NULL, closer, &r) == 0);
    hp_frame f;
    assert(hp_recv_wait(&r, -1, &f) == HP_CLOSED);
    assert(pthread_join(t, NULL) == 0);
    hp_endpoint_release(&r);
    hp_endpoint_release(&w);
    puts("ok close wakes a sleeper");
}

static void test_two_processes(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 16384);
    pid_t pid = fork();
    assert(pid >= 0);
    if (pid == 0) {
        hp_endpoint_release(&r);
        for (long i = 0; i < count; i++) send_msg(&w, i);
        _exit(0);
    }
    hp_endpoint_release(&w);
    for (long i = 0; i < count; i++) recv_msg(&r, i);
    hp_frame f;
    assert(hp_recv_wait(&r, -1, &f) == HP_EOF); /* child exited: its fds closed */
    int status;
    assert(waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0);
    hp_endpoint_release(&r);
    puts("ok two processes");
}

static void test_killed_producer(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 16384);
    pid_t pid = fork();
    assert(pid >= 0);
    if (pid == 0) {
        hp_endpoint_release(&r);
        for (long i = 0;; i++) send_msg(&w, i);
    }
    hp_endpoint_release(&w);
    for (long i = 0; i < 1000; i++) recv_msg(&r, i);
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    /* every complete message, in order, then EOF */
    long i = 1000;
    hp_frame f;
    int rc;
    while ((rc = hp_recv_wait(&r, -1, &f)) == HP_OK) {
        assert(f.len == msg_len(i));
        for (uint32_t k = 0; k < f.len; k++) assert(f.payload[k] == msg_byte(i, k));
        hp_recv_finish(&r, &f, 0);
        i++;
    }
    assert(rc == HP_EOF);
    hp_endpoint_release(&r);
    puts("ok killed producer");
}

static void test_heap(void) {
    uint64_t heap_size = 64 * HP_HEAP_GRANULE;
    int memfd = hp_segment_create(4096, 2, heap_size);
    assert(memfd >= 0);
    hp_heap prod, cons;
    uint64_t off1 = hp_segment_heap_offset(4096, 2, heap_size, 1);
    assert(hp_heap_map(&prod, memfd, off1, heap_size) == 0);
    assert(hp_heap_map(&cons, memfd, off1, heap_size) == 0);
    const uint64_t H = HP_HEAP_BLOCK_HEADER, G = HP_HEAP_GRANULE;
    int64_t a = hp_heap_alloc(&prod, 3 * G + 1); /* 4 granules, with the block header */
    int64_t b = hp_heap_alloc(&prod, 1);
    assert(a == (int64_t)H && b == (int64_t)(4 * G + H)); /* data offsets, after the headers */
    assert(hp_heap_valid_offset(&cons, (uint64_t)a) && !hp_heap_valid_offset(&cons, (uint64_t)a + 8));
    memset(prod.data + a, 0xAB, 3 * G + 1);
    assert(cons.data[a] == 0xAB && cons.data[a + 3 * G] == 0xAB); /* same pages */
    assert(hp_heap_alloc(&prod, heap_size) == -1); /* no room for everything */
    assert(hp_heap_alloc(&prod, 59 * G) == -1);    /* 59 granules left, the header makes 60 */
    int64_t c = hp_heap_alloc(&prod, 59 * G - H);  /* exactly the rest */
    assert(c == (int64_t)(5 * G + H));
    assert(hp_heap_alloc(&prod, 1) == -1); /* full */
    hp_heap_release(&cons, (uint64_t)a); /* the consumer drops the message's reference */
    assert(hp_heap_alloc(&prod, 4 * G) == -1); /* a 4-granule hole only (4 G + header > 4 G) */
    int64_t d = hp_heap_alloc(&prod, 4 * G - H);
    assert(d == a); /* first fit: the hole */
    /* a second reference (a send of an allocate_buffer block): freed by the last drop */
    hp_heap_retain(&prod, (uint64_t)d);
    hp_heap_release(&cons, (uint64_t)d);
    assert(hp_heap_alloc(&prod, 1) == -1); /* still held */
    hp_heap_release(&prod, (uint64_t)d);
    hp_heap_release(&prod, (uint64_t)d);        /* one drop too many: ignored */
    hp_heap_release(&cons, (uint64_t)d + 4096); /* not a block: ignored */
    hp_heap_release(&cons, UINT64_C(1) << 40);  /* outside the heap: ignored */
    int64_t e = hp_heap_alloc(&prod, 1);
    assert(e == d);
    hp_heap_release(&cons, (uint64_t)b);
    hp_heap_release(&cons, (uint64_t)c);
    hp_heap_release(&cons, (uint64_t)e);
    assert(hp_heap_alloc(&prod, heap_size - H) == (int64_t)H); /* all free again */
    hp_heap_unmap(&prod);
    hp_heap_unmap(&cons);
    close(memfd);
    puts("ok heap");
}

/* -- a hostile peer ------------------------------------------------------------------
 * The rings below live in malloc'd memory of exactly the segment's size, so that under
 * -fsanitize=address any access outside the segment is reported (mmap'd memory is not
 * checked). */

static uint64_t rng_state = 0x9E3779B97F4A7C15u;
static uint64_t rnd(void) { /* xorshift64*: a fixed seed, the same run every time */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * UINT64_C(2685821657736338717);
}

typedef struct {
    void *base;
    hp_ring ring;
} heap_ring;

static void heap_ring_open(heap_ring *hr, uint64_t capacity) {
    uint64_t size = hp_segment_rings_size(capacity, 1);
    hr->base = aligned_alloc(HP_DATA_ALIGN, size);
    assert(hr->base);
    hp_segment_init(hr->base, capacity, 1, 0);
    assert(hp_segment_check(hr->base, size) == NULL);
    hp_ring_attach(&hr->ring, hr->base, (const hp_seg_header *)hr->base, 0);
}

static void put_raw_header(hp_ring *ring, uint64_t pos, uint32_t len, uint8_t kind) {
    memcpy(ring->data + pos, &len, 4);
    ring->data[pos + 4] = kind;
    ring->data[pos + 5] = 0;
}

static void set_indices(hp_ring *ring, uint64_t head, uint64_t tail) {
    atomic_store(&ring->ctrl->head, head);
    atomic_store(&ring->ctrl->tail, tail);
}

/* What the reader may accept: a frame inside the ring and inside what was published. */
static void assert_peek_safe(hp_ring *ring) {
    hp_frame f;
    uint64_t head = atomic_load(&ring->ctrl->head), tail = atomic_load(&ring->ctrl->tail);
    int r = hp_ring_peek(ring, &f);
    if (r != HP_RING_READY) return;
    assert(head - tail <= ring->capacity && (head | tail) % 8 == 0);
    assert(f.payload >= ring->data + HP_FRAME_HEADER && f.payload + f.len <= ring->data + ring->capacity);
    assert(f.next_tail > tail && f.next_tail - tail <= head - tail);
    volatile unsigned char sink = 0;
    for (uint32_t k = 0; k < f.len; k++) sink ^= f.payload[k]; /* ASan checks every byte */
    (void)sink;
}

static void test_hostile_producer(void) {
    const uint64_t C = 4096;
    heap_ring hr;
    heap_ring_open(&hr, C);
    hp_ring *ring = &hr.ring;
    hp_frame f;
    /* the three failures of issue 12 and their neighbours, each reported as corrupt */
    put_raw_header(ring, C - 8, 2000, 1); /* no wrap marker, runs past the end */
    set_indices(ring, C + C - 8 + 2008, C + C - 8);
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    set_indices(ring, 3 * C, 0); /* more published than the ring holds */
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    set_indices(ring, 100, 200); /* producer behind the consumer */
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    set_indices(ring, C - 4 + 16, C - 4); /* our own index unaligned: the header would straddle */
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    put_raw_header(ring, C - 8, 0, HP_KIND_WRAP); /* a wrap marker, then another one */
    put_raw_header(ring, 0, 0, HP_KIND_WRAP);
    set_indices(ring, C - 8 + 64, C - 8);
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    put_raw_header(ring, 0, 100, 1); /* after the wrap, more than was published */
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    put_raw_header(ring, 0, 48, 1); /* ... and a good one */
    assert(hp_ring_peek(ring, &f) == HP_RING_READY && f.len == 48 && f.payload == ring->data + 8);
    assert(f.next_tail == C - 8 + 8 + 56);
    put_raw_header(ring, 0, UINT32_MAX, 1);
    set_indices(ring, C, 0);
    assert(hp_ring_peek(ring, &f) == HP_RING_CORRUPT);
    /* random indices and headers: never a frame outside the ring or beyond the head */
    for (long i = 0; i < count; i++) {
        uint64_t tail = rnd() % (4 * C), head = tail + (rnd() % 8 == 0 ? rnd() : rnd() % (C + 64));
        if (rnd() % 4 == 0) tail &= ~UINT64_C(7);
        if (rnd() % 4 == 0) head &= ~UINT64_C(7);
        uint64_t at = (tail & (C - 1)) & ~UINT64_C(7);
        uint32_t len = rnd() % 3 == 0 ? (uint32_t)rnd() : (uint32_t)(rnd() % C);
        put_raw_header(ring, at, len, rnd() % 5 == 0 ? HP_KIND_WRAP : (uint8_t)rnd());
        put_raw_header(ring, 0, (uint32_t)(rnd() % C), (uint8_t)rnd());
        set_indices(ring, head, tail);
        assert_peek_safe(ring);
    }
    free(hr.base);
    puts("ok hostile producer");
}

static void test_hostile_consumer(void) {
    const uint64_t C = 4096;
    heap_ring hr;
    heap_ring_open(&hr, C);
    hp_ring *ring = &hr.ring;
    static unsigned char payload[4096];
    const void *parts[1] = {payload};
    uint64_t head;
    /* an unaligned head: the wrap marker was written 5 bytes past the ring */
    set_indices(ring, C - 3, C - 3);
    assert(hp_ring_can_write(ring, 100, &head) == HP_RING_CORRUPT);
    set_indices(ring, 5 * C, C); /* more in flight than the ring holds */
    assert(hp_ring_can_write(ring, 100, &head) == HP_RING_CORRUPT);
    set_indices(ring, 0, 8); /* the consumer ahead of us */
    assert(hp_ring_can_write(ring, 100, &head) == HP_RING_CORRUPT);
    /* random indices: whatever the writer accepts, it writes inside the ring */
    for (long i = 0; i < count; i++) {
        uint64_t h = rnd() % (8 * C), t = h - (rnd() % 4 == 0 ? rnd() : rnd() % (C + 16));
        if (rnd() % 3) h &= ~UINT64_C(7);
        if (rnd() % 3) t &= ~UINT64_C(7);
        set_indices(ring, h, t);
        uint64_t lens[1] = {rnd() % (hp_ring_max_payload(ring) + 1)};
        int r = hp_ring_can_write(ring, (uint32_t)lens[0], &head);
        if (r == 1) {
            assert(head == h && h % 8 == 0 && t % 8 == 0 && h - t <= C);
            hp_ring_write(ring, head, 1, 0, 0, parts, lens, 1);
            assert(atomic_load(&ring->ctrl->head) - t <= C);
        }
    }
    free(hr.base);
    puts("ok hostile consumer");
}

/* The endpoint: a corrupt ring is HP_ECORRUPT at once (no spin, no sleep), and sticky. */
static void test_hostile_endpoint(void) {
    hp_endpoint r, w;
    make_pair(&r, &w, 4096);
    hp_frame f;
    atomic_store(&r.rx.ctrl->head, 12345); /* the reader would wait forever on it */
    int64_t start = hp_now_ns();
    assert(hp_recv_wait(&r, -1, &f) == HP_ECORRUPT);
    assert(r.corrupt != NULL && hp_now_ns() - start < 1000000000LL);
    atomic_store(&r.rx.ctrl->head, 0);
    assert(hp_recv_wait(&r, 0, &f) == HP_ECORRUPT); /* sticky */
    assert(hp_recv_try(&r, 1, &f) == HP_ECORRUPT);
    uint64_t room;
    atomic_store(&w.tx.ctrl->head, 12345); /* unaligned: no room can be computed from it */
    assert(hp_ring_free(&w.tx, &room) == HP_RING_CORRUPT);
    atomic_store(&w.tx.ctrl->head, 0);
    atomic_store(&w.tx.ctrl->tail, 8); /* the consumer ahead of the producer */
    assert(hp_try_send(&w, 1, 0, (const void *[]){"x"}, (uint64_t[]){1}, 1) == HP_ECORRUPT);
    atomic_store(&w.tx.ctrl->tail, 0);
    assert(hp_send(&w, 1, 0, (const void *[]){"x"}, (uint64_t[]){1}, 1, NULL, 0, 0, -1) == HP_ECORRUPT);
    hp_endpoint_release(&r);
    hp_endpoint_release(&w);
    make_pair(&r, &w, 4096);
    assert(hp_send(&w, 1, 0, (const void *[]){"x"}, (uint64_t[]){1}, 1, NULL, 0, 0, -1) == HP_OK);
    r.rx.data[5] = HP_MAX_FDS + 1; /* more descriptors than a frame carries */
    assert(hp_recv_wait(&r, 0, &f) == HP_ECORRUPT);
    hp_endpoint_release(&r);
    hp_endpoint_release(&w);
    make_pair(&r, &w, 4096);
    atomic_store(&w.tx.ctrl->oob_msgs_recv, 3); /* taken more than was ever sent */
    int fds[1] = {0};
    assert(hp_send(&w, 2, 0, (const void *[]){"12345678"}, (uint64_t[]){8}, 1, fds, 1, 10, -1) == HP_ECORRUPT);
    hp_endpoint_release(&r);
    hp_endpoint_release(&w);
    puts("ok hostile endpoint");
}

static void test_hostile_heap(void) {
    const uint64_t G = HP_HEAP_GRANULE, H = HP_HEAP_BLOCK_HEADER, n = 8;
    hp_heap h;
    memset(&h, 0, sizeof h);
    uint64_t bitmap[1] = {0};
    h.bits = (_Atomic uint64_t *)bitmap;
    h.ngranules = n;
    h.map = h.data = malloc(n * G); /* ASan-checked, unlike the real mapping */
    assert(h.data);
    h.map_len = n * G;
    hp_heap_block_header *hdr = (hp_heap_block_header *)h.data;
    atomic_store(&hdr->refs, 1);
    atomic_store(&hdr->granules, 2);
    bitmap[0] = 3;
    assert(hp_heap_check_block(&h, H, 2 * G - H));
    assert(!hp_heap_check_block(&h, H, 2 * G - H + 1)); /* more bytes than the block has */
    assert(!hp_heap_check_block(&h, H + 8, 1));          /* not a block's offset */
    assert(!hp_heap_check_block(&h, n * G + H, 1));      /* past the heap */
    atomic_store(&hdr->granules, (uint32_t)n + 1);       /* a block longer than the heap */
    assert(!hp_heap_check_block(&h, H, 1));
    hp_heap_release(&h, H); /* must not clear bits past the bitmap's granules */
    assert(bitmap[0] == 3 && atomic_load(&hdr->refs) == 0);
    assert(!hp_heap_check_block(&h, H, 1)); /* no reference left: not a live block */
    hp_heap_release(&h, H);                 /* an underflow is refused */
    assert(atomic_load(&hdr->refs) == 0);
    /* random headers and offsets: checks and drops stay inside the heap and its bitmap */
    for (long i = 0; i < count / 10; i++) {
        uint64_t g = rnd() % (n + 2), off = g * G + (rnd() % 4 ? H : rnd() % G);
        if (g < n) {
            hp_heap_block_header *b = (hp_heap_block_header *)(h.data + g * G);
            atomic_store(&b->refs, (uint32_t)(rnd() % 3 ? rnd() % 3 : rnd()));
            atomic_store(&b->granules, (uint32_t)(rnd() % 3 ? rnd() % (n + 2) : rnd()));
        }
        if (hp_heap_check_block(&h, off, rnd() % (2 * G))) assert(off < n * G);
        hp_heap_release(&h, off);
        assert((bitmap[0] >> n) == 0); /* never a bit beyond the heap's granules */
        bitmap[0] |= rnd() & ((UINT64_C(1) << n) - 1);
    }
    free(h.data);
    puts("ok hostile heap");
}

int main(int argc, char **argv) {
    if (argc > 1) count = atol(argv[1]);
    setvbuf(stdout, NULL, _IOLBF, 0); /* forked children must not repeat what was printed */
    test_header_checks();
    test_heap();
    test_single_thread();
    test_two_threads();
    test_writer_readiness();
    test_close_wakes_sleeper();
    test_hostile_producer();
    test_hostile_consumer();
    test_hostile_endpoint();
    test_hostile_heap();
    if (!getenv("HP_TEST_NO_FORK")) {
        test_two_processes();
        test_killed_producer();
    }
    puts("all ok");
    return 0;
}
