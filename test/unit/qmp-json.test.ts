// The QMP JSON splitter (any chunk boundaries, QEMU-style resynchronisation, size limit),
// QEMU-style serialisation, input member checks and address parsing.
import assert from 'node:assert/strict';
import { JsonSplitter, rewriteQemuQuotes, type JsonUnit } from '../../lib/qmp/json-stream';
import { checkInput, parseQmpAddress, qmpTimestamp, toQmpJson } from '../../lib/qmp/protocol';
import { rng } from './qmp-helpers';

function feed(text: string | Buffer, sizes: () => number, opts = {}): JsonUnit[] {
  const buf = Buffer.isBuffer(text) ? text : Buffer.from(text);
  const s = new JsonSplitter(opts);
  const out: JsonUnit[] = [];
  for (let i = 0; i < buf.length; ) {
    const n = Math.max(1, Math.min(buf.length - i, sizes()));
    out.push(...s.push(buf.subarray(i, i + n)));
    i += n;
  }
  return out;
}

const values = (units: JsonUnit[]): unknown[] => units.map((u) => (u.kind === 'value' ? u.value : `${u.kind}: ${u.message}`));

describe('qmp json splitter', function () {
  const stream =
    '{"execute":"a","arguments":{"s":"}{[]\\"\\\\","n":[1,{"x":null}]}}' +
    '  \r\n{"execute":"b"}{"execute":"c","id":[1,2]}\n' +
    '[1,[2,[3]]] "top" 42 true\n' +
    '{"u":"é€😀"}';
  const expected = [
    { execute: 'a', arguments: { s: '}{[]"\\', n: [1, { x: null }] } },
    { execute: 'b' },
    { execute: 'c', id: [1, 2] },
    [1, [2, [3]]],
    'top',
    42,
    true,
    { u: 'é€😀' },
  ];

  it('splits the same values whatever the chunk boundaries', function () {
    assert.deepEqual(values(feed(stream, () => 1 << 20)), expected);
    assert.deepEqual(values(feed(stream, () => 1)), expected);
    const r = rng(7);
    for (let round = 0; round < 200; round++) assert.deepEqual(values(feed(stream, () => 1 + Math.floor(r() * 9))), expected);
  });

  it('reports the stream offset where each value ends', function () {
    const units = feed('{"a":1}\n{"b":2}', () => 3);
    assert.deepEqual(
      units.map((u) => u.end),
      [7, 15],
    );
  });

  it('resynchronises after errors like QEMU (control chars in strings, stray bytes, 0xFF)', function () {
    const bad = Buffer.concat([
      Buffer.from('{"a":"x\n'), // raw newline in a string
      Buffer.from('{"ok":1}\n'),
      Buffer.from('{"a": @}\n'), // stray punctuation inside a value
      Buffer.from('{"ok":2}\n'),
      Buffer.from('{"open": [1, 2'),
      Buffer.from([0xff]), // QEMU's reset byte
      Buffer.from('\n{"ok":3}\n'),
      Buffer.from('}'), // close without open
      Buffer.from('{"ok":4}'),
    ]);
    for (const size of [1, 2, 5, 1000]) {
      const got = values(feed(bad, () => size));
      assert.deepEqual(
        got.filter((v) => typeof v !== 'string'),
        [{ ok: 1 }, { ok: 2 }, { ok: 3 }, { ok: 4 }],
        `chunk size ${size}`,
      );
      // Five errors: the '}' after '@' ends recovery and is then a close without an open (as in QEMU).
      assert.equal(got.filter((v) => typeof v === 'string').length, 5, `errors at chunk size ${size}: ${JSON.stringify(got)}`);
      for (const v of got) if (typeof v === 'string') assert.match(v, /^error: JSON parse error, /);
    }
  });

  it('keeps only the value in progress in memory and stops at the size limit', function () {
    const s = new JsonSplitter({ maxMessageBytes: 1000 });
    assert.deepEqual(values(s.push(Buffer.from(`{"a":"${'x'.repeat(900)}"}`))), [{ a: 'x'.repeat(900) }]);
    assert.equal(s.pending, 0);
    assert.deepEqual(s.push(Buffer.from('{"a":"' + 'y'.repeat(500))), []);
    assert.equal(s.pending, 506);
    const units = s.push(Buffer.from('y'.repeat(600)));
    assert.equal(units.length, 1);
    assert.equal(units[0].kind, 'overflow');
    assert.equal(s.pending, 0);
    assert.deepEqual(s.push(Buffer.from('{"after":1}')), [], 'dead after overflow');
  });

  it('limits nesting depth', function () {
    const units = feed('['.repeat(2000) + ']'.repeat(2000) + '{"ok":1}', () => 64, { maxDepth: 1024 });
    assert.equal(units[0].kind, 'error');
    assert.match((units[0] as { message: string }).message, /nesting deeper than 1024/);
    assert.deepEqual(values(units).slice(-1), [{ ok: 1 }]);
  });

  it("accepts QEMU's single-quoted strings", function () {
    assert.deepEqual(values(feed("{'execute': 'x', 'arguments': {'s': 'it\\'s \"q\"'}}", () => 4)), [{ execute: 'x', arguments: { s: 'it\'s "q"' } }]);
    assert.equal(rewriteQemuQuotes(`{'a': "b'c", 'd': 'e\\\\'}`), `{"a": "b'c", "d": "e\\\\"}`);
  });

  it('parses a 1 MiB message split into 4 KiB reads', function () {
    const big = JSON.stringify({ execute: 'x', arguments: { data: 'z'.repeat(1 << 20) } });
    const t0 = process.hrtime.bigint();
    const got = values(feed(big, () => 4096));
    const ms = Number(process.hrtime.bigint() - t0) / 1e6;
    assert.equal((got[0] as { arguments: { data: string } }).arguments.data.length, 1 << 20);
    assert.ok(ms < 2000, `took ${ms} ms`);
  });
});

