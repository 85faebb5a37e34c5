import assert from 'node:assert/strict';
import {
  CONFIGURATION_VMSD,
  GLOBALSTATE_VMSD,
  SectionParser,
  StreamError,
  StreamReader,
  StreamWriter,
  TIMER_VMSD,
  buildVmdesc,
  describeVmState,
  formatVmdescJson,
  globalState,
  loadVmState,
  runstateOf,
  saveVmState,
  timerState,
  writeDeviceSection,
  type VmState,
  type VmStateDescription,
} from '../../lib/stream';
import { qemuNone64m } from '../fixtures/stream-samples';

// Offsets in the QEMU 7.2 fixture (see dump-stream output): timer FULL, globalstate FULL, EOF, vmdesc.
const TIMER_AT = 147563;
const EOF_AT = 147745;

async function roundTrip(vmsd: VmStateDescription, state: VmState, version = vmsd.version): Promise<{ bytes: Buffer; loaded: VmState }> {
  const w = new StreamWriter();
  saveVmState(w, vmsd, state);
  const bytes = w.toBuffer();
  const r = StreamReader.fromBuffer(bytes);
  const loaded = await loadVmState(r, vmsd, version);
  assert.equal(r.buffered, 0, 'whole encoding consumed');
  return { bytes, loaded };
}

