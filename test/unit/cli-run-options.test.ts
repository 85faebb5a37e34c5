// parseRunOptions: every option valid and invalid, QEMU spellings, typo suggestions.
import assert from 'node:assert/strict';
import {
  CliHelpRequested,
  CliUsageError,
  DEFAULT_MEMORY,
  closest,
  defaultRunOptionsEnv,
  parseRunOptions,
  type RunOptions,
  type RunOptionsEnv,
} from '../../lib/cli/run-options';

const env: RunOptionsEnv = {
  listGuests: () => [
    { name: 'memwriter', path: '/pkg/guests/out/memwriter.elf', built: true },
    { name: 'ticker', path: '/pkg/guests/out/ticker.elf', built: true },
    { name: 'unbuilt', path: '/pkg/guests/out/unbuilt.elf', built: false },
  ],
  isFile: (p) => ['/pkg/guests/out/memwriter.elf', '/pkg/guests/out/ticker.elf', '/work/my.elf', '/work/local'].includes(p),
  checkMigrationUri: defaultRunOptionsEnv.checkMigrationUri,
  cwd: () => '/work',
};

const parse = (...argv: string[]): RunOptions => parseRunOptions(argv, env);
const G = ['--guest', 'memwriter'];

function usageError(argv: string[]): string {
  try {
    parseRunOptions(argv, env);
  } catch (e) {
    assert.ok(e instanceof CliUsageError, `CliUsageError for ${argv.join(' ')}: ${String(e)}`);
    assert.equal(e.exitCode, 2);
    assert.equal(e.code, 'ERR_USAGE');
    return e.message;
  }
  assert.fail(`accepted: ${argv.join(' ')}`);
}

