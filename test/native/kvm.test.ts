// Kvm, Vm and GuestMemory against the real /dev/kvm: capability probe,
// memory slots, dirty logging (plain and manual-protect), irqchip/PIT/clock
// state, and the error contract on closed fds.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { native, type Binding, type NativeError, type Vcpu } from '../../lib/native';
import { createMachine, DIRTY_BASE_PAGE, GUEST, HAVE_KVM, PAGE, setBits, type TestMachine } from './helpers/guest';

function errOf(fn: () => unknown): NativeError {
  try {
    fn();
  } catch (e) {
    return e as NativeError;
  }
  assert.fail('expected a throw');
}

function assertEbadf(e: NativeError, op: string, syscall = 'ioctl'): void {
  assert.ok(e instanceof Error, `${op}: not an Error`);
  assert.equal(e.code, 'EBADF', `${op}: code`);
  assert.equal(e.errno, -9, `${op}: errno`);
  assert.equal(e.syscall, syscall, `${op}: syscall`);
  assert.equal(e.op, op);
}

/** O_CLOEXEC as /proc reports it (octal flags field of fdinfo). */
function isCloexec(fd: number): boolean {
  const info = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8');
  const m = /flags:\s+([0-7]+)/.exec(info);
  assert.ok(m, 'fdinfo has flags');
  return (parseInt(m[1], 8) & 0o2000000) !== 0;
}

/**
 * Drives GUEST.dirty: each round hands the guest page indices through port
 * 0x11 and pauses it (from inside the exit callback) after the last ack.
 */
class DirtyDriver {
  private queue: number[] = [];
  private done?: () => void;
  constructor(private readonly vcpu: Vcpu) {
    vcpu.start((e) => {
      if (e.reason !== 'io') throw new Error(`unexpected exit ${e.reason}`);
      if (e.direction === 0 && e.port === 0x11) {
        e.data[0] = this.queue.shift() ?? 0;
      } else if (e.direction === 1 && e.port === 0x10 && this.queue.length === 0) {
        const done = this.done;
        this.done = undefined;
        void vcpu.pause().then(done);
      }
    }, false);
  }
  /** Guest writes the given pages (index relative to DIRTY_BASE_PAGE), then parks. */
  round(pages: number[]): Promise<void> {
    this.queue = [...pages];
    const p = new Promise<void>((r) => (this.done = r));
    this.vcpu.resume();
    return p;
  }
}

describe(HAVE_KVM ? 'native: Kvm probe' : 'native: Kvm probe (skipped: /dev/kvm missing)', function () {
  before(function () {
    if (!HAVE_KVM) this.skip();
  });

  it('reports API version 12 and a structured capability probe', function () {
    const kvm = new (native().Kvm)();
    try {
      assert.equal(kvm.apiVersion(), 12);
      const p = kvm.probe();
      assert.equal(p.apiVersion, 12);
      for (const name of [
        'IRQCHIP', 'PIT2', 'USER_MEMORY', 'SET_TSS_ADDR', 'EXT_CPUID', 'MP_STATE', 'VCPU_EVENTS', 'DEBUGREGS',
        'XSAVE', 'XSAVE2', 'XCRS', 'ADJUST_CLOCK', 'MANUAL_DIRTY_LOG_PROTECT2', 'DIRTY_LOG_RING', 'NR_VCPUS',
        'MAX_VCPUS', 'NR_MEMSLOTS', 'TSC_CONTROL', 'GET_TSC_KHZ', 'IMMEDIATE_EXIT',
      ]) {
        assert.equal(typeof p.caps[name], 'number', `caps.${name}`);
      }
      // What every machine here must have for ferry to work at all.
      for (const name of ['IRQCHIP', 'PIT2', 'USER_MEMORY', 'IMMEDIATE_EXIT', 'NR_MEMSLOTS', 'VCPU_EVENTS']) {
        assert.ok(p.caps[name] > 0, `caps.${name} > 0`);
      }
      assert.equal(kvm.checkExtension(3 /* KVM_CAP_USER_MEMORY */), p.caps.USER_MEMORY);
      assert.equal(p.caps.MANUAL_DIRTY_LOG_PROTECT2, p.manualDirtyLogProtect);
      assert.ok(p.maxVcpus >= 1);
      assert.ok(p.xsaveSize >= 4096);
      const msrs = kvm.msrIndexList();
      assert.ok(msrs.length > 0 && msrs.includes(0x174), 'MSR list includes IA32_SYSENTER_CS');
      const cpuid = kvm.supportedCpuid();
      const nent = cpuid.readUInt32LE(0);
      assert.ok(nent > 0);
      assert.equal(cpuid.length, 8 + nent * 40);
    } finally {
      kvm.close();
    }
  });

  it('opens every fd O_CLOEXEC', function () {
    const m = createMachine();
    try {
      assert.ok(isCloexec(m.kvm.fd), 'kvm fd');
      assert.ok(isCloexec(m.vm.fd), 'vm fd');
      assert.ok(isCloexec(m.vcpus[0].fd), 'vcpu fd');
    } finally {
      m.close();
    }
  });
});

