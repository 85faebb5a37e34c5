/**
 * Shared helpers for integration tests that run `ferry run` (or QEMU) as
 * child processes: temp dirs, spawning with captured output, waiting for
 * serial lines and guest ticks, QMP access (typed client and raw socket),
 * and checks that a process left nothing behind.
 *
 * Every wait has a deadline and fails with what it was waiting for plus the
 * tail of the process's output, so a hung test explains itself.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';

import { ferryArgv } from '../../../lib/cli/launch';
import { parseGuestOutput, type GuestLine } from '../../../lib/guests';
import { QmpClient } from '../../../lib/qmp/client';

export const HAVE_KVM = fs.existsSync('/dev/kvm');

export { sleep, waitFor, TempDir } from '../../../lib/util/wait';
import { sleep, waitFor, type TempDir } from '../../../lib/util/wait';

export interface Exit {
  code: number | null;
  signal: NodeJS.Signals | null;
}

/** A child process with its stdout/stderr captured (and its fate observable). */
export class Proc {
  readonly child: ChildProcess;
  readonly label: string;
  stdout = '';
  stderr = '';
  exit: Exit | undefined;
  readonly exited: Promise<Exit>;

  constructor(command: string, args: string[], label: string, env?: NodeJS.ProcessEnv) {
    this.label = label;
    this.child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env: env ?? process.env });
    this.child.stdout!.on('data', (d: Buffer) => (this.stdout += d.toString()));
    this.child.stderr!.on('data', (d: Buffer) => (this.stderr += d.toString()));
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exit = { code, signal };
        resolve(this.exit);
      });
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.exit === undefined;
  }

  /** The last lines of stdout/stderr, for failure messages. */
  tail(lines = 15): string {
    const t = (s: string) => s.split('\n').slice(-lines).join('\n');
    return `--- ${this.label} stdout ---\n${t(this.stdout)}\n--- ${this.label} stderr ---\n${t(this.stderr)}`;
  }

  /** Resolves with the exit, or throws after timeoutMs. */
  async waitExit(timeoutMs = 10_000): Promise<Exit> {
    if (this.exit) return this.exit;
    let timer: NodeJS.Timeout | undefined;
    const t = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${this.label} did not exit within ${timeoutMs} ms\n${this.tail()}`)), timeoutMs);
    });
    try {
      return await Promise.race([this.exited, t]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGKILL if still running (test cleanup). */
  async kill(): Promise<void> {
    if (!this.running) return;
    this.child.kill('SIGKILL');
    await this.exited;
  }
}

/** `node dist/lib/cli/main.js run ...args`. */
export function spawnFerryRun(args: string[], label = 'ferry run'): Proc {
  return new Proc(process.execPath, ferryArgv(['run', ...args]), label);
}

/** `node dist/lib/cli/main.js <args>` (any subcommand). */
export function spawnFerry(args: string[], label = 'ferry'): Proc {
  return new Proc(process.execPath, ferryArgv(args), label);
}

// ---- serial output ---------------------------------------------------------

export function readText(file: string): string {
  try {
    return fs.readFileSync(file, 'utf8');
  } catch {
    return '';
  }
}

/** Complete lines of the file (a trailing partial line is left out). */
export function serialLines(file: string): string[] {
  const lines = readText(file).split('\n');
  lines.pop();
  return lines;
}

export function guestLines(file: string): GuestLine[] {
  return parseGuestOutput(readText(file));
}

export type MemwriterTick = Extract<GuestLine, { kind: 'memwriter-tick' }>;
export type TickerTick = Extract<GuestLine, { kind: 'ticker-tick' }>;

export function memwriterTicks(file: string): MemwriterTick[] {
  return guestLines(file).filter((l): l is MemwriterTick => l.kind === 'memwriter-tick');
}

export function tickerTicks(file: string): TickerTick[] {
  return guestLines(file).filter((l): l is TickerTick => l.kind === 'ticker-tick');
}

/** Any tick line (memwriter or ticker), in order. */
export function ticks(file: string): (MemwriterTick | TickerTick)[] {
  return guestLines(file).filter((l): l is MemwriterTick | TickerTick => l.kind === 'memwriter-tick' || l.kind === 'ticker-tick');
}

/** Waits for a complete serial line matching `re`; returns it. */
export function waitForLine(file: string, re: RegExp, timeoutMs: number, proc?: Proc): Promise<string> {
  return waitFor(`a line matching ${re} in ${file}`, timeoutMs, () => serialLines(file).find((l) => re.test(l)), () => diag(file, proc));
}

/** Waits until the file holds at least `count` tick lines (optionally only those with n > afterN). */
export function waitForTicks(file: string, count: number, timeoutMs: number, proc?: Proc, afterN = -Infinity): Promise<(MemwriterTick | TickerTick)[]> {
  return waitFor(
    `${count} tick line(s)${afterN > -Infinity ? ` after tick ${afterN}` : ''} in ${file}`,
    timeoutMs,
    () => {
      if (proc && !proc.running) throw new Error(`${proc.label} exited (${JSON.stringify(proc.exit)}) while waiting for ticks\n${diag(file, proc)}`);
      const t = ticks(file).filter((x) => x.n > afterN);
      return t.length >= count ? t : undefined;
    },
    () => diag(file, proc),
  );
}

/** Last serial lines and process output, for failure messages. */
export function diag(file: string, proc?: Proc): string {
  const s = serialLines(file).slice(-8).join('\n');
  return `--- serial ${file} (tail) ---\n${s}${proc ? `\n${proc.tail()}` : ''}`;
}

/** Asserts no new tick line appears during `ms`; returns the tick count seen. */
export async function assertNoNewTicks(file: string, ms: number): Promise<number> {
  const before = ticks(file).length;
  await sleep(ms);
  const after = ticks(file).length;
  if (after !== before) throw new Error(`guest kept ticking while stopped: ${before} -> ${after} tick lines\n${diag(file)}`);
  return after;
}

// ---- QMP ------------------------------------------------------------------

/** Connects (retrying until the socket appears) and negotiates. */
export async function connectQmp(address: string, timeoutMs = 15_000, proc?: Proc): Promise<QmpClient> {
  return waitFor(
    `QMP at ${address}`,
    timeoutMs,
    async () => {
      if (proc && !proc.running) throw new Error(`${proc.label} exited before serving QMP\n${proc.tail()}`);
      try {
        return await QmpClient.connect(address, { timeoutMs: 2000 });
      } catch {
        return undefined;
      }
    },
    () => (proc ? proc.tail() : ''),
    50,
  );
}

/**
 * A raw QMP socket for sending malformed input: `send(text)` writes bytes
 * as they are, `next()` resolves with the next JSON message received.
 */
export class RawQmp {
  private buf = '';
  private readonly queue: unknown[] = [];
  private waiters: ((v: unknown) => void)[] = [];
  private constructor(readonly socket: net.Socket) {
    socket.on('data', (d: Buffer) => {
      this.buf += d.toString();
      let i: number;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as unknown;
        const w = this.waiters.shift();
        if (w) w(msg);
        else this.queue.push(msg);
      }
    });
  }

  /** Connects to a unix socket path, reads the greeting and negotiates. */
  static async open(socketPath: string): Promise<RawQmp> {
    const s = net.connect(socketPath);
    await new Promise<void>((resolve, reject) => {
      s.once('connect', resolve);
      s.once('error', reject);
    });
    const q = new RawQmp(s);
    await q.next(); // greeting
    q.send('{"execute":"qmp_capabilities"}\n');
    await q.next();
    return q;
  }

  send(text: string): void {
    this.socket.write(text);
  }

  /** Next message that is not an event (events are skipped). */
  async reply(timeoutMs = 5000): Promise<Record<string, unknown>> {
    for (;;) {
      const m = (await this.next(timeoutMs)) as Record<string, unknown>;
      if (!('event' in m)) return m;
    }
  }

  next(timeoutMs = 5000): Promise<unknown> {
    const q = this.queue.shift();
    if (q !== undefined) return Promise.resolve(q);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error('no QMP message within timeout')), timeoutMs);
      this.waiters.push((v) => {
        clearTimeout(timer);
        resolve(v);
      });
    });
  }

  close(): void {
    this.socket.destroy();
  }
}

// ---- process hygiene ---------------------------------------------------------

/** PIDs of live processes whose command line contains `needle` (e.g. a test's temp dir). */
export function processesMatching(needle: string): number[] {
  const out: number[] = [];
  for (const d of fs.readdirSync('/proc')) {
    if (!/^\d+$/.test(d)) continue;
    try {
      const cmd = fs.readFileSync(`/proc/${d}/cmdline`, 'utf8').replace(/\0/g, ' ');
      if (cmd.includes(needle) && Number(d) !== process.pid) out.push(Number(d));
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

/** Threads of a live process (from /proc/PID/task), or [] when it is gone. */
export function threadsOf(pid: number): number[] {
  try {
    return fs.readdirSync(`/proc/${pid}/task`).map(Number);
  } catch {
    return [];
  }
}

export function processAlive(pid: number): boolean {
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    return !/\) Z /.test(stat); // a zombie has exited
  } catch {
    return false;
  }
}

// ---- files -------------------------------------------------------------------

export function sha256File(file: string): string {
  const h = crypto.createHash('sha256');
  const fd = fs.openSync(file, 'r');
  try {
    const buf = Buffer.allocUnsafe(8 << 20);
    let n: number;
    while ((n = fs.readSync(fd, buf, 0, buf.length, null)) > 0) h.update(buf.subarray(0, n));
  } finally {
    fs.closeSync(fd);
  }
  return h.digest('hex');
}

/** First differing offset of two files (or -1 when identical), for failure messages. */
export function firstDifference(a: string, b: string): number {
  const fa = fs.openSync(a, 'r');
  const fb = fs.openSync(b, 'r');
  try {
    const ba = Buffer.allocUnsafe(1 << 20);
    const bb = Buffer.allocUnsafe(1 << 20);
    let pos = 0;
    for (;;) {
      const na = fs.readSync(fa, ba, 0, ba.length, pos);
      const nb = fs.readSync(fb, bb, 0, bb.length, pos);
      const n = Math.min(na, nb);
      for (let i = 0; i < n; i++) if (ba[i] !== bb[i]) return pos + i;
      if (na !== nb) return pos + n;
      if (na === 0) return -1;
      pos += n;
    }
  } finally {
    fs.closeSync(fa);
    fs.closeSync(fb);
  }
}

/**
 * Starts `ferry run` with a serial file and a QMP socket in `dir`, waits
 * until QMP answers. `name` prefixes the files (NAME.serial, NAME.qmp).
 */
export async function startFerryGuest(
  dir: TempDir,
  name: string,
  args: string[],
): Promise<{ proc: Proc; qmp: QmpClient; serial: string; qmpPath: string }> {
  const serial = dir.file(`${name}.serial`);
  const qmpPath = dir.file(`${name}.qmp`);
  const proc = spawnFerryRun([...args, '--serial', `file:${serial}`, '--qmp', `unix:${qmpPath}`], name);
  const qmp = await connectQmp(`unix:${qmpPath}`, 20_000, proc);
  return { proc, qmp, serial, qmpPath };
}

/** `quit` over QMP and wait for a clean exit; SIGKILL as a last resort. */
export async function quitFerry(proc: Proc, qmp: QmpClient | undefined, timeoutMs = 10_000): Promise<Exit> {
  if (proc.running && qmp && !qmp.closed) {
    await qmp.execute('quit').catch(() => undefined);
  } else if (proc.running) {
    proc.child.kill('SIGTERM');
  }
  try {
    return await proc.waitExit(timeoutMs);
  } finally {
    await proc.kill();
    if (qmp && !qmp.closed) qmp.destroy();
  }
}
