/**
 * The Machine in-process on /dev/kvm with the real test guests: boot,
 * stop/cont, dirty log, state capture and restore into a second machine,
 * and teardown without leaked threads.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';

import { guestPath, parseGuestOutput, type GuestLine } from '../../lib/guests';
import { Machine, type MachineConfig } from '../../lib/machine/machine';
import { PageBitmap } from '../../lib/migration/bitmap';
import type { SerialSink } from '../../lib/machine/serial';

const HAVE_KVM = fs.existsSync('/dev/kvm');
const BUILT = fs.existsSync(guestPath('memwriter')) && fs.existsSync(guestPath('ticker'));
const why = !HAVE_KVM ? ' (skipped: /dev/kvm missing)' : !BUILT ? ' (skipped: guests not built)' : '';

class TextSink implements SerialSink {
  text = '';
  write(d: Uint8Array): void {
    this.text += Buffer.from(d).toString('latin1');
  }
  flush(): void {}
  close(): void {}
  lines(): GuestLine[] {
    return parseGuestOutput(this.text);
  }
  ticks(): Extract<GuestLine, { kind: 'memwriter-tick' | 'ticker-tick' }>[] {
    return this.lines().filter((l): l is Extract<GuestLine, { kind: 'memwriter-tick' | 'ticker-tick' }> => l.kind === 'memwriter-tick' || l.kind === 'ticker-tick');
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until<T>(what: string, ms: number, f: () => T | undefined | false, sink?: TextSink): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = f();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}\n${sink?.text.split('\n').slice(-6).join('\n') ?? ''}`);
    await sleep(20);
  }
}

function make(guest: 'memwriter' | 'ticker', append: string, extra: Partial<MachineConfig> = {}): { m: Machine; sink: TextSink } {
  const sink = new TextSink();
  const m = new Machine({ machineType: 'pvh', ramSize: 128 << 20, cpus: 1, guest: guestPath(guest), cmdline: append, serial: sink, ...extra });
  return { m, sink };
}

/** A machine made, loaded and running, once its guest has printed `ticks` tick lines. */
async function started(guest: 'memwriter' | 'ticker', append: string, ticks: number, open: Machine[], extra: Partial<MachineConfig> = {}): Promise<{ m: Machine; sink: TextSink }> {
  const r = make(guest, append, extra);
  open.push(r.m);
  r.m.loadGuest();
  await r.m.cont();
  await until('ticks', 60_000, () => r.sink.ticks().length >= ticks, r.sink);
  return r;
}

function threadCount(): number {
  return fs.readdirSync('/proc/self/task').length;
}

