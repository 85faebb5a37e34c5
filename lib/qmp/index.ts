/** QMP: server, client, wire shapes, argument schemas. */
export * from './protocol';
export * from './schema';
export { JsonSplitter, DEFAULT_MAX_MESSAGE_BYTES, type JsonUnit } from './json-stream';
export { QmpServer, QmpConnection, type CommandContext, type CommandDefinition, type QmpServerOptions } from './server';
export { QmpClient, type QmpConnectOptions, type ExecuteOptions, type WaitEventOptions } from './client';
