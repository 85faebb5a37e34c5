#!/usr/bin/env -S node --max-semi-space-size=1 --no-opt
/**
 * The `ferry` command line (bin: dist/lib/cli/main.js).
 *
 *   ferry run [options]   run a guest, serve QMP, optionally receive a migration
 *   ferry guests          list the built-in guests
 *   ferry migrate         drive a migration over QMP with progress and a summary
 *   ferry demo            the README's main job: a live migration of memwriter
 *
 * Exit codes: 0 success, 1 runtime failure, 2 usage error (bad option or
 * value, unknown command). `run` words go through parseRunOptions (QEMU
 * spellings, validation, typo hints); the machine itself is lib/cli/run.ts.
 */
import type { Command } from 'commander';
import type * as CommanderModule from 'commander';
import { errorMessage } from '../errors';
import type * as GuestsCmdModule from './guests-cmd';
import type * as MigrateCmdModule from './migrate-cmd';
import type * as RunModule from './run';
import type * as RunCmdModule from './run-cmd';
import { CliHelpRequested, CliUsageError, parseRunOptions } from './run-options';

// commander and the command definitions load only off the `ferry run` path:
// commander alone takes ~15 ms, time a booting guest would wait for.
/* eslint-disable @typescript-eslint/no-require-imports */
const commander = (): typeof CommanderModule => require('commander') as typeof CommanderModule;

export const VERSION = '0.1.0';

export interface CliIo {
  out: (s: string) => void;
  err: (s: string) => void;
}

const defaultIo: CliIo = {
  out: (s) => process.stdout.write(s),
  err: (s) => process.stderr.write(s),
};

/** The top-level program (commands listed for --help; `run` is parsed by parseRunOptions). */
export function createProgram(io: CliIo = defaultIo, setExit: (code: number) => void = () => undefined): Command {
  const { createGuestsCommand } = require('./guests-cmd') as typeof GuestsCmdModule;
  const { createDemoCommand, createMigrateCommand } = require('./migrate-cmd') as typeof MigrateCmdModule;
  const { createRunCommand } = require('./run-cmd') as typeof RunCmdModule;
  const program = new (commander().Command)('ferry')
    .description("live migration of KVM guests, speaking QEMU's migration stream and QMP")
    .version(VERSION, '-V, --version', 'print the version')
    .helpOption('-h, --help', 'show this help')
    .showSuggestionAfterError(true)
    .configureOutput({ writeOut: io.out, writeErr: io.err, outputError: () => {} })
    .exitOverride();
  program.addCommand(createRunCommand());
  program.addCommand(createGuestsCommand(io.out));
  program.addCommand(createMigrateCommand(setExit));
  program.addCommand(createDemoCommand(setExit));
  // addCommand() does not pass these on: usage errors must reach main() (exit 2), not process.exit.
  for (const sub of program.commands) sub.exitOverride().configureOutput({ writeOut: io.out, writeErr: io.err, outputError: () => {} });
  program.addHelpText('after', "\nRun 'ferry <command> --help' for a command's options.");
  return program;
}

/** Runs the CLI on `argv` (the words after the program name); resolves with the exit code. */
export async function main(argv: string[] = process.argv.slice(2), io: CliIo = defaultIo): Promise<number> {
  if (argv[0] === 'run') {
    let options;
    try {
      options = parseRunOptions(argv.slice(1));
    } catch (e) {
      if (e instanceof CliHelpRequested) {
        io.out(e.text);
        return 0;
      }
      if (e instanceof CliUsageError) {
        io.err(`${e.message}\nTry 'ferry run --help' for more information.\n`);
        return e.exitCode;
      }
      io.err(`ferry run: ${errorMessage(e)}\n`);
      return 1;
    }
    try {
      // Loaded lazily: the machine (and the native addon) are not needed for --help or guests.
      const { runMachine } = require('./run') as typeof RunModule;
      const code = await runMachine(options);
      return typeof code === 'number' ? code : 0;
    } catch (e) {
      io.err(`${errorMessage(e)}\n`);
      return 1;
    }
  }

  let exitCode = 0;
  const program = createProgram(io, (code) => (exitCode = code));
  try {
    await program.parseAsync(argv, { from: 'user' });
    return exitCode;
  } catch (e) {
    if (e instanceof commander().CommanderError) {
      if (e.code === 'commander.helpDisplayed' || e.code === 'commander.version') return 0;
      if (e.code === 'commander.help') return e.exitCode === 0 ? 0 : 2; // `ferry` alone: help on stderr
      // Commander's "error: unknown command 'rn'\n(Did you mean run?)" in ferry's one-line style.
      const text = e.message.replace(/^error: /, '').replace(/\n\(Did you mean (.*)\?\)/, ' (did you mean $1?)');
      io.err(`ferry: ${text}\nTry 'ferry --help' for more information.\n`);
      return e.exitCode === 0 ? 0 : 2;
    }
    io.err(`ferry: ${errorMessage(e)}\n`);
    return 1;
  }
}

/* eslint-enable @typescript-eslint/no-require-imports */

if (require.main === module) {
  main().then(
    (code) => {
      process.exitCode = code;
    },
    (e: unknown) => {
      process.stderr.write(`ferry: ${errorMessage(e)}\n`);
      process.exitCode = 1;
    },
  );
}