describe('native: GuestMemory', function () {
  let b: Binding;
  before(function () {
    b = native();
  });

  it('gives zero-copy views; scans find non-zero bytes and zero pages', function () {
    const mem = new b.GuestMemory(64 * PAGE);
    try {
      assert.equal(mem.size, 64 * PAGE);
      assert.ok(mem.address > 0n && mem.address % 4096n === 0n);
      const a = new Uint8Array(mem.view(0, 64 * PAGE));
      const c = new Uint8Array(mem.view(5 * PAGE, PAGE));
      assert.equal(mem.findNonZero(0, 64 * PAGE), -1);
      a[5 * PAGE + 100] = 7;
      assert.equal(c[100], 7, 'two views share the same memory');
      assert.equal(mem.findNonZero(0, 64 * PAGE), 5 * PAGE + 100, 'offset from the start of the mapping');
      assert.equal(mem.findNonZero(5 * PAGE + 101, PAGE), -1);
      a[63 * PAGE + PAGE - 1] = 1; // the very last byte (tail loop)
      assert.equal(mem.findNonZero(6 * PAGE + 3, 58 * PAGE - 3), 64 * PAGE - 1);
      const out = new Uint8Array(64).fill(9);
      mem.scanZeroPages(0, 64, out);
      const nonZero = [...out].flatMap((z, i) => (z === 0 ? [i] : []));
      assert.deepEqual(nonZero, [5, 63]);
      assert.ok(out.every((z) => z === 0 || z === 1));
      mem.discard(5 * PAGE, PAGE);
      assert.equal(c[100], 0, 'discarded page reads as zero');
      assert.throws(() => mem.discard(1, PAGE), { code: 'ERR_OUT_OF_RANGE' });
      assert.throws(() => mem.view(0, 65 * PAGE), { code: 'ERR_OUT_OF_RANGE' });
      assert.throws(() => mem.view(0, 2 ** 30 + 1), { code: 'ERR_OUT_OF_RANGE' });
    } finally {
      mem.close();
    }
  });

  it('encodePageRecords writes ZERO/PAGE records with CONTINUE; loadPageRecords places PAGE runs only inside the block', function () {
    const src = new b.GuestMemory(64 * PAGE);
    const dst = new b.GuestMemory(64 * PAGE);
    try {
      const s = new Uint8Array(src.view(0, 64 * PAGE));
      for (const p of [1, 2, 5, 40]) s.fill(p, p * PAGE, (p + 1) * PAGE);
      const REC = 8 + PAGE;
      const out = Buffer.alloc(10 + 8 * REC, 0xee);
      // Pages 0..7 of the mapping, sent as offsets 8..15 of a block: 3 non-zero (1, 2, 5), 5 zero.
      const r = src.encodePageRecords(0, 8 * PAGE, 8, out, 10);
      const used = r.bytes;
      assert.deepEqual(r, { pages: 8, bytes: 3 * REC + 5 * 9 });
      assert.equal(out[9], 0xee, 'nothing written before outPos');
      assert.equal(out.readBigUInt64BE(10), BigInt(8 * PAGE) | 0x22n, 'page 0: ZERO | CONTINUE at its block offset');
      assert.equal(out[18], 0, 'fill byte');
      assert.equal(out.readBigUInt64BE(19), BigInt(9 * PAGE) | 0x28n, 'page 1: PAGE | CONTINUE');
      assert.ok(out.subarray(27, 27 + PAGE).every((x) => x === 1));
      // Room for two page records: page 0 (zero, 9 bytes) and page 1 (data) fit; the 4095 bytes
      // left cannot hold a page record, so it stops there.
      assert.deepEqual(src.encodePageRecords(0, 0, 8, Buffer.alloc(2 * REC), 0), { pages: 2, bytes: 9 + REC });
      assert.throws(() => src.encodePageRecords(0, 0, 8, out, out.length - REC + 1), { code: 'ERR_OUT_OF_RANGE' }, 'no room for one record');
      assert.throws(() => src.encodePageRecords(60 * PAGE, 0, 8, Buffer.alloc(8 * REC), 0), { code: 'ERR_OUT_OF_RANGE' });

      // Load: only PAGE|CONTINUE records are placed; the ZERO record at the start stops the loop at once.
      const recs = out.subarray(10, 10 + used);
      assert.equal(dst.loadPageRecords(recs, 0, 16 * PAGE), 0, 'a ZERO record is left to the parser');
      const pageRecs = recs.subarray(9); // starts at page 1's PAGE record
      assert.equal(dst.loadPageRecords(pageRecs, 0, 16 * PAGE), 2 * REC, 'pages 1 and 2, then a ZERO record stops it');
      const d = new Uint8Array(dst.view(0, 64 * PAGE));
      assert.ok(d.subarray(9 * PAGE, 10 * PAGE).every((x) => x === 1) && d.subarray(10 * PAGE, 11 * PAGE).every((x) => x === 2));
      assert.equal(dst.findNonZero(0, 9 * PAGE), -1);
      assert.equal(dst.loadPageRecords(pageRecs, 0, 10 * PAGE), REC, 'a record at or past the block length stops the loop');
      assert.equal(dst.loadPageRecords(pageRecs.subarray(0, REC - 1), 0, 16 * PAGE), 0, 'an incomplete record is left to the parser');
      assert.equal(dst.loadPageRecords(pageRecs, 32 * PAGE, 16 * PAGE), 2 * REC, 'offsets are relative to the block');
      assert.ok(d.subarray(41 * PAGE, 42 * PAGE).every((x) => x === 1));
      assert.throws(() => dst.loadPageRecords(pageRecs, 56 * PAGE, 16 * PAGE), { code: 'ERR_OUT_OF_RANGE' }, 'the block must lie in the mapping');
    } finally {
      src.close();
      dst.close();
    }
  });

  it('close() detaches live views before unmapping', function () {
    const mem = new b.GuestMemory(4 * PAGE);
    const ab = mem.view(0, 4 * PAGE);
    const u = new Uint8Array(ab);
    u[0] = 1;
    const maps = () => fs.readFileSync('/proc/self/maps', 'utf8');
    const addr = mem.address.toString(16);
    assert.ok(maps().includes(addr + '-'), 'mapping present');
    mem.close();
    assert.equal(ab.byteLength, 0, 'view detached');
    assert.equal(u.length, 0);
    assert.equal(u[0], undefined, 'reads nothing (no access to unmapped memory)');
    assert.ok(!maps().includes(addr + '-'), 'mapping gone right at close()');
    assert.throws(() => mem.view(0, 1), { code: 'ERR_MEMORY_CLOSED' });
    mem.close(); // idempotent
  });

  it('memfd and file backings are shared mappings; discard punches the file', function () {
    const m = new b.GuestMemory(2 * PAGE, { memfd: true });
    new Uint8Array(m.view(0, 8))[3] = 5;
    assert.equal(m.findNonZero(0, 2 * PAGE), 3);
    m.close();

    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-mem-'));
    const file = path.join(dir, 'ram');
    try {
      const f = new b.GuestMemory(4 * PAGE, { path: file });
      assert.equal(fs.statSync(file).size, 4 * PAGE, 'created and extended');
      const v = new Uint8Array(f.view(0, 4 * PAGE));
      v[PAGE + 1] = 0x11;
      v[2 * PAGE] = 0x22;
      f.discard(PAGE, PAGE);
      f.close();
      const data = fs.readFileSync(file);
      assert.equal(data[PAGE + 1], 0, 'discarded range punched out of the file');
      assert.equal(data[2 * PAGE], 0x22, 'the rest was written through');
      // A larger existing file is not truncated.
      const g = new b.GuestMemory(PAGE, { path: file });
      g.close();
      assert.equal(fs.statSync(file).size, 4 * PAGE);
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe(HAVE_KVM ? 'native: Vm dirty log' : 'native: Vm dirty log (skipped: /dev/kvm missing)', function () {
  let m: TestMachine | undefined;
  before(function () {
    if (!HAVE_KVM) this.skip();
  });
  afterEach(function () {
    m?.close();
    m = undefined;
  });

  it('shows exactly the pages the guest wrote; logging switches per slot at run time', async function () {
    m = createMachine({ code: GUEST.dirty, slotFlags: 1 });
    const bitmap = new Uint8Array(256 / 8);
    m.vm.getDirtyLog(0, bitmap); // fetch-and-clear
    const driver = new DirtyDriver(m.vcpus[0]);

    await driver.round([0, 1, 2, 5, 9]);
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [0, 1, 2, 5, 9].map((k) => DIRTY_BASE_PAGE + k));
    assert.ok(!setBits(bitmap).includes(DIRTY_BASE_PAGE + 3), 'unwritten page is clean');
    const ram = new Uint8Array(m.mem.view(0, m.mem.size));
    assert.equal(ram[(DIRTY_BASE_PAGE + 5) * PAGE + 0x10], 0xab, 'the guest really wrote');
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [], 'the previous get cleared the log');

    // Logging off: the kernel has no log for the slot any more.
    m.vm.setMemorySlot(0, 0, m.mem, 0, m.mem.size, 0);
    await driver.round([4]);
    assert.equal(errOf(() => m!.vm.getDirtyLog(0, bitmap)).code, 'ENOENT');
    // And on again: only writes after re-enabling count.
    m.vm.setMemorySlot(0, 0, m.mem, 0, m.mem.size, 1);
    await driver.round([3]);
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [DIRTY_BASE_PAGE + 3]);
    assert.throws(() => m!.vm.getDirtyLog(0, new Uint8Array(8)), { code: 'ERR_OUT_OF_RANGE' });
  });

  it('with manual protect, get does not clear and clearDirtyLog does (64-page granules)', async function () {
    const probe = new (native().Kvm)();
    const bits = probe.probe().manualDirtyLogProtect;
    probe.close();
    if (!(bits & 1)) this.skip();
    m = createMachine({ code: GUEST.dirty, slotFlags: 1, manualProtect: 1 });
    const bitmap = new Uint8Array(256 / 8);
    const driver = new DirtyDriver(m.vcpus[0]);

    await driver.round([0, 1]);
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [DIRTY_BASE_PAGE, DIRTY_BASE_PAGE + 1]);
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [DIRTY_BASE_PAGE, DIRTY_BASE_PAGE + 1], 'get alone does not clear');
    m.vm.clearDirtyLog(0, 0, 256, new Uint8Array(32).fill(0xff));
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), []);

    // Pages 0x22 (granule 0) and 0x66 (granule 1): clear only granule 0.
    await driver.round([2, 0x46]);
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [0x22, 0x66]);
    m.vm.clearDirtyLog(0, 0, 64, new Uint8Array(8).fill(0xff));
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [0x66]);
    // The kernel insists on 64-page alignment.
    assert.equal(errOf(() => m!.vm.clearDirtyLog(0, 1, 64, new Uint8Array(8))).code, 'EINVAL');
    // A cleared page is write-protected again: a new write shows up.
    await driver.round([2]);
    m.vm.getDirtyLog(0, bitmap);
    assert.deepEqual(setBits(bitmap), [0x22, 0x66]);
  });
});

