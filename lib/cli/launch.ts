/**
 * How a ferry process is started: the Node flags it runs with and the
 * script. The `ferry` bin carries the same flags in its shebang (main.ts;
 * a unit test keeps the two equal); the demo, the tests and the benchmarks
 * spawn ferry through ferryArgv() so every launch runs the same way.
 */
import path from 'node:path';

/**
 * --max-semi-space-size=1: V8's young generation stays at 1 MiB semi-spaces
 * instead of growing to 8 MiB under a migration's allocation rate. Measured on
 * the 1G rate=200M precopy bench: source peak beyond guest RAM 61-67 MiB ->
 * 60-62 MiB, same migration times.
 */
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=1'];

/** The CLI entry point (dist/lib/cli/main.js). */
export const FERRY_MAIN = path.join(__dirname, 'main.js');

/** Arguments for process.execPath that run `ferry <args>`. */
export function ferryArgv(args: readonly string[], extraNodeFlags: readonly string[] = []): string[] {
  return [...NODE_FLAGS, ...extraNodeFlags, FERRY_MAIN, ...args];
}
