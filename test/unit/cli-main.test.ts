// The `ferry` bin as a child process: --help, run --help, guests, exit codes and messages.
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { formatGuests } from '../../lib/cli/guests-cmd';
import { FERRY_MAIN, NODE_FLAGS } from '../../lib/cli/launch';
import { main } from '../../lib/cli/main';

const BIN = path.resolve(__dirname, '..', '..', 'lib', 'cli', 'main.js');

function ferry(...args: string[]): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(process.execPath, [BIN, ...args], { encoding: 'utf8', timeout: 20000 });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('cli: the ferry bin', function () {
  it('starts with a node shebang carrying the same flags every other launch uses, and runs as an executable', function () {
    assert.equal(BIN, FERRY_MAIN);
    assert.equal(fs.readFileSync(BIN, 'utf8').split('\n')[0], `#!/usr/bin/env -S node ${NODE_FLAGS.join(' ')}`);
    const r = spawnSync(BIN, ['--version'], { encoding: 'utf8', timeout: 20000 });
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^\d+\.\d+\.\d+/);
  });

  it('ferry --help lists the commands', function () {
    const r = ferry('--help');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^Usage: ferry \[options\] \[command\]/);
    for (const word of ['run', 'guests', '--help', '--version']) assert.ok(r.stdout.includes(word), `mentions ${word}`);
  });

  it('ferry run --help documents every option', function () {
    const r = ferry('run', '--help');
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^Usage: ferry run \[options\]/);
    for (const opt of [
      '-m, --memory <SIZE>', '--cpus <N>', '--guest <NAME|PATH>', '--append <STRING>', '--serial <DEST>', '--qmp <ADDRESS>',
      '-S, --paused', '--incoming <URI|defer>', '--machine <TYPE>', '--mem-path <FILE>', '-smp N', '-qmp ADDRESS', 'stdio, file:PATH',
      'unix:PATH or tcp:HOST:PORT', 'pvh', 'none', 'defer',
    ]) {
      assert.ok(r.stdout.includes(opt), `run --help mentions '${opt}'`);
    }
    assert.equal(ferry('help', 'run').stdout, r.stdout, 'ferry help run is the same text');
  });

  it('exits 2 with a one-line hint on a usage error', function () {
    const r = ferry('run', '--memroy', '1G');
    assert.equal(r.status, 2);
    assert.equal(r.stdout, '');
    assert.equal(r.stderr, "ferry run: unknown option '--memroy' (did you mean --memory?)\nTry 'ferry run --help' for more information.\n");
    const m = ferry('run', '-m', '12Q', '--guest', 'memwriter');
    assert.equal(m.status, 2);
    assert.match(m.stderr, /^ferry run: --memory '12Q': unknown size suffix 'Q' \(expected a number with optional K, M, G or T suffix\)\n/);
    const c = ferry('rn');
    assert.equal(c.status, 2);
    assert.equal(c.stderr, "ferry: unknown command 'rn' (did you mean run?)\nTry 'ferry --help' for more information.\n");
    const none = ferry();
    assert.equal(none.status, 2);
    assert.match(none.stderr, /Usage: ferry/);
  });

  it('ferry --version', function () {
    const r = ferry('--version');
    assert.equal(r.status, 0);
    assert.equal(r.stdout.trim(), '0.1.0');
  });

  it('ferry guests prints name and absolute image path per line', function () {
    const r = ferry('guests');
    assert.equal(r.status, 0, r.stderr);
    const lines = r.stdout.trimEnd().split('\n');
    assert.ok(lines.length >= 1);
    for (const line of lines) {
      const m = /^(\S+) +(\/\S+\.elf)$/.exec(line);
      assert.ok(m, `line '${line}'`);
      assert.ok(path.isAbsolute(m[2]));
    }
    assert.ok(lines.some((l) => l.startsWith('memwriter ')));
  });

  it('formats guest listings (verbose adds description and build state)', function () {
    const gs = [
      { name: 'a', path: '/x/a.elf', description: 'first', built: true },
      { name: 'long', path: '/x/long.elf', description: 'second', built: false },
    ];
    assert.equal(formatGuests(gs), 'a     /x/a.elf\nlong  /x/long.elf\n');
    assert.equal(
      formatGuests(gs, true),
      'a     /x/a.elf\n      first\nlong  /x/long.elf\n      (not built: run npm run build:guests)\n      second\n',
    );
  });

  it('main() returns exit codes without exiting (in process)', async function () {
    let out = '';
    let err = '';
    const io = { out: (s: string) => (out += s), err: (s: string) => (err += s) };
    assert.equal(await main(['run', '--cpus', 'x', '--guest', 'memwriter'], io), 2);
    assert.match(err, /^ferry run: --cpus 'x': not a whole number/);
    assert.equal(await main(['run', '-h'], io), 0);
    assert.match(out, /Usage: ferry run/);
  });
});
