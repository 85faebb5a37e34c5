// FdPoller + recvWithFds/sendWithFds over a real unix socket, as the QMP
// server uses them for `getfd` (a fd sent with SCM_RIGHTS next to the JSON).
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { native, type Binding, type FdPoller, type NativeError } from '../../lib/native';

// A net.Socket's underlying fd (no public API for it).
function fdOf(s: net.Socket): number {
  const fd = (s as unknown as { _handle?: { fd?: number } })._handle?.fd;
  assert.ok(typeof fd === 'number' && fd >= 0, 'socket has an fd');
  return fd;
}

function errOf(fn: () => unknown): NativeError {
  try {
    fn();
  } catch (e) {
    return e as NativeError;
  }
  assert.fail('expected a throw');
}

describe('native: fdio (FdPoller, recvWithFds, sendWithFds, constants)', function () {
  let b: Binding;
  let dir: string;
  let server: net.Server;
  let serverSide: net.Socket;
  let clientSide: net.Socket;
  const pollers: FdPoller[] = [];

  before(function () {
    b = native();
    dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-fdio-'));
  });
  after(function () {
    fs.rmSync(dir, { recursive: true, force: true });
  });

  // A connected pair: the server side paused (pauseOnConnect) so only our poller reads it.
  beforeEach(async function () {
    const sock = path.join(dir, `s${Math.random().toString(36).slice(2)}.sock`);
    server = net.createServer({ pauseOnConnect: true });
    await new Promise<void>((r) => server.listen(sock, r));
    const accepted = new Promise<net.Socket>((r) => server.once('connection', r));
    clientSide = net.connect(sock);
    await new Promise<void>((r) => clientSide.once('connect', () => r()));
    serverSide = await accepted;
  });
  afterEach(async function () {
    for (const p of pollers.splice(0)) p.close();
    clientSide.destroy();
    serverSide.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  });

  function poll(fd: number, onReadable: () => void): FdPoller {
    const p = new b.FdPoller(fd);
    pollers.push(p);
    p.start(b.constants.UV_READABLE, (status, events) => {
      assert.equal(status, 0);
      if (events & b.constants.UV_READABLE) onReadable();
    });
    return p;
  }

  /** Collect messages from the server side until `count` fds and `bytes` bytes arrived. */
  function receive(bytes: number, fdCount: number): Promise<{ data: Buffer; fds: number[]; reads: number }> {
    return new Promise((resolve, reject) => {
      const chunks: Buffer[] = [];
      const fds: number[] = [];
      let reads = 0;
      const buf = Buffer.alloc(64 * 1024);
      const p = poll(fdOf(serverSide), () => {
        try {
          for (;;) {
            const r = b.recvWithFds(fdOf(serverSide), buf);
            if (r === null) break;
            reads++;
            assert.equal(r.truncated, undefined);
            chunks.push(Buffer.from(buf.subarray(0, r.bytes)));
            fds.push(...r.fds);
            if (r.bytes === 0) break;
          }
          const data = Buffer.concat(chunks);
          if (data.length >= bytes && fds.length >= fdCount) {
            p.stop();
            resolve({ data, fds, reads });
          }
        } catch (e) {
          reject(e);
        }
      });
    });
  }

  it('receives bytes and a file fd sent with SCM_RIGHTS (same inode)', async function () {
    const file = path.join(dir, 'shared.bin');
    fs.writeFileSync(file, 'payload');
    const sent = fs.openSync(file, 'r');
    try {
      const msg = Buffer.from('{"execute":"getfd","arguments":{"fdname":"f"}}\n');
      const got = receive(msg.length, 1);
      assert.equal(b.sendWithFds(fdOf(clientSide), msg, [sent]), msg.length);
      const r = await got;
      assert.equal(r.data.toString(), msg.toString());
      assert.equal(r.fds.length, 1);
      const fd = r.fds[0];
      try {
        assert.notEqual(fd, sent);
        assert.equal(fs.fstatSync(fd).ino, fs.fstatSync(sent).ino);
        assert.equal(fs.fstatSync(fd).dev, fs.fstatSync(sent).dev);
        const rd = Buffer.alloc(7);
        assert.equal(fs.readSync(fd, rd, 0, 7, 0), 7);
        assert.equal(rd.toString(), 'payload');
        // FD_CLOEXEC from MSG_CMSG_CLOEXEC: check through /proc (no fcntl in Node).
        const flags = fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8').match(/flags:\s+(\d+)/);
        assert.ok(flags && (parseInt(flags[1], 8) & 0o2000000) !== 0, 'O_CLOEXEC set');
      } finally {
        fs.closeSync(fd);
      }
    } finally {
      fs.closeSync(sent);
    }
  });

  it('several fds in one message, then plain bytes; replies written with socket.write still arrive', async function () {
    const files = [0, 1, 2].map((i) => {
      const f = path.join(dir, `f${i}`);
      fs.writeFileSync(f, String(i));
      return fs.openSync(f, 'r');
    });
    try {
      const got = receive(6, 3);
      assert.equal(b.sendWithFds(fdOf(clientSide), Buffer.from('abc'), files), 3);
      assert.equal(b.sendWithFds(fdOf(clientSide), Buffer.from('def'), []), 3);
      const r = await got;
      assert.equal(r.data.toString(), 'abcdef');
      assert.deepEqual(
        r.fds.map((f) => fs.fstatSync(f).ino),
        files.map((f) => fs.fstatSync(f).ino),
      );
      r.fds.forEach((f) => fs.closeSync(f));
      // The server writes through Node while our poller (on a dup) watches the same socket.
      const reply = new Promise<string>((res) => clientSide.once('data', (d) => res(d.toString())));
      const more = receive(2, 0);
      serverSide.write('{"return": {}}\n');
      assert.equal(await reply, '{"return": {}}\n');
      clientSide.write('ok');
      assert.equal((await more).data.toString(), 'ok');
    } finally {
      files.forEach((f) => fs.closeSync(f));
    }
  });

  it('recvWithFds returns null when nothing is pending and bytes 0 at EOF', async function () {
    assert.equal(b.recvWithFds(fdOf(serverSide), Buffer.alloc(16)), null);
    const got = receive(0, 0);
    clientSide.end();
    const r = await got;
    assert.equal(r.data.length, 0);
    assert.equal(r.reads, 1);
  });

  it('sendWithFds rejects fds with empty data and bad fds keep their errno', function () {
    const e = errOf(() => b.sendWithFds(fdOf(clientSide), Buffer.alloc(0), [0]));
    assert.equal(e.code, 'ERR_INVALID_ARG_VALUE');
    const bad = errOf(() => b.sendWithFds(fdOf(clientSide), Buffer.from('x'), [987654]));
    assert.equal(bad.code, 'EBADF');
    assert.equal(bad.errno, -9);
    assert.equal(bad.syscall, 'sendmsg');
    const notSock = fs.openSync(__filename, 'r');
    try {
      const r = errOf(() => b.recvWithFds(notSock, Buffer.alloc(4)));
      assert.equal(r.code, 'ENOTSOCK');
      assert.equal(r.syscall, 'recvmsg');
    } finally {
      fs.closeSync(notSock);
    }
  });

  it('FdPoller: stop() silences callbacks; close() is idempotent; start after close is EBADF', async function () {
    let calls = 0;
    const p = poll(fdOf(serverSide), () => {
      calls++;
      p.stop(); // level-triggered: data stays unread, so stop or it fires again
    });
    assert.ok(p.fd >= 0 && p.fd !== fdOf(serverSide), 'polls its own dup');
    clientSide.write('x');
    for (let i = 0; i < 50 && calls === 0; i++) await new Promise((r) => setTimeout(r, 5));
    assert.equal(calls, 1);
    await new Promise((r) => setTimeout(r, 30));
    assert.equal(calls, 1, 'no callbacks after stop()');
    p.close();
    p.close();
    assert.equal(p.fd, -1);
    const e = errOf(() => p.start(1, () => {}));
    assert.equal(e.code, 'EBADF');
    assert.equal(e.errno, -9);
  });

  it('FdPoller leaks no fds: closed pollers (also from inside their callback) release their dup', async function () {
    const count = () => fs.readdirSync('/proc/self/fd').length;
    const before = count();
    for (let i = 0; i < 20; i++) new b.FdPoller(fdOf(serverSide)).close();
    let closedInside = false;
    const p = new b.FdPoller(fdOf(serverSide));
    p.start(b.constants.UV_READABLE, () => {
      p.close();
      closedInside = true;
    });
    clientSide.write('x');
    for (let i = 0; i < 50 && !closedInside; i++) await new Promise((r) => setTimeout(r, 5));
    assert.ok(closedInside);
    await new Promise((r) => setImmediate(r)); // uv_close callbacks run on the next loop turn
    assert.equal(count(), before);
  });

  it('FdPoller on a regular file fails with the errno of epoll (EPERM)', function () {
    const fd = fs.openSync(__filename, 'r');
    try {
      const e = errOf(() => new b.FdPoller(fd));
      assert.equal(e.code, 'EPERM');
      assert.equal(e.syscall, 'uv_poll_init');
    } finally {
      fs.closeSync(fd);
    }
  });

  it('PageSplicer: only a non-blocking unix stream socket; a closed fd keeps its errno; close() is idempotent', function () {
    const file = fs.openSync(__filename, 'r');
    try {
      const e = errOf(() => new b.PageSplicer(file));
      assert.equal(e.code, 'ERR_SPLICE_UNSUPPORTED');
    } finally {
      fs.closeSync(file);
    }
    const blocking = fs.openSync(__filename, 'r'); // a number that is surely closed below
    fs.closeSync(blocking);
    const bad = errOf(() => new b.PageSplicer(blocking));
    assert.equal(bad.code, 'EBADF');
    assert.equal(bad.syscall, 'getsockopt');
    const p = poll(fdOf(clientSide), () => undefined); // its dup is O_NONBLOCK, as FdSink's is
    const sp = new b.PageSplicer(p.fd);
    assert.equal(sp.unsent(), 0);
    sp.close();
    sp.close();
    assert.equal(errOf(() => sp.unsent()).code, 'ERR_SPLICER_CLOSED');
    const mem = new b.GuestMemory(4096);
    try {
      assert.equal(errOf(() => mem.sendPageRecords(p.fd, 0, 0, 1, 8192, Buffer.alloc(8192), true, sp)).code, 'ERR_SPLICER_CLOSED');
    } finally {
      mem.close();
    }
  });

  it('an exception thrown by the callback reaches uncaughtException (child process)', function () {
    const addon = require.resolve('../../lib/native');
    const script = `
      const { native } = require(${JSON.stringify(addon)});
      process.on('uncaughtException', (e) => { console.log('caught:' + e.message); process.exit(7); });
      const p = new (native().FdPoller)(0);
      p.start(1, () => { throw new Error('boom'); });
    `;
    const r = spawnSync(process.execPath, ['-e', script], { input: 'data on stdin', encoding: 'utf8', timeout: 20000 });
    assert.equal(r.stdout.trim(), 'caught:boom', r.stderr);
    assert.equal(r.status, 7);
  });

  it('constants carry the kernel numbers, including ones newer than the build headers', function () {
    const K = b.constants;
    assert.ok(Object.isFrozen(K));
    assert.equal(K.UFFD_FEATURE_PAGEFAULT_FLAG_WP, 1);
    assert.equal(K.UFFD_FEATURE_THREAD_ID, 1 << 8);
    assert.equal(K.UFFD_FEATURE_WP_UNPOPULATED, 1 << 13);
    assert.equal(K.UFFD_FEATURE_WP_ASYNC, 1 << 15);
    assert.equal(K.UFFD_FEATURE_MOVE, 1 << 16);
    assert.equal(K.UFFDIO_REGISTER_MODE_MISSING, 1);
    assert.equal(K.UFFDIO_REGISTER_MODE_WP, 2);
    assert.equal(K.UFFDIO_REGISTER_MODE_MINOR, 4);
    assert.equal(K.UFFDIO_COPY_MODE_DONTWAKE, 1);
    assert.equal(K.UFFDIO_COPY_MODE_WP, 2);
    assert.equal(K._UFFDIO_COPY, 3);
    assert.equal(K.KVM_MEM_LOG_DIRTY_PAGES, 1);
    assert.equal(K.UV_READABLE, 1);
    assert.equal(K.UV_WRITABLE, 2);
  });
});
