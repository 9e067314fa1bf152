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
 * Ownership of a block travels with its frame: the producer sets its bits
 * (atomic fetch_or, relaxed: only the producer ever sets bits) and publishes the frame
 * (release, via the ring's head); the consumer clears them when the last Python view of
 * the block dies (atomic fetch_and, release), and the producer's scan reads the bitmap
 * with acquire, so the consumer's reads of a freed block happen before its reuse.
 */
#ifndef HP_HEAP_H
#define HP_HEAP_H

#include <stdatomic.h>
#include <stdint.h>

#define HP_HEAP_GRANULE_SHIFT 16
#define HP_HEAP_GRANULE (UINT64_C(1) << HP_HEAP_GRANULE_SHIFT)

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
/* Producer: reserve `nbytes`; returns the data offset, -1 when no room, -2 on an error
 * allocating pages (errno set, nothing reserved). */
int64_t hp_heap_alloc(hp_heap *heap, uint64_t nbytes);
/* Either side: release a block (by the consumer once done, or by the producer when
 * the frame that would have carried it was never sent). */
void hp_heap_free(_Atomic uint64_t *bits, uint64_t offset, uint64_t nbytes);

#endif
