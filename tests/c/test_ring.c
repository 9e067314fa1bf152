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

int main(int argc, char **argv) {
    if (argc > 1) count = atol(argv[1]);
    test_header_checks();
    test_heap();
    test_single_thread();
    test_two_threads();
    test_close_wakes_sleeper();
    if (!getenv("HP_TEST_NO_FORK")) {
        test_two_processes();
        test_killed_producer();
    }
    puts("all ok");
    return 0;
}
