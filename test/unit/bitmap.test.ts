import assert from 'node:assert/strict';
import fc from 'fast-check';
import { PageBitmap } from '../../lib/migration/bitmap';

describe('PageBitmap', () => {
  it('rounds storage to 64-bit words and keeps the tail clear', () => {
    const b = new PageBitmap(70);
    assert.equal(b.bytes.byteLength, 16);
    b.setAll();
    assert.equal(b.count(), 70);
    b.invert();
    assert.equal(b.count(), 0);
    b.invert();
    assert.equal(b.next(69), 69);
    assert.equal(b.next(70), -1);
  });

  it('clearRange clears exactly [page, page + n) across word boundaries', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.nat(299), fc.nat(300), (pages, from, n) => {
        const b = new PageBitmap(pages);
        b.setAll();
        b.clearRange(from, n);
        for (let p = 0; p < pages; p++) assert.equal(b.get(p), p < from || p >= from + n, `page ${p}`);
      }),
    );
  });

  it('next/runLength/count agree with a reference set', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 500 }), fc.array(fc.nat(499), { maxLength: 200 }), (pages, marks) => {
        const b = new PageBitmap(pages);
        const ref = new Set<number>();
        for (const m of marks) if (m < pages) { b.set(m); ref.add(m); }
        assert.equal(b.count(), ref.size);
        const seen: number[] = [];
        for (let p = b.next(0); p !== -1; p = b.next(p + 1)) seen.push(p);
        assert.deepEqual(seen, [...ref].sort((x, y) => x - y));
        for (const p of ref) {
          let run = 0;
          while (ref.has(p + run)) run++;
          assert.equal(b.runLength(p, 1000), run);
        }
      }),
    );
  });

  it('setRange() sets exactly [first, first+count) within the block', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 300 }), fc.nat(299), fc.nat(300), (pages, first, count) => {
        const b = new PageBitmap(pages);
        b.setRange(first, count);
        for (let p = 0; p < pages; p++) assert.equal(b.get(p), p >= first && p < first + count, `page ${p}`);
        assert.equal(b.count(), Math.max(0, Math.min(first + count, pages) - first));
      }),
    );
  });

  it('runLength() counts long runs across words, capped by max and the block end', () => {
    fc.assert(
      fc.property(
        fc.integer({ min: 1, max: 700 }),
        fc.array(fc.tuple(fc.nat(699), fc.integer({ min: 1, max: 200 })), { maxLength: 8 }),
        fc.nat(699),
        fc.integer({ min: 0, max: 300 }),
        (pages, ranges, start, max) => {
          const b = new PageBitmap(pages);
          for (const [first, n] of ranges) b.setRange(Math.min(first, pages), Math.max(0, Math.min(n, pages - first)));
          let run = 0;
          while (run < max && start + run < pages && b.get(start + run)) run++;
          assert.equal(b.runLength(start, max), run);
        },
      ),
    );
  });

  it('or() merges a KVM-layout byte bitmap and clear() removes', () => {
    const b = new PageBitmap(128);
    const kvm = new Uint8Array(16);
    kvm[0] = 0b101; // pages 0 and 2
    kvm[15] = 0x80; // page 127
    b.or(kvm);
    assert.deepEqual([b.get(0), b.get(1), b.get(2), b.get(127)], [true, false, true, true]);
    b.clear(2);
    assert.equal(b.count(), 2);
  });

  it('rejects a too-small buffer', () => {
    assert.throws(() => new PageBitmap(128, new Uint8Array(8)), /too small/);
  });
});
