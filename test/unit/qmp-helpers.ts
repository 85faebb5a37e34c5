// Test helpers for the QMP tests: a raw socket speaking bytes, reading CRLF-terminated replies.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { QmpAddress } from '../../lib/qmp/protocol';

export class RawConn {
  readonly socket: net.Socket;
  private buf = '';
  private readonly messages: unknown[] = [];
  private waiters: (() => void)[] = [];
  closed = false;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setEncoding('utf8');
    socket.on('data', (s: string) => {
      this.buf += s;
      let i: number;
      while ((i = this.buf.indexOf('\r\n')) >= 0) {
        const line = this.buf.slice(0, i);
        this.buf = this.buf.slice(i + 2);
        this.messages.push(JSON.parse(line));
      }
      this.wake();
    });
    socket.on('close', () => {
      this.closed = true;
      this.wake();
    });
    socket.on('error', () => {});
  }

  private wake(): void {
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  static async open(addr: QmpAddress): Promise<RawConn> {
    const socket = addr.type === 'unix' ? net.connect(addr.path) : net.connect(addr.port, '127.0.0.1');
    await new Promise<void>((resolve, reject) => {
      socket.once('connect', () => resolve());
      socket.once('error', reject);
    });
    return new RawConn(socket);
  }

  /** Opens, checks the greeting, optionally negotiates. */
  static async negotiated(addr: QmpAddress): Promise<RawConn> {
    const c = await RawConn.open(addr);
    const g = (await c.next()) as { QMP?: unknown };
    assert.ok(g.QMP, 'greeting first');
    assert.deepEqual(await c.cmd({ execute: 'qmp_capabilities' }), { return: {} });
    return c;
  }

  send(data: string | Buffer): void {
    this.socket.write(data);
  }

  /** The next message (rejects on close or after ms). */
  async next(ms = 5000): Promise<Record<string, unknown>> {
    const deadline = Date.now() + ms;
    while (this.messages.length === 0) {
      if (this.closed) throw new Error('connection closed');
      const left = deadline - Date.now();
      if (left <= 0) throw new Error('timed out waiting for a message');
      await new Promise<void>((r) => {
        const t = setTimeout(r, left);
        this.waiters.push(() => {
          clearTimeout(t);
          r();
        });
      });
    }
    return this.messages.shift() as Record<string, unknown>;
  }

  /** Sends one command object (newline-terminated) and returns the next message. */
  async cmd(obj: unknown): Promise<Record<string, unknown>> {
    this.send(JSON.stringify(obj) + '\n');
    return this.next();
  }

  /** Messages until one with this id (skipping others); returns [skipped, match]. */
  async until(pred: (m: Record<string, unknown>) => boolean, ms = 10000): Promise<[Record<string, unknown>[], Record<string, unknown>]> {
    const skipped: Record<string, unknown>[] = [];
    for (;;) {
      const m = await this.next(ms);
      if (pred(m)) return [skipped, m];
      skipped.push(m);
    }
  }

  /** Resolves when the server closed the connection. */
  async waitClosed(ms = 5000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!this.closed) {
      if (Date.now() > deadline) throw new Error('connection still open');
      await new Promise((r) => setTimeout(r, 10));
    }
  }

  destroy(): void {
    this.socket.destroy();
  }
}

export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), prefix));
}

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Open fds of this process (for leak checks). */
export function openFds(): number {
  return fs.readdirSync('/proc/self/fd').length;
}

/** A deterministic PRNG (mulberry32). */
export function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
