/**
 * Splits a byte stream into JSON values the way QEMU's QMP reader does: no
 * framing, values are delimited by their own braces (newlines are only
 * whitespace), so `{...}{...}` without a newline is two messages and a value
 * may span any number of reads.
 *
 * The splitter tracks just enough of JSON's lexical structure (nesting depth,
 * strings and their escapes, scalar tokens) to find where a top-level value
 * ends; JSON.parse then parses that text. Like QEMU's lexer it resynchronises
 * after bad input: a byte that can never appear in JSON (an ASCII control
 * character inside a string, 0xFE/0xFF and other impossible UTF-8 bytes,
 * stray punctuation) reports one error, discards the value in progress, and
 * skips ahead to the next structural character or line end. Clients use a
 * 0xFF byte to force such a reset.
 *
 * QEMU extensions accepted: single-quoted strings and the `\'` escape.
 *
 * Invariants: memory held is bounded by maxMessageBytes (the value in
 * progress); once a value exceeds it the splitter reports 'overflow' and
 * ignores all further input (the caller drops the connection).
 */

export const DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024;
/** QEMU's MAX_NESTING. */
export const DEFAULT_MAX_DEPTH = 1024;

export type JsonUnit =
  /** A complete top-level JSON value; `end` is the stream offset just past it. */
  | { kind: 'value'; value: unknown; end: number }
  /** Bad input (already prefixed "JSON parse error, "); the stream resynchronised. */
  | { kind: 'error'; message: string; end: number }
  /** A value grew past maxMessageBytes: stop reading this stream. */
  | { kind: 'overflow'; message: string; end: number };

export interface JsonSplitterOptions {
  maxMessageBytes?: number;
  maxDepth?: number;
}

const enum Mode {
  Start, // between top-level values
  Value, // inside an object/array, outside strings
  String, // inside a string (quote in `quote`)
  Scalar, // a top-level number/keyword token
  Recovery, // skipping after an error
  Dead, // after overflow
}

const QUOTE = 0x22;
const SQUOTE = 0x27;
const BACKSLASH = 0x5c;

function isWhitespace(c: number): boolean {
  return c === 0x20 || c === 0x09 || c === 0x0a || c === 0x0d;
}
function isOpen(c: number): boolean {
  return c === 0x7b || c === 0x5b; // { [
}
function isClose(c: number): boolean {
  return c === 0x7d || c === 0x5d; // } ]
}
/** Characters of numbers and keywords (true/false/null and QEMU's invalid ones). */
function isTokenChar(c: number): boolean {
  return (
    (c >= 0x30 && c <= 0x39) || (c >= 0x41 && c <= 0x5a) || (c >= 0x61 && c <= 0x7a) || c === 0x2b || c === 0x2d || c === 0x2e
  );
}
/** Bytes that never occur in UTF-8: always a lexer error (and QEMU's reset byte 0xFF). */
function isImpossibleByte(c: number): boolean {
  return c === 0xc0 || c === 0xc1 || c >= 0xf5;
}
/** Where QEMU's lexer leaves error recovery. */
function endsRecovery(c: number): boolean {
  return isOpen(c) || isClose(c) || (c < 0x20 && c !== 0x09) || c === 0xfe || c === 0xff;
}

function show(c: number): string {
  if (c >= 0x20 && c < 0x7f) return String.fromCharCode(c);
  return `\\x${c.toString(16).padStart(2, '0')}`;
}

export class JsonSplitter {
  private readonly maxBytes: number;
  private readonly maxDepth: number;
  private mode = Mode.Start;
  /** Where a string returns to when its closing quote arrives. */
  private afterString = Mode.Value;
  private quote = QUOTE;
  private escape = false;
  private depth = 0;
  /** Pieces of the value in progress from earlier chunks. */
  private parts: Buffer[] = [];
  private partsLength = 0;
  /** The value in progress uses single quotes or \' (needs rewriting before JSON.parse). */
  private qemuQuotes = false;
  /** Absolute stream offset of the first byte of the current chunk. */
  private offset = 0;

  constructor(options: JsonSplitterOptions = {}) {
    this.maxBytes = options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    this.maxDepth = options.maxDepth ?? DEFAULT_MAX_DEPTH;
  }

  /** Total bytes fed so far. */
  get position(): number {
    return this.offset;
  }

  /** Bytes of the value in progress held in memory (0 between values). */
  get pending(): number {
    return this.partsLength;
  }

