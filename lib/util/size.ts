/**
 * SIZE values as QEMU writes them on its command line and in QMP strings:
 * a decimal number (or 0x hex), an optional fraction, and an optional suffix
 * B, K, M, G, T, P or E (either case, powers of 1024). `256M`, `1G`, `1.5K`,
 * `4096`. The result must be a whole number of bytes within
 * Number.MAX_SAFE_INTEGER. Unlike QEMU, `KiB`/`KB` are rejected with a hint
 * rather than silently misread.
 */
import { FerryError } from '../errors';

export const ERR_INVALID_SIZE = 'ERR_INVALID_SIZE';

/**
 * Thrown by parseSize. `reason` is the bare explanation (no input echoed), so
 * callers can prefix it: "ferry run: --memory '12Q': <reason>".
 */
export class SizeError extends FerryError {
  readonly input: string;
  readonly reason: string;
  constructor(input: string, reason: string) {
    super(ERR_INVALID_SIZE, `invalid size '${input}': ${reason}`);
    this.name = 'SizeError';
    this.input = input;
    this.reason = reason;
  }
}

const SUFFIX_SHIFT: Record<string, number> = { B: 0, K: 10, M: 20, G: 30, T: 40, P: 50, E: 60 };
const EXPECTED = '(expected a number with optional K, M, G or T suffix)';

export type SizeUnit = 'B' | 'K' | 'M' | 'G' | 'T';

export interface ParseSizeOptions {
  /** Unit of a bare number (QEMU's `-m 256` means MiB). Default 'B'. */
  defaultUnit?: SizeUnit;
}

/** Parses a SIZE string into bytes; throws SizeError saying what was wrong. */
export function parseSize(text: string, options: ParseSizeOptions = {}): number {
  const s = text.trim();
  if (s === '') throw new SizeError(text, `empty size ${EXPECTED}`);
  if (s.startsWith('-')) throw new SizeError(text, 'negative sizes are not allowed');
  const m = /^(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(.*)$/.exec(s);
  if (!m) throw new SizeError(text, `not a number ${EXPECTED}`);
  const [, num, rest] = m;
  const suffix = rest.trim();
  let shift: number;
  if (suffix === '') {
    shift = SUFFIX_SHIFT[options.defaultUnit ?? 'B'];
  } else if (suffix.length === 1 && SUFFIX_SHIFT[suffix.toUpperCase()] !== undefined) {
    shift = SUFFIX_SHIFT[suffix.toUpperCase()];
  } else if (/^[kmgtpe]i?b$/i.test(suffix)) {
    throw new SizeError(text, `unknown size suffix '${suffix}' (write ${suffix[0].toUpperCase()}, sizes are powers of 1024)`);
  } else {
    throw new SizeError(text, `unknown size suffix '${suffix}' ${EXPECTED}`);
  }
  const isHex = /^0x/i.test(num);
  if (isHex && num.length > 2 + 14) throw new SizeError(text, 'too large (at most 8P - 1 bytes)');
  const mantissa = isHex ? parseInt(num.slice(2), 16) : Number(num);
  const bytes = mantissa * 2 ** shift;
  if (!Number.isFinite(bytes) || bytes > Number.MAX_SAFE_INTEGER) {
    throw new SizeError(text, 'too large (at most 8P - 1 bytes)');
  }
  if (!Number.isInteger(bytes)) throw new SizeError(text, 'not a whole number of bytes');
  return bytes;
}

/** Formats bytes the way QEMU's sizes read best: the largest exact suffix (1G, 256M, 4096). */
export function formatSize(bytes: number): string {
  for (const [suffix, shift] of [['E', 60], ['P', 50], ['T', 40], ['G', 30], ['M', 20], ['K', 10]] as const) {
    const unit = 2 ** shift;
    if (bytes >= unit && bytes % unit === 0) return `${bytes / unit}${suffix}`;
  }
  return String(bytes);
}