describe(`machine: in-process on KVM${why}`, function () {
  this.timeout(120_000);
  const open: Machine[] = [];

  before(function () {
    if (!HAVE_KVM || !BUILT) this.skip();
  });

  afterEach(() => {
    for (const m of open.splice(0)) m.close();
  });

  it('boots memwriter: ticks with errors=0; stop halts the ticks; cont resumes them', async () => {
    const { m, sink } = make('memwriter', 'ws=16M rate=20M');
    open.push(m);
    const events: string[] = [];
    m.on('qmp-event', (name: string) => events.push(name));
    const states: string[] = [];
    m.on('runstate', (s: string) => states.push(s));
    m.loadGuest();
    assert.equal(m.runState, 'prelaunch');
    await m.cont();
    assert.equal(m.runState, 'running');
    await until('3 ticks', 60_000, () => sink.ticks().length >= 3, sink);
    assert.ok(sink.text.includes('memwriter ready'));
    const t = sink.ticks() as Extract<GuestLine, { kind: 'memwriter-tick' }>[];
    assert.ok(t.every((x) => x.errors === 0));
    assert.ok(t.at(-1)!.writes > t[0]!.writes);

    await m.stop();
    assert.equal(m.runState, 'paused');
    await sleep(50);
    const n = sink.ticks().length;
    await sleep(1000);
    assert.equal(sink.ticks().length, n, 'no tick while stopped');
    const last = sink.ticks().at(-1)!.n;
    await m.cont();
    await until('ticks after cont', 10_000, () => sink.ticks().some((x) => x.n > last + 1), sink);
    assert.equal(sink.ticks().find((x) => x.n > last)!.n, last + 1);
    assert.deepEqual(events, ['RESUME', 'STOP', 'RESUME']);
    assert.deepEqual(states, ['running', 'paused', 'running']);
  });

  it('dirty log: reports the pages the guest writes, nothing once stopped', async () => {
    const { m } = await started('memwriter', 'ws=8M rate=40M', 2, open);
    const block = m.ramBlocks[0]!;
    assert.equal(block.idstr, 'pc.ram');
    const bm = new PageBitmap(block.pages);
    block.enableDirtyLog();
    assert.ok(block.dirtyLogging);
    block.syncDirtyLog(bm); // initially-set: may report everything once
    bm.clearAll();
    await sleep(400);
    const n = block.syncDirtyLog(bm);
    assert.ok(n > 0, 'the working set was written');
    assert.equal(bm.count(), n);
    assert.ok(n < block.pages, 'not every page is dirty');
    await m.stop();
    bm.clearAll();
    block.syncDirtyLog(bm); // writes up to the stop
    bm.clearAll();
    assert.equal(block.syncDirtyLog(bm), 0, 'a stopped guest dirties nothing');
    block.disableDirtyLog();
    assert.throws(() => block.syncDirtyLog(bm), { code: 'ERR_DIRTY_LOG_OFF' });
  });

  it('dirty log, deferred protection (INITIALLY_SET): every page reads dirty until protectPages covers it, to the page', async () => {
    const { m } = await started('memwriter', 'ws=8M rate=40M', 2, open);
    assert.deepEqual(m.dirtyLog, { manualProtect: true, initiallySet: true }, 'this host has KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with INITIALLY_SET');
    await m.stop(); // no guest write may blur the counts below
    const block = m.ramBlocks[0]!;
    const bm = new PageBitmap(block.pages);
    assert.throws(() => block.protectPages(0, 64), { code: 'ERR_DIRTY_LOG_OFF' });
    block.enableDirtyLog();
    block.protectPages(1000, 100); // inside KVM's 64-page windows 960..1151: only its own bits
    assert.throws(() => block.protectPages(block.pages - 10, 11), RangeError);
    assert.equal(block.syncDirtyLog(bm), block.pages - 100);
    assert.equal(bm.get(999), true);
    assert.equal(bm.get(1000), false);
    assert.equal(bm.get(1099), false);
    assert.equal(bm.get(1100), true);
    bm.clearAll();
    assert.equal(block.syncDirtyLog(bm), 0, 'the sync protected the rest');
    await m.cont();
    await sleep(300);
    const n = block.syncDirtyLog(bm);
    assert.ok(n > 0 && n < block.pages, `the guest's writes are reported (${n} of ${block.pages})`);
    block.disableDirtyLog();
  });

  it('state captured from a stopped ticker restores into a fresh machine: ticks continue', async () => {
    const a = make('ticker', 'hz=100 tick=100');
    open.push(a.m);
    a.m.loadGuest();
    await a.m.cont();
    await until('ticks on A', 60_000, () => a.sink.ticks().length >= 3, a.sink);
    await a.m.stop();
    await sleep(50);
    const last = a.sink.ticks().at(-1)!;
    const state = JSON.parse(JSON.stringify(a.m.captureState())) as ReturnType<Machine['captureState']>;
    assert.equal(state.vcpus.length, 1);
    assert.ok(state.vcpus[0]!.msrs.length > 10, `MSRs saved (${state.vcpus[0]!.msrs.length})`);
    assert.ok(state.irqchip && state.pit && state.clock && state.serial);

    const b = make('ticker', 'hz=100 tick=100');
    open.push(b.m);
    const src = a.m.ramBlocks[0]!;
    const dst = b.m.ramBlocks[0]!;
    for (let off = 0; off < src.size; off += 32 << 20) dst.view(off, 32 << 20).set(src.view(off, 32 << 20));
    const report = b.m.restoreState(state);
    assert.deepEqual(report.skippedMsrs, []);
    const again = b.m.captureState();
    assert.equal(again.vcpus[0]!.regs, state.vcpus[0]!.regs, 'registers restored exactly');
    assert.equal(again.vcpus[0]!.sregs, state.vcpus[0]!.sregs);
    assert.equal(again.vcpus[0]!.lapic.length, state.vcpus[0]!.lapic.length);
    a.m.close();
    await b.m.cont();
    await until('ticks on B', 20_000, () => b.sink.ticks().length >= 2, b.sink);
    const first = b.sink.ticks()[0] as Extract<GuestLine, { kind: 'ticker-tick' }>;
    assert.equal(first.n, last.n + 1, 'tick numbering continues');
    assert.ok(first.irqs >= (last as Extract<GuestLine, { kind: 'ticker-tick' }>).irqs, 'interrupt count continues');
  });

  it('capture/restore at arbitrary points of serial I/O keeps the output intact (pending I/O completed by pause)', async () => {
    // tick=1: the guest prints continuously, so most stops land on a port-I/O exit.
    const { m, sink } = await started('ticker', 'hz=1000 tick=1', 5, open);
    for (let i = 0; i < 25; i++) {
      await sleep(3 + (i % 7));
      await m.stop();
      const st = JSON.parse(JSON.stringify(m.captureState())) as ReturnType<Machine['captureState']>;
      m.restoreState(st); // re-entering a half-done IN/OUT would duplicate or drop a byte
      await m.cont();
    }
    await sleep(50);
    await m.stop();
    const lines = sink.text.split('\n').slice(0, -1);
    const bad = lines.filter((l) => !/^(info .*|ticker ready hz=\d+|tick \d+ irqs=\d+)$/.test(l));
    assert.deepEqual(bad, [], 'every serial line is well-formed');
    const n = sink.ticks().map((t) => t.n);
    assert.ok(n.length > 40, `the guest printed throughout (${n.length} ticks)`);
    n.forEach((v, i) => i > 0 && assert.equal(v, n[i - 1]! + 1, `tick ${n[i - 1]} followed by ${v}`));
  });

  it('refuses a state of another shape; refuses state access while running', async () => {
    const a = make('ticker', '');
    open.push(a.m);
    const st = a.m.captureState();
    const b = make('ticker', '', { ramSize: 64 << 20 });
    open.push(b.m);
    assert.throws(() => b.m.restoreState(st), { code: 'ERR_STATE_MISMATCH' });
    assert.throws(() => b.m.restoreState({ ...st, format: 'x' } as never), { code: 'ERR_STATE_INVALID' });
    a.m.loadGuest();
    await a.m.cont();
    assert.throws(() => a.m.captureState(), { code: 'ERR_MACHINE_RUNNING' });
  });

  it('2 vCPUs: APIC ids, AP waits for SIPI, state round trip', async () => {
    const { m, sink } = await started('ticker', '', 2, open, { cpus: 2 });
    await m.stop();
    const st = m.captureState();
    assert.equal(st.vcpus.length, 2);
    assert.equal(st.vcpus[1]!.mpState, 1, 'the AP is uninitialized (waits for INIT/SIPI)');
    const lapicId = (b64: string) => Buffer.from(b64, 'base64').readUInt32LE(0x20) >>> 24;
    assert.deepEqual(st.vcpus.map((v) => lapicId(v.lapic)), [0, 1]);
    m.restoreState(st);
    await m.cont();
    const n = sink.ticks().length;
    await until('more ticks', 10_000, () => sink.ticks().length > n + 1, sink);
  });

  it('port bus: debugcon output, unhandled ports read 0xff and are counted, ACPI-style power-off shuts down', async () => {
    const { m, sink } = make('ticker', '');
    open.push(m);
    const boot = m.loadGuest();
    // 32-bit code at the entry: out 0xe9 'A'; in al, 0x61 -> out 0xe9 al; out 0x80; out 0x604 <- 0x2000; hlt
    const code = Buffer.from([
      0xb0, 0x41, 0xe6, 0xe9, // mov al,'A'; out 0xe9,al
      0xe4, 0x61, 0xe6, 0xe9, // in al,0x61 (unhandled: 0xff); out 0xe9,al
      0xe6, 0x80, // out 0x80,al (POST: ignored, not counted)
      0x66, 0xba, 0x04, 0x06, 0x66, 0xb8, 0x00, 0x20, 0x66, 0xef, // mov dx,0x604; mov ax,0x2000; out dx,ax
      0xf4, 0xeb, 0xfd, // hlt; jmp back
    ]);
    m.writePhys(boot.entry, code);
    const events: [string, unknown][] = [];
    m.on('qmp-event', (name: string, data: unknown) => events.push([name, data]));
    const down = new Promise((r) => m.once('shutdown', r));
    await m.cont();
    await down;
    assert.equal(m.runState, 'shutdown');
    assert.equal(sink.text, 'A\xff');
    assert.equal(m.stats.unhandledPortReads, 1);
    assert.deepEqual(m.stats.lastUnhandled, ['in 0x61']);
    assert.equal(m.stats.unhandledPortWrites, 0);
    assert.deepEqual(events.at(-1), ['SHUTDOWN', { guest: true, reason: 'guest-shutdown' }]);
    await assert.rejects(m.cont(), { code: 'ERR_NEEDS_RESET' });
  });

  it('a triple fault shuts the machine down (reboot action shutdown) with SHUTDOWN guest-reset', async () => {
    const { m } = make('ticker', '');
    open.push(m);
    const boot = m.loadGuest();
    m.writePhys(boot.entry, Buffer.from([0x0f, 0x0b])); // ud2 with no IDT: #UD -> #DF -> triple fault
    const errors: string[] = [];
    m.on('guest-error', (e: string) => errors.push(e));
    const info = new Promise((r) => m.once('shutdown', r));
    await m.cont();
    assert.deepEqual(await info, { guest: true, reason: 'guest-reset' });
    assert.match(errors.join('\n'), /triple fault/);
  });

  it('rejects bad configurations', () => {
    assert.throws(() => new Machine({ machineType: 'pvh', ramSize: 1000, cpus: 1 }), { code: 'ERR_MACHINE_CONFIG' });
    assert.throws(() => new Machine({ machineType: 'pvh', ramSize: 64 << 20, cpus: 0 }), { code: 'ERR_MACHINE_CONFIG' });
    assert.throws(() => new Machine({ machineType: 'bogus' as 'pvh', ramSize: 64 << 20, cpus: 1 }), { code: 'ERR_MACHINE_CONFIG' });
    const m = new Machine({ machineType: 'pvh', ramSize: 64 << 20, cpus: 1, guest: '/nonexistent.elf' });
    open.push(m);
    assert.throws(() => m.loadGuest(), { code: 'ERR_GUEST_IMAGE' });
  });

  it("machine 'none': one RAM block, no vCPU; memPath names it mem0 and shares the file", async () => {
    const m = new Machine({ machineType: 'none', ramSize: 16 << 20, cpus: 1 });
    open.push(m);
    assert.equal(m.vcpus.length, 0);
    assert.equal(m.ramBlocks[0]!.idstr, 'ram');
    await m.cont();
    assert.equal(m.runState, 'running');
    await m.stop();
    const file = `/tmp/ferry-mem-${process.pid}.img`;
    try {
      const f = new Machine({ machineType: 'none', ramSize: 16 << 20, cpus: 0, memPath: file });
      open.push(f);
      assert.equal(f.ramBlocks[0]!.idstr, 'mem0');
      f.writePhys(0x1000, Buffer.from('hello'));
      const fd = fs.openSync(file, 'r');
      const b = Buffer.alloc(5);
      fs.readSync(fd, b, 0, 5, 0x1000);
      fs.closeSync(fd);
      assert.equal(b.toString(), 'hello');
      assert.throws(() => f.readPhys(16 << 20, 1), { code: 'ERR_GPA_RANGE' });
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  it('close() joins every vCPU thread (no thread left behind)', async () => {
    const before = threadCount();
    for (let i = 0; i < 3; i++) {
      const { m } = make('ticker', '', { cpus: 2 });
      m.loadGuest();
      await m.cont();
      await sleep(100);
      m.close();
      m.close(); // idempotent
    }
    await until('threads to go', 2000, () => threadCount() <= before);
    assert.ok(threadCount() <= before);
  });
});
