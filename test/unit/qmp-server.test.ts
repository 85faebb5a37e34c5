// QMP server over real unix and tcp sockets in one process: greeting, negotiation, QEMU's error
// replies, garbage and oversized input, ordering, OOB, events, disconnects.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { FerryError } from '../../lib/errors';
import { QmpError, type QmpAddress } from '../../lib/qmp/protocol';
import { QmpServer, type CommandContext } from '../../lib/qmp/server';
import { RawConn, rng, sleep, tmpDir } from './qmp-helpers';

const GREETING = {
  QMP: { version: { qemu: { micro: 22, minor: 2, major: 7 }, package: 'ferry 0.1.0' }, capabilities: ['oob'] },
};

function addServerCommands(server: QmpServer, log: string[]): void {
  server.register<{ val: number; size: number; filename: string }>({
    name: 'pmemsave',
    args: { val: 'int', size: 'int', filename: 'str' },
    handler: (a) => ({ saved: a.size }),
  });
  server.register({
    name: 'memsave',
    args: { val: 'int', size: 'int', filename: 'str', 'cpu-index?': 'int' },
    handler: () => undefined,
  });
  server.register({
    name: 'migrate-set-capabilities',
    args: { capabilities: { array: { object: { capability: { enum: ['xbzrle', 'postcopy-ram'] }, state: 'bool' } } } },
    handler: () => undefined,
  });
  server.register({ name: 'migrate-set-parameters', args: { 'max-bandwidth?': 'size', 'downtime-limit?': 'uint64' }, handler: () => undefined });
  server.register({ name: 'echo', args: 'any', handler: (a) => a });
  server.register<{ ms: number; tag: string }>({
    name: 'sleep',
    args: { ms: 'int', tag: 'str' },
    handler: async (a) => {
      log.push(`start ${a.tag}`);
      await sleep(a.ms);
      log.push(`end ${a.tag}`);
      return { tag: a.tag };
    },
  });
  server.register({ name: 'fail-plain', handler: () => Promise.reject(new Error('it broke')) });
  server.register({ name: 'fail-ferry', handler: () => { throw new FerryError('ERR_X', 'ferry says no'); } });
  server.register({ name: 'fail-class', handler: () => { throw new QmpError('DeviceNotFound', "Device 'x' not found"); } });
  server.register({ name: 'fail-string', handler: () => { throw 'a string'; } });
  server.register({
    name: 'migrate-pause',
    allowOob: true,
    handler: () => {
      log.push('oob');
      return { oob: true };
    },
  });
  server.register({ name: 'unicode', handler: () => ({ s: 'é\u0001"\\/€😀' }) });
}

