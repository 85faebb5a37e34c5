import assert from 'node:assert/strict';
import {
  type MigrationAddress,
  MigrationUriError,
  formatMigrationAddress,
  parseChannels,
  parseMigrationUri,
  parseSize,
  resolveMigrationTarget,
} from '../../lib/transport';

function uriError(fn: () => unknown, message: string | RegExp): void {
  assert.throws(fn, (err: unknown) => {
    assert.ok(err instanceof MigrationUriError, `not a MigrationUriError: ${String(err)}`);
    assert.equal(err.code, 'ERR_MIGRATION_URI');
    if (typeof message === 'string') assert.equal(err.message, message);
    else assert.match(err.message, message);
    return true;
  });
}

describe('transport: parseMigrationUri', () => {
  const valid: Array<[string, MigrationAddress]> = [
    ['tcp:127.0.0.1:4444', { transport: 'socket', type: 'inet', host: '127.0.0.1', port: '4444' }],
    ['tcp:localhost:0', { transport: 'socket', type: 'inet', host: 'localhost', port: '0' }],
    ['tcp::4444', { transport: 'socket', type: 'inet', host: '', port: '4444' }],
    ['tcp:[::1]:4444', { transport: 'socket', type: 'inet', host: '::1', port: '4444' }],
    ['tcp:[fe80::1%eth0]:1', { transport: 'socket', type: 'inet', host: 'fe80::1%eth0', port: '1' }],
    ['tcp:0.0.0.0:4444,to=4450', { transport: 'socket', type: 'inet', host: '0.0.0.0', port: '4444', to: 4450 }],
    ['tcp:h:1,ipv4,keep-alive=off', { transport: 'socket', type: 'inet', host: 'h', port: '1', ipv4: true, 'keep-alive': false }],
    ['tcp:h:65535,ipv6=on', { transport: 'socket', type: 'inet', host: 'h', port: '65535', ipv6: true }],
    ['unix:/tmp/mig.sock', { transport: 'socket', type: 'unix', path: '/tmp/mig.sock' }],
    ['unix:relative/x', { transport: 'socket', type: 'unix', path: 'relative/x' }],
    ['fd:3', { transport: 'socket', type: 'fd', str: '3' }],
    ['fd:migfd', { transport: 'socket', type: 'fd', str: 'migfd' }],
    ['exec:cat > /tmp/x', { transport: 'exec', args: ['/bin/sh', '-c', 'cat > /tmp/x'] }],
    ['exec:a:b,c', { transport: 'exec', args: ['/bin/sh', '-c', 'a:b,c'] }],
    ['file:/tmp/x', { transport: 'file', filename: '/tmp/x', offset: 0 }],
    ['file:/tmp/x,offset=4096', { transport: 'file', filename: '/tmp/x', offset: 4096 }],
    ['file:/tmp/x,offset=1M', { transport: 'file', filename: '/tmp/x', offset: 1 << 20 }],
    ['file:/tmp/x,offset=0x1000', { transport: 'file', filename: '/tmp/x', offset: 4096 }],
    ['file:/tmp/a,b,offset=1.5k', { transport: 'file', filename: '/tmp/a,b', offset: 1536 }],
  ];
  for (const [uri, want] of valid) {
    it(`parses ${uri}`, () => {
      assert.deepEqual(parseMigrationUri(uri), want);
    });
  }

  const invalid: Array<[string, string | RegExp]> = [
    ['tcp:foo', "invalid migration URI 'tcp:foo': expected tcp:HOST:PORT"],
    ['tcp:', "invalid migration URI 'tcp:': expected tcp:HOST:PORT"],
    ['tcp:host:', "invalid migration URI 'tcp:host:': missing port (expected tcp:HOST:PORT)"],
    ['tcp:host:http', "invalid migration URI 'tcp:host:http': port 'http' is not a number between 0 and 65535 (expected tcp:HOST:PORT)"],
    ['tcp:host:65536', /port '65536' is not a number between 0 and 65535/],
    ['tcp:host:-1', /port '-1' is not a number/],
    ['tcp:::1:4444', "invalid migration URI 'tcp:::1:4444': IPv6 addresses must be in brackets (expected tcp:[ADDRESS]:PORT)"],
    ['tcp:[::1:4444', /unterminated '\[' in IPv6 address/],
    ['tcp:[::1]4444', /missing ':PORT' after '\]'/],
    ['tcp:[host]:1', /'host' in brackets is not an IPv6 address/],
    ['tcp:h:10,to=5', /option 'to=5' is below the port 10/],
    ['tcp:h:10,to', /option 'to' needs a port/],
    ['tcp:h:10,bogus', "invalid migration URI 'tcp:h:10,bogus': unknown option 'bogus' (known: to, ipv4, ipv6, keep-alive)"],
    ['tcp:h:10,ipv4=maybe', /option 'ipv4' takes on or off, not 'maybe'/],
    ['tcp:h:10,ipv4=off,ipv6=off', /leave no address family/],
    ['unix:', "invalid migration URI 'unix:': expected unix:PATH"],
    [`unix:/${'x'.repeat(107)}`, /socket path is 108 bytes, longer than 107/],
    ['fd:', "invalid migration URI 'fd:': expected fd:NUMBER or fd:NAME"],
    ['fd:3x', "invalid migration URI 'fd:3x': invalid file descriptor number '3x'"],
    ['exec:', "invalid migration URI 'exec:': expected exec:COMMAND"],
    ['exec:   ', "invalid migration URI 'exec:   ': expected exec:COMMAND"],
    ['file:', "invalid migration URI 'file:': expected file:PATH[,offset=N]"],
    ['file:,offset=5', "invalid migration URI 'file:,offset=5': expected file:PATH[,offset=N]"],
    ['file:/x,offset=abc', "invalid migration URI 'file:/x,offset=abc': bad offset 'abc' (expected a byte count, optionally with K, M, G, T, P or E)"],
    ['file:/x,offset=', /bad offset ''/],
    ['file:/x,offset=1.5', /bad offset '1.5'/],
    ['file:/x,offset=-1', /bad offset '-1'/],
    ['file:/x,offset=9E', /bad offset '9E'/],
    ['vsock:3:4444', "invalid migration URI 'vsock:3:4444': the vsock transport is not supported by ferry"],
    ['rdma:host:4444', /the rdma transport is not supported by ferry/],
    ['udp:host:1', 'unknown migration protocol: udp:host:1'],
    ['/tmp/file', 'unknown migration protocol: /tmp/file'],
    ['', 'unknown migration protocol: '],
    ['TCP:h:1', 'unknown migration protocol: TCP:h:1'],
  ];
  for (const [uri, msg] of invalid) {
    it(`rejects ${JSON.stringify(uri.length > 40 ? `${uri.slice(0, 40)}...` : uri)}`, () => {
      uriError(() => parseMigrationUri(uri), msg);
    });
  }

  it('round-trips through formatMigrationAddress', () => {
    for (const [uri] of valid) {
      const a = parseMigrationUri(uri);
      assert.deepEqual(parseMigrationUri(formatMigrationAddress(a)), a, uri);
    }
  });

  it('parseSize follows qemu_strtosz units (powers of 1024)', () => {
    assert.equal(parseSize('0'), 0);
    assert.equal(parseSize('12'), 12);
    assert.equal(parseSize('12b'), 12);
    assert.equal(parseSize('2K'), 2048);
    assert.equal(parseSize('3g'), 3 * 1024 ** 3);
    assert.equal(parseSize('1T'), 1024 ** 4);
    assert.equal(parseSize('0x10'), 16);
    assert.equal(parseSize('0x10K'), undefined);
    assert.equal(parseSize('1.25k'), 1280);
    assert.equal(parseSize('1.1b'), undefined);
    assert.equal(parseSize('1 K'), undefined);
    assert.equal(parseSize('7P'), 7 * 1024 ** 5);
    assert.equal(parseSize('8P'), undefined); // 2^53 is past Number.MAX_SAFE_INTEGER
    assert.equal(parseSize('16E'), undefined); // beyond 2^53
  });
});

