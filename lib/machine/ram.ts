/**
 * Guest RAM: RAM blocks (QEMU's RAMBlock: an idstr, a size, one host
 * mapping) and the KVM memory slots that map them into guest-physical
 * space, with GPA <-> block-offset translation, bounded access helpers and
 * the dirty log per block.
 *
 * Layout of the 'pvh' machine: the block's first min(size, 3 GiB) at GPA 0,
 * the rest at GPA 4 GiB (the 3-4 GiB hole holds the LAPIC, IOAPIC and KVM's
 * TSS). The 'none' machine maps its block contiguously at GPA 0, as QEMU's
 * `-M none` does.
 *
 * Dirty log: one bit per 4 KiB page in block-offset order (PageBitmap). With
 * KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 the VM is switched to manual protect at
 * creation, so a sync is KVM_GET_DIRTY_LOG then KVM_CLEAR_DIRTY_LOG of the
 * pages just read (the pages are write-protected again only then). With
 * INITIALLY_SET (bit 1) turning logging on protects nothing: the first sync
 * reports every page dirty and the protection happens as pages are cleared.
 */
import { native, type GuestMemory, type Vm } from '../native';
import { PageBitmap } from '../migration/bitmap';
import { FerryError } from '../errors';

export const PAGE_SIZE = 4096;
export const GIB = 1024 * 1024 * 1024;
export const PCI_HOLE_START = 3 * GIB;
export const HIGH_RAM_START = 4 * GIB;
/** Largest span one GuestMemory.view may cover. */
const VIEW_SPAN = GIB;
const KVM_MEM_LOG_DIRTY_PAGES = 1;
export const DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1;
export const DIRTY_LOG_INITIALLY_SET = 2;

export interface RamSlot {
  /** KVM memory slot number. */
  slot: number;
  gpa: number;
  /** Offset within the block. */
  offset: number;
  size: number;
}

/** The slots for a block of `size` bytes: `split` = the pvh layout with a hole at 3-4 GiB. */
export function planRamSlots(size: number, split: boolean, firstSlot = 0): RamSlot[] {
  if (!split || size <= PCI_HOLE_START) return [{ slot: firstSlot, gpa: 0, offset: 0, size }];
  return [
    { slot: firstSlot, gpa: 0, offset: 0, size: PCI_HOLE_START },
    { slot: firstSlot + 1, gpa: HIGH_RAM_START, offset: PCI_HOLE_START, size: size - PCI_HOLE_START },
  ];
}

export class RamBlock {
  readonly idstr: string;
  readonly size: number;
  readonly pages: number;
  readonly memory: GuestMemory;
  readonly slots: readonly RamSlot[];
  private readonly vm: Vm | undefined;
  private views: (Uint8Array | undefined)[] = [];
  private logging = false;
  private scratch: Map<number, Uint8Array> = new Map();
  private manualProtect = false;

  /** Maps `memory` into `vm` at `slots` (vm undefined: RAM only, no KVM). */
  constructor(idstr: string, memory: GuestMemory, slots: RamSlot[], vm: Vm | undefined) {
    if (idstr.length === 0 || idstr.length > 255) throw new RangeError(`bad RAM block id '${idstr}'`);
    this.idstr = idstr;
    this.size = memory.size;
    this.pages = Math.ceil(memory.size / PAGE_SIZE);
    this.memory = memory;
    this.slots = slots;
    this.vm = vm;
    for (const s of slots) vm?.setMemorySlot(s.slot, s.gpa, memory, s.offset, s.size, 0);
  }

  /** Makes every per-GiB view now (each costs V8 a full GC the first time: see lib/migration/ram.ts). */
  warmViews(): void {
    for (let off = 0; off < this.size; off += VIEW_SPAN) this.view(off, 1);
  }

  /** A zero-copy view of [offset, offset+length) of the block; must not cross a 1 GiB boundary. */
  view(offset: number, length: number): Uint8Array {
    this.checkRange(offset, length);
    const i = Math.floor(offset / VIEW_SPAN);
    if (Math.floor((offset + length - 1) / VIEW_SPAN) !== i && length > 0) {
      throw new RangeError(`range [${offset}, +${length}) crosses a 1 GiB view boundary`);
    }
    let v = this.views[i];
    if (!v) {
      const start = i * VIEW_SPAN;
      v = new Uint8Array(this.memory.view(start, Math.min(VIEW_SPAN, this.size - start)));
      this.views[i] = v;
    }
    const rel = offset - i * VIEW_SPAN;
    return v.subarray(rel, rel + length);
  }

  /** Calls fn for each piece of [offset, offset+length) that fits one view. */
  forEachChunk(offset: number, length: number, fn: (view: Uint8Array, offset: number) => void, maxChunk = VIEW_SPAN): void {
    this.checkRange(offset, length);
    let o = offset;
    const end = offset + length;
    while (o < end) {
      const boundary = (Math.floor(o / VIEW_SPAN) + 1) * VIEW_SPAN;
      const n = Math.min(end, boundary, o + maxChunk) - o;
      fn(this.view(o, n), o);
      o += n;
    }
  }

  write(offset: number, data: Uint8Array): void {
    let done = 0;
    this.forEachChunk(offset, data.length, (v) => {
      v.set(data.subarray(done, done + v.length));
      done += v.length;
    });
  }

  read(offset: number, length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    let done = 0;
    this.forEachChunk(offset, length, (v) => {
      out.set(v, done);
      done += v.length;
    });
    return out;
  }

  fill(offset: number, length: number, value: number): void {
    this.forEachChunk(offset, length, (v) => v.fill(value));
  }

