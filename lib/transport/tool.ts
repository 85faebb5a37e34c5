/**
 * A small diagnostic peer for the transports (also used by the integration tests to put the
 * other end in a separate process):
 *
 *   node dist/lib/transport/tool.js send URI --bytes N [--seed S] [--raw] [--listen] [--fd NAME=N]
 *   node dist/lib/transport/tool.js recv URI [--rp] [--raw] [--connect] [--fd NAME=N]
 *
 * `send` writes N pseudo-random bytes (AES-CTR keystream of the seed, so both sides can
 * regenerate it) with backpressure; `recv` reads to EOF. By default send connects and recv
 * listens (as a migration does); --listen / --connect swap that. With --rp, on sockets, the
 * receiver sends "PONG\n" on the return path when it starts and "SHA <hex>\n" after EOF; the
 * sender always reports what it read back. (Without --rp the receiver never writes: a QEMU source
 * that did not open a return path closes its socket with unread data, i.e. with a reset.) Each side prints JSON lines on stdout: {"event":"listening","uri":...} and
 * {"event":"done",...} (or {"event":"error",...} with exit status 1).
 * --raw measures the transport alone: the sender repeats one 1 MiB buffer, nobody hashes.
 */
import crypto from 'node:crypto';
import type { Readable, Writable } from 'node:stream';
import { formatMigrationAddress, parseMigrationUri } from './address';
import { connectOutgoing, listenIncoming } from './index';
import type { IncomingChannel, OutgoingChannel, TransportOptions } from './types';

const CHUNK = 1024 * 1024;

/** Deterministic pseudo-random bytes: the AES-128-CTR keystream for sha256(seed). */
export class PatternSource {
  private readonly cipher: crypto.Cipher;
  private readonly zeros = Buffer.alloc(CHUNK);
  constructor(seed: string) {
    const key = crypto.createHash('sha256').update(seed).digest().subarray(0, 16);
    this.cipher = crypto.createCipheriv('aes-128-ctr', key, Buffer.alloc(16));
  }
  next(n: number): Buffer {
    return this.cipher.update(this.zeros.subarray(0, Math.min(n, CHUNK)));
  }
}

/** write() with backpressure; rejects if the stream errors or closes while we wait. */
export function writeWithBackpressure(stream: Writable, buf: Buffer): Promise<void> {
  if (stream.destroyed) return Promise.reject(stream.errored ?? new Error('stream destroyed'));
  if (stream.write(buf)) return Promise.resolve();
  return new Promise<void>((resolve, reject) => {
    const done = (err?: Error) => {
      stream.off('drain', onDrain);
      stream.off('error', onError);
      stream.off('close', onClose);
      if (err) reject(err);
      else resolve();
    };
    const onDrain = () => done();
    const onError = (err: Error) => done(err);
    const onClose = () => done(stream.errored ?? new Error('stream closed while writing'));
    stream.on('drain', onDrain);
    stream.on('error', onError);
    stream.on('close', onClose);
  });
}

/** Sends `bytes` pattern bytes; returns their sha256 (hex). */
export async function sendPattern(stream: Writable, bytes: number, seed: string, onProgress?: (sent: number) => void): Promise<string> {
  const src = new PatternSource(seed);
  const hash = crypto.createHash('sha256');
  for (let sent = 0; sent < bytes; ) {
    const buf = src.next(bytes - sent);
    hash.update(buf);
    await writeWithBackpressure(stream, buf);
    sent += buf.length;
    onProgress?.(sent);
  }
  return hash.digest('hex');
}

/** The sha256 of `bytes` pattern bytes, without sending them. */
export function patternSha256(bytes: number, seed: string): string {
  const src = new PatternSource(seed);
  const hash = crypto.createHash('sha256');
  for (let n = 0; n < bytes; ) {
    const buf = src.next(bytes - n);
    hash.update(buf);
    n += buf.length;
  }
  return hash.digest('hex');
}

/** Reads a stream to its end; resolves with byte count and sha256, rejects on 'error'. */
export function receiveAll(stream: Readable): Promise<{ bytes: number; sha256: string }> {
  return new Promise((resolve, reject) => {
    const hash = crypto.createHash('sha256');
    let bytes = 0;
    stream.on('data', (c: Buffer) => {
      bytes += c.length;
      hash.update(c);
    });
    stream.once('end', () => resolve({ bytes, sha256: hash.digest('hex') }));
    stream.once('error', reject);
    stream.once('close', () => reject(new Error(`stream closed before its end after ${bytes} bytes`)));
  });
}