describe('transport: parseChannels', () => {
  const main = (addr: unknown) => [{ 'channel-type': 'main', addr }];

  it('converts each address type', () => {
    assert.deepEqual(parseChannels(main({ transport: 'socket', type: 'inet', host: '10.0.0.1', port: '4444' })), {
      transport: 'socket',
      type: 'inet',
      host: '10.0.0.1',
      port: '4444',
    });
    assert.deepEqual(parseChannels(main({ transport: 'socket', type: 'inet', host: '::1', port: '0', to: 10, ipv6: true, 'keep-alive': true })), {
      transport: 'socket',
      type: 'inet',
      host: '::1',
      port: '0',
      to: 10,
      ipv6: true,
      'keep-alive': true,
    });
    assert.deepEqual(parseChannels(main({ transport: 'socket', type: 'unix', path: '/run/m.sock' })), {
      transport: 'socket',
      type: 'unix',
      path: '/run/m.sock',
    });
    assert.deepEqual(parseChannels(main({ transport: 'socket', type: 'unix', path: 'm', abstract: true, tight: true })), {
      transport: 'socket',
      type: 'unix',
      path: 'm',
      abstract: true,
      tight: true,
    });
    assert.deepEqual(parseChannels(main({ transport: 'socket', type: 'fd', str: 'fdname' })), { transport: 'socket', type: 'fd', str: 'fdname' });
    assert.deepEqual(parseChannels(main({ transport: 'exec', args: ['/usr/bin/ssh', 'host', 'cat > x'] })), {
      transport: 'exec',
      args: ['/usr/bin/ssh', 'host', 'cat > x'],
    });
    assert.deepEqual(parseChannels(main({ transport: 'file', filename: '/tmp/f', offset: 8192 })), {
      transport: 'file',
      filename: '/tmp/f',
      offset: 8192,
    });
    assert.deepEqual(parseChannels(main({ transport: 'file', filename: '/tmp/f' })), { transport: 'file', filename: '/tmp/f', offset: 0 });
  });

  it('gives the same address as the equivalent URI', () => {
    assert.deepEqual(
      parseChannels(main({ transport: 'socket', type: 'inet', host: '127.0.0.1', port: '4444' })),
      parseMigrationUri('tcp:127.0.0.1:4444'),
    );
    assert.deepEqual(parseChannels(main({ transport: 'exec', args: ['/bin/sh', '-c', 'cat > f'] })), parseMigrationUri('exec:cat > f'));
    assert.equal(formatMigrationAddress(parseChannels(main({ transport: 'exec', args: ['/bin/sh', '-c', 'cat > f'] }))), 'exec:cat > f');
    assert.equal(formatMigrationAddress(parseChannels(main({ transport: 'exec', args: ['ssh', 'h', 'cat > f'] }))), "exec:ssh h 'cat > f'");
  });

  const invalid: Array<[string, unknown, string | RegExp]> = [
    ['not an array', { 'channel-type': 'main' }, "Invalid parameter type for 'channels', expected: array"],
    ['empty list', [], "Parameter 'channels' has no 'main' channel"],
    ['two mains', [...main({ transport: 'file', filename: 'a', offset: 0 }), ...main({ transport: 'file', filename: 'b', offset: 0 })], "Parameter 'channels' has more than one 'main' channel (channels[1])"],
    ['cpr channel', [{ 'channel-type': 'cpr', addr: { transport: 'file', filename: 'a', offset: 0 } }], "'channels[0]': channel type 'cpr' is not supported by ferry"],
    ['unknown channel-type', [{ 'channel-type': 'side', addr: {} }], "Parameter 'channels[0].channel-type' does not accept value 'side' (main)"],
    ['missing channel-type', [{ addr: {} }], "Parameter 'channels[0].channel-type' is missing"],
    ['missing addr', [{ 'channel-type': 'main' }], "Parameter 'channels[0].addr' is missing"],
    ['extra member', [{ 'channel-type': 'main', addr: {}, x: 1 }], "Parameter 'channels[0].x' is unexpected"],
    ['channel not an object', ['tcp:x:1'], "Invalid parameter type for 'channels[0]', expected: object"],
    ['missing transport', main({}), "Parameter 'channels[0].addr.transport' is missing"],
    ['unknown transport', main({ transport: 'carrier-pigeon' }), /'channels\[0\].addr.transport' does not accept value 'carrier-pigeon'/],
    ['rdma', main({ transport: 'rdma', host: 'h', port: '1' }), /rdma transport is not supported/],
    ['socket without type', main({ transport: 'socket', host: 'h', port: '1' }), "Parameter 'channels[0].addr.type' is missing"],
    ['socket unknown type', main({ transport: 'socket', type: 'ax25' }), /'channels\[0\].addr.type' does not accept value 'ax25'/],
    ['vsock', main({ transport: 'socket', type: 'vsock', cid: '3', port: '1' }), /vsock transport is not supported/],
    ['inet missing host', main({ transport: 'socket', type: 'inet', port: '1' }), "Parameter 'channels[0].addr.host' is missing"],
    ['inet missing port', main({ transport: 'socket', type: 'inet', host: 'h' }), "Parameter 'channels[0].addr.port' is missing"],
    ['inet numeric port', main({ transport: 'socket', type: 'inet', host: 'h', port: 4444 }), "Invalid parameter type for 'channels[0].addr.port', expected: string"],
    ['inet bad port', main({ transport: 'socket', type: 'inet', host: 'h', port: 'ssh' }), /'channels\[0\].addr.port' \('ssh'\) is not a number/],
    ['inet unknown member', main({ transport: 'socket', type: 'inet', host: 'h', port: '1', path: '/x' }), "Parameter 'channels[0].addr.path' is unexpected"],
    ['inet ipv4 not bool', main({ transport: 'socket', type: 'inet', host: 'h', port: '1', ipv4: 'yes' }), "Invalid parameter type for 'channels[0].addr.ipv4', expected: boolean"],
    ['inet to below port', main({ transport: 'socket', type: 'inet', host: 'h', port: '10', to: 5 }), /is below the port 10/],
    ['unix missing path', main({ transport: 'socket', type: 'unix' }), "Parameter 'channels[0].addr.path' is missing"],
    ['unix empty path', main({ transport: 'socket', type: 'unix', path: '' }), "Parameter 'channels[0].addr.path' is empty"],
    ['fd missing str', main({ transport: 'socket', type: 'fd' }), "Parameter 'channels[0].addr.str' is missing"],
    ['fd bad number', main({ transport: 'socket', type: 'fd', str: '12a' }), "Parameter 'channels[0].addr.str': invalid file descriptor number '12a'"],
    ['exec missing args', main({ transport: 'exec' }), "Parameter 'channels[0].addr.args' is missing"],
    ['exec args not strings', main({ transport: 'exec', args: ['sh', 1] }), "Invalid parameter type for 'channels[0].addr.args', expected: array of strings"],
    ['exec empty args', main({ transport: 'exec', args: [] }), "Parameter 'channels[0].addr.args' needs a command"],
    ['file missing filename', main({ transport: 'file', offset: 0 }), "Parameter 'channels[0].addr.filename' is missing"],
    ['file negative offset', main({ transport: 'file', filename: 'f', offset: -1 }), /'channels\[0\].addr.offset' is out of range/],
    ['file string offset', main({ transport: 'file', filename: 'f', offset: '1M' }), "Invalid parameter type for 'channels[0].addr.offset', expected: integer"],
  ];
  for (const [name, channels, msg] of invalid) {
    it(`rejects ${name}`, () => {
      uriError(() => parseChannels(channels), msg);
    });
  }
});

describe('transport: resolveMigrationTarget', () => {
  it('wants exactly one of uri and channels', () => {
    uriError(() => resolveMigrationTarget(undefined, undefined), "need either 'uri' or 'channels' argument");
    uriError(
      () => resolveMigrationTarget('tcp:h:1', [{ 'channel-type': 'main', addr: { transport: 'file', filename: 'f', offset: 0 } }]),
      "need either 'uri' or 'channels' argument",
    );
    uriError(() => resolveMigrationTarget(42, undefined), "Invalid parameter type for 'uri', expected: string");
    assert.deepEqual(resolveMigrationTarget('unix:/s', undefined), { transport: 'socket', type: 'unix', path: '/s' });
    assert.deepEqual(
      resolveMigrationTarget(undefined, [{ 'channel-type': 'main', addr: { transport: 'socket', type: 'unix', path: '/s' } }]),
      { transport: 'socket', type: 'unix', path: '/s' },
    );
  });
});
