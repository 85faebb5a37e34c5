import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { buildSample, qemuNone64m, randomBytes } from '../fixtures/stream-samples';

const SCRIPT = path.join(__dirname, '..', '..', 'scripts', 'dump-stream.js');

function dump(args: string[], input?: Buffer) {
  const r = spawnSync(process.execPath, [SCRIPT, ...args], { input, encoding: 'utf8', maxBuffer: 64 << 20 });
  return { code: r.status, out: r.stdout, err: r.stderr };
}

describe('stream dump script', () => {
  let dir: string;
  before(() => (dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-dump-'))));
  after(() => fs.rmSync(dir, { recursive: true, force: true }));

  it('prints a QEMU 7.2 stream from a file, decoding devices through its vmdesc', () => {
    const file = path.join(dir, 'qemu.bin');
    fs.writeFileSync(file, qemuNone64m());
    const { code, out } = dump([file]);
    assert.equal(code, 0);
    assert.match(out, /@0 header: QEVM version 3/);
    assert.match(out, /configuration: machine 'none'/);
    assert.match(out, /START id=2 'ram' instance=0 version=4\n\s+MEM_SIZE total=67108864: 'ram' 67108864/);
    assert.match(out, /block 'ram': 0 pages, 16384 zero pages/);
    assert.match(out, /FULL id=0 'timer' instance=0 version=2\n\s+cpu_ticks_offset = 167972986 \(0xa03107a\)\s+\[int64\]/);
    assert.match(out, /runstate = "running"\s+\[buffer\]/);
    assert.match(out, /@147745 EOF\n@147746 VMDESCRIPTION 486 bytes/);
  });

  it('reads stdin (-), descends into PACKAGED, lists records with --verbose', () => {
    const data = randomBytes(2 * 4096, 3);
    const s = buildSample({ blocks: [{ idstr: 'pc.ram', data }], commands: true, packaged: true, runstate: 'running' });
    const { code, out } = dump(['--verbose', '-'], s.bytes);
    assert.equal(code, 0);
    assert.match(out, /COMMAND PING value=1/);
    assert.match(out, /COMMAND PACKAGED length=\d+\n  \| @\d+ COMMAND POSTCOPY_LISTEN/);
    assert.match(out, /PAGE 'pc.ram' 0x1000/);
    assert.match(out, /\| @\d+ FULL id=4 'globalstate'/);
    assert.match(out, /\| @\d+ COMMAND POSTCOPY_RUN/);
  });

  it('exits 1 with the StreamError message on a broken stream', () => {
    const b = qemuNone64m().subarray(0, 1000);
    const { code, err } = dump(['-'], b);
    assert.equal(code, 1);
    assert.match(err, /dump-stream: stream ended at byte 1000 while reading RAM record header/);
  });
});
