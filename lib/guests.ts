/**
 * The test guests: small PVH ELF images built from guests/ at build time
 * (`npm run build:guests`, output in guests/out/), bootable by ferry's VMM
 * and by QEMU (`-M microvm -kernel <image> -append '<params>'`).
 *
 * They report on the 16550 serial port as plain text lines; the parsers
 * here turn those lines into typed records so tests and benchmarks do not
 * each grow their own regular expressions.
 */
import fs from 'node:fs';
import path from 'node:path';

import { FerryError } from './errors';

export interface GuestInfo {
  readonly name: string;
  readonly description: string;
}

export const GUESTS: readonly GuestInfo[] = Object.freeze([
  {
    name: 'memwriter',
    description:
      'Rewrites a working set of pages in ring 3 (whole pages, stamped with address and generation) and ' +
      'verifies each stamp before rewriting it. Params: ws=SIZE (64M; 0 = idle), rate=SIZE bytes/s (0 = flat out), ' +
      'fill=zero|random, order=seq|random, tick=MS (100), hz=N (100). ' +
      'Prints "memwriter ready ram=<bytes> ws=<bytes>", then "tick <n> writes=<total> verified=<total> errors=<total>", ' +
      'and "CORRUPT gpa=0x<hex> expected=<gen> found=<gen>" per mismatch (rate-limited).',
  },
  {
    name: 'ticker',
    description:
      'Periodic LAPIC timer interrupts through an IDT, sleeping with hlt. Params: hz=N (100), tick=MS (100). ' +
      'Prints "ticker ready hz=<n>", then "tick <n> irqs=<total>".',
  },
]);

/** The package root: the nearest ancestor of this file holding guests/Makefile (dist/lib -> root, or lib -> root). */
function packageRoot(): string {
  let dir = __dirname;
  for (;;) {
    if (fs.existsSync(path.join(dir, 'guests', 'Makefile'))) return dir;
    const up = path.dirname(dir);
    if (up === dir) return path.resolve(__dirname, '..', '..');
    dir = up;
  }
}

/** Absolute path of guests/out/<name>.elf. Throws ERR_UNKNOWN_GUEST for a name not in GUESTS. */
export function guestPath(name: string): string {
  if (!GUESTS.some((g) => g.name === name)) {
    throw new FerryError('ERR_UNKNOWN_GUEST', `unknown guest '${name}' (known: ${GUESTS.map((g) => g.name).join(', ')})`);
  }
  return path.join(packageRoot(), 'guests', 'out', `${name}.elf`);
}

/** The guests with their descriptions, and whether each image has been built. */
export function listGuests(): (GuestInfo & { path: string; built: boolean })[] {
  return GUESTS.map((g) => {
    const p = guestPath(g.name);
    return { ...g, path: p, built: fs.existsSync(p) };
  });
}

/** One parsed serial line of a test guest. Numbers above 2^53 would lose precision: counters stay far below. */
export type GuestLine =
  | { kind: 'info'; tscHz: number; lapicHz: number; ram: number; io: string }
  | { kind: 'info-ram'; start: number; end: number }
  | { kind: 'memwriter-ready'; ram: number; ws: number }
  | { kind: 'ticker-ready'; hz: number }
  | { kind: 'memwriter-tick'; n: number; writes: number; verified: number; errors: number }
  | { kind: 'ticker-tick'; n: number; irqs: number }
  | { kind: 'corrupt'; gpa: number; expected: number; found: number }
  | { kind: 'error'; message: string };

