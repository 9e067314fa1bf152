/* hp_heap.c - first-fit granule allocator over a shared bitmap; see hp_heap.h. */
#include "hp_heap.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define PAGE 4096u

uint64_t hp_heap_meta_size(uint64_t heap_size) {
    uint64_t ngranules = heap_size >> HP_HEAP_GRANULE_SHIFT;
    uint64_t bytes = (ngranules + 63) / 64 * 8;
    return (bytes + PAGE - 1) / PAGE * PAGE;
}

int hp_heap_map(hp_heap *heap, int fd, uint64_t region_offset, uint64_t heap_size) {
    memset(heap, 0, sizeof *heap);
    heap->fd = fd;
    heap->region_offset = region_offset;
    heap->ngranules = heap_size >> HP_HEAP_GRANULE_SHIFT;
    uint64_t meta = hp_heap_meta_size(heap_size);
    heap->map_len = meta + heap_size;
    /* the bitmap pages were allocated with the segment; the data pages are not yet */
    void *p = mmap(NULL, heap->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)region_offset);
    if (p == MAP_FAILED) {
        heap->map = NULL;
        return -1;
    }
    heap->map = p;
    heap->bits = (_Atomic uint64_t *)p;
    heap->data = (unsigned char *)p + meta;
    return 0;
}

void hp_heap_unmap(hp_heap *heap) {
    if (heap->map) munmap(heap->map, heap->map_len);
    heap->map = NULL;
    free(heap->touched);
    heap->touched = NULL;
}

static int bit_is_set(hp_heap *h, uint64_t g) {
    return (atomic_load_explicit(&h->bits[g / 64], memory_order_acquire) >> (g % 64)) & 1;
}

static void set_range(_Atomic uint64_t *bits, uint64_t first, uint64_t count, int set) {
    while (count > 0) {
        uint64_t word = first / 64, shift = first % 64;
        uint64_t n = 64 - shift < count ? 64 - shift : count;
        uint64_t mask = (n == 64 ? ~UINT64_C(0) : ((UINT64_C(1) << n) - 1)) << shift;
        if (set) atomic_fetch_or_explicit(&bits[word], mask, memory_order_relaxed);
        else atomic_fetch_and_explicit(&bits[word], ~mask, memory_order_release);
        first += n;
        count -= n;
    }
}

/* Allocate the pages of granules [first, first+count) that were never used. */
static int ensure_pages(hp_heap *h, uint64_t first, uint64_t count) {
    if (!h->touched) {
        h->touched = calloc(h->ngranules, 1);
        if (!h->touched) return -1;
    }
    uint64_t g = first, end = first + count;
    while (g < end) {
        if (h->touched[g]) {
            g++;
            continue;
        }
        uint64_t run = g;
        while (run < end && !h->touched[run]) run++;
        off_t off = (off_t)(h->region_offset + hp_heap_meta_size(h->ngranules << HP_HEAP_GRANULE_SHIFT) +
                            (g << HP_HEAP_GRANULE_SHIFT));
        int rc = posix_fallocate(h->fd, off, (off_t)((run - g) << HP_HEAP_GRANULE_SHIFT));
        if (rc != 0) {
            errno = rc;
            return -1;
        }
        memset(h->touched + g, 1, run - g);
        g = run;
    }
    return 0;
}

static hp_heap_block_header *block_header(const hp_heap *h, uint64_t offset) {
    return (hp_heap_block_header *)(h->data + offset - HP_HEAP_BLOCK_HEADER);
}

int hp_heap_valid_offset(const hp_heap *h, uint64_t offset) {
    return h->map && offset >= HP_HEAP_BLOCK_HEADER &&
           (offset - HP_HEAP_BLOCK_HEADER) % HP_HEAP_GRANULE == 0 &&
           ((offset - HP_HEAP_BLOCK_HEADER) >> HP_HEAP_GRANULE_SHIFT) < h->ngranules;
}

int hp_heap_check_block(const hp_heap *h, uint64_t offset, uint64_t nbytes) {
    if (!hp_heap_valid_offset(h, offset)) return 0;
    hp_heap_block_header *hdr = block_header(h, offset);
    uint64_t first = (offset - HP_HEAP_BLOCK_HEADER) >> HP_HEAP_GRANULE_SHIFT;
    uint64_t granules = atomic_load_explicit(&hdr->granules, memory_order_relaxed);
    return atomic_load_explicit(&hdr->refs, memory_order_relaxed) > 0 && granules > 0 &&
           granules <= h->ngranules - first && nbytes <= (granules << HP_HEAP_GRANULE_SHIFT) - HP_HEAP_BLOCK_HEADER;
}

int64_t hp_heap_alloc(hp_heap *h, uint64_t nbytes) {
    if (nbytes > (h->ngranules << HP_HEAP_GRANULE_SHIFT)) return -1; /* also keeps the sum below from wrapping */
    uint64_t need = (nbytes + HP_HEAP_BLOCK_HEADER + HP_HEAP_GRANULE - 1) >> HP_HEAP_GRANULE_SHIFT;
    if (!h->map || need > h->ngranules) return -1;
    /* First fit from the start: the low, already-mapped pages are reused over and over,
       so a steady stream of big buffers costs no page faults and no allocation. */
    uint64_t g = 0;
    while (g + need <= h->ngranules) {
        uint64_t run = 0;
        while (run < need && !bit_is_set(h, g + run)) run++;
        if (run == need) {
            if (ensure_pages(h, g, need) < 0) return -2;
            set_range(h->bits, g, need, 1);
            uint64_t offset = (g << HP_HEAP_GRANULE_SHIFT) + HP_HEAP_BLOCK_HEADER;
            hp_heap_block_header *hdr = block_header(h, offset);
            atomic_store_explicit(&hdr->granules, (uint32_t)need, memory_order_relaxed);
            atomic_store_explicit(&hdr->refs, 1, memory_order_relaxed);
            return (int64_t)offset;
        }
        g += run + 1;
    }
    return -1;
}

void hp_heap_retain(hp_heap *h, uint64_t offset) {
    if (!hp_heap_valid_offset(h, offset)) return;
    atomic_fetch_add_explicit(&block_header(h, offset)->refs, 1, memory_order_relaxed);
}

void hp_heap_release(hp_heap *h, uint64_t offset) {
    if (!hp_heap_valid_offset(h, offset)) return;
    hp_heap_block_header *hdr = block_header(h, offset);
    uint32_t refs = atomic_load_explicit(&hdr->refs, memory_order_relaxed);
    do {
        if (refs == 0) return; /* not a live block: a corrupt frame, never ours to free */
    } while (!atomic_compare_exchange_weak_explicit(&hdr->refs, &refs, refs - 1, memory_order_acq_rel,
                                                    memory_order_relaxed));
    if (refs != 1) return;
    uint64_t first = (offset - HP_HEAP_BLOCK_HEADER) >> HP_HEAP_GRANULE_SHIFT;
    uint64_t count = atomic_load_explicit(&hdr->granules, memory_order_relaxed);
    if (count == 0 || count > h->ngranules - first) return;
    set_range(h->bits, first, count, 0);
}