describe(HAVE_KVM ? 'native: Vm irqchip, PIT and clock' : 'native: Vm irqchip, PIT and clock (skipped: /dev/kvm missing)', function () {
  let m: TestMachine | undefined;
  before(function () {
    if (!HAVE_KVM) this.skip();
  });
  afterEach(function () {
    m?.close();
    m = undefined;
  });

  it('round-trips PIC, IOAPIC, PIT and kvmclock state', function () {
    m = createMachine({ irqchip: true, pit: true });
    const vm = m.vm;
    // PIC master: imr at chip offset 8 + 2.
    const pic = vm.getIrqchip(0);
    assert.equal(pic.length, 520);
    assert.equal(pic.readUInt32LE(0), 0, 'chip_id');
    pic[10] = 0xfb;
    vm.setIrqchip(pic);
    assert.deepEqual(vm.getIrqchip(0), pic);
    // IOAPIC: redirection entry 3 at 8 + 24 + 3*8 = vector 0x33, masked.
    const ioapic = vm.getIrqchip(2);
    ioapic.writeBigUInt64LE(0x10033n, 8 + 24 + 3 * 8);
    vm.setIrqchip(ioapic);
    assert.equal(vm.getIrqchip(2).readBigUInt64LE(8 + 24 + 3 * 8), 0x10033n);
    vm.irqLine(4, 1);
    vm.irqLine(4, 0);

    // PIT channel 0 (24-byte channel states): count 0x1234, rw_mode 3, mode 2.
    const pit = vm.getPit2();
    assert.equal(pit.length, 112);
    pit.writeUInt32LE(0x1234, 0);
    pit[12] = 3;
    pit[13] = 2;
    vm.setPit2(pit);
    const pit2 = vm.getPit2();
    assert.equal(pit2.readUInt32LE(0), 0x1234);
    assert.equal(pit2[12], 3);
    assert.equal(pit2[13], 2);

    // kvmclock: set, then read back no earlier than what was set (and not far after).
    const clock = vm.getClock();
    assert.equal(clock.length, 48);
    const target = 123_456_789_000n;
    const c = Buffer.alloc(48);
    c.writeBigUInt64LE(target, 0);
    vm.setClock(c);
    const now = vm.getClock().readBigUInt64LE(0);
    assert.ok(now >= target && now < target + 2_000_000_000n, `clock ${now}`);
  });

  it('setMemorySlot keeps its memory, deletes with size 0, checks ranges', function () {
    m = createMachine();
    const mem2 = new (native().GuestMemory)(4 * PAGE);
    try {
      m.vm.setMemorySlot(1, 0x100000, mem2, PAGE, 2 * PAGE, 0);
      assert.throws(() => m!.vm.setMemorySlot(2, 0x200000, mem2, PAGE, 4 * PAGE, 0), { code: 'ERR_OUT_OF_RANGE' });
      assert.throws(() => m!.vm.setMemorySlot(2, 0x200000, {} as never, 0, PAGE, 0), { code: 'ERR_INVALID_ARG_VALUE' });
      // Overlapping GPA range: the kernel refuses.
      assert.equal(errOf(() => m!.vm.setMemorySlot(3, 0x100000, mem2, 0, PAGE, 0)).code, 'EEXIST');
      m.vm.setMemorySlot(1, 0x100000, mem2, 0, 0, 0);
      m.vm.setMemorySlot(3, 0x100000, mem2, 0, PAGE, 0); // free again after the delete
    } finally {
      m.close();
      m = undefined;
      mem2.close();
    }
  });
});

