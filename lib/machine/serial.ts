/**
 * A 16550A UART (COM1 at 0x3f8, IRQ 4) and the sinks its output goes to.
 *
 * Registers modelled: RBR/THR, IER, IIR/FCR, LCR (DLAB selects the divisor
 * latch DLL/DLM at offsets 0/1), MCR (loopback), LSR, MSR, SCR. Output is
 * instantaneous, so LSR always reports THRE|TEMT: a polling driver never
 * waits. Interrupts: THR-empty (IER bit 1) and received-data (IER bit 0)
 * drive the IRQ line level through `setIrq` (KVM_IRQ_LINE), as a level
 * source that the in-kernel PIC/IOAPIC sample.
 *
 * The whole register file is plain data (`getState`/`setState`) so it
 * migrates with the machine.
 */
import fs from 'node:fs';

/** Where the guest's serial bytes go. */
export interface SerialSink {
  write(data: Uint8Array): void;
  /** Push buffered bytes out now. */
  flush(): void;
  /** Flush and release the file (idempotent). */
  close(): void;
}

export type SerialSpec = 'stdio' | 'none' | { file: string };

/** Serial register file as plain JSON data. */
export interface SerialState {
  dll: number;
  dlm: number;
  ier: number;
  lcr: number;
  mcr: number;
  lsr: number;
  msr: number;
  scr: number;
  fcr: number;
  /** THR-empty interrupt latched (cleared by reading IIR or writing THR). */
  thrIpending: boolean;
  /** Received bytes not yet read by the guest, base64. */
  rx: string;
}

const LSR_DR = 0x01;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;
const IER_RDI = 0x01;
const IER_THRI = 0x02;
const IIR_NO_INT = 0x01;
const IIR_THRI = 0x02;
const IIR_RDI = 0x04;
const IIR_FIFO = 0xc0;
const LCR_DLAB = 0x80;
const MCR_LOOP = 0x10;
const FCR_ENABLE = 0x01;
const FCR_CLEAR_RX = 0x02;
const RX_LIMIT = 4096;

export interface UartOptions {
  /** Drive the interrupt line (0/1); called only on level changes. */
  setIrq?: (level: 0 | 1) => void;
  sink: SerialSink;
}

export class Uart16550 {
  static readonly BASE = 0x3f8;
  static readonly IRQ = 4;
  /**
   * Ports whose writes need not stop the guest until handled (Vcpu
   * postedPorts): every register but MCR. While the line status shadow is
   * valid (no loopback, nothing received) no such write changes what the
   * guest can read without an exit of its own, and those exits are handled
   * after the writes, in order; interrupts are raised when a write is
   * handled. MCR stays synchronous: entering loopback must invalidate the
   * shadow before the guest reads LSR again.
   */
  static readonly POSTED_PORTS: readonly number[] = [0, 1, 2, 3, 5, 6, 7].map((o) => Uart16550.BASE + o);
  /** Ports answered from `shadow` by the vCPU thread while valid (Vcpu shadowPorts): LSR. */
  static readonly SHADOW_PORTS: readonly number[] = [Uart16550.BASE + 5];
  /**
   * [valid, value] for each SHADOW_PORTS entry, kept current after every
   * change: the transmitter is always empty (THRE|TEMT); valid only while
   * nothing is received and loopback is off, so that a read which depends on
   * earlier (posted) writes or on the receiver goes to read() in order.
   */
  readonly shadow = new Uint8Array(new ArrayBuffer(2)); // its own buffer: off the JS heap, never moved by GC

  private s: SerialState = Uart16550.resetState();
  private rx: number[] = [];
  private irqLevel: 0 | 1 = 0;
  private readonly setIrq?: (level: 0 | 1) => void;
  readonly sink: SerialSink;
  /** Bytes the guest transmitted. */
  txBytes = 0;

  constructor(opts: UartOptions) {
    this.setIrq = opts.setIrq;
    this.sink = opts.sink;
    this.refreshShadow();
  }

  static resetState(): SerialState {
    return { dll: 0x0c, dlm: 0, ier: 0, lcr: 0, mcr: 0, lsr: LSR_THRE | LSR_TEMT, msr: 0xb0, scr: 0, fcr: 0, thrIpending: false, rx: '' };
  }

