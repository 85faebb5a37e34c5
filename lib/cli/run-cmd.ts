/**
 * The commander definition of `ferry run`: the program's subcommand and the
 * source of `ferry run --help`. Parsing does not use it (run-options.ts), so
 * booting a guest does not pay for loading commander.
 */
import { Command, Option } from 'commander';
import { MAX_CPUS, RUN_DEFAULTS, defaultRunOptionsEnv } from './run-options';

function builtinGuestNames(): string {
  try {
    return defaultRunOptionsEnv
      .listGuests()
      .map((g) => g.name)
      .join(', ');
  } catch {
    return '(unavailable)';
  }
}

/** The commander definition of `ferry run` (fresh each call: commander keeps parse state). */
export function createRunCommand(): Command {
  const cmd = new Command('run')
    .description('run a guest (or a RAM-only machine), serve QMP, optionally wait for an incoming migration')
    .option('-m, --memory <SIZE>', "guest RAM: 256M, 1G, 4096M (a bare number is MiB, as QEMU's -m)", RUN_DEFAULTS.memory)
    .option('--cpus <N>', `number of vCPUs, 1-${MAX_CPUS} (QEMU: -smp N)`, RUN_DEFAULTS.cpus)
    .addOption(new Option('--smp <N>', 'same as --cpus').hideHelp())
    .option('--guest <NAME|PATH>', "a built-in guest name (see 'ferry guests') or the path of a PVH ELF image (QEMU: -kernel)")
    .option('--append <STRING>', 'the guest command line, e.g. "ws=256M rate=50M"')
    .option('--serial <DEST>', 'where the 16550 serial port goes: stdio, file:PATH or none', RUN_DEFAULTS.serial)
    .option('--qmp <ADDRESS>', 'serve QMP at unix:PATH or tcp:HOST:PORT (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('-S, --paused', 'start with the vCPUs stopped; QMP "cont" starts them')
    .option(
      '--incoming <URI|defer>',
      'wait for an incoming migration at tcp:HOST:PORT, unix:PATH, fd:N, exec:CMD or file:PATH; "defer" waits for QMP migrate-incoming',
    )
    .option('--machine <TYPE>', 'pvh (boot a PVH ELF guest) or none (RAM only, no vCPUs) (QEMU: -M; microvm = pvh)', RUN_DEFAULTS.machine)
    .option('--mem-path <FILE>', 'back guest RAM with this file, mapped shared')
    .helpOption('-h, --help', 'show this help')
    .addHelpText(
      'after',
      [
        '',
        'QEMU spellings are accepted: -m SIZE, -smp N, -S, -qmp ADDRESS (,server=on,wait=off is ignored),',
        '-serial DEST, -append STRING, -incoming URI, -machine/-M TYPE, -mem-path FILE, -kernel PATH.',
        'SIZE: a number with optional K, M, G or T suffix (powers of 1024).',
        `Built-in guests: ${builtinGuestNames()} (see 'ferry guests').`,
        '',
        'Examples:',
        "  ferry run --guest memwriter --append 'ws=256M rate=50M' -m 1G --qmp unix:/tmp/src.sock",
        '  ferry run --guest memwriter -m 1G --qmp unix:/tmp/dst.sock --incoming tcp:0:4444',
        '  ferry run --machine none -m 64M --qmp tcp:127.0.0.1:4445 --incoming defer',
      ].join('\n'),
    );
  return cmd;
}

/** The text of `ferry run --help`, as commander prints it. */
export function runHelpText(): string {
  const cmd = createRunCommand();
  new Command('ferry').addCommand(cmd); // so help reads "Usage: ferry run [options]"
  let text = '';
  cmd.exitOverride();
  cmd.configureOutput({ writeOut: (s) => (text += s), writeErr: (s) => (text += s), outputError: () => {} });
  try {
    cmd.parse(['--help'], { from: 'user' });
  } catch {
    // commander ends --help by throwing (exitOverride) once the text is written
  }
  return text;
}
