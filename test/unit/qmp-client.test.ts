// QmpClient against ferry's QmpServer (unix and tcp) and, when installed, QEMU 7.2 itself.
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { hasCode } from '../../lib/errors';
import { QmpClient } from '../../lib/qmp/client';
import { ERR_QMP_DISCONNECTED, ERR_QMP_TIMEOUT, QmpError, type QmpAddress } from '../../lib/qmp/protocol';
import { QmpServer } from '../../lib/qmp/server';
import { sleep, tmpDir } from './qmp-helpers';

for (const transport of ['unix', 'tcp'] as const) {
  describe(`qmp client over ${transport}`, function () {
    let dir: string;
    let server: QmpServer;
    let addr: QmpAddress;
    const clients: QmpClient[] = [];

    async function connect(opts = {}): Promise<QmpClient> {
      const c = await QmpClient.connect(addr, opts);
      clients.push(c);
      return c;
    }

    beforeEach(async function () {
      dir = tmpDir('ferry-qmpc-');
      server = new QmpServer();
      server.register<{ a: number; b: number }>({ name: 'add', args: { a: 'int', b: 'int' }, handler: (x) => x.a + x.b });
      server.register({
        name: 'stop',
        handler: () => {
          server.emitEvent('STOP');
        },
      });
      server.register<{ n: number }>({
        name: 'events',
        args: { n: 'int' },
        handler: (x) => {
          for (let i = 0; i < x.n; i++) server.emitEvent('TICK', { i });
        },
      });
      server.register<{ ms: number }>({ name: 'slow', args: { ms: 'int' }, handler: (x) => sleep(x.ms).then(() => 'late') });
      server.register({ name: 'pause', allowOob: true, handler: () => 'oob' });
      addr = await server.listen(transport === 'unix' ? `unix:${path.join(dir, 'q.sock')}` : 'tcp:127.0.0.1:0');
    });
    afterEach(async function () {
      for (const c of clients.splice(0)) c.destroy();
      await server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    });

    it('connects, negotiates and executes (string address form too)', async function () {
      const c = await QmpClient.connect(addr.type === 'unix' ? `unix:${addr.path}` : `tcp:127.0.0.1:${addr.port}`);
      clients.push(c);
      assert.deepEqual(c.greeting.QMP.version.qemu, { micro: 22, minor: 2, major: 7 });
      assert.equal(await c.execute('add', { a: 2, b: 40 }), 42);
      assert.deepEqual(await c.execute('query-version'), server.version);
      // Pipelined commands resolve to their own replies.
      const rs = await Promise.all([1, 2, 3, 4, 5].map((i) => c.execute('add', { a: i, b: 0 })));
      assert.deepEqual(rs, [1, 2, 3, 4, 5]);
    });

    it('rejects with QmpError carrying class and desc', async function () {
      const c = await connect();
      const e1 = await c.execute('nosuch').catch((e: unknown) => e);
      assert.ok(e1 instanceof QmpError);
      assert.equal(e1.errorClass, 'CommandNotFound');
      assert.equal(e1.desc, 'The command nosuch has not been found');
      assert.equal(e1.code, 'ERR_QMP_COMMAND');
      assert.equal(e1.command, 'nosuch');
      const e2 = await c.execute('add', { a: 1 }).catch((e: unknown) => e);
      assert.ok(e2 instanceof QmpError);
      assert.equal(e2.desc, "Parameter 'b' is missing");
      assert.equal(await c.execute('add', { a: 1, b: 1 }), 2, 'still usable');
    });

    it('can skip negotiation and negotiate itself; oob execution', async function () {
      const c = await connect({ negotiate: false });
      await assert.rejects(c.execute('add', { a: 1, b: 1 }), (e: QmpError) => e.errorClass === 'CommandNotFound');
      await c.execute('qmp_capabilities', { enable: ['oob'] });
      const slow = c.execute('slow', { ms: 100 });
      assert.equal(await c.execute('pause', undefined, { oob: true }), 'oob');
      assert.equal(await slow, 'late');
    });

    it('emits events and waits for them (predicate, past, timeout)', async function () {
      const c = await connect();
      const seen: string[] = [];
      c.on('event', (ev) => seen.push(ev.event));
      const stop = c.waitEvent('STOP');
      await c.execute('stop');
      const ev = await stop;
      assert.equal(ev.event, 'STOP');
      assert.ok(ev.timestamp.seconds > 1.6e9);
      const third = c.waitEvent('TICK', (e) => e.data?.i === 3, 2000);
      await c.execute('events', { n: 5 });
      assert.deepEqual((await third).data, { i: 3 });
      assert.deepEqual((await c.waitEvent('TICK', (e) => e.data?.i === 1, 10, { past: true })).data, { i: 1 });
      assert.deepEqual(seen, ['STOP', 'TICK', 'TICK', 'TICK', 'TICK', 'TICK']);
      await assert.rejects(c.waitEvent('NEVER', undefined, 50), (e) => hasCode(e, ERR_QMP_TIMEOUT));
    });

    it('times out a command, and rejects pending work when the server goes away', async function () {
      const c = await connect();
      await assert.rejects(c.execute('slow', { ms: 300 }, { timeoutMs: 20 }), (e) => hasCode(e, ERR_QMP_TIMEOUT));
      const pending = c.execute('slow', { ms: 5000 });
      const waiting = c.waitEvent('NEVER', undefined, 10000);
      const closed = new Promise((r) => c.once('close', r));
      await sleep(20);
      await server.close();
      await assert.rejects(pending, (e) => hasCode(e, ERR_QMP_DISCONNECTED));
      await assert.rejects(waiting, (e) => hasCode(e, ERR_QMP_DISCONNECTED));
      await closed;
      assert.equal(c.closed, true);
      await assert.rejects(c.execute('add', { a: 1, b: 1 }), (e) => hasCode(e, ERR_QMP_DISCONNECTED));
    });

    it('close() ends the connection; the server forgets the client', async function () {
      const c = await connect();
      assert.equal(server.clients.length, 1);
      await c.close();
      for (let i = 0; i < 100 && server.clients.length > 0; i++) await sleep(5);
      assert.equal(server.clients.length, 0);
    });
  });
}

