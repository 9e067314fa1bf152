/* hp_heap.h - a per-direction heap for big buffers, inside the pipe's segment.
 *
 * Pure C11, no Python. Each ring's producer owns one heap region of the segment:
 *
 *   [bitmap: one bit per 64 KiB granule, padded to a page][data: heap_size bytes]
 *
 * The region is sparse (memfd pages are allocated on first use, with fallocate so a full
 * /dev/shm or memory limit is an error, never a SIGBUS) and stays mapped in both
 * processes, so a reused block costs no page faults: big buffers are one memcpy on the
 * sending side and no copy at all on the receiving side.
 *
 * A block is [header page][data]: the header holds the block's reference count and
 * its length in granules; offsets handed around (frames, views) are those of the data,
 * which starts on a page (a copy into a block that started 64 bytes into a page ran
 * 1.3-1.6x slower here, and numpy likes its arrays aligned).
 * References: the message that carries the block (taken by the producer when it
 * reserves the block for a send, dropped by the consumer when the last Python view of
 * the data dies) and, for a block from allocate_buffer, the sender's own buffer object
 * (dropped when it dies; each send of it takes one more). The side that drops the last
 * reference clears the block's bits.
 *
 * Memory order: the producer sets bits (fetch_or, relaxed: only the producer sets bits)
 * and initialises the header (relaxed) before it publishes the frame (release, via the
 * ring's head), which the consumer acquires. References are dropped with fetch_sub
 * (acq_rel), so every access by either side happens before the last drop, which clears
 * the bits (fetch_and, release); the producer scans the bitmap with acquire, so those
 * accesses happen before the block is reused. A retain (fetch_add, relaxed) is made only
 * by the producer on a block it still holds, before the release of the frame.
 */
#ifndef HP_HEAP_H
#define HP_HEAP_H

#include <stdatomic.h>
#include <stdint.h>

#define HP_HEAP_GRANULE_SHIFT 16
#define HP_HEAP_GRANULE (UINT64_C(1) << HP_HEAP_GRANULE_SHIFT)
#define HP_HEAP_BLOCK_HEADER 4096u

typedef struct hp_heap_block_header {
    _Atomic uint32_t refs;    /* references to the block (see above) */
    _Atomic uint32_t granules; /* its length; written once by the producer when reserved */
} hp_heap_block_header;

typedef struct hp_heap {
    unsigned char *map;        /* the mapped region (bitmap + data) */
    uint64_t map_len;
    _Atomic uint64_t *bits;    /* shared bitmap, one bit per granule (1 = in use) */
    unsigned char *data;
    uint64_t ngranules;
    uint64_t region_offset;    /* offset of the region in the memfd */
    unsigned char *touched;    /* producer-local: granules already fallocated */
    int fd;                    /* the segment's memfd (not owned) */
} hp_heap;

/* Bytes of the bitmap area (page-aligned) for a heap of `heap_size` data bytes. */
uint64_t hp_heap_meta_size(uint64_t heap_size);
/* Map region `index` of the segment; 0 or -1 (errno). */
int hp_heap_map(hp_heap *heap, int fd, uint64_t region_offset, uint64_t heap_size);
void hp_heap_unmap(hp_heap *heap);
/* Producer: reserve a block for `nbytes` of data, holding one reference; returns the
 * data offset, -1 when no room, -2 on an error allocating pages (errno set, nothing
 * reserved). */
int64_t hp_heap_alloc(hp_heap *heap, uint64_t nbytes);
/* Producer: one more reference to a block it holds (a send of an allocate_buffer block). */
void hp_heap_retain(hp_heap *heap, uint64_t offset);
/* Either side: drop one reference to the block whose data is at `offset` (the consumer
 * once done with a message, the producer for a frame never sent or a buffer that died);
 * the last one frees the block. An offset that is no block's is ignored. */
void hp_heap_release(hp_heap *heap, uint64_t offset);
/* Whether `offset` can be a block's data offset in this heap (frames are checked). */
int hp_heap_valid_offset(const hp_heap *heap, uint64_t offset);
/* Consumer: whether a frame's block at `offset` with `nbytes` of data is a live block of
 * this heap whose header (written by the peer, so checked) covers those bytes. */
int hp_heap_check_block(const hp_heap *heap, uint64_t offset, uint64_t nbytes);

#endif
