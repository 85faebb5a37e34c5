/**
 * Memory temperature control for benchmarks on these machines.
 *
 * They run with free page reporting (virtio-balloon, page_reporting_order 9):
 * free 2 MiB blocks are handed back to the host soon after they are freed, and
 * the next first touch of such a block costs the host's fault on top of the
 * kernel's zeroing (measured: 2 GiB of fresh huge pages 0.2 s warm, 3-5 s
 * cold). Guest RAM (both VMMs madvise it for huge pages) comes from exactly
 * such blocks, so whichever VMM happens to run right after another one freed
 * memory receives several times faster. warmHugePages() touches and frees
 * `bytes` of huge-page memory just before a trial, so every trial starts on
 * the same (warm, recently freed) memory, as on hardware without reporting.
 */
import { native } from '../../lib/native';

const GIB = 1 << 30;

/** Touches `bytes` of THP-advised anonymous memory, then unmaps it. Returns ms taken. */
export function warmHugePages(bytes: number): number {
  const t0 = performance.now();
  const mem = new (native().GuestMemory)(bytes, { hugepages: true });
  try {
    for (let off = 0; off < bytes; off += GIB) new Uint8Array(mem.view(off, Math.min(GIB, bytes - off))).fill(1);
  } finally {
    mem.close();
  }
  return performance.now() - t0;
}