  /** Feeds one chunk; returns the units it completed, in order. */
  push(chunk: Uint8Array): JsonUnit[] {
    const out: JsonUnit[] = [];
    const buf = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
    const base = this.offset;
    this.offset += buf.length;
    if (this.mode === Mode.Dead) return out;
    let start = this.mode === Mode.Start || this.mode === Mode.Recovery ? -1 : 0; // start of value in this chunk
    let i = 0;
    const n = buf.length;

    const fail = (message: string, at: number, recover: boolean): void => {
      out.push({ kind: 'error', message: `JSON parse error, ${message}`, end: base + at });
      this.reset();
      start = -1;
      this.mode = recover ? Mode.Recovery : Mode.Start;
    };
    const finish = (endExclusive: number): void => {
      const text = this.collect(buf, start, endExclusive);
      out.push(this.parse(text, base + endExclusive));
      this.reset();
      start = -1;
      this.mode = Mode.Start;
    };

    while (i < n) {
      const c = buf[i];
      switch (this.mode) {
        case Mode.Start:
          if (isWhitespace(c)) {
            i++;
          } else if (isOpen(c)) {
            start = i;
            this.depth = 1;
            this.mode = Mode.Value;
            i++;
          } else if (c === QUOTE || c === SQUOTE) {
            start = i;
            this.beginString(c, Mode.Scalar);
            i++;
          } else if (isTokenChar(c)) {
            start = i;
            this.mode = Mode.Scalar;
            i++;
          } else if (isClose(c) || c === 0x2c || c === 0x3a) {
            i++;
            fail('expecting value', i, false);
          } else {
            i++;
            fail(`stray '${show(c)}'`, i, true);
          }
          break;
        case Mode.Recovery:
          if (endsRecovery(c)) {
            this.mode = Mode.Start;
            // 0xFE/0xFF themselves would just report again: consume them as the reset marker.
            if (c === 0xfe || c === 0xff) i++;
          } else {
            i++;
          }
          break;
        case Mode.Value:
          if (isOpen(c)) {
            if (++this.depth > this.maxDepth) {
              i++;
              fail(`nesting deeper than ${this.maxDepth} levels`, i, true);
              break;
            }
            i++;
          } else if (isClose(c)) {
            i++;
            if (--this.depth === 0) finish(i);
          } else if (c === QUOTE || c === SQUOTE) {
            this.beginString(c, Mode.Value);
            i++;
          } else if (isWhitespace(c) || isTokenChar(c) || c === 0x2c || c === 0x3a) {
            i++;
          } else {
            i++;
            fail(`stray '${show(c)}'`, i, true);
          }
          break;
        case Mode.String:
          if (c < 0x20) {
            // QEMU's lexer rejects raw control characters in strings; the
            // character (usually the line end) is then a resynchronisation point.
            fail('unterminated string or control character in string', i, false);
          } else if (isImpossibleByte(c)) {
            i++;
            fail(`stray '${show(c)}'`, i, true);
          } else if (this.escape) {
            this.escape = false;
            if (c === SQUOTE) this.qemuQuotes = true;
            i++;
          } else if (c === BACKSLASH) {
            this.escape = true;
            i++;
          } else if (c === this.quote) {
            i++;
            this.mode = this.afterString;
            if (this.mode === Mode.Scalar) finish(i); // a top-level string is complete
          } else {
            i++;
          }
          break;
        case Mode.Scalar:
          if (isTokenChar(c)) i++;
          else finish(i); // the terminating character is looked at again in Start
          break;
        case Mode.Dead:
          return out;
      }
      if (start >= 0 && this.partsLength + (i - start) > this.maxBytes) {
        out.push({
          kind: 'overflow',
          message: `JSON parse error, message larger than ${this.maxBytes} bytes`,
          end: base + i,
        });
        this.reset();
        this.mode = Mode.Dead;
        return out;
      }
    }
    // Keep the unfinished value for the next chunk (copied: the caller may reuse `buf`).
    if (start >= 0 && start < n) {
      const piece = Buffer.from(buf.subarray(start, n));
      this.parts.push(piece);
      this.partsLength += piece.length;
    }
    return out;
  }

  private beginString(quote: number, after: Mode): void {
    this.mode = Mode.String;
    this.quote = quote;
    this.afterString = after;
    this.escape = false;
    if (quote === SQUOTE) this.qemuQuotes = true;
  }

  private reset(): void {
    this.parts = [];
    this.partsLength = 0;
    this.depth = 0;
    this.escape = false;
    this.qemuQuotes = false;
  }

  private collect(buf: Buffer, start: number, end: number): string {
    const tail = buf.subarray(start, end);
    if (this.parts.length === 0) return tail.toString('utf8');
    return Buffer.concat([...this.parts, tail]).toString('utf8');
  }

  private parse(text: string, end: number): JsonUnit {
    const source = this.qemuQuotes ? rewriteQemuQuotes(text) : text;
    try {
      return { kind: 'value', value: JSON.parse(source), end };
    } catch (e) {
      if (/^[A-Za-z]+$/.test(text)) return { kind: 'error', message: `JSON parse error, invalid keyword '${text}'`, end };
      const why = e instanceof Error ? e.message : String(e);
      return { kind: 'error', message: `JSON parse error, ${why}`, end };
    }
  }
}

/**
 * Rewrites QEMU's single-quoted strings (and `\'` escapes) into standard JSON.
 * Only called on text the splitter already delimited.
 */
export function rewriteQemuQuotes(text: string): string {
  let out = '';
  let i = 0;
  const n = text.length;
  while (i < n) {
    const ch = text[i];
    if (ch !== '"' && ch !== "'") {
      out += ch;
      i++;
      continue;
    }
    const q = ch;
    out += '"';
    i++;
    while (i < n && text[i] !== q) {
      const c = text[i];
      if (c === '\\' && i + 1 < n) {
        const e = text[i + 1];
        out += e === "'" ? "'" : c + e;
        i += 2;
      } else {
        out += c === '"' ? '\\"' : c;
        i++;
      }
    }
    out += '"';
    i++;
  }
  return out;
}
