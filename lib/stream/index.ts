/** lib/stream: QEMU savevm stream (version 3) encoder, pull parser, RAM codec, vmstate. */
export * from './constants';
export * from './errors';
export * from './reader';
export * from './writer';
export * from './vmstate';
export * from './devices';
export * from './ram-codec';
export * from './sections';
export * from './commands';
export * from './return-path';
