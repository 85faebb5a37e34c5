/**
 * The QMP server: QEMU's monitor protocol over unix and tcp sockets.
 *
 * Each connection gets the greeting, must negotiate with qmp_capabilities,
 * then runs commands strictly in order (a command starts when the previous
 * one's reply was written); "exec-oob" commands that allow it (after the
 * client enabled the oob capability) run at once, out of band. Events go to
 * every negotiated connection. Input that is not JSON, not a QMP command, or
 * has wrong arguments is answered with QEMU's error replies and the
 * connection keeps working; a message beyond maxMessageBytes, or a client
 * that stops reading while its output piles up past maxOutputBytes, is
 * dropped. Nothing a client sends can throw out of the server.
 *
 * File descriptors (QEMU's getfd/closefd): on unix sockets fds arrive with
 * SCM_RIGHTS through the native addon (see reader.ts). Each received batch is
 * remembered with the stream position where it arrived; when a command runs,
 * the newest batch that arrived no later than the command's last byte is the
 * one it may take, older unclaimed batches are closed (QEMU keeps only the
 * latest received fds too). `getfd` moves one into the server-wide name
 * table `fds`; `takeFd(name)` hands it to its consumer (a migration fd:
 * URI). Unclaimed received fds are closed on disconnect; named fds live until
 * closefd, takeFd or server.close() (QEMU keeps them per monitor, across
 * reconnections).
 */
import { EventEmitter } from 'node:events';
import fs from 'node:fs';
import net from 'node:net';
import { JsonSplitter, DEFAULT_MAX_MESSAGE_BYTES } from './json-stream';
import {
  FERRY_QMP_VERSION,
  QMP_CAPABILITIES,
  QmpError,
  checkInput,
  errorClassOf,
  errorDescOf,
  errorReply,
  eventMessage,
  formatQmpAddress,
  parseQmpAddress,
  successReply,
  toQmpJson,
  type QmpAddress,
  type QmpEvent,
  type QmpRequest,
  type QmpVersion,
} from './protocol';
import { startReader, type ConnectionReader } from './reader';
import { SchemaError, validateArgs, type ArgSchema } from './schema';

/** What a handler learns about the call. */
export interface CommandContext {
  readonly server: QmpServer;
  readonly connection: QmpConnection;
  /** The request's id (undefined when none was sent). */
  readonly id: unknown;
  /** Aborted when the client disconnects while the command runs. */
  readonly signal: AbortSignal;
  /** Takes one fd the client sent with (or before) this command; the caller owns it. */
  takeReceivedFd(): number | undefined;
}

export interface CommandDefinition<A = Record<string, unknown>, R = unknown> {
  name: string;
  /**
   * Checked before the handler runs. Omitted: the command takes no arguments
   * (as a QAPI command without 'data'); 'any': anything goes (the handler checks).
   */
  args?: ArgSchema | 'any';
  /** Returning undefined replies {"return": {}}. Throw QmpError for a class other than GenericError. */
  handler: (args: A, ctx: CommandContext) => R | Promise<R>;
  /** May run out of band with "exec-oob" (QEMU's allow-oob). */
  allowOob?: boolean;
}

export interface QmpServerOptions {
  version?: QmpVersion;
  /** Largest single JSON message accepted (default 64 MiB); a larger one drops the connection. */
  maxMessageBytes?: number;
  /** Unsent output per connection beyond which a client that does not read is dropped (default 64 MiB). */
  maxOutputBytes?: number;
  /** Receive fds on unix sockets: 'auto' (default) uses the native addon when it loads. */
  fdPassing?: boolean | 'auto';
  /** Called after `quit` was answered; default: only the server's 'quit' event. */
  onQuit?: (ctx: CommandContext) => void | Promise<void>;
}

/** Queued inputs per connection before the server stops reading it (QEMU suspends at 8). */
const QUEUE_HIGH = 8;