  /** Register read at offset 0..7 from the base port. */
  read(offset: number): number {
    const s = this.s;
    switch (offset & 7) {
      case 0:
        if (s.lcr & LCR_DLAB) return s.dll;
        {
          const v = this.rx.length ? this.rx.shift()! : 0;
          this.update();
          return v;
        }
      case 1:
        return s.lcr & LCR_DLAB ? s.dlm : s.ier;
      case 2: {
        const iir = this.iir();
        if ((iir & 0x0f) === IIR_THRI) s.thrIpending = false; // reading IIR acknowledges THR-empty
        this.update();
        return iir | (s.fcr & FCR_ENABLE ? IIR_FIFO : 0);
      }
      case 3:
        return s.lcr;
      case 4:
        return s.mcr;
      case 5:
        return s.lsr | (this.rx.length ? LSR_DR : 0);
      case 6:
        if (s.mcr & MCR_LOOP) {
          // loopback: CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2
          const m = s.mcr;
          return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4);
        }
        return s.msr;
      default:
        return s.scr;
    }
  }

  /** Register write at offset 0..7 from the base port. */
  write(offset: number, value: number): void {
    const s = this.s;
    value &= 0xff;
    switch (offset & 7) {
      case 0:
        if (s.lcr & LCR_DLAB) {
          s.dll = value;
          return;
        }
        if (s.mcr & MCR_LOOP) {
          this.pushRx([value]);
        } else {
          this.txBytes++;
          this.sink.write(Uint8Array.of(value));
        }
        s.thrIpending = true; // the byte left at once: THR is empty again
        this.update();
        return;
      case 1:
        if (s.lcr & LCR_DLAB) {
          s.dlm = value;
          return;
        }
        {
          const was = s.ier;
          s.ier = value & 0x0f;
          // enabling THRI while THR is empty raises it (what drivers expect)
          if (!(was & IER_THRI) && s.ier & IER_THRI) s.thrIpending = true;
          this.update();
        }
        return;
      case 2:
        s.fcr = value & 0xc9;
        if (value & FCR_CLEAR_RX) this.rx = [];
        this.update();
        return;
      case 3:
        s.lcr = value;
        return;
      case 4:
        s.mcr = value & 0x1f;
        this.refreshShadow();
        return;
      case 5:
      case 6:
        return; // LSR/MSR are read-only (factory test writes ignored)
      default:
        s.scr = value;
    }
  }

  /** Bytes arriving from the host side (stdin). */
  receive(data: Uint8Array): void {
    this.pushRx(Array.from(data));
  }

  getState(): SerialState {
    return { ...this.s, rx: Buffer.from(this.rx).toString('base64') };
  }

  setState(state: SerialState): void {
    const fields: (keyof SerialState)[] = ['dll', 'dlm', 'ier', 'lcr', 'mcr', 'lsr', 'msr', 'scr', 'fcr'];
    for (const f of fields) {
      const v = state[f];
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v > 255) throw new RangeError(`serial state: bad ${f}`);
    }
    this.s = { ...state, lsr: (state.lsr | LSR_THRE | LSR_TEMT) & ~LSR_DR, thrIpending: !!state.thrIpending, rx: '' };
    this.rx = Array.from(Buffer.from(state.rx ?? '', 'base64')).slice(0, RX_LIMIT);
    this.update();
  }

  reset(): void {
    this.s = Uart16550.resetState();
    this.rx = [];
    this.update();
  }

  private pushRx(bytes: number[]): void {
    for (const b of bytes) if (this.rx.length < RX_LIMIT) this.rx.push(b & 0xff);
    this.update();
  }

  private iir(): number {
    const s = this.s;
    if (s.ier & IER_RDI && this.rx.length) return IIR_RDI;
    if (s.ier & IER_THRI && s.thrIpending) return IIR_THRI;
    return IIR_NO_INT;
  }

  private update(): void {
    const level: 0 | 1 = this.iir() === IIR_NO_INT ? 0 : 1;
    if (level !== this.irqLevel) {
      this.irqLevel = level;
      this.setIrq?.(level);
    }
    this.refreshShadow();
  }

  private refreshShadow(): void {
    const valid = !(this.s.mcr & MCR_LOOP) && this.rx.length === 0;
    if (!valid) this.shadow[0] = 0; // invalid first: the vCPU thread reads the flag, then the value
    this.shadow[1] = this.s.lsr;
    if (valid) this.shadow[0] = 1;
  }
}

/** Discards output. */
export class NullSink implements SerialSink {
  write(): void {}
  flush(): void {}
  close(): void {}
}

/**
 * Buffers bytes and writes whole lines (or whatever is pending after
 * `delayMs`, or 4 KiB) synchronously to an fd, so a reader tailing the file
 * sees each line as soon as the guest finished it.
 */
export class FdLineSink implements SerialSink {
  private buf = Buffer.alloc(4096);
  private len = 0;
  private timer: NodeJS.Timeout | undefined;
  private fd: number;
  private readonly ownsFd: boolean;

  constructor(fd: number, ownsFd: boolean, private readonly delayMs = 20) {
    this.fd = fd;
    this.ownsFd = ownsFd;
  }

  /** Append to `path` (created if missing). */
  static file(path: string): FdLineSink {
    return new FdLineSink(fs.openSync(path, 'a'), true);
  }

  write(data: Uint8Array): void {
    if (this.fd < 0) return;
    let sawNewline = false;
    for (const b of data) {
      if (this.len === this.buf.length) this.flush();
      this.buf[this.len++] = b;
      if (b === 0x0a) sawNewline = true;
    }
    if (sawNewline) this.flush();
    else if (this.len && !this.timer) {
      this.timer = setTimeout(() => this.flush(), this.delayMs);
      this.timer.unref();
    }
  }

  flush(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = undefined;
    }
    let off = 0;
    let again = 0;
    while (this.fd >= 0 && off < this.len) {
      try {
        off += fs.writeSync(this.fd, this.buf, off, this.len - off);
      } catch (err) {
        // a non-blocking stdout pipe that stays full: give up on this chunk
        if ((err as NodeJS.ErrnoException).code === 'EAGAIN' && ++again < 1000) continue;
        break; // reader gone (EPIPE) or disk full: drop the output, keep the guest running
      }
    }
    this.len = 0;
  }

  close(): void {
    this.flush();
    if (this.ownsFd && this.fd >= 0) fs.closeSync(this.fd);
    this.fd = -1;
  }
}

export function createSerialSink(spec: SerialSpec): SerialSink {
  if (spec === 'none') return new NullSink();
  if (spec === 'stdio') return new FdLineSink(1, false);
  return FdLineSink.file(spec.file);
}