describe('qmp protocol helpers', function () {
  it('serialises like QEMU', function () {
    assert.equal(toQmpJson({ return: {}, id: 1 }), '{"return": {}, "id": 1}');
    assert.equal(toQmpJson({ a: [1, 'b', null, true, { c: 1.5 }], u: undefined }), '{"a": [1, "b", null, true, {"c": 1.5}]}');
    assert.equal(toQmpJson('é\n\t"\\/\u0000\u007f'), '"\\u00E9\\n\\t\\"\\\\/\\u0000\u007f"');
    assert.equal(toQmpJson(Infinity), 'null');
    assert.equal(toQmpJson(new Date(0)), '"1970-01-01T00:00:00.000Z"');
    assert.equal(toQmpJson(12n), '12');
  });

  it('timestamps split wall-clock microseconds', function () {
    assert.deepEqual(qmpTimestamp(1700000000123.4567), { seconds: 1700000000, microseconds: 123456 });
  });

  it('checks input members', function () {
    assert.deepEqual(checkInput({ execute: 'x', id: 0 }, false), { ok: true, request: { command: 'x', args: {}, oob: false, id: 0 } });
    assert.deepEqual(checkInput({ 'exec-oob': 'x' }, true), { ok: true, request: { command: 'x', args: {}, oob: true } });
    assert.deepEqual(checkInput({ execute: 'x', 'exec-oob': 'y' }, true), { ok: false, id: undefined, desc: "QMP input member 'execute' clashes with 'exec-oob'" });
    assert.deepEqual(checkInput(null, false), { ok: false, desc: 'QMP input must be a JSON object' });
  });

  it('parses QMP addresses', function () {
    assert.deepEqual(parseQmpAddress('unix:/run/q.sock'), { type: 'unix', path: '/run/q.sock' });
    assert.deepEqual(parseQmpAddress('unix:/run/q.sock,server=on,wait=off'), { type: 'unix', path: '/run/q.sock' });
    assert.deepEqual(parseQmpAddress('tcp:127.0.0.1:4444'), { type: 'tcp', host: '127.0.0.1', port: 4444 });
    assert.deepEqual(parseQmpAddress('tcp:[::1]:0,server,nowait'), { type: 'tcp', host: '::1', port: 0 });
    assert.deepEqual(parseQmpAddress('tcp::4444'), { type: 'tcp', host: '', port: 4444 });
    assert.throws(() => parseQmpAddress('tcp:host'), /expected tcp:HOST:PORT/);
    assert.throws(() => parseQmpAddress('tcp:h:70000'), /out of range/);
    assert.throws(() => parseQmpAddress('unix:'), /empty unix socket path/);
    assert.throws(() => parseQmpAddress(`unix:/${'x'.repeat(120)}`), /longer than 107 bytes/);
    assert.throws(() => parseQmpAddress('unix:/x,bogus=1'), (e: Error & { code?: string }) => e.code === 'ERR_QMP_ADDRESS' && /unknown flag 'bogus=1'/.test(e.message));
    assert.throws(() => parseQmpAddress('stdio'), /expected unix:PATH or tcp:HOST:PORT/);
  });
});
