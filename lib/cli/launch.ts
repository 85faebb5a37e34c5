/**
 * How a ferry process is started: the Node flags it runs with and the
 * script. The `ferry` bin carries the same flags in its shebang (main.ts;
 * a unit test keeps the two equal); the demo, the tests and the benchmarks
 * spawn ferry through ferryArgv() so every launch runs the same way.
 */
import path from 'node:path';

/**
 * --no-opt: no TurboFan. ferry's hot loops are native (page runs, kernel
 * copies); its JavaScript only orchestrates them, and optimizing it costs
 * more than it returns: on this 2-core host the compiler threads took
 * ~50 ms of CPU per process in every 1 GiB migration, competing with the
 * migration itself. Measured (1G fill=random ws=256M, ferry only, 4 runs
 * each, alternating): rate=50M median total 427 -> 394 ms, rate=200M
 * 531 -> 446 ms; peak memory beyond guest RAM 57 -> 51 MiB; boot unchanged
 * (median 117 -> 114 ms to `memwriter ready`).
 *
 * --max-semi-space-size=1: V8's young generation stays at 1 MiB semi-spaces
 * instead of growing to 8 MiB under a migration's allocation rate. Measured on
 * the 1G rate=200M precopy bench: source peak beyond guest RAM 61-67 MiB ->
 * 60-62 MiB, same migration times.
 */
export const NODE_FLAGS: readonly string[] = ['--max-semi-space-size=1', '--no-opt'];

/** The CLI entry point (dist/lib/cli/main.js). */
export const FERRY_MAIN = path.join(__dirname, 'main.js');

/** Arguments for process.execPath that run `ferry <args>`. */
export function ferryArgv(args: readonly string[], extraNodeFlags: readonly string[] = []): string[] {
  return [...NODE_FLAGS, ...extraNodeFlags, FERRY_MAIN, ...args];
}
