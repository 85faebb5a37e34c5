/**
 * Transports across processes: the other end is dist/lib/transport/tool.js in a child process
 * (tcp and unix both ways, fd inherited through spawn's stdio), 64 MiB with sha256 checks, the
 * return path, throughput, and a peer killed mid-transfer.
 */
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { type IncomingChannel, type MigrationAddress, connectOutgoing, formatMigrationAddress, listenIncoming } from '../../lib/transport';
import { collectText, patternSha256, receiveAll, sendPattern } from '../../lib/transport/tool';

const TOOL = path.join(__dirname, '..', '..', 'lib', 'transport', 'tool.js');
const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

interface PeerEvent {
  event: string;
  [k: string]: unknown;
}

class Peer {
  readonly proc: ChildProcess;
  private readonly events: PeerEvent[] = [];
  private readonly waiters: Array<() => void> = [];
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  constructor(args: string[], extraStdio: Array<'pipe' | 'ignore'> = []) {
    this.proc = spawn(process.execPath, [TOOL, ...args], { stdio: ['ignore', 'pipe', 'inherit', ...extraStdio] });
    readline.createInterface({ input: this.proc.stdout! }).on('line', (line) => {
      this.events.push(JSON.parse(line) as PeerEvent);
      for (const w of this.waiters.splice(0)) w();
    });
    this.exited = new Promise((resolve) => this.proc.once('exit', (code, signal) => resolve({ code, signal })));
    this.exited.then(() => {
      for (const w of this.waiters.splice(0)) w();
    });
  }

  /** The first event named `name`; rejects if the peer reports an error or exits first. */
  async next(name: string, ms = 30_000): Promise<PeerEvent> {
    const deadline = Date.now() + ms;
    let exited = false;
    void this.exited.then(() => (exited = true));
    for (;;) {
      const e = this.events.find((x) => x.event === name || x.event === 'error');
      if (e) {
        if (e.event === 'error') throw new Error(`peer failed: ${JSON.stringify(e)}`);
        return e;
      }
      if (exited) throw new Error(`peer exited before '${name}'`);
      if (Date.now() > deadline) throw new Error(`timed out waiting for '${name}' from the peer`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, 200);
        this.waiters.push(() => (clearTimeout(t), resolve()));
      });
    }
  }

  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}

const peers: Peer[] = [];
function peer(args: string[], extraStdio: Array<'pipe' | 'ignore'> = []): Peer {
  const p = new Peer(args, extraStdio);
  peers.push(p);
  return p;
}

function mbps(bytes: number, seconds: number): string {
  return (bytes / MiB / seconds).toFixed(0);
}

/** Parent sends to a child that listens on `uri`; returns parent-side seconds. */
async function sendToChild(uri: string, seed: string): Promise<number> {
  const child = peer(['recv', uri, '--rp']);
  const listening = await child.next('listening');
  const addr = listening['address'] as MigrationAddress;
  const out = await connectOutgoing(addr);
  const rp = collectText(out.returnPath!);
  const t0 = process.hrtime.bigint();
  const sha = await sendPattern(out.stream, SIZE, seed);
  await out.finish();
  const done = await child.next('done');
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  assert.equal(done['bytes'], SIZE);
  assert.equal(done['sha256'], sha);
  assert.equal(await rp, `PONG\nSHA ${sha}\n`, 'return path carried both messages');
  await out.close();
  assert.deepEqual(await child.exited, { code: 0, signal: null });
  return seconds;
}

