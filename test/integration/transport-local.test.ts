/**
 * Transports end to end inside one process: real sockets, files, pipes and child commands.
 * Each round trip sends 64 MiB of pseudo-random data with backpressure and compares sha256.
 */
import assert from 'node:assert/strict';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import type { Readable, Writable } from 'node:stream';
import {
  type IncomingChannel,
  type IncomingListener,
  MigrationTransportError,
  type OutgoingChannel,
  connectOutgoing,
  formatMigrationAddress,
  listenIncoming,
  parseChannels,
  parseMigrationUri,
} from '../../lib/transport';
import { collectText, receiveAll, sendPattern } from '../../lib/transport/tool';

const MiB = 1024 * 1024;
const SIZE = 64 * MiB;

/** Rejects if `p` has not settled within ms (so a hang fails the test with a reason). */
function deadline<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  return new Promise<T>((resolve, reject) => {
    const t = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    p.then(
      (v) => (clearTimeout(t), resolve(v)),
      (e: unknown) => (clearTimeout(t), reject(e)),
    );
  });
}

async function expectTransportError(p: Promise<unknown>, check: (e: MigrationTransportError) => void): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof MigrationTransportError, `not a MigrationTransportError: ${String(err)}`);
    assert.equal(err.code, 'ERR_MIGRATION_TRANSPORT');
    check(err);
    return true;
  });
}

async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r));
  const port = (s.address() as net.AddressInfo).port;
  await new Promise<void>((r) => s.close(() => r()));
  return port;
}

interface RoundTrip {
  mbps: number;
  returnPath: string | undefined;
}

/**
 * Sends SIZE bytes from `out` to `inc`; the destination answers PONG at once and SHA after EOF
 * on the return path when there is one. Checks byte count and sha256.
 */
async function roundTrip(out: OutgoingChannel, inc: IncomingChannel, seed: string, size = SIZE): Promise<RoundTrip> {
  const rpText = out.returnPath ? collectText(out.returnPath) : Promise.resolve(undefined);
  if (inc.returnPath) inc.returnPath.write('PONG\n');
  const got = receiveAll(inc.stream);
  const t0 = process.hrtime.bigint();
  const sent = await sendPattern(out.stream, size, seed);
  await out.finish();
  const r = await got;
  const seconds = Number(process.hrtime.bigint() - t0) / 1e9;
  assert.equal(r.bytes, size);
  assert.equal(r.sha256, sent);
  if (inc.returnPath) inc.returnPath.write(`SHA ${r.sha256}\n`);
  await inc.finish();
  await Promise.all([inc.close(), out.close()]);
  const text = await rpText;
  if (out.returnPath) assert.equal(text, `PONG\nSHA ${sent}\n`);
  return { mbps: size / MiB / seconds, returnPath: text };
}

async function listenAndConnect(uri: string): Promise<{ l: IncomingListener; out: OutgoingChannel; inc: IncomingChannel }> {
  const l = await listenIncoming(parseMigrationUri(uri));
  const [out, inc] = await Promise.all([connectOutgoing(l.address), l.accept()]);
  return { l, out, inc };
}

function hasIPv6Loopback(): boolean {
  return Object.values(os.networkInterfaces()).some((list) => list?.some((i) => i.address === '::1'));
}

