/* hp_ring.h - single-producer/single-consumer byte rings in one shared segment.
 *
 * Pure C11, no Python. The segment is an anonymous memfd mapped by both processes:
 *
 *   [hp_seg_header 64 B][hp_ring_ctrl x nrings, 192 B each][pad to 4096]
 *   [ring 0 data: capacity bytes][ring 1 data: capacity bytes]
 *
 * Memory order of every shared field (see docs/design.md "Memory ordering"):
 *   head            written by the producer only (release), read by the consumer (acquire)
 *   tail            written by the consumer only (release), read by the producer (acquire)
 *   oob_*_sent      producer only (release) / consumer reads (acquire)
 *   oob_*_recv      consumer only (release) / producer reads (acquire)
 *   reader_armed    the reader's wake token: HP_TOKEN_ARMED (1, the reader may sleep: the
 *                   producer must signal), HP_TOKEN_WRITER (0, the producer took it and
 *                   signals), HP_TOKEN_READER (2, a reader is active or kept it).
 *                   Consumer stores ARMED (relaxed) then seq_cst fence then re-reads head;
 *                   producer stores head, seq_cst fence, then CAS ARMED->WRITER (acq_rel):
 *                   a Dekker pair, so one of the two always sees the other. The consumer
 *                   takes it back with exchange(READER) (acq_rel).
 *   writer_waiting  the same pattern with roles swapped (producer waits for space).
 *   space_seq       futex word, incremented (release) by the consumer when it wakes a writer.
 *   consumer_closes incremented (release) by the consumer after closing its socket; the
 *                   producer compares it (relaxed) on every send and, when it changed,
 *                   looks at the socket at once: a clean close is seen by the next send.
 *   busy_until      the producer's estimate (CLOCK_MONOTONIC ns) of when the big message it
 *                   is copying will be published, 0 when none: stored relaxed by the
 *                   producer, read relaxed by a spinning consumer (a hint, as below).
 *   producer_cpu,   1 + the CPU the producer/consumer last waited on (0: unknown), written
 *   consumer_cpu    relaxed by its owner only when it changed, read relaxed by the other
 *                   side: a scheduling hint with no ordering duty (a stale value costs one
 *                   needless or one missed yield, never a lost message).
 * Header fields are written once before the segment is shared and never change.
 *
 * Nothing read from the segment is trusted (docs/design.md "Threat model"): the peer may
 * be buggy or hostile and can rewrite any of it at any time. Each call reads an index
 * once, checks it (aligned, the pair within the capacity) and works on that private copy;
 * a frame is checked against what was published and against the end of the ring. An
 * impossible value is reported (HP_RING_CORRUPT), never used.
 */
#ifndef HP_RING_H
#define HP_RING_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define HP_MAGIC UINT64_C(0x45504950524550ff) /* "\xffREPIPE" little-endian-ish tag */
#define HP_VERSION 4u
#define HP_CACHE_LINE 64
#define HP_DATA_ALIGN 4096
#define HP_FRAME_HEADER 8u
#define HP_KIND_WRAP 0xFFu
#define HP_MIN_CAPACITY 4096u
#define HP_MAX_CAPACITY (UINT64_C(1) << 30)

typedef struct hp_seg_header {
    uint64_t magic;
    uint32_t version;
    uint32_t header_size;   /* sizeof(hp_seg_header) */
    uint32_t nrings;
    uint32_t ctrl_size;     /* sizeof(hp_ring_ctrl) */
    uint64_t capacity;      /* bytes of data per ring, power of two */
    uint64_t data_offset;   /* offset of ring 0 data */
    uint64_t total_size;    /* bytes of the whole segment */
    uint64_t heap_size;     /* data bytes of each ring's heap (hp_heap.h), 0: none */
    uint64_t heap_offset;   /* offset of ring 0's heap region; ring i's follows */
} hp_seg_header;

typedef struct hp_ring_ctrl {
    /* producer-written line */
    _Alignas(HP_CACHE_LINE) _Atomic uint64_t head;
    _Atomic uint64_t oob_bytes_sent;
    _Atomic uint64_t oob_msgs_sent;
    _Atomic uint32_t writer_waiting;
    _Atomic uint32_t producer_cpu;
    _Atomic int64_t busy_until;
    /* consumer-written line */
    _Alignas(HP_CACHE_LINE) _Atomic uint64_t tail;
    _Atomic uint64_t oob_bytes_recv;
    _Atomic uint64_t oob_msgs_recv;
    _Atomic uint32_t reader_armed;
    _Atomic uint32_t consumer_closes; /* +1 (release) after a copy of the consumer's end closed */
    _Atomic uint32_t consumer_cpu;
    /* futex line */
    _Alignas(HP_CACHE_LINE) _Atomic uint32_t space_seq;
} hp_ring_ctrl;

