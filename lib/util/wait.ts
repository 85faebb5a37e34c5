/**
 * Waiting with a deadline, and scratch directories: shared by the demo, the
 * tests and the benchmarks. Every wait names what it waited for, so a hang
 * explains itself.
 */
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Polls `probe` every `intervalMs` until it returns something other than undefined/false. */
export async function waitFor<T>(
  what: string,
  timeoutMs: number,
  probe: () => T | undefined | false | Promise<T | undefined | false>,
  detail?: () => string,
  intervalMs = 25,
): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > end) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${detail ? `\n${detail()}` : ''}`);
    await sleep(intervalMs);
  }
}

/** A temp directory removed by cleanup(). */
export class TempDir {
  readonly path: string;
  constructor(prefix = 'ferry-') {
    this.path = fs.mkdtempSync(path.join(os.tmpdir(), prefix));
  }
  file(name: string): string {
    return path.join(this.path, name);
  }
  cleanup(): void {
    fs.rmSync(this.path, { recursive: true, force: true });
  }
}