describe('transport: in one process', () => {
  let tmp: string;
  before(() => {
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-transport-'));
  });
  after(() => {
    fs.rmSync(tmp, { recursive: true, force: true });
  });

  describe('transport: tcp (in process)', function () {
    this.timeout(60_000);

    it('tcp:127.0.0.1:0 picks a port, carries 64 MiB intact and the return path back', async () => {
      const { l, out, inc } = await listenAndConnect('tcp:127.0.0.1:0');
      assert.equal(l.address.transport, 'socket');
      assert.ok(l.address.transport === 'socket' && l.address.type === 'inet');
      assert.notEqual(l.address.port, '0');
      assert.equal(l.multiChannel, true);
      assert.equal(out.stream, out.returnPath, 'socket is its own return path');
      assert.equal(inc.stream, inc.returnPath);
      assert.match(inc.describe(), /^tcp:127\.0\.0\.1:\d+ \(peer 127\.0\.0\.1:\d+\)$/);
      assert.equal((out.stream as net.Socket).writableHighWaterMark, 2 * MiB);
      const r = await roundTrip(out, inc, 'tcp4');
      console.log(`      tcp 127.0.0.1: ${r.mbps.toFixed(0)} MB/s (64 MiB incl. AES pattern + sha256)`);
      await l.close();
    });

    it('tcp with a host name (localhost)', async () => {
      const { l, out, inc } = await listenAndConnect('tcp:localhost:0');
      await roundTrip(out, inc, 'localhost', 8 * MiB);
      await l.close();
    });

    // Not a skip: CI counts skipped tests as failures on KVM machines. Without IPv6 the test
    // checks that the failure is a clear transport error instead.
    const v6 = hasIPv6Loopback();
    it(v6 ? 'tcp:[::1]:0 (IPv6 in brackets)' : 'tcp:[::1]:0 fails clearly (this machine has no IPv6 loopback)', async () => {
      if (!v6) {
        await expectTransportError(listenIncoming('tcp:[::1]:0'), (e) => assert.equal(e.op, 'listen'));
        return;
      }
      const { l, out, inc } = await listenAndConnect('tcp:[::1]:0');
      assert.ok(l.address.transport === 'socket' && l.address.type === 'inet' && l.address.host === '::1');
      assert.match(formatMigrationAddress(l.address), /^tcp:\[::1\]:\d+$/);
      await roundTrip(out, inc, 'v6', 8 * MiB);
      await l.close();
    });

    it('the channels form listens and connects like the URI', async () => {
      const l = await listenIncoming(parseChannels([{ 'channel-type': 'main', addr: { transport: 'socket', type: 'inet', host: '127.0.0.1', port: '0' } }]));
      const port = l.address.transport === 'socket' && l.address.type === 'inet' ? l.address.port : '';
      const [out, inc] = await Promise.all([connectOutgoing(`tcp:127.0.0.1:${port}`), l.accept()]);
      await roundTrip(out, inc, 'channels', 1 * MiB);
      await l.close();
    });

    it('to= tries the next port when the first is taken', async () => {
      const blocker = net.createServer();
      await new Promise<void>((r) => blocker.listen(0, '127.0.0.1', r));
      const taken = (blocker.address() as net.AddressInfo).port;
      try {
        const l = await listenIncoming(`tcp:127.0.0.1:${taken},to=${taken + 20}`);
        assert.ok(l.address.transport === 'socket' && l.address.type === 'inet');
        assert.ok(Number(l.address.port) > taken && Number(l.address.port) <= taken + 20);
        await l.close();
        await expectTransportError(listenIncoming(`tcp:127.0.0.1:${taken}`), (e) => {
          assert.equal(e.op, 'listen');
          assert.equal(e.syscallCode, 'EADDRINUSE');
        });
      } finally {
        blocker.close();
      }
    });

    it('ECONNREFUSED is a clear error naming the address', async () => {
      const port = await freePort();
      await expectTransportError(connectOutgoing(`tcp:127.0.0.1:${port}`), (e) => {
        assert.equal(e.op, 'connect');
        assert.equal(e.syscallCode, 'ECONNREFUSED');
        assert.equal(e.address, `tcp:127.0.0.1:${port}`);
        assert.match(e.message, new RegExp(`^migration transport tcp:127\\.0\\.0\\.1:${port}: connect failed: .*ECONNREFUSED`));
        assert.equal((e.cause as NodeJS.ErrnoException).code, 'ECONNREFUSED');
      });
      await expectTransportError(connectOutgoing('tcp:127.0.0.1:0'), (e) => assert.match(e.message, /port 0 is only meaningful when listening/));
    });

    it('source destroyed mid-transfer: the destination ends early and its return path fails, not a hang', async () => {
      const { l, out, inc } = await listenAndConnect('tcp:127.0.0.1:0');
      const got = receiveAll(inc.stream).catch((e: unknown) => e);
      const sending = sendPattern(out.stream, SIZE, 'cut', (n) => {
        if (n >= 8 * MiB) out.destroy(new Error('cancelled'));
      }).catch((e: unknown) => e);
      // destroy() resets the connection: Linux hands the reader an early EOF (or ECONNRESET),
      // and the next return-path write fails with ECONNRESET.
      const r = await deadline(got, 10_000, 'destination noticing the reset');
      if (!(r instanceof Error)) assert.ok((r as { bytes: number }).bytes < SIZE, 'stream ended early');
      else assert.equal((r as NodeJS.ErrnoException).code, 'ECONNRESET');
      assert.ok((await sending) instanceof Error, 'sender stopped with an error');
      assert.equal(out.error?.message, 'cancelled');
      const rpErr = await deadline(
        new Promise<Error | null | undefined>((resolve) => inc.returnPath!.write('PONG', resolve)),
        5000,
        'return-path write failing',
      );
      assert.ok(rpErr, 'return-path write fails');
      assert.ok(['ECONNRESET', 'EPIPE'].includes(String((rpErr as NodeJS.ErrnoException).code)), String(rpErr));
      await deadline(Promise.all([out.onceClosed, inc.close()]), 5000, 'both ends closed');
      await l.close();
    });

    it('destination destroyed mid-transfer: the source write fails, not a hang', async () => {
      const { l, out, inc } = await listenAndConnect('tcp:127.0.0.1:0');
      let received = 0;
      inc.stream.on('data', (c: Buffer) => {
        received += c.length;
        if (received >= 4 * MiB) inc.destroy();
      });
      await assert.rejects(deadline(sendPattern(out.stream, SIZE, 'cut2'), 10_000, 'source noticing'), (err: NodeJS.ErrnoException) => {
        assert.ok(['ECONNRESET', 'EPIPE'].includes(String(err.code)), String(err.code));
        return true;
      });
      await expectTransportError(out.finish(), (e) => assert.equal(e.op, 'write'));
      await out.close();
      await l.close();
    });

    it('nextConnection() hands out later connections; close() rejects waiters', async () => {
      const l = await listenIncoming('tcp:127.0.0.1:0');
      const c1 = await connectOutgoing(l.address);
      const c2 = await connectOutgoing(l.address);
      const main = await l.accept();
      assert.equal(await l.accept(), main, 'accept() is memoised');
      const second = await l.nextConnection();
      c1.stream.write('main');
      c2.stream.write('preempt');
      const read = (s: Readable) => new Promise<string>((r) => s.once('data', (d: Buffer) => r(d.toString())));
      assert.equal(await read(main.stream), 'main');
      assert.equal(await read(second.stream), 'preempt');
      const waiting = l.nextConnection();
      await l.close();
      await expectTransportError(waiting, (e) => assert.match(e.message, /listener closed/));
      // Channels handed out outlive the listener.
      c1.stream.write('still');
      assert.equal(await read(main.stream), 'still');
      for (const c of [c1, c2, main, second]) c.destroy();
    });

    it('an AbortSignal cancels accept and destroys channels', async () => {
      const ac = new AbortController();
      const l = await listenIncoming('tcp:127.0.0.1:0', { signal: ac.signal });
      const pending = l.accept();
      ac.abort();
      await expectTransportError(pending, (e) => assert.match(e.message, /aborted/));
      await expectTransportError(listenIncoming('tcp:127.0.0.1:0', { signal: ac.signal }), (e) => assert.equal(e.op, 'listen'));
      await expectTransportError(connectOutgoing('tcp:127.0.0.1:1', { signal: ac.signal }), (e) => assert.equal(e.op, 'connect'));

      const l2 = await listenIncoming('tcp:127.0.0.1:0');
      const ac2 = new AbortController();
      const out = await connectOutgoing(l2.address, { signal: ac2.signal });
      const inc = await l2.accept();
      ac2.abort();
      await deadline(out.onceClosed, 5000, 'aborted channel closing');
      assert.equal(out.stream.destroyed, true);
      inc.destroy();
      await l2.close();
    });
  });

  describe('transport: unix (in process)', function () {
    this.timeout(60_000);

    it('carries 64 MiB intact with the return path; removes its socket file on close', async () => {
      const p = path.join(tmp, 'mig.sock');
      const { l, out, inc } = await listenAndConnect(`unix:${p}`);
      assert.ok(fs.lstatSync(p).isSocket());
      const r = await roundTrip(out, inc, 'unix');
      console.log(`      unix: ${r.mbps.toFixed(0)} MB/s (64 MiB incl. AES pattern + sha256)`);
      await l.close();
      assert.equal(fs.existsSync(p), false, 'socket file removed');
    });

    it('replaces a stale socket file, refuses a live one and a regular file', async () => {
      const p = path.join(tmp, 'stale.sock');
      // A stale socket: bound by a server that is gone without unlinking (as after SIGKILL).
      const fd = fs.openSync(p, 'w');
      fs.closeSync(fd);
      await expectTransportError(listenIncoming(`unix:${p}`), (e) => {
        assert.equal(e.syscallCode, 'EADDRINUSE');
        assert.match(e.message, /exists and is not a socket/);
      });
      fs.unlinkSync(p);
      const l1 = await listenIncoming(`unix:${p}`);
      await expectTransportError(listenIncoming(`unix:${p}`), (e) => assert.match(e.message, /another process is listening/));
      // Make it stale: close the listening fd but keep the file (simulate a crashed listener).
      const ino = fs.lstatSync(p).ino;
      fs.renameSync(p, `${p}.keep`);
      await l1.close();
      fs.renameSync(`${p}.keep`, p);
      assert.equal(fs.lstatSync(p).ino, ino);
      const l2 = await listenIncoming(`unix:${p}`);
      const [out, inc] = await Promise.all([connectOutgoing(`unix:${p}`), l2.accept()]);
      await roundTrip(out, inc, 'stale', 1 * MiB);
      await l2.close();
    });

    it('abstract socket from the channels form', async () => {
      const name = `ferry-test-${process.pid}-${Date.now()}`;
      const addr = parseChannels([{ 'channel-type': 'main', addr: { transport: 'socket', type: 'unix', path: name, abstract: true } }]);
      const l = await listenIncoming(addr);
      const [out, inc] = await Promise.all([connectOutgoing(addr), l.accept()]);
      await roundTrip(out, inc, 'abstract', 1 * MiB);
      await l.close();
    });

    it('ENOENT on connect names the path', async () => {
      const p = path.join(tmp, 'nobody.sock');
      await expectTransportError(connectOutgoing(`unix:${p}`), (e) => {
        assert.equal(e.syscallCode, 'ENOENT');
        assert.ok(e.message.startsWith(`migration transport unix:${p}: connect failed:`), e.message);
      });
    });

    it('source destroyed mid-transfer: the destination sees the stream end early, not a hang', async () => {
      const p = path.join(tmp, 'cut.sock');
      const { l, out, inc } = await listenAndConnect(`unix:${p}`);
      const got = receiveAll(inc.stream);
      void sendPattern(out.stream, SIZE, 'cut', (n) => {
        if (n >= 8 * MiB) out.destroy();
      }).catch(() => undefined);
      // Unix sockets have no reset: the peer sees EOF; the stream parser above finds it short.
      const r = await deadline(got, 10_000, 'destination noticing');
      assert.ok(r.bytes < SIZE && r.bytes >= 4 * MiB, `received ${r.bytes}`);
      await inc.close();
      await l.close();
    });
  });

  describe('transport: file (in process)', function () {
    this.timeout(60_000);

    it('file:PATH,offset=1M writes after the offset (O_TRUNC first) and reads back from it', async () => {
      const f = path.join(tmp, 'stream.bin');
      fs.writeFileSync(f, Buffer.alloc(3 * MiB, 0xaa)); // must be truncated away
      const out = await connectOutgoing(`file:${f},offset=1M`);
      assert.equal(out.returnPath, undefined);
      const sent = await sendPattern(out.stream, SIZE, 'file');
      await out.finish();
      await out.close();
      const st = fs.statSync(f);
      assert.equal(st.size, MiB + SIZE);
      const head = Buffer.alloc(MiB);
      const fd = fs.openSync(f, 'r');
      fs.readSync(fd, head, 0, MiB, 0);
      fs.closeSync(fd);
      assert.ok(head.every((b) => b === 0), 'bytes before the offset are zero (file was truncated)');

      const l = await listenIncoming(parseChannels([{ 'channel-type': 'main', addr: { transport: 'file', filename: f, offset: MiB } }]));
      assert.equal(l.multiChannel, false);
      const inc = await l.accept();
      assert.equal(inc.returnPath, undefined);
      const hwm = inc.stream.readableHighWaterMark;
      assert.equal(hwm, 2 * MiB, 'streamed in 2 MiB chunks');
      let biggest = 0;
      inc.stream.on('data', (c: Buffer) => (biggest = Math.max(biggest, c.length)));
      const r = await receiveAll(inc.stream);
      assert.equal(r.bytes, SIZE);
      assert.equal(r.sha256, sent);
      assert.ok(biggest <= 2 * MiB);
      await inc.finish();
      await inc.close();
      await expectTransportError(l.nextConnection(), (e) => assert.match(e.message, /single channel/));
      await l.close();
    });

    it('a new file is created with mode 0600', async () => {
      const f = path.join(tmp, 'new.bin');
      const out = await connectOutgoing(`file:${f}`);
      await sendPattern(out.stream, 1000, 'small');
      await out.finish();
      assert.equal(fs.statSync(f).mode & 0o777, 0o600);
      assert.equal(fs.statSync(f).size, 1000);
    });

    it('ENOENT on the destination, EISDIR/ENOENT on the source', async () => {
      const missing = path.join(tmp, 'missing.bin');
      await expectTransportError(listenIncoming(`file:${missing}`), (e) => {
        assert.equal(e.op, 'open');
        assert.equal(e.syscallCode, 'ENOENT');
        assert.ok(e.message.includes(`file:${missing}`));
      });
      await expectTransportError(connectOutgoing(`file:${path.join(tmp, 'no/such/dir/x')}`), (e) => assert.equal(e.syscallCode, 'ENOENT'));
      await expectTransportError(connectOutgoing(`file:${tmp}`), (e) => assert.equal(e.syscallCode, 'EISDIR'));
    });
  });

  describe('transport: fd (in process)', function () {
    this.timeout(60_000);

    it('fd:NUMBER on regular files, both directions; the channel closes the fd', async () => {
      const f = path.join(tmp, 'fd.bin');
      const wfd = fs.openSync(f, 'w');
      const out = await connectOutgoing(`fd:${wfd}`);
      const sent = await sendPattern(out.stream, SIZE, 'fdfile');
      await out.finish();
      await out.close();
      assert.throws(() => fs.fstatSync(wfd), { code: 'EBADF' });
      const rfd = fs.openSync(f, 'r');
      const l = await listenIncoming(`fd:${rfd}`);
      const inc = await l.accept();
      const r = await receiveAll(inc.stream);
      assert.equal(r.sha256, sent);
      await inc.close();
      assert.throws(() => fs.fstatSync(rfd), { code: 'EBADF' });
    });

    it('fd:NAME goes through lookupFd; unknown names and bad fds are clear errors', async () => {
      const f = path.join(tmp, 'named.bin');
      const table = new Map<string, number>([['migout', fs.openSync(f, 'w')]]);
      const lookupFd = (name: string) => table.get(name);
      const out = await connectOutgoing('fd:migout', { lookupFd });
      const sent = await sendPattern(out.stream, 4 * MiB, 'named');
      await out.finish();
      await out.close();
      table.set('migin', fs.openSync(f, 'r'));
      const inc = await (await listenIncoming('fd:migin', { lookupFd })).accept();
      assert.equal((await receiveAll(inc.stream)).sha256, sent);
      await inc.close();

      await expectTransportError(connectOutgoing('fd:nosuch', { lookupFd }), (e) => {
        assert.equal(e.message, "migration transport fd:nosuch: open failed: File descriptor named 'nosuch' has not been found");
      });
      await expectTransportError(connectOutgoing('fd:nosuch'), (e) => assert.match(e.message, /has not been found/));
      await expectTransportError(connectOutgoing('fd:987654'), (e) => {
        assert.equal(e.syscallCode, 'EBADF');
        assert.match(e.message, /^migration transport fd:987654: open failed:/);
      });
    });
  });

  describe('transport: exec (in process)', function () {
    this.timeout(60_000);

    it("exec:cat > FILE as the sink and exec:cat FILE as the source carry 64 MiB", async () => {
      const f = path.join(tmp, 'exec.bin');
      const out = await connectOutgoing(`exec:cat > '${f}'`);
      assert.equal(out.returnPath, undefined);
      const sent = await sendPattern(out.stream, SIZE, 'exec');
      await out.finish(); // the child has exited 0 here
      assert.equal(fs.statSync(f).size, SIZE);
      await out.close();
      const l = await listenIncoming(`exec:cat '${f}'`);
      const inc = await l.accept();
      const r = await receiveAll(inc.stream);
      assert.equal(r.sha256, sent);
      await inc.finish();
      await inc.close();
    });

    it('the channels form runs args without a shell', async () => {
      const f = path.join(tmp, 'args.bin');
      fs.writeFileSync(f, 'hello exec');
      const l = await listenIncoming(parseChannels([{ 'channel-type': 'main', addr: { transport: 'exec', args: ['/bin/cat', f] } }]));
      const inc = await l.accept();
      const text = await collectText(inc.stream);
      assert.equal(text, 'hello exec');
      await inc.finish();
    });

    it('a source command exiting non-zero after the whole stream is reported by finish()', async () => {
      const out = await connectOutgoing('exec:cat > /dev/null; exit 3');
      await sendPattern(out.stream, 4 * MiB, 'x');
      await expectTransportError(out.finish(), (e) => {
        assert.equal(e.op, 'exec');
        assert.equal(e.message, "migration transport exec:cat > /dev/null; exit 3: exec failed: command exited with status 3");
      });
      await out.close();
    });

    it('a source command dying early fails the stream with its status (not EPIPE alone)', async () => {
      const out = await connectOutgoing(`exec:exec 2>/dev/null; cat > '${path.join(tmp, 'no/such/dir/f')}'`);
      const err = await deadline(
        sendPattern(out.stream, SIZE, 'x').then(
          () => undefined,
          (e: unknown) => e,
        ),
        10_000,
        'write failing',
      );
      assert.ok(err instanceof MigrationTransportError, String(err));
      assert.match(err.message, /command exited with status \d+ before reading the whole stream \(write EPIPE\)$/);
      await out.close();
    });

    it('a destination command exiting non-zero errors the stream after its data', async () => {
      const l = await listenIncoming('exec:head -c 100000 /dev/zero; exit 2');
      const inc = await l.accept();
      let bytes = 0;
      inc.stream.on('data', (c: Buffer) => (bytes += c.length));
      await assert.rejects(receiveAll(inc.stream), (e: unknown) => {
        assert.ok(e instanceof MigrationTransportError);
        assert.match(e.message, /command exited with status 2$/);
        return true;
      });
      assert.equal(bytes, 100000);
      await expectTransportError(inc.finish(), (e) => assert.match(e.message, /status 2/));
      await inc.close();
    });

    it('spawn failure (channels form, missing program) is ERR_MIGRATION_TRANSPORT', async () => {
      const addr = parseChannels([{ 'channel-type': 'main', addr: { transport: 'exec', args: ['/nonexistent/ferry-sink'] } }]);
      await expectTransportError(connectOutgoing(addr), (e) => {
        assert.equal(e.op, 'spawn');
        assert.equal(e.syscallCode, 'ENOENT');
        assert.ok(e.message.startsWith('migration transport exec:/nonexistent/ferry-sink: spawn failed:'), e.message);
      });
      await expectTransportError(listenIncoming(addr), (e) => assert.equal(e.op, 'spawn'));
    });

    it('destroy() kills a child that does not read (and does not wait for its grandchildren)', async () => {
      const out = await connectOutgoing('exec:sleep 8; sleep 8');
      const w: Writable = out.stream;
      w.write(Buffer.alloc(4 * MiB));
      out.destroy();
      await deadline(out.onceClosed, 5000, 'child killed');
    });
  });

  describe('transport: resources', function () {
    this.timeout(60_000);

    const openFds = () => fs.readdirSync('/proc/self/fd').length;

    it('leaks no fds across connect/accept/close cycles of every transport', async () => {
      const cycle = async () => {
        const sock = path.join(tmp, 'leak.sock');
        for (const uri of ['tcp:127.0.0.1:0', `unix:${sock}`]) {
          const l = await listenIncoming(uri);
          const [out, inc] = await Promise.all([connectOutgoing(l.address), l.accept()]);
          await roundTrip(out, inc, 'leak', 64 * 1024);
          await l.close();
        }
        const f = path.join(tmp, 'leak.bin');
        const out = await connectOutgoing(`file:${f}`);
        await sendPattern(out.stream, 64 * 1024, 'leak');
        await out.close();
        const inc = await (await listenIncoming(`file:${f}`)).accept();
        await receiveAll(inc.stream);
        await inc.close();
        const eo = await connectOutgoing('exec:cat > /dev/null');
        await sendPattern(eo.stream, 64 * 1024, 'leak');
        await eo.close();
        const ei = await (await listenIncoming(`exec:cat '${f}'`)).accept();
        await receiveAll(ei.stream);
        await ei.close();
        // Failures release what they opened too.
        await connectOutgoing(`unix:${path.join(tmp, 'none.sock')}`).catch(() => undefined);
        await listenIncoming(`file:${path.join(tmp, 'none.bin')}`).catch(() => undefined);
        // Unused single-channel listeners close their source.
        await (await listenIncoming(`file:${f}`)).close();
      };
      await cycle(); // warm-up: lazily created fds (epoll, signalfd for children, ...)
      await new Promise((r) => setTimeout(r, 50));
      const before = openFds();
      for (let i = 0; i < 5; i++) await cycle();
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(openFds(), before);
    });
  });
});
