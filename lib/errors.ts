/**
 * The shared error type of ferry's TypeScript layer: an Error with a stable
 * `code` (ERR_...) and an optional `cause`, shaped like Node's own errors so
 * callers branch on `code`, never on message text.
 */
export class FerryError extends Error {
  readonly code: string;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'FerryError';
    this.code = code;
  }
}

/** True when `e` is an Error-like object carrying the given string `code`. */
export function hasCode(e: unknown, code: string): boolean {
  return typeof e === 'object' && e !== null && (e as { code?: unknown }).code === code;
}

/** The message of anything thrown (non-Errors are stringified). */
export function errorMessage(e: unknown): string {
  if (e instanceof Error) return e.message;
  if (typeof e === 'object' && e !== null && typeof (e as { message?: unknown }).message === 'string') {
    return (e as { message: string }).message;
  }
  return String(e);
}

/** Normalises anything thrown into an Error (non-Errors become a FerryError with `code`). */
export function toError(e: unknown, code = 'ERR_UNKNOWN'): Error {
  return e instanceof Error ? e : new FerryError(code, errorMessage(e), { cause: e });
}