describe('stream vmstate', () => {
  it('re-encodes QEMU 7.2 timer and globalstate sections byte for byte', async () => {
    const q = qemuNone64m();
    const parser = new SectionParser(StreamReader.fromBuffer(q.subarray(TIMER_AT, EOF_AT), TIMER_AT), { header: false, configuration: false });
    const w = new StreamWriter();
    const descs = [];
    for (const vmsd of [TIMER_VMSD, GLOBALSTATE_VMSD]) {
      const item = await parser.next();
      assert.ok(item && item.kind === 'section' && item.typeName === 'FULL');
      assert.equal(item.idstr, vmsd.name);
      const state = await loadVmState(parser.reader, vmsd, item.version);
      descs.push(writeDeviceSection(w, { sectionId: item.sectionId, idstr: item.idstr, instanceId: item.instanceId, vmsd, state }));
    }
    assert.equal(await parser.next(), undefined);
    assert.ok(w.toBuffer().equals(q.subarray(TIMER_AT, EOF_AT)));
    // The VM description QEMU appended, reproduced exactly (text, not only structure).
    const json = formatVmdescJson(buildVmdesc(descs));
    assert.equal(json, q.subarray(EOF_AT + 6).toString('utf8'));
    assert.equal(q.readUInt32BE(EOF_AT + 2), json.length);
  });

  it('timer: values round trip; version 1 streams have no cpu_clock_offset', async () => {
    const { bytes, loaded } = await roundTrip(TIMER_VMSD, timerState(-1n, 0x123456789abcn));
    assert.equal(bytes.length, 24);
    assert.equal(loaded.cpu_ticks_offset, -1n);
    assert.equal(loaded.cpu_clock_offset, 0x123456789abcn);
    const v1 = await loadVmState(StreamReader.fromBuffer(bytes.subarray(0, 16)), TIMER_VMSD, 1);
    assert.equal(v1.cpu_clock_offset, undefined);
  });

  it('timer/icount nested subsections save, load and describe', async () => {
    const state = { ...timerState(1n, 2n), qemu_icount_bias: 3n, qemu_icount: 4n, icount_time_shift: -3, last_delta: 5n };
    const { bytes, loaded } = await roundTrip(TIMER_VMSD, state);
    assert.equal(loaded.qemu_icount, 4n);
    assert.equal(loaded.icount_time_shift, -3);
    assert.equal(loaded.last_delta, 5n);
    // 24 + (0x05, len, "timer/icount", be32) + 16 + (0x05, len, "timer/icount/shift", be32) + 10
    assert.equal(bytes.length, 24 + 2 + 12 + 4 + 16 + 2 + 18 + 4 + 10);
    const d = describeVmState(TIMER_VMSD, state);
    assert.deepEqual(d.subsections?.map((s) => s.vmsd_name), ['timer/icount']);
    assert.deepEqual(d.subsections?.[0]?.subsections?.map((s) => [s.vmsd_name, s.version, s.fields.map((f) => [f.name, f.type, f.size])]), [
      ['timer/icount/shift', 2, [['icount_time_shift', 'int16', 2], ['last_delta', 'int64', 8]]],
    ]);
  });

  it('globalstate: runstate string, size = strlen + 1, unknown runstates rejected', async () => {
    const { bytes, loaded } = await roundTrip(GLOBALSTATE_VMSD, globalState('paused'));
    assert.equal(bytes.readUInt32BE(0), 7);
    assert.equal(runstateOf(loaded), 'paused');
    const bad = Buffer.from(bytes);
    bad.write('bogus\0', 4, 'latin1');
    await assert.rejects(loadVmState(StreamReader.fromBuffer(bad), GLOBALSTATE_VMSD, 1), (e: unknown) => e instanceof StreamError && /unknown runstate 'bogus'/.test(e.message));
    const unterminated = Buffer.from(bytes);
    unterminated.fill(0x61, 4);
    await assert.rejects(loadVmState(StreamReader.fromBuffer(unterminated), GLOBALSTATE_VMSD, 1), /not NUL-terminated/);
  });

  it('rejects versions newer than local and older than the minimum', async () => {
    const r = () => StreamReader.fromBuffer(Buffer.alloc(64));
    await assert.rejects(loadVmState(r(), TIMER_VMSD, 3), /timer: incoming version 3 is too new for local version 2/);
    await assert.rejects(loadVmState(r(), TIMER_VMSD, 0), /too old for local minimum version 1/);
  });

  const ELEM: VmStateDescription = { name: 'elem', version: 1, fields: [{ name: 'a', type: 'uint16' }, { name: 'b', type: 'bool' }] };
  const DEV: VmStateDescription = {
    name: 'dev',
    version: 3,
    minimumVersion: 1,
    fields: [
      { name: 'n', type: 'uint8' },
      { name: 'regs', type: 'uint32', count: 3 },
      { name: 'elems', type: 'struct', vmsd: ELEM, countField: 'n', maxCount: 8 },
      { name: 'len', type: 'int32' },
      { name: 'data', type: 'vbuffer', sizeField: 'len', maxSize: 64 },
      { name: 'x', type: 'int8', version: 2 },
      { name: 'x', type: 'int8', version: 3 },
      { name: 'dyn', type: 'uint64', count: 2, exists: (s) => s.n === 2 },
    ],
    subsections: [{ name: 'dev/extra', version: 1, needed: (s) => s.extra !== undefined, fields: [{ name: 'extra', type: 'uint64' }] }],
  };
  const devState = (): VmState => ({
    n: 2,
    regs: [1, 2, 0xffffffff],
    elems: [{ a: 7, b: true }, { a: 8, b: false }],
    len: 5,
    data: Buffer.from('hello'),
    x: -1,
    dyn: [10n, 11n],
    extra: 99n,
  });

  it('arrays, struct arrays, vbuffers, duplicate names, field versions and exists() round trip', async () => {
    const { loaded } = await roundTrip(DEV, devState());
    assert.deepEqual(loaded.regs, [1, 2, 0xffffffff]);
    assert.deepEqual(loaded.elems, [{ a: 7, b: true }, { a: 8, b: false }]);
    assert.equal(Buffer.from(loaded.data as Uint8Array).toString(), 'hello');
    assert.equal(loaded.x, -1);
    assert.deepEqual(loaded.dyn, [10n, 11n]);
    assert.equal(loaded.extra, 99n);
  });

  it('vmdesc follows QEMU: array_len for fixed layouts, index otherwise, [n] for duplicate names, struct before size', () => {
    const d = describeVmState(DEV, devState());
    assert.equal(
      formatVmdescJson(d),
      '{"vmsd_name": "dev", "version": 3, "fields": [' +
        '{"name": "n", "type": "uint8", "size": 1}, ' +
        '{"name": "regs", "array_len": 3, "type": "uint32", "size": 4}, ' +
        '{"name": "elems", "array_len": 2, "type": "struct", "struct": {"vmsd_name": "elem", "version": 1, "fields": [{"name": "a", "type": "uint16", "size": 2}, {"name": "b", "type": "bool", "size": 1}]}, "size": 3}, ' +
        '{"name": "len", "type": "int32", "size": 4}, ' +
        '{"name": "data", "type": "buffer", "size": 5}, ' +
        '{"name": "x[0]", "type": "int8", "size": 1}, ' +
        '{"name": "x[1]", "type": "int8", "size": 1}, ' +
        '{"name": "dyn", "index": 0, "type": "uint64", "size": 8}, ' +
        '{"name": "dyn", "index": 1, "type": "uint64", "size": 8}], ' +
        '"subsections": [{"vmsd_name": "dev/extra", "version": 1, "fields": [{"name": "extra", "type": "uint64", "size": 8}]}]}',
    );
  });

  it('bounds every peer-supplied count and size before use', async () => {
    const { bytes } = await roundTrip(DEV, devState());
    const bigCount = Buffer.from(bytes);
    bigCount[0] = 200; // n > maxCount 8
    await assert.rejects(loadVmState(StreamReader.fromBuffer(bigCount), DEV, 3), /dev.elems: element count 200 out of range \(max 8\)/);
    const bigLen = Buffer.from(bytes);
    bigLen.writeInt32BE(-1, 1 + 12 + 6); // len field
    await assert.rejects(loadVmState(StreamReader.fromBuffer(bigLen), DEV, 3), /dev.data: size -1 out of range \(max 64\)/);
  });

  it('subsections: unknown name with our prefix is an error; another prefix is left for the caller', async () => {
    const w = new StreamWriter();
    saveVmState(w, GLOBALSTATE_VMSD, globalState('running'));
    w.subsectionHeader('globalstate/nope', 1);
    const r = StreamReader.fromBuffer(w.toBuffer());
    await assert.rejects(loadVmState(r, GLOBALSTATE_VMSD, 1), /globalstate: unknown subsection 'globalstate\/nope'/);

    const w2 = new StreamWriter();
    saveVmState(w2, GLOBALSTATE_VMSD, globalState('running'));
    w2.subsectionHeader('other/thing', 1);
    const r2 = StreamReader.fromBuffer(w2.toBuffer());
    await loadVmState(r2, GLOBALSTATE_VMSD, 1);
    assert.equal(await r2.u8(), 0x05, 'foreign subsection not consumed');
  });

  it('configuration vmstate matches the writer and carries capabilities and uuid', async () => {
    const uuid = Buffer.from('00112233445566778899aabbccddeeff', 'hex');
    const a = new StreamWriter();
    a.configuration({ machine: 'pc-q35-7.2', capabilities: ['x-ignore-shared'], uuid, targetPageBits: 12 });
    const b = new StreamWriter();
    b.put8(7);
    saveVmState(b, CONFIGURATION_VMSD, { name: Buffer.from('pc-q35-7.2'), capabilities: ['x-ignore-shared'], uuid, target_page_bits: 12 });
    assert.ok(a.toBuffer().equals(b.toBuffer()));
  });
});
