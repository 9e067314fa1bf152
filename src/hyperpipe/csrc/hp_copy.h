/* hp_copy.h - copying a big buffer into shared memory that the other process reads next.
 *
 * Pure C, no Python. glibc's memcpy uses ordinary stores up to its non-temporal threshold
 * (240 MiB on the 2-vCPU VM we measure on, where the last-level cache is 32 MiB): the
 * destination's lines are read in before they are written (a read for ownership) and
 * written back when evicted. Once the source and the destination together no longer fit
 * in that cache, stores that go straight to memory skip that read: from half the
 * last-level cache up a copy with non-temporal stores ran 1.2-1.9x faster there (16 and
 * 64 MiB), and 1.3-1.5x faster than glibc's own non-temporal loop at 256 MiB
 * (docs/benchmarks.md, "shm views, sixth round"); below it, glibc's copy was as fast
 * (8 MiB) or faster (1-4 MiB: up to 1.5x).
 *
 * Non-temporal stores are weakly ordered: hp_copy returns after a store fence, so the
 * release store that publishes the buffer (the ring's head) orders them as it orders
 * ordinary stores.
 */
#ifndef HP_COPY_H
#define HP_COPY_H

#include <stddef.h>
#include <stdint.h>

/* From how many bytes hp_copy streams past the caches: half the last-level cache (the
 * smaller of sysfs's and sysconf's figure), 16 MiB when neither is known; UINT64_MAX
 * without AVX2 (x86-64 CPUs without it, other architectures: memcpy throughout). */
uint64_t hp_copy_stream_min(void);

/* memcpy(dst, src, n) with AVX2 non-temporal stores (memcpy without AVX2), fenced: for
 * a part of a buffer whose whole size is hp_copy_stream_min() or more. */
void hp_copy_stream(void *dst, const void *src, size_t n);

/* memcpy(dst, src, n), streamed (hp_copy_stream) from hp_copy_stream_min() bytes up. */
void hp_copy(void *dst, const void *src, size_t n);

#endif