interface FdBatch {
  /** Stream offset of the first byte of the read that delivered these fds. */
  start: number;
  fds: number[];
}

type Work = { kind: 'request'; request: QmpRequest; end: number } | { kind: 'reply'; message: unknown };

let nextConnectionId = 1;

/** One client connection. */
export class QmpConnection {
  readonly id = nextConnectionId++;
  readonly transport: 'unix' | 'tcp';
  /** 'unix:PATH' or 'tcp:HOST:PORT' of the peer. */
  readonly peer: string;
  negotiated = false;
  oobEnabled = false;
  closed = false;
  private reader: ConnectionReader | undefined;
  private readonly splitter: JsonSplitter;
  private readonly queue: Work[] = [];
  private running = false;
  private readonly abort = new AbortController();
  private batches: FdBatch[] = [];
  private readPaused = false;

  constructor(
    private readonly server: QmpServer,
    readonly socket: net.Socket,
    transport: 'unix' | 'tcp',
    listenAddress: string,
    private readonly limits: { maxMessageBytes: number; maxOutputBytes: number },
    wantFds: boolean,
  ) {
    this.transport = transport;
    this.peer = transport === 'tcp' ? `tcp:${socket.remoteAddress}:${socket.remotePort}` : listenAddress;
    this.splitter = new JsonSplitter({ maxMessageBytes: limits.maxMessageBytes });
    socket.setNoDelay?.(true);
    socket.on('error', () => this.close()); // write errors (EPIPE) arrive here
    this.send({ QMP: { version: server.version, capabilities: [...QMP_CAPABILITIES] } });
    this.reader = startReader(socket, wantFds, {
      onData: (chunk, fds) => this.onData(chunk, fds),
      onEnd: () => this.close(),
    });
  }

  /** True when this connection can receive fds (unix socket, native addon loaded). */
  get fdCapable(): boolean {
    return this.reader?.fdCapable ?? false;
  }

  private onData(chunk: Buffer, fds: number[]): void {
    if (this.closed) {
      closeFds(fds);
      return;
    }
    try {
      this.consume(chunk, fds);
    } catch {
      // A bug here must cost this client its connection, not the process (this
      // runs from a native poll callback where a throw would be fatal).
      this.close();
    }
  }

  private consume(chunk: Buffer, fds: number[]): void {
    if (fds.length > 0) this.batches.push({ start: this.splitter.position, fds });
    for (const unit of this.splitter.push(chunk)) {
      if (unit.kind === 'overflow') {
        this.sendNow(errorReply('GenericError', unit.message, undefined));
        this.close();
        return;
      }
      if (unit.kind === 'error') {
        this.enqueue({ kind: 'reply', message: errorReply('GenericError', unit.message, undefined) });
        continue;
      }
      const checked = checkInput(unit.value, this.oobEnabled);
      if (!checked.ok) {
        this.enqueue({ kind: 'reply', message: errorReply('GenericError', checked.desc, checked.id) });
      } else if (checked.request.oob) {
        void this.execute(checked.request, unit.end); // out of band: not behind the queue
      } else {
        this.enqueue({ kind: 'request', request: checked.request, end: unit.end });
      }
    }
  }

  private enqueue(work: Work): void {
    this.queue.push(work);
    if (this.queue.length >= QUEUE_HIGH && !this.readPaused) {
      this.readPaused = true;
      this.reader?.pause();
    }
    if (!this.running) void this.run();
  }

  private async run(): Promise<void> {
    this.running = true;
    try {
      while (!this.closed && this.queue.length > 0) {
        const work = this.queue.shift()!;
        if (this.readPaused && this.queue.length < QUEUE_HIGH / 2) {
          this.readPaused = false;
          this.reader?.resume();
        }
        if (work.kind === 'reply') this.send(work.message);
        else await this.execute(work.request, work.end);
        if (this.socket.writableNeedDrain && !this.closed) await this.drained();
      }
    } finally {
      this.running = false;
    }
  }

