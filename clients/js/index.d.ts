// Type declarations for tidings-client (hand-written; they cover the whole public API of src/index.js).
// docs/js-client.md documents every option, method and event.

/** A JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A position in a channel's stream. `offset` 0 is "before the first publication". */
export interface Position {
  offset: number;
  epoch: string;
}

/** The `info` a publication carries when its publisher was authenticated. */
export interface PublicationInfo {
  user: string;
  client: string;
  info?: Json;
}

/** One publication, as handed to subscription handlers and the `message` event. */
export interface Publication<T = any> {
  channel: string;
  offset: number;
  epoch: string;
  id: string;
  /** Unix milliseconds. */
  time: number;
  data: T;
  info?: PublicationInfo;
}

/** The states of a client's connection. */
export type ConnectionState = "disconnected" | "connecting" | "connected" | "closed";

/** Error codes of the server (docs/protocol.md) and the client-side ones. */
export type ServerErrorCode =
  | "bad_request"
  | "unknown_op"
  | "invalid_field"
  | "invalid_channel"
  | "unknown_namespace"
  | "permission_denied"
  | "unauthorized"
  | "token_expired"
  | "already_subscribed"
  | "not_subscribed"
  | "too_many_subscriptions"
  | "message_too_large"
  | "rate_limited"
  | "not_available"
  | "not_found"
  | "internal"
  | "unavailable"
  /** Only in an `unsubscribe` push: the node could not keep the subscription gapless (the client
   * subscribes again from its position by itself). */
  | "insufficient_state";

export type ClientErrorCode =
  /** No reply in time (or no connection in time). */
  | "timeout"
  /** The connection dropped after the request was sent. */
  | "disconnected"
  /** The client is closed. */
  | "closed"
  /** unsubscribe() before the subscription completed. */
  | "unsubscribed"
  /** The server sent a frame that is not JSON. */
  | "bad_frame"
  /** The WebSocket could not be created. */
  | "connect_failed"
  /** A getToken function threw or rejected. */
  | "token";

export type ErrorCode = ServerErrorCode | ClientErrorCode;

/** The error every promise of the client rejects with, and the payload of the `error` event. */
export class TidingsError extends Error {
  constructor(code: ErrorCode | string, message?: string, extra?: Record<string, unknown>);
  readonly name: "TidingsError";
  /** Stable code: program against it. */
  code: ErrorCode | (string & {});
  /** The op of the request that failed, when there was one. */
  op?: string;
  /** The channel concerned (failed re-subscribe, refresh, publish, ...). */
  channel?: string;
  /** publish(): the idempotency key it was sent with. */
  idempotencyKey?: string;
  /** publish(): how many times it was sent. */
  attempts?: number;
  /** The underlying error (getToken failure, WebSocket constructor error). */
  cause?: unknown;
}

/** Returns a token, or a Promise of one. */
export type TokenGetter = () => string | PromiseLike<string>;
/** Returns a subscription token for `channel`, or a Promise of one. */
export type SubscriptionTokenGetter = (channel: string) => string | PromiseLike<string>;

/** What the client needs of a WebSocket (browsers' WebSocket, Node's built-in one, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => any) | null;
  onmessage: ((ev: { data: any }) => any) | null;
  onclose: ((ev: { code: number; reason: string }) => any) | null;
  onerror: ((ev: any) => any) | null;
}

export type WebSocketConstructor = new (url: string) => WebSocketLike;

export interface TidingsOptions {
  /** WebSocket URL; default ws(s)://<page host>/ws. http(s):// and page-relative URLs are converted. */
  url?: string | null;
  /** Connection token (JWT). */
  token?: string | null;
  /** Called before every (re)connect, and before the connection token expires (renewed in-band). */
  getToken?: TokenGetter | null;
  /** ms, lower bound of the reconnect delay (default 500). */
  minReconnectDelay?: number;
  /** ms, upper bound of the reconnect delay (default 20000). */
  maxReconnectDelay?: number;
  /** ms, per request and for the socket to open and answer `connect` (default 10000). */
  timeout?: number;
  /** ms, how long publish() keeps retrying, with the same idempotency key (default 30000). */
  publishDeadline?: number;
  /** ms of silence after which the client pings the server; 0 disables (default 25000). */
  pingInterval?: number;
  /** false: never reconnect automatically (default true). */
  reconnect?: boolean;
  /** WebSocket constructor; default globalThis.WebSocket. In Node: `require("ws")`. */
  WebSocket?: WebSocketConstructor | null;
  /** Log every frame and event with console.debug. */
  debug?: boolean;
}

export interface RequestOptions {
  /** ms; overrides the client's `timeout` for this call. */
  timeout?: number;
}

export interface SubscribeOptions {
  /** Resume after this position: the server replays what came after it. */
  since?: Position | null;
  /** A fixed subscription token. */
  token?: string | null;
  /** A fresh subscription token before every (re)subscribe and before the grant expires. */
  getToken?: SubscriptionTokenGetter | null;
}

