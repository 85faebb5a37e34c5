import type net from 'node:net';

/**
 * The fd of a connected net.Socket (Node keeps it on the internal handle;
 * stable on Linux for tcp and unix sockets), or -1 when there is none.
 */
export function socketFd(socket: net.Socket): number {
  const fd = (socket as unknown as { _handle?: { fd?: unknown } })._handle?.fd;
  return typeof fd === 'number' ? fd : -1;
}
