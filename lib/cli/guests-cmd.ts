/**
 * `ferry guests`: the built-in test guests, one a line: the name, then the
 * absolute path of its PVH ELF image (`--verbose` adds whether it is built
 * and what it does).
 */
import { Command } from 'commander';

export interface GuestListing {
  name: string;
  path: string;
  description?: string;
  built?: boolean;
}

export function loadGuests(): GuestListing[] {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const mod = require('../guests') as { listGuests(): GuestListing[] };
  return mod.listGuests();
}

/** The text `ferry guests` prints. */
export function formatGuests(guests: GuestListing[], verbose = false): string {
  const width = Math.max(0, ...guests.map((g) => g.name.length));
  const lines: string[] = [];
  for (const g of guests) {
    lines.push(`${g.name.padEnd(width)}  ${g.path}`);
    if (verbose) {
      if (g.built === false) lines.push(`${''.padEnd(width)}  (not built: run npm run build:guests)`);
      if (g.description) lines.push(`${''.padEnd(width)}  ${g.description}`);
    }
  }
  return lines.length > 0 ? `${lines.join('\n')}\n` : '';
}

export function createGuestsCommand(write: (s: string) => void = (s) => process.stdout.write(s)): Command {
  return new Command('guests')
    .description('list the built-in guests: name, then the absolute path of its image')
    .option('-v, --verbose', 'also say what each guest does and whether its image is built')
    .helpOption('-h, --help', 'show this help')
    .action((opts: { verbose?: boolean }) => {
      write(formatGuests(loadGuests(), opts.verbose === true));
    });
}