/* A process-local view of one ring of a mapped segment. */
typedef struct hp_ring {
    hp_ring_ctrl *ctrl;
    unsigned char *data;
    uint64_t capacity;
    uint64_t mask;
} hp_ring;

/* A frame as seen by the consumer before it is released (a private copy of its header). */
typedef struct hp_frame {
    const unsigned char *payload;
    uint32_t len;
    uint8_t kind;
    uint8_t nfds;
    uint16_t flags;
    uint64_t next_tail;  /* the tail that releases it: the peek's checked tail + the frame's
                            bytes, wrap skip included */
} hp_frame;

/* Results of the ring calls that read the peer's index. */
enum { HP_RING_CORRUPT = -1, HP_RING_EMPTY = 0, HP_RING_READY = 1 };

/* -- segment ------------------------------------------------------------- */
#define HP_MAX_HEAP (UINT64_C(1) << 36)
/* Bytes of the rings part (header, controls, ring data): what is mapped eagerly. */
uint64_t hp_segment_rings_size(uint64_t capacity, uint32_t nrings);
uint64_t hp_segment_size(uint64_t capacity, uint32_t nrings, uint64_t heap_size);
/* Offset of ring `index`'s heap region (bitmap then data). */
uint64_t hp_segment_heap_offset(uint64_t capacity, uint32_t nrings, uint64_t heap_size, uint32_t index);
/* Initialise a zeroed mapping of the rings part. */
void hp_segment_init(void *base, uint64_t capacity, uint32_t nrings, uint64_t heap_size);
/* Validate a mapping of `mapped` bytes; 0 if good, else a static message. */
const char *hp_segment_check(const void *base, uint64_t mapped);
/* Fill `ring` for ring number `index` of a segment mapped at `base`, from a private
 * copy of its header that passed hp_segment_check. */
void hp_ring_attach(hp_ring *ring, void *base, const hp_seg_header *checked, uint32_t index);

/* -- ring ------------------------------------------------------------------ */
/* Largest payload a ring of this capacity accepts inline. */
uint64_t hp_ring_max_payload(const hp_ring *ring);
/* Bytes a payload of `len` needs at the current head, or 0 if it never fits. */
uint64_t hp_ring_needed(const hp_ring *ring, uint64_t head, uint32_t len);
/* Producer: whether `len` bytes fit now: 1 with *head (our index, checked against the
 * consumer's tail), 0 when there is no room yet, HP_RING_CORRUPT. */
int hp_ring_can_write(const hp_ring *ring, uint32_t len, uint64_t *head);
/* Producer: the bytes free for frames now: 1 with *free, or HP_RING_CORRUPT. */
int hp_ring_free(const hp_ring *ring, uint64_t *free);
/* Bytes a frame with a `len` payload takes in the ring (header and padding, no wrap). */
static inline uint64_t hp_ring_frame_bytes(uint64_t len) { return HP_FRAME_HEADER + ((len + 7) & ~UINT64_C(7)); }
/* Producer: copy the parts of a payload at `head` (from hp_ring_can_write in the same
 * call) and publish it. */
void hp_ring_write(hp_ring *ring, uint64_t head, uint8_t kind, uint8_t nfds, uint16_t flags,
                   const void *const *parts, const uint64_t *part_lens, int nparts);
/* Producer: after a publish, take the reader's wake token; 1 if the caller must wake it. */
enum { HP_TOKEN_WRITER = 0, HP_TOKEN_ARMED = 1, HP_TOKEN_READER = 2 };
int hp_ring_take_reader_token(hp_ring *ring);
/* Consumer: non-zero when a frame (or an impossible index, which hp_ring_peek reports)
 * is there. */
int hp_ring_readable(const hp_ring *ring);
/* Consumer: look at the next frame: HP_RING_READY, HP_RING_EMPTY or HP_RING_CORRUPT.
 * Never blocks. */
int hp_ring_peek(const hp_ring *ring, hp_frame *frame);
/* Consumer: release a peeked frame; returns 1 if a waiting writer must be woken. */
int hp_ring_release(hp_ring *ring, const hp_frame *frame);

static inline void hp_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

#endif
