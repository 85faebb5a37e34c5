/**
 * Child processes for benchmarks: spawn with captured output, wait with a
 * deadline, stop politely (QMP quit) and then by force, and follow a guest's
 * serial log file line by line.
 *
 * Every wait names what it waited for and the tail of the output on timeout,
 * so a benchmark that hangs explains itself instead of spinning.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

import { parseGuestLine, type GuestLine } from '../../lib/guests';

export { sleep, waitFor, TempDir } from '../../lib/util/wait';

/** A child process with stdout/stderr captured (bounded) and its exit observable. */
export class Proc {
  readonly child: ChildProcess;
  out = '';
  exitCode: number | null | undefined;
  exitSignal: NodeJS.Signals | null | undefined;
  readonly exited: Promise<void>;

  constructor(
    readonly label: string,
    command: string,
    args: readonly string[],
    env: NodeJS.ProcessEnv = process.env,
  ) {
    this.child = spawn(command, args, { stdio: ['ignore', 'pipe', 'pipe'], env });
    const keep = (d: Buffer) => {
      this.out += d.toString();
      if (this.out.length > 64 * 1024) this.out = this.out.slice(-32 * 1024);
    };
    this.child.stdout!.on('data', keep);
    this.child.stderr!.on('data', keep);
    this.exited = new Promise((resolve) => {
      this.child.once('exit', (code, signal) => {
        this.exitCode = code;
        this.exitSignal = signal;
        resolve();
      });
    });
  }

  get pid(): number {
    return this.child.pid!;
  }

  get running(): boolean {
    return this.exitCode === undefined;
  }

  tail(lines = 12): string {
    return `--- ${this.label} output ---\n${this.out.split('\n').slice(-lines).join('\n')}`;
  }

  /** Waits up to `timeoutMs` for the exit; then SIGKILL. Returns true if it exited by itself. */
  async stop(timeoutMs: number): Promise<boolean> {
    if (!this.running) return true;
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((r) => (timer = setTimeout(() => r(false), timeoutMs)));
    const clean = await Promise.race([this.exited.then(() => true), timeout]);
    clearTimeout(timer);
    if (!clean && this.running) {
      this.child.kill('SIGKILL');
      await this.exited;
    }
    return clean;
  }
}

/** Reads a guest's serial log file incrementally and parses complete lines. */
export class SerialLog {
  private offset = 0;
  private partial = '';
  readonly lines: GuestLine[] = [];
  /** Raw lines that reported a problem (CORRUPT, error). */
  readonly problems: string[] = [];

  constructor(readonly file: string) {}

  /** Reads whatever was appended since the last call. */
  poll(): void {
    let fd: number;
    try {
      fd = fs.openSync(this.file, 'r');
    } catch {
      return; // not created yet
    }
    try {
      const size = fs.fstatSync(fd).size;
      if (size <= this.offset) return;
      const buf = Buffer.allocUnsafe(size - this.offset);
      const n = fs.readSync(fd, buf, 0, buf.length, this.offset);
      this.offset += n;
      const text = this.partial + buf.subarray(0, n).toString('latin1');
      const parts = text.split('\n');
      this.partial = parts.pop()!;
      for (const l of parts) {
        const g = parseGuestLine(l);
        if (g) this.lines.push(g);
        if (g?.kind === 'corrupt' || g?.kind === 'error') this.problems.push(l);
      }
    } finally {
      fs.closeSync(fd);
    }
  }

  /** The memwriter ticks seen so far. */
  ticks(): Extract<GuestLine, { kind: 'memwriter-tick' }>[] {
    return this.lines.filter((l): l is Extract<GuestLine, { kind: 'memwriter-tick' }> => l.kind === 'memwriter-tick');
  }

  ready(): boolean {
    return this.lines.some((l) => l.kind === 'memwriter-ready');
  }

  tail(n = 8): string {
    this.poll();
    let text = '';
    try {
      text = fs.readFileSync(this.file, 'latin1');
    } catch {
      // no log yet
    }
    return `--- serial ${path.basename(this.file)} ---\n${text.split('\n').slice(-n).join('\n')}`;
  }
}
