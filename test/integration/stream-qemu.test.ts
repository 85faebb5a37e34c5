/**
 * lib/stream against a real QEMU 7.2: streams QEMU writes parse completely
 * (and match our own vmstate/vmdesc descriptions byte for byte), and streams
 * our encoder writes are loaded by QEMU (status completed, run state taken
 * from globalstate, RAM contents landing in a shared memory-backend-file).
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import {
  GLOBALSTATE_VMSD,
  RAM_SECTION_VERSION,
  RamEncoder,
  SectionType,
  StreamReader,
  StreamSink,
  StreamWriter,
  TIMER_VMSD,
  buildVmdesc,
  describeVmState,
  formatVmdescJson,
  globalState,
  timerState,
  writeDeviceSection,
} from '../../lib/stream';
import { parseWholeStream, randomBytes } from '../fixtures/stream-samples';

const QEMU = 'qemu-system-x86_64';
const HAVE_QEMU = spawnSync(QEMU, ['--version'], { stdio: 'ignore' }).status === 0;
const MiB = 1 << 20;
const PAGE = 4096;

/** A minimal QMP client: greeting, qmp_capabilities, one command at a time, events skipped. */
class Qmp {
  private sock: net.Socket;
  private buf = '';
  private queue: Array<Record<string, unknown>> = [];
  private waiter: (() => void) | undefined;
  private closed = false;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      let nl: number;
      while ((nl = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (line) this.queue.push(JSON.parse(line) as Record<string, unknown>);
      }
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }

  static async connect(socketPath: string, timeoutMs = 10000): Promise<Qmp> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(socketPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const q = new Qmp(sock);
        const greeting = await q.message();
        assert.ok('QMP' in greeting, 'QMP greeting');
        await q.cmd('qmp_capabilities');
        return q;
      } catch (err) {
        if (Date.now() > deadline) throw err;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.();
  }

  private async message(): Promise<Record<string, unknown>> {
    for (;;) {
      const m = this.queue.shift();
      if (m) return m;
      if (this.closed) throw new Error('QMP connection closed');
      await new Promise<void>((r) => (this.waiter = r));
    }
  }

  async cmd(execute: string, args?: Record<string, unknown>): Promise<any> {
    this.sock.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    for (;;) {
      const m = await this.message();
      if ('event' in m) continue;
      if ('error' in m) throw new Error(`QMP ${execute}: ${JSON.stringify(m.error)}`);
      return m.return;
    }
  }

  close(): void {
    this.sock.destroy();
  }
}

interface QemuProc {
  proc: ChildProcess;
  qmp: Qmp;
  stderr: () => string;
  stop(): Promise<void>;
}

async function startQemu(dir: string, name: string, extra: string[]): Promise<QemuProc> {
  const sockPath = path.join(dir, `${name}.qmp`);
  const proc = spawn(QEMU, ['-nodefaults', '-display', 'none', '-qmp', `unix:${sockPath},server=on,wait=off`, ...extra], {
    stdio: ['ignore', 'ignore', 'pipe'],
  });
  let err = '';
  proc.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  let qmp: Qmp;
  try {
    qmp = await Qmp.connect(sockPath);
  } catch (e) {
    proc.kill('SIGKILL');
    throw new Error(`QEMU ${name} did not start: ${(e as Error).message}; stderr: ${err}`);
  }
  return {
    proc,
    qmp,
    stderr: () => err,
    async stop() {
      try {
        await Promise.race([qmp.cmd('quit'), new Promise((r) => setTimeout(r, 2000))]);
      } catch {
        /* already gone */
      }
      qmp.close();
      const t = setTimeout(() => proc.kill('SIGKILL'), 3000);
      await exited;
      clearTimeout(t);
    },
  };
}

