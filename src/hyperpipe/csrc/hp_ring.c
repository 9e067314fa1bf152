/* hp_ring.c - the SPSC byte ring; see hp_ring.h for the layout and the orderings. */
#include "hp_ring.h"
#include "hp_heap.h"

#include <string.h>

#define HP_ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((uint64_t)(a) - 1))

static uint64_t ctrl_offset(void) { return HP_ALIGN_UP(sizeof(hp_seg_header), HP_CACHE_LINE); }

static uint64_t data_offset(uint32_t nrings) {
    return HP_ALIGN_UP(ctrl_offset() + (uint64_t)nrings * sizeof(hp_ring_ctrl), HP_DATA_ALIGN);
}

uint64_t hp_segment_rings_size(uint64_t capacity, uint32_t nrings) {
    return data_offset(nrings) + capacity * nrings;
}

uint64_t hp_segment_heap_offset(uint64_t capacity, uint32_t nrings, uint64_t heap_size, uint32_t index) {
    return hp_segment_rings_size(capacity, nrings) + index * (hp_heap_meta_size(heap_size) + heap_size);
}

uint64_t hp_segment_size(uint64_t capacity, uint32_t nrings, uint64_t heap_size) {
    if (heap_size == 0) return hp_segment_rings_size(capacity, nrings);
    return hp_segment_heap_offset(capacity, nrings, heap_size, nrings);
}

void hp_segment_init(void *base, uint64_t capacity, uint32_t nrings, uint64_t heap_size) {
    hp_seg_header *h = (hp_seg_header *)base;
    memset(base, 0, data_offset(nrings));
    h->version = HP_VERSION;
    h->header_size = (uint32_t)sizeof(hp_seg_header);
    h->nrings = nrings;
    h->ctrl_size = (uint32_t)sizeof(hp_ring_ctrl);
    h->capacity = capacity;
    h->data_offset = data_offset(nrings);
    h->total_size = hp_segment_size(capacity, nrings, heap_size);
    h->heap_size = heap_size;
    h->heap_offset = heap_size ? hp_segment_heap_offset(capacity, nrings, heap_size, 0) : 0;
    for (uint32_t i = 0; i < nrings; i++) {
        hp_ring_ctrl *c = (hp_ring_ctrl *)((char *)base + ctrl_offset()) + i;
        /* Nobody is in recv yet, so the first publish must signal (see Wakeup protocol). */
        atomic_store_explicit(&c->reader_armed, HP_TOKEN_ARMED, memory_order_relaxed);
    }
    /* The magic last: a reader that sees it sees a complete header (the segment is
       only shared after this function returns, through fd passing, a full barrier). */
    atomic_thread_fence(memory_order_release);
    h->magic = HP_MAGIC;
}

const char *hp_segment_check(const void *base, uint64_t mapped) {
    const hp_seg_header *h = (const hp_seg_header *)base;
    if (mapped < sizeof(hp_seg_header)) return "segment smaller than its header";
    if (h->magic != HP_MAGIC) return "bad segment magic (not a hyperpipe segment)";
    if (h->version != HP_VERSION) return "segment version mismatch";
    if (h->header_size != sizeof(hp_seg_header) || h->ctrl_size != sizeof(hp_ring_ctrl))
        return "segment layout mismatch";
    if (h->nrings < 1 || h->nrings > 2) return "bad ring count in segment";
    if (h->capacity < HP_MIN_CAPACITY || h->capacity > HP_MAX_CAPACITY ||
        (h->capacity & (h->capacity - 1)) != 0)
        return "bad ring capacity in segment";
    if (h->heap_size > HP_MAX_HEAP || h->heap_size % HP_HEAP_GRANULE != 0) return "bad heap size in segment";
    if (h->data_offset != data_offset(h->nrings) ||
        h->total_size != hp_segment_size(h->capacity, h->nrings, h->heap_size) ||
        h->heap_offset != (h->heap_size ? hp_segment_heap_offset(h->capacity, h->nrings, h->heap_size, 0) : 0))
        return "segment sizes inconsistent";
    if (hp_segment_rings_size(h->capacity, h->nrings) > mapped) return "segment larger than its mapping";
    return 0;
}

void hp_ring_attach(hp_ring *ring, void *base, const hp_seg_header *h, uint32_t index) {
    ring->ctrl = (hp_ring_ctrl *)((char *)base + ctrl_offset()) + index;
    ring->data = (unsigned char *)base + h->data_offset + h->capacity * index;
    ring->capacity = h->capacity;
    ring->mask = h->capacity - 1;
}

uint64_t hp_ring_max_payload(const hp_ring *ring) { return ring->capacity / 2 - HP_FRAME_HEADER; }


uint64_t hp_ring_needed(const hp_ring *ring, uint64_t head, uint32_t len) {
    if (len > hp_ring_max_payload(ring)) return 0;
    uint64_t total = hp_ring_frame_bytes(len);
    uint64_t room_to_end = ring->capacity - (head & ring->mask);
    return room_to_end >= total ? total : room_to_end + total;
}

/* An index pair is possible only when both are frame-aligned and the producer is ahead
 * of the consumer by at most the capacity (every frame and wrap skip is a multiple of 8). */
static int indices_ok(const hp_ring *ring, uint64_t head, uint64_t tail) {
    return ((head | tail) & 7) == 0 && head - tail <= ring->capacity;
}

