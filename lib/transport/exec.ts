/**
 * exec: transport. The URI form runs `/bin/sh -c COMMAND`; the channels form runs `args`
 * directly. stderr is the child's own (inherited), as with QEMU.
 *
 * Source: the stream goes to the child's stdin. Its stdout is a pipe too (QEMU opens the command
 * read-write), read and discarded: ferry does not run a return path over exec, and the child's
 * output must not land on our stdout. The stream's 'finish' (and finish()) come only after the
 * child exited; a non-zero status or a signal is an ERR_MIGRATION_TRANSPORT error naming it.
 * Destination: the stream is the child's stdout (stdin is /dev/null). The end of the stream is
 * delivered only once the child exited with status 0; otherwise the stream errors with the status.
 */
import { type ChildProcess, spawn } from 'node:child_process';
import { Readable, Writable } from 'node:stream';
import type { ExecAddress } from './address';
import { formatMigrationAddress } from './address';
import { DEFAULT_CLOSE_TIMEOUT_MS, DEFAULT_HIGH_WATER_MARK, PlainChannel, within } from './channel';
import { MigrationTransportError, transportError } from './errors';
import { abortError } from './socket';
import type { TransportOptions } from './types';

const KILL_GRACE_MS = 2000;

interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

function statusText(s: ExitStatus): string {
  return s.signal ? `killed by signal ${s.signal}` : `exited with status ${s.code}`;
}

function ok(s: ExitStatus): boolean {
  return s.code === 0 && !s.signal;
}

class Child {
  readonly exit: Promise<ExitStatus>;
  readonly closed: Promise<void>;
  private exited = false;

  constructor(readonly proc: ChildProcess) {
    this.exit = new Promise((resolve) =>
      proc.once('exit', (code, signal) => {
        this.exited = true;
        resolve({ code, signal });
      }),
    );
    this.closed = new Promise((resolve) => proc.once('close', () => resolve()));
  }

  get running(): boolean {
    return !this.exited;
  }

  /**
   * SIGTERM, then SIGKILL if it is still there after the grace period. Our pipe ends are closed
   * too: a grandchild holding them (sh -c 'a | b') must not keep the channel open.
   */
  kill(): void {
    this.proc.stdin?.destroy();
    this.proc.stdout?.destroy();
    if (!this.running) return;
    this.proc.kill('SIGTERM');
    const t = setTimeout(() => {
      if (this.running) this.proc.kill('SIGKILL');
    }, KILL_GRACE_MS);
    t.unref();
    void this.exit.then(() => clearTimeout(t));
  }

  /** close(): let the child end by itself within the timeout, then kill it. */
  async release(timeoutMs: number): Promise<void> {
    if (this.running) await within(this.exit, timeoutMs);
    this.kill();
    await this.closed;
  }
}

async function start(addr: ExecAddress, direction: 'out' | 'in', opts: TransportOptions): Promise<Child> {
  const uri = formatMigrationAddress(addr);
  if (opts.signal?.aborted) throw abortError(uri, 'connect', opts.signal);
  const [file, ...args] = addr.args;
  const proc = spawn(file!, args, { stdio: [direction === 'out' ? 'pipe' : 'ignore', 'pipe', 'inherit'] });
  const child = new Child(proc);
  await new Promise<void>((resolve, reject) => {
    proc.once('spawn', resolve);
    proc.once('error', (err) => reject(transportError(uri, 'spawn', err)));
  });
  return child;
}

export async function openExecOutgoing(addr: ExecAddress, opts: TransportOptions): Promise<PlainChannel<Writable>> {
  const uri = formatMigrationAddress(addr);
  const child = await start(addr, 'out', opts);
  const stdin = child.proc.stdin!;
  child.proc.stdout!.resume();
  child.proc.stdout!.on('error', () => undefined);
  let stdinError: Error | undefined;
  const failure = async (cause: Error): Promise<MigrationTransportError> => {
    // Prefer the exit status: "exited with status 1" says more than "write EPIPE".
    await within(child.exit, KILL_GRACE_MS);
    if (child.running) return transportError(uri, 'write', cause);
    const st = await child.exit;
    return new MigrationTransportError(uri, 'exec', `command ${statusText(st)} before reading the whole stream (${cause.message})`, cause);
  };
  let pendingDrain: (() => void) | undefined;
  const stream: Writable = new Writable({
    highWaterMark: opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK,
    write(chunk: Buffer, _enc, cb) {
      if (stdinError) return cb(stdinError);
      if (stdin.write(chunk)) return cb();
      pendingDrain = () => {
        pendingDrain = undefined;
        cb();
      };
      stdin.once('drain', pendingDrain);
    },
    final(cb) {
      stdin.end();
      void child.exit.then((st) => {
        if (ok(st)) return cb();
        cb(new MigrationTransportError(uri, 'exec', `command ${statusText(st)}`));
      });
    },
    destroy(err, cb) {
      if (pendingDrain) stdin.off('drain', pendingDrain);
      stdin.destroy();
      cb(err);
    },
  });
  stdin.on('error', (err) => {
    if (stdinError) return;
    stdinError = err;
    void failure(err).then((e) => stream.destroy(e));
  });
  return new PlainChannel<Writable>(addr, stream, 'out', opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS, {
    abort: () => child.kill(),
    release: (ms) => child.release(ms),
    extraClosed: child.closed,
  });
}

export async function openExecIncoming(addr: ExecAddress, opts: TransportOptions): Promise<PlainChannel<Readable>> {
  const uri = formatMigrationAddress(addr);
  const child = await start(addr, 'in', opts);
  const stdout = child.proc.stdout!;
  const stream = new Readable({
    highWaterMark: opts.highWaterMark ?? DEFAULT_HIGH_WATER_MARK,
    read() {
      stdout.resume();
    },
    destroy(err, cb) {
      stdout.destroy();
      cb(err);
    },
  });
  stdout.on('data', (chunk: Buffer) => {
    if (!stream.push(chunk)) stdout.pause();
  });
  stdout.pause();
  stdout.on('error', (err) => stream.destroy(transportError(uri, 'read', err)));
  stdout.on('end', () => {
    void child.exit.then((st) => {
      if (stream.destroyed) return;
      if (ok(st)) stream.push(null);
      else stream.destroy(new MigrationTransportError(uri, 'exec', `command ${statusText(st)}`));
    });
  });
  const channel = new PlainChannel<Readable>(addr, stream, 'in', opts.closeTimeoutMs ?? DEFAULT_CLOSE_TIMEOUT_MS, {
    afterFinish: async () => {
      const st = await child.exit;
      if (!ok(st)) throw new MigrationTransportError(uri, 'exec', `command ${statusText(st)}`);
    },
    abort: () => child.kill(),
    release: (ms) => child.release(ms),
    extraClosed: child.closed,
  });
  void child.exit.then((st) => {
    if (!ok(st)) channel.noteError(new MigrationTransportError(uri, 'exec', `command ${statusText(st)}`));
  });
  return channel;
}