/** Collects everything a return path sends until EOF (or close). */
export function collectText(stream: Readable): Promise<string> {
  return new Promise((resolve) => {
    let text = '';
    stream.on('data', (c: Buffer) => (text += c.toString('latin1')));
    stream.once('end', () => resolve(text));
    stream.once('close', () => resolve(text));
  });
}

/** Sends `bytes` bytes by repeating one buffer (no generation or hashing cost). */
export async function sendRaw(stream: Writable, bytes: number): Promise<null> {
  const buf = new PatternSource('raw').next(CHUNK);
  for (let sent = 0; sent < bytes; ) {
    const n = Math.min(CHUNK, bytes - sent);
    await writeWithBackpressure(stream, n === CHUNK ? buf : buf.subarray(0, n));
    sent += n;
  }
  return null;
}

/** Counts a stream's bytes to its end. */
export function countAll(stream: Readable): Promise<{ bytes: number; sha256: null }> {
  return new Promise((resolve, reject) => {
    let bytes = 0;
    stream.on('data', (c: Buffer) => (bytes += c.length));
    stream.once('end', () => resolve({ bytes, sha256: null }));
    stream.once('error', reject);
    stream.once('close', () => reject(new Error(`stream closed before its end after ${bytes} bytes`)));
  });
}

interface Args {
  mode: 'send' | 'recv';
  uri: string;
  bytes: number;
  seed: string;
  swap: boolean;
  raw: boolean;
  rp: boolean;
  fds: Map<string, number>;
}

function parseArgs(argv: string[]): Args {
  const [mode, uri, ...rest] = argv;
  if ((mode !== 'send' && mode !== 'recv') || !uri) {
    throw new Error('usage: tool.js send|recv URI [--bytes N] [--seed S] [--listen|--connect] [--fd NAME=N]');
  }
  const a: Args = { mode, uri, bytes: 0, seed: 'ferry', swap: false, raw: false, rp: false, fds: new Map() };
  for (let i = 0; i < rest.length; i++) {
    const k = rest[i];
    if (k === '--bytes') a.bytes = Number(rest[++i]);
    else if (k === '--seed') a.seed = String(rest[++i]);
    else if (k === '--listen' || k === '--connect') a.swap = true;
    else if (k === '--raw') a.raw = true;
    else if (k === '--rp') a.rp = true;
    else if (k === '--fd') {
      const [name, n] = String(rest[++i]).split('=');
      a.fds.set(name!, Number(n));
    } else throw new Error(`unknown option ${k}`);
  }
  return a;
}

function emit(o: object): void {
  process.stdout.write(`${JSON.stringify(o)}\n`);
}

async function obtain(a: Args, opts: TransportOptions, outgoing: boolean): Promise<OutgoingChannel | IncomingChannel> {
  if (outgoing) return connectOutgoing(parseMigrationUri(a.uri), opts);
  const l = await listenIncoming(parseMigrationUri(a.uri), opts);
  emit({ event: 'listening', uri: formatMigrationAddress(l.address), address: l.address });
  const ch = await l.accept();
  void l.close();
  return ch;
}

async function main(): Promise<void> {
  const a = parseArgs(process.argv.slice(2));
  const opts: TransportOptions = { lookupFd: (name) => a.fds.get(name) };
  const outgoing = (a.mode === 'send') !== a.swap;
  const ch = await obtain(a, opts, outgoing);
  const t0 = process.hrtime.bigint();
  if (a.mode === 'send') {
    const w = ch.stream as Writable;
    const rp = ch.returnPath as Readable | undefined;
    const rpText = rp ? collectText(rp) : Promise.resolve(undefined);
    const sha256 = a.raw ? await sendRaw(w, a.bytes) : await sendPattern(w, a.bytes, a.seed);
    await ch.finish();
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    const returned = await rpText;
    await ch.close();
    emit({ event: 'done', bytes: a.bytes, sha256, seconds, returnPath: returned });
  } else {
    const r = ch.stream as Readable;
    const rp = a.rp ? (ch.returnPath as Writable | undefined) : undefined;
    if (rp) rp.write('PONG\n');
    const got = a.raw ? await countAll(r) : await receiveAll(r);
    const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
    if (rp) rp.write(`SHA ${got.sha256}\n`);
    await ch.finish();
    await ch.close();
    emit({ event: 'done', ...got, seconds });
  }
}

if (require.main === module) {
  main().catch((err: unknown) => {
    const e = err as { message?: string; code?: string; syscallCode?: string };
    emit({ event: 'error', message: e.message ?? String(err), code: e.code, syscallCode: e.syscallCode });
    process.exitCode = 1;
  });
}