  private drained(): Promise<void> {
    return new Promise((resolve) => {
      const done = (): void => {
        this.socket.off('drain', done);
        this.socket.off('close', done);
        resolve();
      };
      this.socket.on('drain', done);
      this.socket.on('close', done);
    });
  }

  /** Runs one request and writes its reply; never throws. */
  private async execute(req: QmpRequest, end: number): Promise<void> {
    let reply: unknown;
    let quitCtx: CommandContext | undefined;
    try {
      const ctx = this.context(req, end);
      const value = await this.server.dispatch(this, req, ctx);
      reply = successReply(value === undefined ? {} : value, req.id);
      if (req.command === 'quit' && this.negotiated) quitCtx = ctx;
    } catch (e) {
      reply = errorReply(errorClassOf(e), errorDescOf(e), req.id);
    }
    if (this.closed) return; // the client went away mid-command: the reply has nowhere to go
    this.send(reply);
    if (quitCtx) await this.server.quitRequested(quitCtx);
  }

  private context(req: QmpRequest, end: number): CommandContext {
    return {
      server: this.server,
      connection: this,
      id: req.id,
      signal: this.abort.signal,
      takeReceivedFd: () => this.takeReceivedFd(end),
    };
  }

  /**
   * The fd for a command whose last byte is at stream offset `end`: from the
   * newest batch whose read began before `end` (a sendmsg's fds arrive with
   * the first read of its bytes). Like QEMU, only the newest received fds
   * count: older eligible batches, and the other fds of the batch, are closed.
   */
  private takeReceivedFd(end: number): number | undefined {
    const eligible = this.batches.filter((b) => b.start < end);
    if (eligible.length === 0) return undefined;
    this.batches = this.batches.filter((b) => b.start >= end);
    const newest = eligible.pop()!;
    for (const b of eligible) closeFds(b.fds);
    const [fd, ...rest] = newest.fds;
    closeFds(rest);
    return fd;
  }

  /** Writes one message (QEMU ends each with CRLF). Drops a client whose output piles up. */
  send(message: unknown): void {
    if (this.closed) return;
    if (this.socket.writableLength > this.limits.maxOutputBytes) {
      this.close();
      return;
    }
    this.socket.write(`${toQmpJson(message)}\r\n`);
  }

  /** Writes and then closes (used for the overflow error). */
  private sendNow(message: unknown): void {
    if (this.closed) return;
    this.socket.end(`${toQmpJson(message)}\r\n`);
  }

  /** Closes the connection: unclaimed fds are closed, running handlers see `signal` aborted. */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.reader?.close();
    this.reader = undefined;
    this.queue.length = 0;
    for (const b of this.batches) closeFds(b.fds);
    this.batches = [];
    this.abort.abort(new QmpError('GenericError', 'client disconnected'));
    // Let an ended write (sendNow) flush; destroy otherwise.
    if (!this.socket.writableEnded) this.socket.destroy();
    else setTimeout(() => this.socket.destroy(), 1000).unref();
    this.server.connectionClosed(this);
  }
}

function closeFds(fds: number[]): void {
  for (const fd of fds) {
    try {
      fs.closeSync(fd);
    } catch {
      // already closed
    }
  }
}

export interface QmpServerEvents {
  connect: [QmpConnection];
  disconnect: [QmpConnection];
  quit: [CommandContext];
}

export class QmpServer extends EventEmitter<QmpServerEvents> {
  readonly version: QmpVersion;
  /** fds named by getfd, name -> fd (the server owns them until takeFd/closefd/close). */
  readonly fds = new Map<string, number>();
  private readonly commands = new Map<string, CommandDefinition<never, unknown>>();
  private readonly netServers: { server: net.Server; address: QmpAddress }[] = [];
  private readonly connections = new Set<QmpConnection>();
  private readonly options: QmpServerOptions;
  private closing = false;

