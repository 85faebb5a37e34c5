/**
 * The one error type of lib/stream: anything wrong with the bytes of a
 * migration stream (truncation, bad magic, unknown types, out-of-range
 * lengths or offsets) is a StreamError with a stable code and the absolute
 * byte position in the stream where the offending item starts. Messages
 * name the position themselves ("... at byte N").
 */
export class StreamError extends Error {
  readonly code = 'ERR_MIGRATION_STREAM';
  /** Absolute byte offset in the stream (-1 when not tied to a position). */
  readonly position: number;

  constructor(message: string, position = -1, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StreamError';
    this.position = position;
  }
}

/** Error for misuse of the encoder (bad arguments), latched like I/O errors. */
export class StreamWriteError extends Error {
  readonly code: string;
  constructor(message: string, code = 'ERR_MIGRATION_STREAM_WRITE', options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StreamWriteError';
    this.code = code;
  }
}

/**
 * Text taken from the stream (idstr, block name, machine type, a JSON
 * parser's excerpt), made safe for an error message: bytes outside printable
 * ASCII become \xNN and the result is cut at about `max` characters, so a
 * corrupt stream still yields a readable one-line error.
 */
export function printable(text: string, max = 64): string {
  let out = '';
  let i = 0;
  for (; i < text.length && out.length < max; i++) {
    const c = text.charCodeAt(i);
    out += c >= 0x20 && c < 0x7f && c !== 0x5c ? text[i] : c < 0x100 ? `\\x${c.toString(16).padStart(2, '0')}` : `\\u${c.toString(16).padStart(4, '0')}`;
  }
  return i < text.length ? `${out}...(${text.length} characters)` : out;
}