const LINE_PATTERNS: readonly [RegExp, (m: RegExpExecArray) => GuestLine][] = [
  [/^info tsc_hz=(\d+) lapic_hz=(\d+) ram=(\d+) io=(\w+)$/, (m) => ({ kind: 'info', tscHz: +m[1], lapicHz: +m[2], ram: +m[3], io: m[4] })],
  [/^info ram 0x([0-9a-f]+)-0x([0-9a-f]+)$/, (m) => ({ kind: 'info-ram', start: parseInt(m[1], 16), end: parseInt(m[2], 16) })],
  [/^memwriter ready ram=(\d+) ws=(\d+)$/, (m) => ({ kind: 'memwriter-ready', ram: +m[1], ws: +m[2] })],
  [/^ticker ready hz=(\d+)$/, (m) => ({ kind: 'ticker-ready', hz: +m[1] })],
  [
    /^tick (\d+) writes=(\d+) verified=(\d+) errors=(\d+)$/,
    (m) => ({ kind: 'memwriter-tick', n: +m[1], writes: +m[2], verified: +m[3], errors: +m[4] }),
  ],
  [/^tick (\d+) irqs=(\d+)$/, (m) => ({ kind: 'ticker-tick', n: +m[1], irqs: +m[2] })],
  [
    /^CORRUPT gpa=0x([0-9a-f]+) expected=(\d+) found=(\d+)/,
    (m) => ({ kind: 'corrupt', gpa: parseInt(m[1], 16), expected: +m[2], found: +m[3] }),
  ],
  [/^error (.*)$/, (m) => ({ kind: 'error', message: m[1] })],
];

/** Parse one serial line (without its newline); undefined for anything else (partial lines, noise). */
export function parseGuestLine(line: string): GuestLine | undefined {
  const l = line.replace(/\r$/, '');
  for (const [re, make] of LINE_PATTERNS) {
    const m = re.exec(l);
    if (m) return make(m);
  }
  return undefined;
}

/** Parse all complete lines of a serial log (a trailing partial line is ignored). */
export function parseGuestOutput(text: string): GuestLine[] {
  const lines = text.split('\n');
  lines.pop();
  const out: GuestLine[] = [];
  for (const l of lines) {
    const p = parseGuestLine(l);
    if (p) out.push(p);
  }
  return out;
}

/*
 * memwriter's page format, for tests that inspect or forge guest RAM from
 * outside: word 0 = the page's guest-physical address, word 1 = generation,
 * words 2..510 = x, x + K_STEP, ... with x = (addr * K_MID) ^ gen, word 511 =
 * ~addr ^ (gen * K_TAIL); all little-endian u64, arithmetic mod 2^64.
 */
const U64 = (1n << 64n) - 1n;
const K_MID = 0xff51afd7ed558ccdn;
const K_STEP = 0xc4ceb9fe1a85ec53n;
const K_TAIL = 0x9e3779b97f4a7c15n;

function tailOf(addr: bigint, gen: bigint): bigint {
  return (~addr ^ (gen * K_TAIL)) & U64;
}

/** The 4 KiB page memwriter writes at `gpa` for generation `gen`. */
export function memwriterPage(gpa: number, gen: number): Buffer {
  const addr = BigInt(gpa);
  const g = BigInt(gen);
  const page = Buffer.alloc(4096);
  page.writeBigUInt64LE(addr, 0);
  page.writeBigUInt64LE(g, 8);
  let x = ((addr * K_MID) & U64) ^ g;
  for (let i = 2; i < 511; i++) {
    page.writeBigUInt64LE(x, i * 8);
    x = (x + K_STEP) & U64;
  }
  page.writeBigUInt64LE(tailOf(addr, g), 511 * 8);
  return page;
}

/**
 * Read a memwriter stamp: `stamped` when word 0 is the page's own address
 * and the tail matches word 1 (what the guest itself checks).
 */
export function readMemwriterStamp(page: Uint8Array, gpa: number): { stamped: boolean; gen: number } {
  const b = Buffer.from(page.buffer, page.byteOffset, page.byteLength);
  const addr = BigInt(gpa);
  const g = b.readBigUInt64LE(8);
  const stamped = b.readBigUInt64LE(0) === addr && b.readBigUInt64LE(511 * 8) === tailOf(addr, g);
  return { stamped, gen: Number(g) };
}
