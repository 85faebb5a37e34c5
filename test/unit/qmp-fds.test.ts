// getfd/closefd with real SCM_RIGHTS over a unix socket (native FdPoller + recvWithFds/sendWithFds).
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { QmpClient } from '../../lib/qmp/client';
import { QmpError, type QmpAddress } from '../../lib/qmp/protocol';
import { fdBinding } from '../../lib/qmp/reader';
import { QmpServer } from '../../lib/qmp/server';
import { openFds, sleep, tmpDir } from './qmp-helpers';

const HAVE_FDIO = fdBinding() !== null;

function sameFile(a: number, b: number): boolean {
  const x = fs.fstatSync(a);
  const y = fs.fstatSync(b);
  return x.ino === y.ino && x.dev === y.dev;
}

function isOpen(fd: number): boolean {
  try {
    fs.fstatSync(fd);
    return true;
  } catch {
    return false;
  }
}

describe(HAVE_FDIO ? 'qmp fd passing (getfd/closefd)' : 'qmp fd passing (skipped: native addon with FdPoller/recvWithFds not loadable)', function () {
  let dir: string;
  let server: QmpServer;
  let addr: QmpAddress;
  let files: { path: string; fd: number }[];
  const clients: QmpClient[] = [];

  before(function () {
    if (!HAVE_FDIO) this.skip();
  });

  beforeEach(async function () {
    dir = tmpDir('ferry-qmpfd-');
    server = new QmpServer();
    addr = await server.listen(`unix:${path.join(dir, 'q.sock')}`);
    files = ['a', 'b', 'c'].map((n) => {
      const p = path.join(dir, n);
      fs.writeFileSync(p, n);
      return { path: p, fd: fs.openSync(p, 'r') };
    });
  });
  afterEach(async function () {
    for (const c of clients.splice(0)) c.destroy();
    await server?.close();
    for (const f of files ?? []) fs.closeSync(f.fd);
    if (dir) fs.rmSync(dir, { recursive: true, force: true });
  });

  async function connect(): Promise<QmpClient> {
    const c = await QmpClient.connect(addr);
    clients.push(c);
    return c;
  }

  it('reads unix clients through the native reader', async function () {
    await connect();
    assert.equal(server.clients.length, 1);
    assert.equal(server.clients[0].fdCapable, true);
  });

  it('getfd stores a received fd under its name; takeFd hands it over', async function () {
    const c = await connect();
    await c.sendFd('mig', files[0].fd);
    const fd = server.fds.get('mig');
    assert.ok(fd !== undefined && fd !== files[0].fd);
    assert.ok(sameFile(fd, files[0].fd), 'same open file');
    const got = server.takeFd('mig');
    assert.equal(got, fd);
    assert.equal(server.fds.has('mig'), false);
    assert.equal(server.takeFd('mig'), undefined);
    const buf = Buffer.alloc(1);
    fs.readSync(got!, buf, 0, 1, 0);
    assert.equal(buf.toString(), 'a');
    fs.closeSync(got!);
  });

  it('getfd without an fd, closefd of an unknown name, names starting with a digit: QEMU errors', async function () {
    const c = await connect();
    await assert.rejects(c.execute('getfd', { fdname: 'x' }), (e: QmpError) => e.desc === 'No file descriptor supplied via SCM_RIGHTS');
    await assert.rejects(c.execute('closefd', { fdname: 'x' }), (e: QmpError) => e.desc === "File descriptor named 'x' not found");
    const before = openFds();
    await assert.rejects(c.sendFd('1x', files[0].fd), (e: QmpError) => e.desc === "Parameter 'fdname' expects a name not starting with a digit");
    assert.equal(openFds(), before, 'the refused fd was closed');
  });

  it('closefd closes; getfd on an existing name replaces (closing the old fd)', async function () {
    const c = await connect();
    await c.sendFd('n', files[0].fd);
    const first = server.fds.get('n')!;
    await c.sendFd('n', files[1].fd);
    const second = server.fds.get('n')!;
    assert.ok(sameFile(second, files[1].fd));
    if (first !== second) assert.equal(isOpen(first), false, 'old fd closed');
    await c.execute('closefd', { fdname: 'n' });
    assert.equal(server.fds.has('n'), false);
    assert.equal(isOpen(second), false);
  });

  it('pipelined getfd commands each get their own fd', async function () {
    const c = await connect();
    await Promise.all([c.sendFd('fa', files[0].fd), c.sendFd('fb', files[1].fd), c.sendFd('fc', files[2].fd)]);
    assert.ok(sameFile(server.fds.get('fa')!, files[0].fd));
    assert.ok(sameFile(server.fds.get('fb')!, files[1].fd));
    assert.ok(sameFile(server.fds.get('fc')!, files[2].fd));
  });

  it('an fd sent with a command that does not take it is replaced by a later one (QEMU semantics)', async function () {
    const c = await connect();
    await c.execute('query-version', undefined, { fds: [files[0].fd] });
    await c.sendFd('later', files[1].fd);
    assert.ok(sameFile(server.fds.get('later')!, files[1].fd));
  });

  it('closes unclaimed fds when the client disconnects, and named ones on server.close()', async function () {
    const base = openFds();
    const c = await connect();
    await c.sendFd('keep', files[0].fd);
    await c.execute('query-version', undefined, { fds: [files[1].fd, files[2].fd] });
    c.destroy();
    for (let i = 0; i < 200 && server.clients.length > 0; i++) await sleep(5);
    assert.equal(server.clients.length, 0);
    await sleep(20);
    // Left: the named fd only (the socket and its poller dup are gone).
    assert.equal(openFds(), base + 1);
    const named = server.fds.get('keep')!;
    await server.close();
    assert.equal(isOpen(named), false);
    assert.equal(openFds(), base - 1, 'listening socket closed too');
  });

  it('refuses to send fds over tcp', async function () {
    const tcp = await server.listen('tcp:127.0.0.1:0');
    const c = await QmpClient.connect(tcp);
    clients.push(c);
    assert.equal(server.clients.find((k) => k.transport === 'tcp')?.fdCapable, false);
    await assert.rejects(c.sendFd('x', files[0].fd), /only be sent over a unix socket/);
  });
});