int hp_ring_can_write(const hp_ring *ring, uint32_t len, uint64_t *head_out) {
    /* Our own head is re-read from the segment: another process sharing this end (under
       its lock) may have advanced it. tail acquire so the consumer's reads of the space
       we are about to overwrite happened before. */
    uint64_t head = atomic_load_explicit(&ring->ctrl->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&ring->ctrl->tail, memory_order_acquire);
    if (!indices_ok(ring, head, tail)) return HP_RING_CORRUPT;
    uint64_t needed = hp_ring_needed(ring, head, len);
    *head_out = head;
    return needed != 0 && ring->capacity - (head - tail) >= needed;
}

int hp_ring_free(const hp_ring *ring, uint64_t *free_out) {
    uint64_t head = atomic_load_explicit(&ring->ctrl->head, memory_order_relaxed);
    uint64_t tail = atomic_load_explicit(&ring->ctrl->tail, memory_order_acquire);
    if (!indices_ok(ring, head, tail)) return HP_RING_CORRUPT;
    *free_out = ring->capacity - (head - tail);
    return 1;
}

static void put_header(unsigned char *at, uint32_t len, uint8_t kind, uint8_t nfds, uint16_t flags) {
    memcpy(at, &len, 4);
    at[4] = kind;
    at[5] = nfds;
    memcpy(at + 6, &flags, 2);
}

void hp_ring_write(hp_ring *ring, uint64_t head, uint8_t kind, uint8_t nfds, uint16_t flags,
                   const void *const *parts, const uint64_t *part_lens, int nparts) {
    uint64_t len = 0;
    for (int i = 0; i < nparts; i++) len += part_lens[i];
    uint64_t pos = head & ring->mask;
    uint64_t total = hp_ring_frame_bytes((uint32_t)len);
    uint64_t skip = 0;
    if (ring->capacity - pos < total) {
        skip = ring->capacity - pos;
        put_header(ring->data + pos, 0, HP_KIND_WRAP, 0, 0);
        pos = 0;
    }
    put_header(ring->data + pos, (uint32_t)len, kind, nfds, flags);
    unsigned char *dst = ring->data + pos + HP_FRAME_HEADER;
    for (int i = 0; i < nparts; i++) {
        if (part_lens[i]) memcpy(dst, parts[i], part_lens[i]);
        dst += part_lens[i];
    }
    /* release: the payload bytes above are visible before the new head */
    atomic_store_explicit(&ring->ctrl->head, head + skip + total, memory_order_release);
}

int hp_ring_take_reader_token(hp_ring *ring) {
    /* StoreLoad between our head store and the reader_armed load (Dekker pair). */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&ring->ctrl->reader_armed, memory_order_relaxed) != HP_TOKEN_ARMED) return 0;
    uint32_t expected = HP_TOKEN_ARMED;
    return atomic_compare_exchange_strong_explicit(&ring->ctrl->reader_armed, &expected, HP_TOKEN_WRITER,
                                                   memory_order_acq_rel, memory_order_relaxed);
}

int hp_ring_readable(const hp_ring *ring) {
    return atomic_load_explicit(&ring->ctrl->head, memory_order_acquire) !=
           atomic_load_explicit(&ring->ctrl->tail, memory_order_relaxed);
}

int hp_ring_peek(const hp_ring *ring, hp_frame *frame) {
    uint64_t head = atomic_load_explicit(&ring->ctrl->head, memory_order_acquire);
    uint64_t tail = atomic_load_explicit(&ring->ctrl->tail, memory_order_relaxed);
    if (head == tail) return HP_RING_EMPTY;
    if (!indices_ok(ring, head, tail)) return HP_RING_CORRUPT;
    uint64_t avail = head - tail, pos = tail & ring->mask, skip = 0;
    unsigned char hdr[HP_FRAME_HEADER]; /* read once: the bytes may change under us */
    memcpy(hdr, ring->data + pos, sizeof hdr);
    if (hdr[4] == HP_KIND_WRAP) {
        skip = ring->capacity - pos;
        pos = 0;
        memcpy(hdr, ring->data, sizeof hdr);
    }
    uint32_t len;
    memcpy(&len, hdr, 4);
    if (hdr[4] == HP_KIND_WRAP || len > hp_ring_max_payload(ring)) return HP_RING_CORRUPT;
    /* within what was published, and inside the ring: a frame never straddles its end */
    uint64_t bytes = hp_ring_frame_bytes(len);
    if (skip + bytes > avail || pos + bytes > ring->capacity) return HP_RING_CORRUPT;
    frame->payload = ring->data + pos + HP_FRAME_HEADER;
    frame->len = len;
    frame->kind = hdr[4];
    frame->nfds = hdr[5];
    memcpy(&frame->flags, hdr + 6, 2);
    frame->next_tail = tail + skip + bytes;
    return HP_RING_READY;
}

int hp_ring_release(hp_ring *ring, const hp_frame *frame) {
    /* release: our reads of the payload happen before the producer may overwrite it */
    atomic_store_explicit(&ring->ctrl->tail, frame->next_tail, memory_order_release);
    atomic_thread_fence(memory_order_seq_cst); /* StoreLoad vs writer_waiting */
    if (!atomic_load_explicit(&ring->ctrl->writer_waiting, memory_order_relaxed)) return 0;
    return atomic_exchange_explicit(&ring->ctrl->writer_waiting, 0, memory_order_acq_rel) == 1;
}
