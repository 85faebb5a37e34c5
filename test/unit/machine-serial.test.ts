import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { FdLineSink, Uart16550, type SerialSink } from '../../lib/machine/serial';

class MemSink implements SerialSink {
  bytes: number[] = [];
  write(d: Uint8Array): void {
    this.bytes.push(...d);
  }
  flush(): void {}
  close(): void {}
  get text(): string {
    return Buffer.from(this.bytes).toString('latin1');
  }
}

function uart() {
  const sink = new MemSink();
  const irq: number[] = [];
  const u = new Uart16550({ sink, setIrq: (l) => irq.push(l) });
  return { u, sink, irq };
}

describe('machine/serial: 16550A UART', () => {
  it('transmits THR writes to the sink; LSR always reports THRE|TEMT', () => {
    const { u, sink } = uart();
    for (const c of Buffer.from('hi\n')) {
      assert.equal(u.read(5) & 0x60, 0x60);
      u.write(0, c);
    }
    assert.equal(sink.text, 'hi\n');
    assert.equal(u.txBytes, 3);
  });

  it('DLAB switches offsets 0/1 to the divisor latch', () => {
    const { u, sink } = uart();
    u.write(3, 0x80);
    u.write(0, 0x01);
    u.write(1, 0x02);
    assert.equal(u.read(0), 0x01);
    assert.equal(u.read(1), 0x02);
    u.write(3, 0x03);
    assert.equal(u.read(1), 0, 'IER untouched by divisor writes');
    assert.equal(sink.bytes.length, 0, 'divisor writes are not output');
    assert.equal(u.read(3), 0x03);
  });

  it('raises IRQ for THR-empty when IER enables it; reading IIR acknowledges', () => {
    const { u, irq } = uart();
    assert.equal(u.read(2) & 0x0f, 0x01, 'no interrupt pending');
    u.write(1, 0x02);
    assert.deepEqual(irq, [1]);
    assert.equal(u.read(2) & 0x0f, 0x02, 'THRI identified');
    assert.deepEqual(irq, [1, 0], 'IIR read lowers the line');
    u.write(0, 0x41);
    assert.deepEqual(irq, [1, 0, 1], 'next byte sent: THR empty again');
    u.write(1, 0);
    assert.deepEqual(irq, [1, 0, 1, 0]);
  });

  it('receives host bytes with data-ready and RDI', () => {
    const { u, irq } = uart();
    u.write(1, 0x01);
    u.receive(Buffer.from('ab'));
    assert.equal(u.read(5) & 1, 1);
    assert.equal(u.read(2) & 0x0f, 0x04);
    assert.equal(u.read(0), 0x61);
    assert.equal(u.read(0), 0x62);
    assert.equal(u.read(5) & 1, 0);
    assert.deepEqual(irq, [1, 0]);
  });

  it('loopback sends THR to RBR and reflects MCR in MSR', () => {
    const { u, sink } = uart();
    u.write(4, 0x10 | 0x0f);
    u.write(0, 0x5a);
    assert.equal(sink.bytes.length, 0);
    assert.equal(u.read(0), 0x5a);
    assert.equal(u.read(6), 0xf0);
    u.write(4, 0);
    assert.equal(u.read(6), 0xb0, 'DCD|DSR|CTS when not in loopback');
  });

  it('scratch register and FIFO bits in IIR', () => {
    const { u } = uart();
    u.write(7, 0x99);
    assert.equal(u.read(7), 0x99);
    u.write(2, 0x07);
    assert.equal(u.read(2) & 0xc0, 0xc0);
  });

  it('state round-trips through JSON into a fresh UART', () => {
    const a = uart();
    a.u.write(3, 0x80);
    a.u.write(0, 0x03);
    a.u.write(3, 0x1b);
    a.u.write(1, 0x03);
    a.u.write(7, 0x42);
    a.u.receive(Buffer.from('z'));
    const s = JSON.parse(JSON.stringify(a.u.getState()));
    const b = uart();
    b.u.setState(s);
    assert.deepEqual(b.u.getState(), a.u.getState());
    assert.equal(b.u.read(0), 0x7a);
    assert.deepEqual(b.irq, [1], 'IRQ level follows the restored state');
    assert.equal(b.u.read(2) & 0x0f, 0x02, 'THR-empty still latched');
    assert.deepEqual(b.irq, [1, 0]);
    assert.throws(() => b.u.setState({ ...s, lcr: 300 }), RangeError);
  });

  it('FdLineSink writes whole lines to a file promptly and the tail after a delay', async () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'ferry-serial-'));
    const file = path.join(dir, 's.log');
    const sink = FdLineSink.file(file);
    for (const c of Buffer.from('line one\npart')) sink.write(Uint8Array.of(c));
    assert.equal(fs.readFileSync(file, 'utf8'), 'line one\n');
    await new Promise((r) => setTimeout(r, 60));
    assert.equal(fs.readFileSync(file, 'utf8'), 'line one\npart');
    sink.close();
    sink.write(Buffer.from('x\n'));
    assert.equal(fs.readFileSync(file, 'utf8'), 'line one\npart', 'closed sink drops output');
    fs.rmSync(dir, { recursive: true });
  });
});