  constructor(options: QmpServerOptions = {}) {
    super();
    this.options = options;
    this.version = options.version ?? FERRY_QMP_VERSION;
    this.registerBuiltins();
  }

  /** Adds a command (replacing one of the same name). */
  register<A = Record<string, unknown>, R = unknown>(def: CommandDefinition<A, R>): void {
    if (!/^[A-Za-z][A-Za-z0-9_-]*$/.test(def.name)) throw new TypeError(`invalid QMP command name '${def.name}'`);
    this.commands.set(def.name, def as unknown as CommandDefinition<never, unknown>);
  }

  unregister(name: string): boolean {
    return this.commands.delete(name);
  }

  hasCommand(name: string): boolean {
    return this.commands.has(name);
  }

  /** Registered command names, in registration order. */
  commandNames(): string[] {
    return [...this.commands.keys()];
  }

  /** Open connections. */
  get clients(): QmpConnection[] {
    return [...this.connections];
  }

  /** The addresses listened on (tcp port 0 resolved to the real port). */
  get addresses(): QmpAddress[] {
    return this.netServers.map((l) => l.address);
  }

  /**
   * Listens on `unix:PATH` or `tcp:HOST:PORT` (QEMU -qmp flags such as
   * `,server=on,wait=off` are accepted). A stale unix socket file is replaced,
   * as QEMU does. Resolves with the bound address.
   */
  async listen(address: string | QmpAddress): Promise<QmpAddress> {
    if (this.closing) throw new QmpError('GenericError', 'QMP server is closed');
    const addr = typeof address === 'string' ? parseQmpAddress(address) : address;
    const isUnix = addr.type === 'unix';
    const wantFds = isUnix && this.options.fdPassing !== false;
    const maxMessageBytes = this.options.maxMessageBytes ?? DEFAULT_MAX_MESSAGE_BYTES;
    const maxOutputBytes = this.options.maxOutputBytes ?? 64 * 1024 * 1024;
    const server = net.createServer({ pauseOnConnect: true });
    const label = formatQmpAddress(addr);
    server.on('connection', (socket) => {
      if (this.closing) {
        socket.destroy();
        return;
      }
      try {
        const conn = new QmpConnection(this, socket, addr.type, label, { maxMessageBytes, maxOutputBytes }, wantFds);
        if (!conn.closed) {
          this.connections.add(conn);
          this.emit('connect', conn);
        }
      } catch {
        socket.destroy();
      }
    });
    server.on('error', () => {
      /* accept errors (EMFILE) must not crash the process */
    });
    if (isUnix) removeStaleSocket(addr.path);
    await new Promise<void>((resolve, reject) => {
      server.once('error', reject);
      if (isUnix) server.listen(addr.path, () => resolve());
      else server.listen(addr.port, addr.host === '' ? undefined : addr.host, () => resolve());
    });
    let bound: QmpAddress = addr;
    if (!isUnix) {
      const a = server.address() as net.AddressInfo;
      bound = { type: 'tcp', host: addr.host, port: a.port };
    }
    this.netServers.push({ server, address: bound });
    return bound;
  }

  /** Sends an event to every negotiated client; returns the message sent. */
  emitEvent(name: string, data?: Record<string, unknown>): QmpEvent {
    const msg = eventMessage(name, data);
    for (const c of this.connections) if (c.negotiated) c.send(msg);
    return msg;
  }

  /** Removes and returns the fd named by getfd; the caller owns it afterwards. */
  takeFd(name: string): number | undefined {
    const fd = this.fds.get(name);
    this.fds.delete(name);
    return fd;
  }

  /** Stops listening, disconnects every client, closes named fds. */
  async close(): Promise<void> {
    this.closing = true;
    for (const c of [...this.connections]) c.close();
    await Promise.all(
      this.netServers.splice(0).map(
        (l) =>
          new Promise<void>((resolve) => {
            l.server.close(() => resolve());
          }),
      ),
    );
    closeFds([...this.fds.values()]);
    this.fds.clear();
  }