for (const transport of ['unix', 'tcp'] as const) {
  describe(`qmp server over ${transport}`, function () {
    let dir: string;
    let server: QmpServer;
    let addr: QmpAddress;
    let log: string[];
    const conns: RawConn[] = [];

    async function open(): Promise<RawConn> {
      const c = await RawConn.open(addr);
      conns.push(c);
      return c;
    }
    async function negotiated(): Promise<RawConn> {
      const c = await RawConn.negotiated(addr);
      conns.push(c);
      return c;
    }

    beforeEach(async function () {
      dir = tmpDir('ferry-qmp-');
      log = [];
      server = new QmpServer();
      addServerCommands(server, log);
      addr = await server.listen(transport === 'unix' ? `unix:${path.join(dir, 'qmp.sock')}` : 'tcp:127.0.0.1:0');
    });
    afterEach(async function () {
      for (const c of conns.splice(0)) c.destroy();
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('sends the greeting in QEMU 7.2 shape, with CRLF line ends', async function () {
      const c = await open();
      assert.deepEqual(await c.next(), GREETING);
      if (transport === 'tcp') assert.ok(addr.type === 'tcp' && addr.port > 0, 'port 0 resolved to the bound port');
    });

    it('allows only qmp_capabilities before negotiation, and only once', async function () {
      const c = await open();
      await c.next();
      assert.deepEqual(await c.cmd({ execute: 'query-version', id: 1 }), {
        id: 1,
        error: { class: 'CommandNotFound', desc: "Expecting capabilities negotiation with 'qmp_capabilities'" },
      });
      // An unknown command gets the same answer before negotiation (as QEMU).
      assert.equal(((await c.cmd({ execute: 'nosuch' })).error as { desc: string }).desc, "Expecting capabilities negotiation with 'qmp_capabilities'");
      assert.deepEqual(await c.cmd({ execute: 'qmp_capabilities', id: 'n' }), { return: {}, id: 'n' });
      assert.deepEqual(await c.cmd({ execute: 'qmp_capabilities' }), {
        error: { class: 'CommandNotFound', desc: 'Capabilities negotiation is already complete, command ignored' },
      });
      assert.deepEqual(await c.cmd({ execute: 'query-version' }), { return: GREETING.QMP.version });
    });

    it('answers an unknown command with CommandNotFound and echoes ids of any type', async function () {
      const c = await negotiated();
      assert.deepEqual(await c.cmd({ execute: 'nosuch', id: 'x' }), {
        id: 'x',
        error: { class: 'CommandNotFound', desc: 'The command nosuch has not been found' },
      });
      for (const id of [0, 7, 'abc', null, [1, { a: null }], { k: 'v' }, true, 'a\u0000b']) {
        assert.deepEqual(await c.cmd({ execute: 'query-version', id }), { return: GREETING.QMP.version, id });
      }
      const names = ((await c.cmd({ execute: 'query-commands' })).return as { name: string }[]).map((x) => x.name);
      for (const n of ['qmp_capabilities', 'query-version', 'query-commands', 'quit', 'getfd', 'closefd', 'pmemsave']) {
        assert.ok(names.includes(n), `query-commands lists ${n}`);
      }
    });

    it('checks arguments with QEMU 7.2 messages', async function () {
      const c = await negotiated();
      const desc = async (obj: unknown): Promise<string> => {
        const r = await c.cmd(obj);
        assert.equal((r.error as { class: string }).class, 'GenericError', JSON.stringify(r));
        return (r.error as { desc: string }).desc;
      };
      const pm = (args: unknown) => ({ execute: 'pmemsave', arguments: args });
      assert.equal(await desc(pm({ val: 'a', size: 1, filename: 'x' })), "Invalid parameter type for 'val', expected: integer");
      assert.equal(await desc(pm({ val: 1.5, size: 1, filename: 'x' })), "Invalid parameter type for 'val', expected: integer");
      assert.equal(await desc(pm({ val: 0, size: 2 ** 64, filename: 'x' })), "Invalid parameter type for 'size', expected: integer");
      assert.equal(await desc(pm({ val: 0, size: 1, filename: 5 })), "Invalid parameter type for 'filename', expected: string");
      assert.equal(await desc(pm({ size: 1, filename: 'x' })), "Parameter 'val' is missing");
      assert.equal(await desc(pm({ val: 0, size: 1, filename: 'x', y: 1 })), "Parameter 'y' is unexpected");
      assert.equal(
        await desc({ execute: 'memsave', arguments: { val: 0, size: 1, filename: 'x', 'cpu-index': 'z' } }),
        "Invalid parameter type for 'cpu-index', expected: integer",
      );
      assert.deepEqual(await c.cmd({ execute: 'memsave', arguments: { val: 0, size: 1, filename: 'x', 'cpu-index': 1 } }), { return: {} });
      assert.deepEqual(await c.cmd(pm({ val: 0, size: 4096, filename: 'x' })), { return: { saved: 4096 } });
      const caps = (v: unknown) => ({ execute: 'migrate-set-capabilities', arguments: { capabilities: v } });
      assert.equal(await desc(caps([{ capability: 'nosuch', state: true }])), "Parameter 'capability' does not accept value 'nosuch'");
      assert.equal(await desc(caps([{ state: true }])), "Parameter 'capabilities[0].capability' is missing");
      assert.equal(await desc(caps([{ capability: 'xbzrle', state: 1 }])), "Invalid parameter type for 'capabilities[0].state', expected: boolean");
      assert.equal(await desc(caps({ a: 1 })), "Invalid parameter type for 'capabilities', expected: array");
      assert.equal(await desc(caps([5])), "Invalid parameter type for 'capabilities[0]', expected: object");
      assert.equal(await desc(caps([{ capability: 'xbzrle', state: true, zz: 1 }])), "Parameter 'capabilities[0].zz' is unexpected");
      assert.equal(await desc({ execute: 'migrate-set-parameters', arguments: { 'downtime-limit': 1.5 } }), "Parameter 'downtime-limit' expects uint64");
      assert.equal(await desc({ execute: 'migrate-set-parameters', arguments: { 'max-bandwidth': true } }), "Parameter 'max-bandwidth' expects uint64");
      // A command declared without arguments takes none; 'any' takes anything.
      assert.equal(await desc({ execute: 'query-version', arguments: { a: 1 } }), "Parameter 'a' is unexpected");
      assert.deepEqual(await c.cmd({ execute: 'echo', arguments: { a: [1, 'b'] } }), { return: { a: [1, 'b'] } });
      // qmp_capabilities' enum list (QEMU names the element 'null').
      const c2 = await open();
      await c2.next();
      assert.equal(
        ((await c2.cmd({ execute: 'qmp_capabilities', arguments: { enable: ['bogus'] } })).error as { desc: string }).desc,
        "Parameter 'null' does not accept value 'bogus'",
      );
    });

    it('checks QMP input members like QEMU', async function () {
      const c = await negotiated();
      const cases: [string, unknown][] = [
        ['{"execute":"query-version","arguments":[]}', { error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } }],
        ['{"execute":"query-version","arguments":null}', { error: { class: 'GenericError', desc: "QMP input member 'arguments' must be an object" } }],
        ['{"execute":5}', { error: { class: 'GenericError', desc: "QMP input member 'execute' must be a string" } }],
        ['{"exec":"x"}', { error: { class: 'GenericError', desc: "QMP input member 'exec' is unexpected" } }],
        ['{"id":5}', { id: 5, error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } }],
        ['{}', { error: { class: 'GenericError', desc: "QMP input lacks member 'execute'" } }],
        ['[1,2]', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
        ['"str"', { error: { class: 'GenericError', desc: 'QMP input must be a JSON object' } }],
        ['{"exec-oob":"migrate-pause","id":1}', { id: 1, error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" } }],
        ['{"execute":"x","exec-oob":"y"}', { error: { class: 'GenericError', desc: "QMP input member 'exec-oob' is unexpected" } }],
      ];
      for (const [text, want] of cases) {
        c.send(text + '\n');
        assert.deepEqual(await c.next(), want, text);
      }
    });

    it('maps handler errors to GenericError (or the given class)', async function () {
      const c = await negotiated();
      assert.deepEqual(await c.cmd({ execute: 'fail-plain', id: 1 }), { id: 1, error: { class: 'GenericError', desc: 'it broke' } });
      assert.deepEqual(await c.cmd({ execute: 'fail-ferry' }), { error: { class: 'GenericError', desc: 'ferry says no' } });
      assert.deepEqual(await c.cmd({ execute: 'fail-class' }), { error: { class: 'DeviceNotFound', desc: "Device 'x' not found" } });
      assert.deepEqual(await c.cmd({ execute: 'fail-string' }), { error: { class: 'GenericError', desc: 'a string' } });
    });

    it('serialises like QEMU (spacing, \\u escapes for non-ASCII)', async function () {
      const c = await open();
      await c.next();
      c.send('{"execute":"qmp_capabilities"}');
      c.send('{"execute":"unicode"}\n');
      const raw: string[] = [];
      c.socket.on('data', (s: string) => raw.push(s));
      await c.next();
      const r = await c.next();
      assert.deepEqual(r, { return: { s: 'é\u0001"\\/€😀' } });
      const text = raw.join('');
      assert.ok(text.includes('{"return": {"s": "\\u00E9\\u0001\\"\\\\/\\u20AC\\uD83D\\uDE00"}}\r\n'), text);
    });

    it('recovers after malformed JSON on the same connection', async function () {
      const c = await negotiated();
      c.send('{"execute":"query-version" xx}\n');
      const e1 = await c.next();
      assert.match((e1.error as { desc: string }).desc, /^JSON parse error, /);
      assert.deepEqual(await c.cmd({ execute: 'echo', arguments: { ok: 1 }, id: 1 }), { return: { ok: 1 }, id: 1 });
      c.send('}\n');
      assert.deepEqual(await c.next(), { error: { class: 'GenericError', desc: 'JSON parse error, expecting value' } });
      c.send('xyz\n');
      assert.deepEqual(await c.next(), { error: { class: 'GenericError', desc: "JSON parse error, invalid keyword 'xyz'" } });
      // An unterminated string ends at the line end; the next line works.
      c.send('{"execute":"echo","id":"abc\n');
      assert.match(((await c.next()).error as { desc: string }).desc, /^JSON parse error/);
      assert.deepEqual(await c.cmd({ execute: 'echo', id: 2 }), { return: {}, id: 2 });
      // Objects back to back without newlines, and one split into single bytes.
      c.send('{"execute":"echo","id":3}{"execute":"echo","id":4}');
      assert.deepEqual(await c.next(), { return: {}, id: 3 });
      assert.deepEqual(await c.next(), { return: {}, id: 4 });
      for (const ch of Buffer.from('{"execute": "echo", "arguments": {"s": "}{\\"é"}, "id": 5}')) {
        c.send(Buffer.from([ch]));
        await sleep(0);
      }
      assert.deepEqual(await c.next(), { return: { s: '}{"é' }, id: 5 });
      // QEMU's single quotes.
      c.send("{'execute': 'echo', 'arguments': {'q': 'it\\'s \"x\"'}, 'id': 6}\n");
      assert.deepEqual(await c.next(), { return: { q: 'it\'s "x"' }, id: 6 });
    });

    it('survives a 100 KB garbage blob and answers the next command', async function () {
      const c = await negotiated();
      const other = await negotiated();
      const rand = rng(42);
      const blob = Buffer.alloc(100 * 1024);
      for (let i = 0; i < blob.length; i++) blob[i] = Math.floor(rand() * 256);
      c.send(blob);
      // 0xFF is QEMU's documented reset byte: whatever state the garbage left, it resynchronises.
      c.send(Buffer.from([0xff, 0x0a]));
      c.send('{"execute":"echo","id":"after-garbage"}\n');
      const [skipped, reply] = await c.until((m) => m.id === 'after-garbage', 20000);
      assert.deepEqual(reply, { return: {}, id: 'after-garbage' });
      assert.ok(skipped.length > 0, 'garbage was answered with errors');
      for (const m of skipped) assert.ok('error' in m, JSON.stringify(m));
      // Printable junk too (one huge invalid keyword).
      c.send('a'.repeat(100 * 1024) + '\n');
      assert.deepEqual(await c.next(), { error: { class: 'GenericError', desc: `JSON parse error, invalid keyword '${'a'.repeat(100 * 1024)}'` } });
      assert.deepEqual(await other.cmd({ execute: 'echo', id: 'other' }), { return: {}, id: 'other' });
    });

    it('drops a client whose message exceeds the size limit, and keeps serving others', async function () {
      await server.close();
      server = new QmpServer({ maxMessageBytes: 4096 });
      addServerCommands(server, log);
      addr = await server.listen(transport === 'unix' ? `unix:${path.join(dir, 'qmp2.sock')}` : 'tcp:127.0.0.1:0');
      const c = await negotiated();
      assert.deepEqual(await c.cmd({ execute: 'echo', arguments: { s: 'x'.repeat(3000) }, id: 1 }), { return: { s: 'x'.repeat(3000) }, id: 1 });
      c.send(`{"execute":"echo","arguments":{"s":"${'y'.repeat(10000)}`);
      const r = await c.next();
      assert.deepEqual(r, { error: { class: 'GenericError', desc: 'JSON parse error, message larger than 4096 bytes' } });
      await c.waitClosed();
      const d = await negotiated();
      assert.deepEqual(await d.cmd({ execute: 'echo', id: 2 }), { return: {}, id: 2 });
      assert.equal(server.clients.length, 1);
    });

    it('runs commands in order per client, OOB ones out of band', async function () {
      const c = await open();
      await c.next();
      assert.deepEqual(await c.cmd({ execute: 'qmp_capabilities', arguments: { enable: ['oob'] } }), { return: {} });
      c.send(JSON.stringify({ execute: 'sleep', arguments: { ms: 150, tag: 'a' }, id: 'a' }));
      c.send(JSON.stringify({ execute: 'sleep', arguments: { ms: 1, tag: 'b' }, id: 'b' }));
      c.send(JSON.stringify({ 'exec-oob': 'migrate-pause', id: 'oob' }));
      assert.deepEqual(await c.next(), { return: { oob: true }, id: 'oob' });
      assert.deepEqual(await c.next(), { return: { tag: 'a' }, id: 'a' });
      assert.deepEqual(await c.next(), { return: { tag: 'b' }, id: 'b' });
      assert.deepEqual(log, ['start a', 'oob', 'end a', 'start b', 'end b']);
      assert.deepEqual(await c.cmd({ 'exec-oob': 'echo', id: 9 }), { id: 9, error: { class: 'GenericError', desc: 'The command echo does not support OOB' } });
    });

    it('keeps working when a client disconnects mid-command', async function () {
      let ctxSeen: CommandContext | undefined;
      let release!: () => void;
      const gate = new Promise<void>((r) => (release = r));
      server.register({
        name: 'block',
        handler: async (_a, ctx) => {
          ctxSeen = ctx;
          await gate;
          return { done: true };
        },
      });
      const c = await negotiated();
      const other = await negotiated();
      c.send('{"execute":"block"}\n{"execute":"echo"}\n');
      while (!ctxSeen) await sleep(5);
      assert.equal(ctxSeen.signal.aborted, false);
      c.destroy();
      while (server.clients.length !== 1) await sleep(5);
      assert.equal(ctxSeen.signal.aborted, true, 'the handler sees the disconnect');
      release();
      await sleep(20);
      assert.deepEqual(await other.cmd({ execute: 'echo', id: 'still' }), { return: {}, id: 'still' });
    });

    it('broadcasts events to every negotiated client with QEMU timestamps', async function () {
      const a = await negotiated();
      const b = await negotiated();
      const pending = await open(); // not negotiated: gets no events
      await pending.next();
      const before = Date.now();
      const sent = server.emitEvent('STOP');
      server.emitEvent('MIGRATION', { status: 'active' });
      for (const c of [a, b]) {
        const ev = await c.next();
        assert.deepEqual(Object.keys(ev), ['timestamp', 'event']);
        assert.equal(ev.event, 'STOP');
        const ts = ev.timestamp as { seconds: number; microseconds: number };
        assert.deepEqual(Object.keys(ts), ['seconds', 'microseconds']);
        assert.ok(Number.isInteger(ts.seconds) && Number.isInteger(ts.microseconds));
        assert.ok(ts.microseconds >= 0 && ts.microseconds < 1e6);
        assert.ok(Math.abs(ts.seconds * 1000 + ts.microseconds / 1000 - before) < 2000, 'wall clock time');
        assert.deepEqual(ev.timestamp, sent.timestamp, 'the same event for everyone');
        const ev2 = await c.next();
        assert.deepEqual(ev2.data, { status: 'active' });
      }
      assert.deepEqual(await pending.cmd({ execute: 'qmp_capabilities' }), { return: {} }, 'no event queued before the reply');
    });

    it('answers quit, then runs the quit hook', async function () {
      const c = await negotiated();
      const quit = new Promise<CommandContext>((r) => server.once('quit', r));
      assert.deepEqual(await c.cmd({ execute: 'quit', id: 99 }), { return: {}, id: 99 });
      const ctx = await quit;
      assert.equal(ctx.id, 99);
    });

    it('pauses reading a flooding client without losing commands', async function () {
      const c = await negotiated();
      const n = 500;
      let text = '';
      for (let i = 0; i < n; i++) text += JSON.stringify({ execute: 'echo', arguments: { i }, id: i });
      c.send(text);
      for (let i = 0; i < n; i++) assert.deepEqual(await c.next(), { return: { i }, id: i });
    });
  });
}

describe('qmp server: listening', function () {
  it('replaces a stale unix socket file, refuses a regular file, and unlinks nothing else', async function () {
    const dir = tmpDir('ferry-qmp-');
    try {
      const sock = path.join(dir, 's.sock');
      const s1 = new QmpServer();
      await s1.listen(`unix:${sock},server=on,wait=off`);
      // Simulate a crash: the socket file stays behind.
      const s2 = new QmpServer();
      await s2.listen(`unix:${sock}`);
      const c = await RawConn.open({ type: 'unix', path: sock });
      assert.deepEqual(((await c.next()).QMP as { capabilities: string[] }).capabilities, ['oob']);
      c.destroy();
      const file = path.join(dir, 'file');
      fs.writeFileSync(file, 'keep');
      await assert.rejects(new QmpServer().listen(`unix:${file}`), /EADDRINUSE/);
      assert.equal(fs.readFileSync(file, 'utf8'), 'keep');
      await s1.close();
      await s2.close();
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('rejects bad addresses with a clear message', async function () {
    await assert.rejects(new QmpServer().listen('udp:1'), /expected unix:PATH or tcp:HOST:PORT/);
    await assert.rejects(new QmpServer().listen('tcp:127.0.0.1:x'), /port 'x' is not a number/);
    await assert.rejects(new QmpServer().listen('unix:/tmp/x,wait=on'), /wait=on is not supported/);
  });
});

describe('qmp server: fuzzed input', function () {
  function randomValue(r: () => number, depth: number): unknown {
    const k = Math.floor(r() * (depth > 2 ? 5 : 8));
    switch (k) {
      case 0:
        return Math.floor(r() * 2000) - 1000;
      case 1:
        return r() < 0.5 ? r() * 1e6 : ['é', '}{', '"', '\\', 'x\u0001y', ''][Math.floor(r() * 6)];
      case 2:
        return [true, false, null][Math.floor(r() * 3)];
      case 3:
        return ['abc', 'query-version', 'echo', 'pmemsave'][Math.floor(r() * 4)];
      case 4:
        return 2 ** 64;
      case 5:
        return Array.from({ length: Math.floor(r() * 4) }, () => randomValue(r, depth + 1));
      default: {
        const o: Record<string, unknown> = {};
        const n = Math.floor(r() * 4);
        for (let i = 0; i < n; i++) o[['val', 'size', 'filename', 'x', 'cpu-index', 'id'][Math.floor(r() * 6)]] = randomValue(r, depth + 1);
        return o;
      }
    }
  }

  function randomMessage(r: () => number, i: number): unknown {
    if (r() < 0.15) return randomValue(r, 0);
    const msg: Record<string, unknown> = {};
    const cmds = ['echo', 'pmemsave', 'query-version', 'nosuch', 'qmp_capabilities', 'fail-plain', 'getfd', 'closefd', 'memsave', 'migrate-set-capabilities'];
    if (r() < 0.95) msg[r() < 0.05 ? 'exec-oob' : 'execute'] = r() < 0.9 ? cmds[Math.floor(r() * cmds.length)] : randomValue(r, 0);
    if (r() < 0.7) msg.arguments = r() < 0.9 ? randomValue(r, 1) : [1];
    msg.id = i;
    if (r() < 0.05) msg.extra = 1;
    return msg;
  }

  it('answers every value exactly once, in order, whatever arrives', async function () {
    const dir = tmpDir('ferry-qmpfz-');
    const server = new QmpServer();
    addServerCommands(server, []);
    const addr = await server.listen(`unix:${path.join(dir, 'f.sock')}`);
    try {
      for (const seed of [1, 2, 3]) {
        const r = rng(seed);
        const c = await RawConn.negotiated(addr);
        const n = 400;
        let text = '';
        const ids: { id?: unknown }[] = [];
        for (let i = 0; i < n; i++) {
          const m = randomMessage(r, i);
          const isObj = typeof m === 'object' && m !== null && !Array.isArray(m);
          ids.push(isObj && 'id' in m ? { id: (m as { id: unknown }).id } : {});
          text += JSON.stringify(m) + [' ', '\n', '\r\n', '\t'][Math.floor(r() * 4)];
        }
        const bytes = Buffer.from(text);
        for (let off = 0; off < bytes.length; ) {
          const len = 1 + Math.floor(r() * 300);
          c.send(bytes.subarray(off, off + len));
          off += len;
          if (r() < 0.2) await sleep(0);
        }
        for (let i = 0; i < n; i++) {
          const reply = await c.next(10000);
          assert.ok('return' in reply || 'error' in reply, JSON.stringify(reply));
          if ('id' in ids[i]) assert.deepEqual(reply.id, JSON.parse(JSON.stringify(ids[i].id)), `reply ${i} in order`);
          else assert.equal('id' in reply, false, `reply ${i} has no id`);
        }
        // Nothing more, and the connection still works.
        assert.deepEqual(await c.cmd({ execute: 'echo', id: 'end' }), { return: {}, id: 'end' });
        c.destroy();
      }
    } finally {
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });
});