describe('qmp client: connection failures', function () {
  it('rejects when nothing listens (the cause names the errno)', async function () {
    const dir = tmpDir('ferry-qmpc-');
    try {
      const e = await QmpClient.connect(`unix:${path.join(dir, 'none.sock')}`).catch((x: unknown) => x);
      assert.ok(e instanceof Error);
      assert.equal((e as { code?: string }).code, 'ENOENT');
    } finally {
      fs.rmSync(dir, { recursive: true, force: true });
    }
  });

  it('times out when the peer never greets', async function () {
    const net = await import('node:net');
    const silent = net.createServer(() => {});
    await new Promise<void>((r) => silent.listen(0, '127.0.0.1', r));
    const port = (silent.address() as { port: number }).port;
    try {
      await assert.rejects(QmpClient.connect(`tcp:127.0.0.1:${port}`, { timeoutMs: 100 }), (e) => hasCode(e, ERR_QMP_TIMEOUT));
    } finally {
      silent.close();
    }
  });
});

const HAVE_QEMU = spawnSync('sh', ['-c', 'command -v qemu-system-x86_64']).status === 0;

describe(HAVE_QEMU ? 'qmp client against QEMU 7.2' : 'qmp client against QEMU 7.2 (skipped: qemu-system-x86_64 missing)', function () {
  let dir: string;
  let qemu: ChildProcess | undefined;

  before(function () {
    if (!HAVE_QEMU) this.skip();
    dir = tmpDir('ferry-qmpq-');
  });
  after(function () {
    qemu?.kill('SIGKILL');
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  it('negotiates, queries, sees STOP/RESUME and QEMU error classes', async function () {
    const sock = path.join(dir, 'qemu.sock');
    qemu = spawn('qemu-system-x86_64', ['-M', 'none', '-m', '16M', '-nodefaults', '-display', 'none', '-qmp', `unix:${sock},server=on,wait=off`], {
      stdio: 'ignore',
    });
    for (let i = 0; i < 200 && !fs.existsSync(sock); i++) await sleep(25);
    const c = await QmpClient.connect(`unix:${sock}`);
    try {
      assert.deepEqual(c.greeting.QMP.version.qemu, { micro: c.greeting.QMP.version.qemu.micro, minor: 2, major: 7 });
      assert.deepEqual(c.greeting.QMP.capabilities, ['oob']);
      const status = await c.execute<{ status: string }>('query-status');
      assert.equal(typeof status.status, 'string');
      const stop = c.waitEvent('STOP', undefined, 5000);
      assert.deepEqual(await c.execute('stop'), {});
      await stop;
      const resume = c.waitEvent('RESUME', undefined, 5000);
      await c.execute('cont');
      await resume;
      const e = await c.execute('pmemsave', { val: 'a', size: 1, filename: 'x' }).catch((x: unknown) => x);
      assert.ok(e instanceof QmpError);
      assert.equal(e.desc, "Invalid parameter type for 'val', expected: integer");
      const quit = new Promise((r) => c.once('close', r));
      await c.execute('quit').catch(() => undefined);
      await quit;
    } finally {
      c.destroy();
    }
  });
});