  /** @internal Routes a checked request (negotiation, lookup, argument checks, handler). */
  async dispatch(conn: QmpConnection, req: QmpRequest, ctx: CommandContext): Promise<unknown> {
    const def = this.commands.get(req.command);
    if (!conn.negotiated) {
      if (req.command !== 'qmp_capabilities') {
        throw new QmpError('CommandNotFound', "Expecting capabilities negotiation with 'qmp_capabilities'");
      }
    } else if (req.command === 'qmp_capabilities') {
      throw new QmpError('CommandNotFound', 'Capabilities negotiation is already complete, command ignored');
    }
    if (!def) throw new QmpError('CommandNotFound', `The command ${req.command} has not been found`);
    if (req.oob && !def.allowOob) throw new QmpError('GenericError', `The command ${req.command} does not support OOB`);
    try {
      if (def.args !== 'any') validateArgs(def.args ?? {}, req.args);
    } catch (e) {
      if (e instanceof SchemaError) throw new QmpError('GenericError', e.message);
      throw e;
    }
    return await def.handler(req.args as never, ctx);
  }

  /** @internal */
  connectionClosed(conn: QmpConnection): void {
    if (this.connections.delete(conn)) this.emit('disconnect', conn);
  }

  /** @internal Runs the quit hook after the reply went out. */
  async quitRequested(ctx: CommandContext): Promise<void> {
    this.emit('quit', ctx);
    try {
      await this.options.onQuit?.(ctx);
    } catch {
      // the hook's own business; the reply was already sent
    }
  }

  private registerBuiltins(): void {
    this.register<{ enable?: string[] }>({
      name: 'qmp_capabilities',
      args: { 'enable?': { array: { enum: ['oob'] } } },
      handler: (args, ctx) => {
        const conn = ctx.connection;
        for (const cap of args.enable ?? []) {
          if (!(QMP_CAPABILITIES as readonly string[]).includes(cap)) throw new QmpError('GenericError', `Capability '${cap}' not available`);
        }
        conn.oobEnabled = (args.enable ?? []).includes('oob');
        conn.negotiated = true;
        return {};
      },
    });
    this.register({
      name: 'query-version',
      args: {},
      handler: () => this.version,
    });
    this.register({
      name: 'query-commands',
      args: {},
      handler: () => this.commandNames().map((name) => ({ name })),
    });
    this.register({
      name: 'quit',
      args: {},
      handler: () => ({}),
    });
    this.register<{ fdname: string }>({
      name: 'getfd',
      args: { fdname: 'str' },
      handler: (args, ctx) => {
        // QEMU checks the name first, then whether an fd came with the command.
        if (/^[0-9]/.test(args.fdname)) {
          const fd = ctx.takeReceivedFd();
          if (fd !== undefined) closeFds([fd]);
          throw new QmpError('GenericError', "Parameter 'fdname' expects a name not starting with a digit");
        }
        const fd = ctx.takeReceivedFd();
        if (fd === undefined) throw new QmpError('GenericError', 'No file descriptor supplied via SCM_RIGHTS');
        const old = this.fds.get(args.fdname);
        if (old !== undefined) closeFds([old]);
        this.fds.set(args.fdname, fd);
        return {};
      },
    });
    this.register<{ fdname: string }>({
      name: 'closefd',
      args: { fdname: 'str' },
      handler: (args) => {
        const fd = this.fds.get(args.fdname);
        if (fd === undefined) throw new QmpError('GenericError', `File descriptor named '${args.fdname}' not found`);
        this.fds.delete(args.fdname);
        closeFds([fd]);
        return {};
      },
    });
  }
}

/** QEMU unlinks an existing socket file before binding; never touch other file types. */
function removeStaleSocket(path: string): void {
  try {
    if (fs.lstatSync(path).isSocket()) fs.unlinkSync(path);
  } catch {
    // absent: fine
  }
}