export interface PublishOptions extends RequestOptions {
  /** 1-64 characters; default: a random key. A repeat with the same key is stored once. */
  idempotencyKey?: string;
  /** ms, overall time for the retries (default: the client's publishDeadline); 0: no retry. */
  deadline?: number;
}

export interface HistoryOptions extends RequestOptions {
  /** 1-1000. */
  limit?: number;
  since?: Position | null;
}

export interface ConnectResult {
  client: string;
  version: number;
  user: string;
  expires?: number;
  ttl?: number;
}

export interface SubscribeResult {
  channel: string;
  offset: number;
  epoch: string;
  recovered?: boolean;
  /** With a subscription token: when the grant ends (Unix seconds), and seconds until then. */
  expires?: number;
  ttl?: number;
}

export interface PublishResult {
  offset: number;
  epoch: string;
  id: string;
}

export interface HistoryResult<T = any> {
  publications: Publication<T>[];
  offset: number;
  epoch: string;
  recovered?: boolean;
}

export interface PresenceResult {
  clients: { client: string; user: string }[];
  count: number;
}

export interface ConnectedEvent {
  client: string | null;
  version: number | undefined;
}

export interface DisconnectEvent {
  code: number;
  reason: string;
  reconnect: boolean;
}

export interface ReconnectingEvent {
  attempt: number;
  delay: number;
}

export interface SubscribedEvent {
  channel: string;
  offset: number;
  epoch: string;
  recovered: boolean | undefined;
}

export interface GapEvent {
  channel: string;
  reason: "not_recovered" | "epoch" | "missing";
  epochChanged: boolean;
  previous: Position;
  position: Position;
  missing?: { from: number; to: number };
}

export interface PresenceEvent {
  channel: string;
  client: string;
  user: string;
}

export interface UnsubscribedEvent {
  channel: string;
  code: ErrorCode | (string & {});
  reason: string;
  /** true: the grant ended; subscribe again with a fresh token and `since: position`. */
  resubscribe: boolean;
  /** The last position delivered on the channel, or null. */
  position: Position | null;
}

/** Event name → listener arguments. */
export interface TidingsEvents {
  state: [state: ConnectionState, previous: ConnectionState];
  connected: [event: ConnectedEvent];
  disconnect: [event: DisconnectEvent];
  reconnecting: [event: ReconnectingEvent];
  subscribed: [event: SubscribedEvent];
  gap: [event: GapEvent];
  message: [publication: Publication];
  join: [event: PresenceEvent];
  leave: [event: PresenceEvent];
  unsubscribed: [event: UnsubscribedEvent];
  error: [error: TidingsError];
  /** A push of a type this version does not know. */
  push: [push: { type: string; [key: string]: unknown }];
}

export type TidingsEventName = keyof TidingsEvents;
export type Listener<E extends TidingsEventName> = (...args: TidingsEvents[E]) => void;

export class Tidings {
  constructor(options?: TidingsOptions | string);

  static readonly PROTOCOL_VERSION: 1;
  /** This library's version (the package's, which is the server's). */
  static readonly VERSION: string;
  static readonly Error: typeof TidingsError;
  static readonly TidingsError: typeof TidingsError;
  static readonly Tidings: typeof Tidings;
  static readonly TidingsClient: typeof Tidings;
  static readonly default: typeof Tidings;

  readonly options: Required<TidingsOptions>;
  /** The resolved WebSocket URL. */
  readonly url: string;
  readonly state: ConnectionState;
  /** This connection's client id (from the `connect` reply), or null. */
  readonly clientId: string | null;

  /** Open the connection and keep it open. */
  connect(): this;
  /** Close for good (no reconnect); waiting requests reject with `closed`. */
  close(): this;
  /** The connection token for the next (re)connect. */
  setToken(token: string | null): this;

  on<E extends TidingsEventName>(event: E, listener: Listener<E>): () => void;
  once<E extends TidingsEventName>(event: E, listener: Listener<E>): () => void;
  off<E extends TidingsEventName>(event: E, listener?: Listener<E>): this;

  subscribe<T = any>(
    channel: string,
    handler?: ((publication: Publication<T>) => void) | null,
    options?: SubscribeOptions
  ): Promise<SubscribeResult>;
  subscribe(channel: string, options: SubscribeOptions): Promise<SubscribeResult>;
  unsubscribe(channel: string, handler?: (publication: Publication<any>) => void): Promise<{}>;

  /** `data`: any JSON-encodable value (undefined is sent as null). */
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<PublishResult>;
  history<T = any>(channel: string, options?: HistoryOptions): Promise<HistoryResult<T>>;
  presence(channel: string, options?: RequestOptions): Promise<PresenceResult>;
  ping(options?: RequestOptions): Promise<{}>;
  /** Any command, for ops this library does not wrap. */
  request(op: string, fields?: Record<string, unknown>, options?: RequestOptions): Promise<Record<string, any>>;

  /** The last position delivered on a channel, or null. */
  position(channel: string): Position | null;
  /** Channels subscribed, or to be re-subscribed on reconnect. */
  subscriptions(): string[];
}

export { Tidings as TidingsClient };
export declare const PROTOCOL_VERSION: 1;
export declare const VERSION: string;
export default Tidings;