  /** GPA of a block offset, or undefined when the offset is in no slot. */
  gpaOf(offset: number): number | undefined {
    const s = this.slots.find((x) => offset >= x.offset && offset < x.offset + x.size);
    return s ? s.gpa + (offset - s.offset) : undefined;
  }

  /** Block offset of a GPA, or undefined when the GPA is not in this block. */
  offsetOf(gpa: number): number | undefined {
    const s = this.slots.find((x) => gpa >= x.gpa && gpa < x.gpa + x.size);
    return s ? s.offset + (gpa - s.gpa) : undefined;
  }

  get dirtyLogging(): boolean {
    return this.logging;
  }

  /** Set by the Machine when the VM runs with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2. */
  setManualProtect(on: boolean): void {
    this.manualProtect = on;
  }

  /** Start dirty logging on every slot of the block (KVM_MEM_LOG_DIRTY_PAGES). */
  enableDirtyLog(): void {
    const vm = this.requireVm();
    for (const s of this.slots) vm.setMemorySlot(s.slot, s.gpa, this.memory, s.offset, s.size, KVM_MEM_LOG_DIRTY_PAGES);
    this.logging = true;
  }

  disableDirtyLog(): void {
    const vm = this.requireVm();
    for (const s of this.slots) vm.setMemorySlot(s.slot, s.gpa, this.memory, s.offset, s.size, 0);
    this.logging = false;
    this.scratch.clear();
  }

  /**
   * Fetch (and, with manual protect, clear) the dirty log of every slot and
   * OR it into `into` (a bitmap of this block's pages). Returns the number of
   * dirty pages KVM reported in this sync.
   */
  syncDirtyLog(into: PageBitmap): number {
    const vm = this.requireVm();
    if (!this.logging) throw new FerryError('ERR_DIRTY_LOG_OFF', `dirty logging is not enabled on RAM block '${this.idstr}'`);
    if (into.pages !== this.pages) throw new RangeError(`bitmap of ${into.pages} pages for block of ${this.pages}`);
    let dirty = 0;
    for (const s of this.slots) {
      const pages = Math.ceil(s.size / PAGE_SIZE);
      let tmp = this.scratch.get(s.slot);
      if (!tmp) {
        tmp = new Uint8Array(PageBitmap.byteLength(pages));
        this.scratch.set(s.slot, tmp);
      }
      vm.getDirtyLog(s.slot, tmp);
      const bm = new PageBitmap(pages, tmp);
      const n = bm.count();
      if (n === 0) continue;
      dirty += n;
      if (this.manualProtect) vm.clearDirtyLog(s.slot, 0, pages, tmp);
      orAt(into, tmp, s.offset / PAGE_SIZE);
    }
    return dirty;
  }

  /**
   * Write-protects block pages [first, first + count) for the dirty log
   * (KVM_CLEAR_DIRTY_LOG of their bits, in KVM's 64-page-aligned windows). For manual protect with INITIALLY_SET, where
   * turning logging on protects nothing: the engine protects a range right
   * before it first reads it, so enabling logging costs nothing up front and
   * a write that lands before the read is not reported as dirty again.
   */
  protectPages(first: number, count: number): void {
    const vm = this.requireVm();
    if (!this.logging) throw new FerryError('ERR_DIRTY_LOG_OFF', `dirty logging is not enabled on RAM block '${this.idstr}'`);
    if (!this.manualProtect) throw new FerryError('ERR_DIRTY_LOG_MODE', `RAM block '${this.idstr}' is not in manual-protect mode`);
    this.checkRange(first * PAGE_SIZE, count * PAGE_SIZE);
    for (const s of this.slots) {
      const slotFirst = s.offset / PAGE_SIZE;
      const slotPages = Math.ceil(s.size / PAGE_SIZE);
      const lo = Math.max(first, slotFirst) - slotFirst;
      const hi = Math.min(first + count, slotFirst + slotPages) - slotFirst;
      if (lo >= hi) continue;
      // KVM: first_page a multiple of 64, num_pages too unless it reaches the slot's end. KVM
      // clears only the bits set in the mask: pages of the widened window outside the range
      // keep theirs (one of them may have been written since its own protection).
      const start = lo - (lo % 64);
      const end = Math.min(slotPages, Math.ceil(hi / 64) * 64);
      const mask = new PageBitmap(end - start);
      mask.setRange(lo - start, hi - lo);
      vm.clearDirtyLog(s.slot, start, end - start, mask.bytes);
    }
  }

  private requireVm(): Vm {
    if (!this.vm) throw new FerryError('ERR_NO_KVM', `RAM block '${this.idstr}' is not mapped into a VM`);
    return this.vm;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.size) {
      throw new RangeError(`range [${offset}, +${length}) outside RAM block '${this.idstr}' of ${this.size} bytes`);
    }
  }

  /** Drop cached views (before the memory is closed). */
  dropViews(): void {
    this.views = [];
  }
}

/** into |= src, where src's bit 0 is `into`'s page `firstPage`. */
function orAt(into: PageBitmap, src: Uint8Array, firstPage: number): void {
  if (firstPage % 64 === 0) {
    const byteOff = firstPage / 8;
    native().bitmapOr(into.bytes.subarray(byteOff), src.subarray(0, Math.min(src.length, into.bytes.length - byteOff)));
    return;
  }
  const srcBm = new PageBitmap(src.length * 8, src);
  for (let p = srcBm.next(0); p >= 0 && p + firstPage < into.pages; p = srcBm.next(p + 1)) into.set(p + firstPage);
}