describe(HAVE_KVM ? 'native: Kvm and Vm on a closed fd' : 'native: Kvm and Vm on a closed fd (skipped: /dev/kvm missing)', function () {
  before(function () {
    if (!HAVE_KVM) this.skip();
  });

  const kvmCalls: [string, (k: import('../../lib/native').Kvm) => unknown][] = [
    ['KVM_GET_API_VERSION', (k) => k.apiVersion()],
    ['KVM_CHECK_EXTENSION', (k) => k.checkExtension(3)],
    ['KVM_GET_API_VERSION', (k) => k.probe()],
    ['KVM_GET_MSR_INDEX_LIST', (k) => k.msrIndexList()],
    ['KVM_GET_SUPPORTED_CPUID', (k) => k.supportedCpuid()],
    ['KVM_CREATE_VM', (k) => k.createVm()],
  ];

  it('every Kvm method fails with EBADF after close() and after the fd is closed underneath', function () {
    const b = native();
    const k1 = new b.Kvm();
    k1.close();
    for (const [op, call] of kvmCalls) assertEbadf(errOf(() => call(k1)), op);
    const k2 = new b.Kvm();
    fs.closeSync(k2.fd);
    for (const [op, call] of kvmCalls) assertEbadf(errOf(() => call(k2)), op);
    k2.close();
  });

  it('every Vm method fails with EBADF after close() and after the fd is closed underneath', function () {
    const b = native();
    const mem = new b.GuestMemory(PAGE);
    const vmCalls: [string, (v: import('../../lib/native').Vm) => unknown][] = [
      ['KVM_SET_USER_MEMORY_REGION', (v) => v.setMemorySlot(0, 0, mem, 0, PAGE, 0)],
      ['KVM_SET_USER_MEMORY_REGION', (v) => v.setMemorySlot(0, 0, mem, 0, 0, 0)],
      ['KVM_ENABLE_CAP', (v) => v.enableManualDirtyLogProtect(1)],
      ['KVM_GET_DIRTY_LOG', (v) => v.getDirtyLog(0, new Uint8Array(8))],
      ['KVM_CLEAR_DIRTY_LOG', (v) => v.clearDirtyLog(0, 0, 64, new Uint8Array(8))],
      ['KVM_SET_TSS_ADDR', (v) => v.setTssAddr(0xfffbd000)],
      ['KVM_SET_IDENTITY_MAP_ADDR', (v) => v.setIdentityMapAddr(0xfffbc000)],
      ['KVM_CREATE_IRQCHIP', (v) => v.createIrqchip()],
      ['KVM_CREATE_PIT2', (v) => v.createPit2(0)],
      ['KVM_IRQ_LINE', (v) => v.irqLine(4, 1)],
      ['KVM_GET_IRQCHIP', (v) => v.getIrqchip(0)],
      ['KVM_SET_IRQCHIP', (v) => v.setIrqchip(Buffer.alloc(520))],
      ['KVM_GET_PIT2', (v) => v.getPit2()],
      ['KVM_SET_PIT2', (v) => v.setPit2(Buffer.alloc(112))],
      ['KVM_GET_CLOCK', (v) => v.getClock()],
      ['KVM_SET_CLOCK', (v) => v.setClock(Buffer.alloc(48))],
      ['KVM_CREATE_VCPU', (v) => v.createVcpu(0)],
    ];
    const kvm = new b.Kvm();
    try {
      const v1 = kvm.createVm();
      v1.close();
      for (const [op, call] of vmCalls) assertEbadf(errOf(() => call(v1)), op);
      const v2 = kvm.createVm();
      v2.setMemorySlot(0, 0, mem, 0, PAGE, 1); // a known slot: the bitmap is checked, then EBADF
      fs.closeSync(v2.fd);
      for (const [op, call] of vmCalls) assertEbadf(errOf(() => call(v2)), op);
      v2.close();
    } finally {
      kvm.close();
      mem.close();
    }
  });
});