describe('cli: ferry run options', function () {
  it('has QEMU-like defaults', function () {
    assert.deepEqual(parse(...G), {
      machine: 'pvh',
      memory: DEFAULT_MEMORY,
      cpus: 1,
      guest: { name: 'memwriter', path: '/pkg/guests/out/memwriter.elf' },
      append: '',
      serial: { type: 'stdio' },
      qmp: [],
      paused: false,
    });
  });

  it('parses every option (long forms)', function () {
    const o = parse(
      '--memory', '1G', '--cpus', '2', '--guest', 'ticker', '--append', 'hz=50 tick=10', '--serial', 'file:out/serial.log',
      '--qmp', 'unix:/tmp/a.sock', '--qmp', 'tcp:127.0.0.1:4444', '--paused', '--incoming', 'tcp:0:5555', '--machine', 'pvh',
      '--mem-path', 'ram.img',
    );
    assert.deepEqual(o, {
      machine: 'pvh',
      memory: 2 ** 30,
      cpus: 2,
      guest: { name: 'ticker', path: '/pkg/guests/out/ticker.elf' },
      append: 'hz=50 tick=10',
      serial: { type: 'file', path: '/work/out/serial.log' },
      qmp: [
        { type: 'unix', path: '/tmp/a.sock' },
        { type: 'tcp', host: '127.0.0.1', port: 4444 },
      ],
      paused: true,
      incoming: { type: 'uri', uri: 'tcp:0:5555' },
      memPath: '/work/ram.img',
    });
  });

  it('accepts QEMU spellings and --opt=value', function () {
    const o = parse('-m', '256', '-smp', '2', '-S', '-kernel', 'my.elf', '-append', '-S x', '-qmp', 'unix:/tmp/q.sock,server=on,wait=off', '-serial', 'none', '-M', 'microvm', '-mem-path', '/dev/shm/r', '-incoming', 'defer');
    assert.equal(o.memory, 256 << 20, 'bare -m is MiB');
    assert.equal(o.cpus, 2);
    assert.equal(o.paused, true);
    assert.deepEqual(o.guest, { path: '/work/my.elf' });
    assert.equal(o.append, '-S x', 'a value is never rewritten');
    assert.deepEqual(o.qmp, [{ type: 'unix', path: '/tmp/q.sock' }]);
    assert.deepEqual(o.serial, { type: 'none' });
    assert.equal(o.machine, 'pvh');
    assert.equal(o.memPath, '/dev/shm/r');
    assert.deepEqual(o.incoming, { type: 'defer' });
    const p = parse('--memory=2G', '--smp=4', '--guest=memwriter', '-m512M', '-machine', 'pvh', '--cpus', 'cpus=3');
    assert.equal(p.memory, 512 << 20, 'the last -m wins');
    assert.equal(p.cpus, 3);
    assert.equal(parse('-m', 'size=1G', ...G).memory, 2 ** 30);
    assert.equal(parse('--guest', 'local').guest?.path, '/work/local', 'an existing file without a slash');
  });

  it('runs a RAM-only machine without a guest, and an incoming one without a guest', function () {
    const o = parse('--machine', 'none', '-m', '64M', '--incoming', 'unix:/tmp/in.sock');
    assert.equal(o.machine, 'none');
    assert.equal(o.guest, undefined);
    assert.deepEqual(o.incoming, { type: 'uri', uri: 'unix:/tmp/in.sock' });
    assert.equal(parse('--incoming', 'defer').guest, undefined);
    for (const uri of ['fd:3', 'fd:mig', 'exec:cat /tmp/x', 'file:/tmp/s.bin,offset=4K', 'tcp:[::1]:4444']) {
      assert.deepEqual(parse('--incoming', uri).incoming, { type: 'uri', uri });
    }
  });

  it('rejects bad values, naming the option, the problem and what is accepted', function () {
    const cases: [string[], string][] = [
      [['--memory', '12Q', ...G], "ferry run: --memory '12Q': unknown size suffix 'Q' (expected a number with optional K, M, G or T suffix)"],
      [['-m', '1KiB', ...G], "ferry run: --memory '1KiB': unknown size suffix 'KiB' (write K, sizes are powers of 1024)"],
      [['-m', '-1G', ...G], "ferry run: --memory '-1G': negative sizes are not allowed"],
      [['-m', '512K', ...G], "ferry run: --memory '512K': too small (at least 1M)"],
      [['-m', '1000001K', ...G], "ferry run: --memory '1000001K': not a multiple of 4K (the page size)"],
      [['-m', '1G,slots=2,maxmem=4G', ...G], "ferry run: --memory '1G,slots=2,maxmem=4G': memory hotplug options (slots=, maxmem=) are not supported (expected a SIZE such as 256M)"],
      [['--cpus', '0', ...G], "ferry run: --cpus '0': out of range (expected 1-255)"],
      [['--cpus', '256', ...G], "ferry run: --cpus '256': out of range (expected 1-255)"],
      [['--cpus', 'two', ...G], "ferry run: --cpus 'two': not a whole number (expected 1-255)"],
      [['-smp', '2,sockets=2', ...G], "ferry run: --cpus '2,sockets=2': CPU topology (sockets=, cores=, threads=, maxcpus=) is not supported (expected a number of vCPUs)"],
      [['--guest', 'memwritr'], "ferry run: --guest 'memwritr': no built-in guest of that name (did you mean memwriter?); expected one of memwriter, ticker, unbuilt or the path of a PVH ELF image"],
      [['--guest', 'unbuilt'], "ferry run: --guest 'unbuilt': the image /pkg/guests/out/unbuilt.elf has not been built (run: npm run build:guests)"],
      [['--guest', './nope.elf'], "ferry run: --guest './nope.elf': no such file (/work/nope.elf)"],
      [['--guest', ''], "ferry run: --guest '': empty (expected a built-in guest name or a path to a PVH ELF image)"],
      [['--serial', 'pty', ...G], "ferry run: --serial 'pty': unknown destination (expected stdio, file:PATH or none)"],
      [['--serial', 'file:', ...G], "ferry run: --serial 'file:': empty file name (expected file:PATH)"],
      [['--qmp', 'stdio', ...G], "ferry run: --qmp 'stdio': expected unix:PATH or tcp:HOST:PORT"],
      [['--qmp', 'tcp:localhost:http', ...G], "ferry run: --qmp 'tcp:localhost:http': port 'http' is not a number"],
      [['--qmp', 'unix:/tmp/q,wait=on', ...G], "ferry run: --qmp 'unix:/tmp/q,wait=on': wait=on is not supported (ferry never waits for a QMP client)"],
      [['--qmp', 'unix:/a', '--qmp', 'unix:/a', ...G], "ferry run: --qmp 'unix:/a': given twice"],
      [['--incoming', 'tcp:localhost'], "ferry run: --incoming 'tcp:localhost': expected tcp:HOST:PORT (or defer)"],
      [['--machine', 'q35', ...G], "ferry run: --machine 'q35': unknown machine type (expected pvh or none)"],
      [['--machine', 'pvj', ...G], "ferry run: --machine 'pvj': unknown machine type (expected pvh or none); did you mean pvh?"],
      [['--machine', 'pvh,accel=kvm', ...G], "ferry run: --machine 'pvh,accel=kvm': machine properties are not supported (expected pvh or none)"],
      [['--mem-path', '', ...G], "ferry run: --mem-path '': empty file name"],
    ];
    for (const [argv, msg] of cases) assert.equal(usageError(argv), msg, argv.join(' '));
    assert.match(usageError(['--incoming', 'vsock:1:2']), /^ferry run: --incoming 'vsock:1:2': .*\(or defer\)$/);
  });

  it('rejects inconsistent combinations', function () {
    assert.equal(
      usageError([]),
      "ferry run: --guest is required with --machine pvh (a built-in name from 'ferry guests' or a PVH ELF path), unless --incoming is given",
    );
    assert.equal(usageError(['--machine', 'none', ...G]), 'ferry run: --guest cannot be used with --machine none (that machine has no vCPUs)');
    assert.equal(usageError(['--machine', 'none', '--append', 'x']), 'ferry run: --append needs a guest; --machine none has none');
  });

  it('rejects unknown options with a suggestion, missing values and stray arguments', function () {
    const cases: [string[], string][] = [
      [['--memroy', '1G'], "ferry run: unknown option '--memroy' (did you mean --memory?)"],
      [['--mmeory', '1G'], "ferry run: unknown option '--mmeory' (did you mean --memory?)"],
      [['--gest', 'x'], "ferry run: unknown option '--gest' (did you mean --guest?)"],
      [['--qpm', 'x'], "ferry run: unknown option '--qpm' (did you mean --qmp?)"],
      [['-smpp', '2'], "ferry run: unknown option '-smpp' (did you mean --cpus?)"],
      [['--pause'], "ferry run: unknown option '--pause' (did you mean --paused?)"],
      [['--incomming', 'defer'], "ferry run: unknown option '--incomming' (did you mean --incoming?)"],
      [['--mem', '1G'], "ferry run: unknown option '--mem' (did you mean --memory or --mem-path?)"],
      [['--mempath', 'x'], "ferry run: unknown option '--mempath' (did you mean --mem-path?)"],
      [['--machine-type', 'pvh'], "ferry run: unknown option '--machine-type'"],
      [['--frobnicate'], "ferry run: unknown option '--frobnicate'"],
      [['-x'], "ferry run: unknown option '-x'"],
      [['--memory'], 'ferry run: --memory needs a value (SIZE)'],
      [['-m', '--cpus', '2'], 'ferry run: --memory needs a value (SIZE)'],
      [['--qmp'], 'ferry run: --qmp needs a value (ADDRESS)'],
      [['--paused=yes', ...G], "ferry run: --paused takes no value (got '--paused=yes')"],
      [['memwriter'], "ferry run: unexpected argument 'memwriter' (ferry run takes only options; see ferry run --help)"],
      [[...G, '--', 'x'], "ferry run: unexpected argument 'x' (ferry run takes only options)"],
    ];
    for (const [argv, msg] of cases) assert.equal(usageError(argv), msg, argv.join(' '));
  });

  it('reports --help with the full option list', function () {
    for (const h of ['--help', '-h']) {
      let text = '';
      try {
        parse(h);
        assert.fail('no help');
      } catch (e) {
        assert.ok(e instanceof CliHelpRequested);
        text = e.text;
      }
      assert.match(text, /^Usage: ferry run \[options\]/);
      for (const opt of ['--memory', '--cpus', '--guest', '--append', '--serial', '--qmp', '--paused', '--incoming', '--machine', '--mem-path', '-smp', '-S']) {
        assert.ok(text.includes(opt), `help mentions ${opt}`);
      }
    }
  });

  it('suggests only close words', function () {
    assert.equal(closest('memroy', ['memory', 'cpus']), 'memory');
    assert.equal(closest('xyz', ['memory', 'cpus']), undefined);
    assert.equal(closest('PVH', ['pvh']), 'pvh');
  });
});