async function waitMigration(q: QemuProc, timeoutMs = 30000): Promise<any> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const info = await q.qmp.cmd('query-migrate');
    if (info.status === 'completed' || info.status === 'failed') return info;
    if (Date.now() > deadline) throw new Error(`migration still ${info.status}; stderr: ${q.stderr()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Our stream for a `-M none` machine: every page (data or ZERO), timer, globalstate, EOF, vmdesc. */
async function writeOurStream(file: string, block: string, ram: Uint8Array, runstate: string): Promise<void> {
  const sink = new StreamSink(fs.createWriteStream(file));
  const w = new StreamWriter({ sink });
  const e = new RamEncoder(w);
  const RAM_ID = 1;
  w.header();
  w.configuration({ machine: 'none' });
  w.sectionStart(SectionType.START, RAM_ID, 'ram', 0, RAM_SECTION_VERSION);
  e.memSize([{ idstr: block, usedLength: ram.length }]);
  e.eos();
  w.footer(RAM_ID);
  w.sectionPart(SectionType.PART, RAM_ID);
  for (let off = 0; off < ram.length; off += PAGE) {
    const page = ram.subarray(off, off + PAGE);
    if (page.every((b) => b === 0)) e.zero(block, off);
    else e.page(block, off, page);
    if (w.pendingBytes > 4 * MiB) await w.flush();
  }
  e.eos();
  w.footer(RAM_ID);
  w.sectionPart(SectionType.END, RAM_ID);
  e.eos();
  w.footer(RAM_ID);
  const descs = [
    writeDeviceSection(w, { sectionId: 7, idstr: 'timer', instanceId: 0, vmsd: TIMER_VMSD, state: timerState(1000n, 2000n) }),
    writeDeviceSection(w, { sectionId: 9, idstr: 'globalstate', instanceId: 0, vmsd: GLOBALSTATE_VMSD, state: globalState(runstate) }),
  ];
  w.eof();
  w.vmdescription(formatVmdescJson(buildVmdesc(descs)));
  await w.flush();
  await sink.end();
}

describe(HAVE_QEMU ? 'stream vs QEMU 7.2' : 'stream vs QEMU 7.2 (skipped: qemu-system-x86_64 not installed)', function () {
  this.timeout(120000);
  let dir: string;
  const procs: QemuProc[] = [];

  before(function () {
    if (!HAVE_QEMU) this.skip();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-stream-qemu-'));
  });
  afterEach(async () => {
    while (procs.length) await procs.pop()!.stop();
  });
  after(() => {
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function qemuSourceStream(name: string, extra: string[]): Promise<{ file: string; info: any }> {
    const q = await startQemu(dir, name, ['-M', 'none', '-m', '64M', ...extra]);
    procs.push(q);
    const file = path.join(dir, `${name}.bin`);
    await q.qmp.cmd('migrate-set-parameters', { 'max-bandwidth': 100 * 1024 * MiB });
    await q.qmp.cmd('migrate', { uri: `exec:cat > ${file}` });
    const info = await waitMigration(q);
    assert.equal(info.status, 'completed', q.stderr());
    return { file, info };
  }

  it('parses a QEMU 7.2 stream of an idle -M none machine completely', async () => {
    const { file, info } = await qemuSourceStream('idle', []);
    const bytes = fs.readFileSync(file);
    assert.equal(info.ram.total, 64 * MiB);
    assert.ok(info.ram.transferred <= bytes.length, 'QEMU counts RAM bytes of the file');
    const res = await parseWholeStream(StreamReader.fromBuffer(bytes), [{ idstr: 'ram', size: 64 * MiB }], { expectMachine: 'none' });
    assert.equal(res.machine, 'none');
    assert.equal(res.touched.get('ram')!.size, 16384, 'every page of block ram announced');
    assert.equal(res.zero + res.pages, info.ram.duplicate + info.ram.normal);
    assert.deepEqual([...res.devices.keys()], ['timer', 'globalstate']);
    assert.equal(res.runstate, 'running');
    assert.ok(res.sawEof);
    // QEMU's vmdesc equals, as text, the one our descriptions produce for the states we loaded.
    const ours = formatVmdescJson(
      buildVmdesc([
        { name: 'timer', instance_id: 0, ...describeVmState(TIMER_VMSD, res.devices.get('timer')!) },
        { name: 'globalstate', instance_id: 0, ...describeVmState(GLOBALSTATE_VMSD, res.devices.get('globalstate')!) },
      ]),
    );
    assert.equal(res.vmdescJson, ours);
  });

  it('parses a QEMU 7.2 stream with memory-backend-file RAM and every page equals the file', async () => {
    const img = path.join(dir, 'src-ram.img');
    const content = randomBytes(64 * MiB, 42);
    content.fill(0, 10 * MiB, 11 * MiB); // some zero pages too
    fs.writeFileSync(img, content);
    const { file } = await qemuSourceStream('file', [
      '-M', 'none,memory-backend=mem0',
      '-object', `memory-backend-file,id=mem0,size=64M,mem-path=${img},share=on`,
    ]);
    // Parse from a file stream, i.e. in 64 KiB..1 MiB chunks at arbitrary record boundaries.
    const reader = StreamReader.fromReadable(fs.createReadStream(file, { highWaterMark: 100003 }));
    const res = await parseWholeStream(reader, [{ idstr: 'mem0', size: 64 * MiB }], { expectMachine: 'none' });
    assert.equal(res.touched.get('mem0')!.size, 16384);
    assert.equal(res.zero, 256);
    assert.equal(res.pages, 16384 - 256);
    assert.ok(Buffer.from(res.blocks.get('mem0')!).equals(content), 'every parsed page equals the backing file');
  });

  for (const runstate of ['paused', 'running']) {
    it(`QEMU 7.2 loads a stream written by our encoder (globalstate '${runstate}')`, async () => {
      const ram = randomBytes(64 * MiB, 7);
      ram.fill(0, 0, 3 * MiB);
      const file = path.join(dir, `ours-${runstate}.bin`);
      await writeOurStream(file, 'ram', ram, runstate);
      // Our own parser accepts it too.
      const self = await parseWholeStream(StreamReader.fromBuffer(fs.readFileSync(file)), [{ idstr: 'ram', size: 64 * MiB }]);
      assert.equal(self.runstate, runstate);
      const q = await startQemu(dir, `dst-${runstate}`, ['-M', 'none', '-m', '64M', '-incoming', `exec:cat ${file}`]);
      procs.push(q);
      const info = await waitMigration(q);
      assert.equal(info.status, 'completed', q.stderr());
      const status = await q.qmp.cmd('query-status');
      assert.equal(status.status, runstate, `run state after load: ${JSON.stringify(status)}`);
      assert.equal(status.running, runstate === 'running');
    });
  }

  it('QEMU 7.2 puts our pages into a shared memory-backend-file (ZERO records clear dirty pages)', async () => {
    const img = path.join(dir, 'dst-ram.img');
    fs.writeFileSync(img, Buffer.alloc(64 * MiB, 0xff)); // stale content that ZERO records must clear
    const ram = randomBytes(64 * MiB, 99);
    ram.fill(0, 5 * MiB, 9 * MiB);
    const file = path.join(dir, 'ours-mem0.bin');
    await writeOurStream(file, 'mem0', ram, 'paused');
    const q = await startQemu(dir, 'dst-mem0', [
      '-M', 'none,memory-backend=mem0',
      '-object', `memory-backend-file,id=mem0,size=64M,mem-path=${img},share=on`,
      '-incoming', `exec:cat ${file}`,
    ]);
    procs.push(q);
    const info = await waitMigration(q);
    assert.equal(info.status, 'completed', q.stderr());
    assert.equal((await q.qmp.cmd('query-status')).status, 'paused');
    const got = fs.readFileSync(img);
    assert.ok(got.equals(ram), 'file RAM equals what our stream carried');
  });

  it('QEMU 7.2 rejects our stream for another machine type (configuration is checked)', async () => {
    const file = path.join(dir, 'wrong-machine.bin');
    const w = new StreamWriter();
    w.header();
    w.configuration({ machine: 'pc-i440fx-7.2' });
    w.eof();
    fs.writeFileSync(file, w.toBuffer());
    // QEMU fails the load and exits (often before QMP is up): watch the process only.
    const proc = spawn(QEMU, ['-nodefaults', '-display', 'none', '-M', 'none', '-m', '64M', '-incoming', `exec:cat ${file}`], {
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    let stderr = '';
    proc.stderr!.on('data', (d: Buffer) => (stderr += d.toString()));
    const exit = new Promise<number | null>((r) => proc.once('exit', (code) => r(code)));
    const code = await Promise.race([exit, new Promise<string>((r) => setTimeout(() => r('timeout'), 20000))]);
    if (code === 'timeout') proc.kill('SIGKILL');
    assert.notEqual(code, 'timeout');
    assert.notEqual(code, 0);
    assert.match(stderr, /Machine type received is 'pc-i440fx-7.2' and local is 'none'/);
  });
});
