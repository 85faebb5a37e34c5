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