/** A child connects to our listener on `uri` and sends; we verify and answer on the return path. */
async function receiveFromChild(uri: string, seed: string): Promise<number> {
  const l = await listenIncoming(uri);
  const child = peer(['send', formatMigrationAddress(l.address), '--bytes', String(SIZE), '--seed', seed]);
  const inc = await l.accept();
  await l.close();
  inc.returnPath!.write('PONG\n');
  const t0 = process.hrtime.bigint();
  const got = await receiveAll(inc.stream);
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  assert.equal(got.bytes, SIZE);
  assert.equal(got.sha256, patternSha256(SIZE, seed));
  inc.returnPath!.write(`SHA ${got.sha256}\n`);
  await inc.finish();
  await inc.close();
  const done = await child.next('done');
  assert.equal(done['sha256'], got.sha256);
  assert.equal(done['returnPath'], `PONG\nSHA ${got.sha256}\n`);
  assert.deepEqual(await child.exited, { code: 0, signal: null });
  return seconds;
}

describe('transport: with peer processes', () => {
  let tmp: string;
  before(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-transport-proc-'));
  });
  afterEach(() => {
    for (const p of peers.splice(0)) p.kill();
  });
  after(() => {
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  describe('transport: across processes', function () {
    this.timeout(120_000);

    it('tcp: child listens on 127.0.0.1 port 0, parent sends 64 MiB (throughput printed)', async () => {
      const s = await sendToChild('tcp:127.0.0.1:0', 'p-tcp');
      console.log(`      tcp parent->child: ${mbps(SIZE, s)} MB/s (64 MiB, pattern + sha256 on each side)`);
    });

    it('tcp: parent listens, child connects and sends 64 MiB', async () => {
      const s = await receiveFromChild('tcp:127.0.0.1:0', 'c-tcp');
      console.log(`      tcp child->parent: ${mbps(SIZE, s)} MB/s`);
    });

    it('unix: child listens, parent sends 64 MiB (throughput printed)', async () => {
      const s = await sendToChild(`unix:${path.join(tmp, 'p.sock')}`, 'p-unix');
      console.log(`      unix parent->child: ${mbps(SIZE, s)} MB/s`);
    });

    it('unix: parent listens, child connects and sends 64 MiB', async () => {
      const s = await receiveFromChild(`unix:${path.join(tmp, 'c.sock')}`, 'c-unix');
      console.log(`      unix child->parent: ${mbps(SIZE, s)} MB/s`);
    });

    it('fd: a socket inherited as fd 3 carries the stream to the child and the return path back', async () => {
      const child = peer(['recv', 'fd:3', '--rp'], ['pipe']);
      const sock = child.proc.stdio[3] as net.Socket;
      const rp = collectText(sock);
      const sha = await sendPattern(sock, SIZE, 'fd-in');
      sock.end();
      const done = await child.next('done');
      assert.equal(done['bytes'], SIZE);
      assert.equal(done['sha256'], sha);
      assert.equal(await rp, `PONG\nSHA ${sha}\n`);
      assert.deepEqual(await child.exited, { code: 0, signal: null });
    });

    it('fd: the child sends through a named fd (getfd-style lookup of fd 3)', async () => {
      const child = peer(['send', 'fd:migfd', '--fd', 'migfd=3', '--bytes', String(SIZE), '--seed', 'fd-out'], ['pipe']);
      const sock = child.proc.stdio[3] as net.Socket;
      sock.allowHalfOpen = true; // keep our side writable after the child's EOF, for the SHA reply
      sock.write('PONG\n');
      const got = await receiveAll(sock);
      assert.equal(got.bytes, SIZE);
      assert.equal(got.sha256, patternSha256(SIZE, 'fd-out'));
      sock.end(`SHA ${got.sha256}\n`);
      const done = await child.next('done');
      assert.equal(done['returnPath'], `PONG\nSHA ${got.sha256}\n`);
      assert.deepEqual(await child.exited, { code: 0, signal: null });
    });

    it('raw throughput between processes, tcp and unix (printed; no hashing)', async () => {
      const RAW = 512 * MiB;
      for (const uri of ['tcp:127.0.0.1:0', `unix:${path.join(tmp, 'raw.sock')}`]) {
        const recv = peer(['recv', uri, '--raw', '--rp']);
        const addr = (await recv.next('listening'))['address'] as MigrationAddress;
        const send = peer(['send', formatMigrationAddress(addr), '--raw', '--bytes', String(RAW)]);
        const [s, r] = await Promise.all([send.next('done', 60_000), recv.next('done', 60_000)]);
        assert.equal(r['bytes'], RAW);
        assert.match(String(s['returnPath']), /^PONG\n/);
        console.log(`      raw ${uri.split(':')[0]}: ${mbps(RAW, Number(r['seconds']))} MB/s (512 MiB, 1 MiB writes, receiver side)`);
      }
    });

    it('a destination killed mid-transfer fails the source write (no hang)', async () => {
      const child = peer(['recv', 'tcp:127.0.0.1:0']);
      const addr = (await child.next('listening'))['address'] as MigrationAddress;
      const out = await connectOutgoing(addr);
      await assert.rejects(
        sendPattern(out.stream, 16 * SIZE, 'kill', (n) => {
          if (n >= 16 * MiB) child.kill();
        }),
        (err: NodeJS.ErrnoException) => {
          assert.ok(['ECONNRESET', 'EPIPE'].includes(String(err.code)), String(err.code));
          return true;
        },
      );
      assert.equal((await child.exited).signal, 'SIGKILL');
      await out.close();
    });

    it('a source killed mid-transfer ends the destination stream early (no hang)', async () => {
      const l = await listenIncoming(`unix:${path.join(tmp, 'kill.sock')}`);
      const child = peer(['send', formatMigrationAddress(l.address), '--bytes', String(16 * SIZE)]);
      const inc: IncomingChannel = await l.accept();
      let bytes = 0;
      inc.stream.on('data', (c: Buffer) => {
        bytes += c.length;
        if (bytes >= 16 * MiB) child.kill();
      });
      const r: { bytes: number } | Error = await receiveAll(inc.stream).catch((e: unknown) => e as Error);
      if (r instanceof Error) assert.equal((r as NodeJS.ErrnoException).code, 'ECONNRESET');
      else assert.ok(r.bytes < 16 * SIZE && r.bytes >= 16 * MiB, `received ${r.bytes}`);
      assert.equal((await child.exited).signal, 'SIGKILL');
      await inc.close();
      await l.close();
    });
  });

  // ---------------------------------------------------------------------------------------------
  // QEMU 7.2 on both ends, ferry's transports relaying the live stream between them.

  const HAVE_QEMU = spawnSync('qemu-system-x86_64', ['--version']).status === 0;

  /** Just enough QMP for this test: one command at a time, events skipped. */
  class MiniQmp {
    private buf = '';
    private readonly lines: string[] = [];
    private wake: (() => void) | undefined;
    private constructor(private readonly sock: net.Socket) {
      sock.setEncoding('utf8');
      sock.on('data', (d: string) => {
        this.buf += d;
        let i;
        while ((i = this.buf.indexOf('\n')) >= 0) {
          this.lines.push(this.buf.slice(0, i));
          this.buf = this.buf.slice(i + 1);
        }
        this.wake?.();
      });
    }
    static async connect(p: string): Promise<MiniQmp> {
      for (let i = 0; ; i++) {
        try {
          const s = await new Promise<net.Socket>((resolve, reject) => {
            const c = net.connect(p, () => resolve(c));
            c.once('error', reject);
          });
          const q = new MiniQmp(s);
          await q.line(); // greeting
          await q.cmd('qmp_capabilities');
          return q;
        } catch (err) {
          if (i > 100) throw err;
          await new Promise((r) => setTimeout(r, 50));
        }
      }
    }
    private async line(): Promise<Record<string, unknown>> {
      while (this.lines.length === 0) await new Promise<void>((r) => (this.wake = r));
      return JSON.parse(this.lines.shift()!) as Record<string, unknown>;
    }
    async cmd(execute: string, args?: object): Promise<Record<string, unknown>> {
      this.sock.write(`${JSON.stringify(args ? { execute, arguments: args } : { execute })}\n`);
      for (;;) {
        const m = await this.line();
        if ('event' in m) continue;
        if ('error' in m) throw new Error(`${execute}: ${JSON.stringify(m['error'])}`);
        return m['return'] as Record<string, unknown>;
      }
    }
    close(): void {
      this.sock.destroy();
    }
  }

  function qemuRamOnly(dir: string, name: string, extra: string[]): ChildProcess {
    const args = [
      '-M', 'none,memory-backend=mem0', '-m', '64M',
      '-object', `memory-backend-file,id=mem0,size=64M,mem-path=${path.join(dir, `${name}.img`)},share=on`,
      '-nodefaults', '-display', 'none', '-qmp', `unix:${path.join(dir, `${name}.qmp`)},server=on,wait=off`,
      ...extra,
    ];
    return spawn('qemu-system-x86_64', args, { stdio: ['ignore', 'inherit', 'inherit'] });
  }

  describe(HAVE_QEMU ? 'transport: relaying a live QEMU 7.2 migration' : 'transport: relaying a live QEMU 7.2 migration (skipped: qemu-system-x86_64 missing)', function () {
    this.timeout(120_000);
    const procs: ChildProcess[] = [];
    afterEach(() => {
      for (const p of procs.splice(0)) if (p.exitCode === null) p.kill('SIGKILL');
    });

    it('QEMU source -> our tcp listener -> our unix connection -> QEMU destination: RAM arrives intact', async function () {
      if (!HAVE_QEMU) this.skip();
      const dir = fs.mkdtempSync(path.join(tmp, 'qemu-'));
      const ram = crypto.randomBytes(64 * MiB);
      fs.writeFileSync(path.join(dir, 'src.img'), ram);
      const destSock = path.join(dir, 'dest-incoming.sock');
      const dest = qemuRamOnly(dir, 'dest', ['-incoming', `unix:${destSock}`]);
      const src = qemuRamOnly(dir, 'src', []);
      procs.push(dest, src);
      const destExit = new Promise<number | null>((r) => dest.once('exit', (code) => r(code)));
      const [qs, qd] = await Promise.all([MiniQmp.connect(path.join(dir, 'src.qmp')), MiniQmp.connect(path.join(dir, 'dest.qmp'))]);

      // The relay: accept QEMU's connection, connect to the waiting destination, pipe with backpressure.
      const l = await listenIncoming('tcp:127.0.0.1:0');
      const fromQemu = l.accept();
      await qs.cmd('migrate-set-parameters', { 'max-bandwidth': 100 * 1024 * 1024 * 1024 });
      await qs.cmd('migrate', { uri: formatMigrationAddress(l.address) });
      const inc = await fromQemu;
      const out = await connectOutgoing(`unix:${destSock}`);
      let relayed = 0;
      inc.stream.on('data', (c: Buffer) => (relayed += c.length));
      inc.stream.pipe(out.stream);

      let status = '';
      for (let i = 0; i < 600 && status !== 'completed' && status !== 'failed'; i++) {
        status = String((await qs.cmd('query-migrate'))['status']);
        if (status !== 'completed') await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(status, 'completed');
      let run = '';
      for (let i = 0; i < 600; i++) {
        run = String((await qd.cmd('query-status'))['status']);
        if (run !== 'inmigrate') break;
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(run, 'running', 'destination loaded the stream and started');
      assert.ok(relayed > 64 * MiB, `relayed ${relayed} bytes`);
      const got = fs.readFileSync(path.join(dir, 'dest.img'));
      assert.ok(got.equals(ram), 'destination RAM equals the source RAM');
      console.log(`      relayed ${(relayed / MiB).toFixed(1)} MiB from QEMU to QEMU`);
      await qd.cmd('quit').catch(() => undefined);
      await qs.cmd('quit').catch(() => undefined);
      assert.equal(await destExit, 0);
      qs.close();
      qd.close();
      await Promise.all([inc.close(), out.close(), l.close()]);
    });
  });
});
