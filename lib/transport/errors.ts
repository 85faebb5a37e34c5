/**
 * Errors of the migration transports.
 *
 * Two stable codes:
 * - ERR_MIGRATION_URI: a URI or a `channels` list that does not parse (nothing was touched).
 * - ERR_MIGRATION_TRANSPORT: connecting, listening, spawning, opening, or finishing a transport
 *   failed. The message names the address; the system error (ECONNREFUSED, ENOENT, EBADF, ...)
 *   is kept as `cause`, and its code is copied to `syscallCode` for quick checks.
 */

export const ERR_MIGRATION_URI = 'ERR_MIGRATION_URI';
export const ERR_MIGRATION_TRANSPORT = 'ERR_MIGRATION_TRANSPORT';

export class MigrationUriError extends Error {
  readonly code = ERR_MIGRATION_URI;
  override readonly name = 'MigrationUriError';
}

/** What the transport was doing when it failed. */
export type TransportOp =
  | 'connect'
  | 'listen'
  | 'accept'
  | 'open'
  | 'spawn'
  | 'exec'
  | 'write'
  | 'read'
  | 'close';

export class MigrationTransportError extends Error {
  readonly code = ERR_MIGRATION_TRANSPORT;
  override readonly name = 'MigrationTransportError';
  /** The address as a URI (`tcp:127.0.0.1:4444`). */
  readonly address: string;
  readonly op: TransportOp;
  /** `cause.code` when the cause is a system error ('ECONNREFUSED', 'ENOENT', ...). */
  readonly syscallCode?: string;

  constructor(address: string, op: TransportOp, detail: string, cause?: unknown) {
    super(`migration transport ${address}: ${op} failed: ${detail}`, cause === undefined ? undefined : { cause });
    this.address = address;
    this.op = op;
    const c = cause as { code?: unknown } | undefined;
    if (c && typeof c.code === 'string') this.syscallCode = c.code;
  }
}

/** Wraps any failure as a MigrationTransportError (kept as is when it already is one). */
export function transportError(address: string, op: TransportOp, err: unknown): MigrationTransportError {
  if (err instanceof MigrationTransportError) return err;
  const detail = err instanceof Error ? err.message : String(err);
  return new MigrationTransportError(address, op, detail, err);
}
