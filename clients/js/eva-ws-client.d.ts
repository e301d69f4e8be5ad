// Types for eva-ws-client.js (the module itself is plain JavaScript, no build step).

export type Channel = 'transactions' | 'user_updates' | 'notifications';

export interface Filters {
  customerId?: string;
  userId?: string;
  /** 1 to 100 transaction ids; events of other transactions are not sent. */
  transactionIds?: string[];
}

export interface StreamPosition {
  offset: number;
  epoch: string;
}

export type EventType =
  | 'transaction_update'
  | 'transaction_new'
  | 'transaction_delete'
  | 'stage_change'
  | 'user_update'
  | 'notification';

export interface ServerEvent<T = Record<string, unknown>> {
  type: EventType;
  channel: Channel;
  /** The subscription key, e.g. "transactions:CUST-001". */
  subscription: string;
  offset: number;
  epoch: string;
  data: T;
  timestamp: string;
  correlationId: string;
}

export interface SubscribedAck {
  type: 'subscribed';
  channel: Channel;
  subscription: string;
  filters: Filters;
  position: StreamPosition;
  /** Present only when the subscribe carried `since`. */
  recovered?: boolean;
  replayed?: number;
  /** Present when the subscribe asked for a snapshot. */
  snapshot?: true;
  correlationId: string | null;
  timestamp: string;
}

/** What `ready` of a `{snapshot: true}` subscription resolves with: the ack and the state it starts from. */
export interface SnapshotAck extends SubscribedAck {
  /** The newest data of every live transaction the subscription may see, in no particular order. */
  transactions: Array<Record<string, unknown> & { id: string }>;
}

/** The order of a transaction's versions: an integer `data.version`, else `data.updatedAt`. */
export type Version = { kind: 'n'; value: number } | { kind: 's'; value: string } | null;
export declare function versionOf(data: Record<string, unknown>): Version;
export declare function isOlder(version: Version, than: Version): boolean;

/** Why a token is asked for: the provider may cache for 'connect' and must renew otherwise. */
export type TokenReason = 'connect' | 'reconnect' | 'expired' | 'expiring';
export type TokenProvider = (context: { reason: TokenReason }) => string | Promise<string>;

export interface EvaWsClientOptions {
  /** e.g. "wss://api.example.com/ws/transactions"; http(s) and relative URLs are mapped to ws(s). */
  url: string;
  /** A token, or a function returning one (called before every connection attempt and on token_expiring). */
  token: string | TokenProvider;
  /** Routing key for the load balancer, sent as ?customerId=. */
  customerId?: string;
  /** Connect from the constructor (default true). */
  autoConnect?: boolean;
  /** Backoff window of the first retry; it doubles per failed attempt up to maxDelayMs. Default 1000. */
  initialDelayMs?: number;
  /** Default 30000. */
  maxDelayMs?: number;
  /** Application-level ping interval; 0 turns it off. Default 30000. */
  pingIntervalMs?: number;
  /** Abandon the socket when nothing arrives this long after a ping. Default 10000. */
  pongTimeoutMs?: number;
  /** A token function that has not answered after this long counts as failed (retried with backoff). Default 15000. */
  tokenTimeoutMs?: number;
  /** A WebSocket class, for runtimes without a global one. */
  WebSocket?: unknown;
  /** Source of randomness for the jitter, for tests. Default Math.random. */
  random?: () => number;
}

export type ClientState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

export interface SubscriptionHandlers {
  /** Start from the current state: `ready` resolves with it (SnapshotAck), `state` keeps it, events follow. */
  snapshot?: boolean;
  /** Every snapshot: the first, and the fresh one after a resync (replace what is shown). */
  onSnapshot?(transactions: Array<Record<string, unknown> & { id: string }>, position: StreamPosition): void;
  onEvent?(message: ServerEvent): void;
  onResync?(position: StreamPosition, reason: ResyncReason): void;
  onResumed?(replayed: number): void;
}

/** not_recovered: the server could not replay the gap; server_resync: history was lost while
 *  subscribed; epoch_changed: events of a new stream arrived. In every case: refetch. */
export type ResyncReason = 'not_recovered' | 'server_resync' | 'epoch_changed';

export declare class Position {
  offset: number | null;
  epoch: string | null;
  readonly since: StreamPosition | undefined;
  reset(position: StreamPosition): void;
  accept(offset: number, epoch: string): boolean;
}

export declare class Subscription {
  readonly id: number;
  readonly channel: Channel;
  readonly filters: Filters;
  /** The server's subscription key, known after the first acknowledgement. */
  readonly key: string | null;
  readonly position: Position;
  readonly active: boolean;
  readonly closed: boolean;
  /** Resolves with the first acknowledgement (with `snapshot: true`, once the snapshot arrived:
   *  a SnapshotAck); rejects on a final error or unsubscribe. */
  readonly ready: Promise<SubscribedAck | SnapshotAck>;
  /** With `snapshot: true`: the current transactions by id, updated by every event; else null. */
  readonly state: Map<string, Record<string, unknown>> | null;
  unsubscribe(): void;
  /** What JSON.stringify writes; never the client or its token. */
  toJSON(): SubscriptionJson;
}

export interface SubscriptionJson {
  id: number;
  channel: Channel;
  filters: Filters;
  key: string | null;
  position: { offset: number | null; epoch: string | null };
  active: boolean;
  closed: boolean;
}

export interface ClientEventMap {
  state: { state: ClientState; previous: ClientState; code?: number | null; reason?: string; attempt?: number; delayMs?: number };
  event: { message: ServerEvent; subscription: Subscription };
  subscribed: { subscription: Subscription; ack: SubscribedAck };
  resumed: { subscription: Subscription; replayed: number };
  resync: { subscription: Subscription; position: StreamPosition; reason: ResyncReason };
  snapshot: { subscription: Subscription; transactions: Array<Record<string, unknown> & { id: string }>; position: StreamPosition };
  reconnected: { missed: number; resynced: number };
  /** `reason` is set when the server ended the subscription: `forbidden` (a refreshed token no longer
   * allows it) or the reason an operator gave; the subscription is not asked for again. */
  unsubscribed: { subscription: string; reason?: string };
  tokenrefreshed: { expiresAt: string };
  tokenexpiring: Record<string, never>;
  error: { code: string; message: string; correlationId?: string | null; subscription?: Subscription };
}

/**
 * The server's close codes (docs/protocol.md): what each means and whether the client reconnects
 * after it (`false` where the server advises against it; 4001 only with a new token).
 */
export declare const CLOSE_CODES: Readonly<Record<number, Readonly<{ meaning: string; reconnect: boolean | 'with a new token' }>>>;
/** The codes of CLOSE_CODES after which the client stays closed. */
export declare const NO_RECONNECT_CODES: ReadonlySet<number>;
export declare const TOKEN_EXPIRED_CODE: 4001;
/** An operator disconnected the user or revoked its token: the client closes for good (state `closed`). */
export declare const DISCONNECTED_BY_SERVER_CODE: 4003;
export declare const State: Readonly<{
  IDLE: 'idle';
  CONNECTING: 'connecting';
  OPEN: 'open';
  RECONNECTING: 'reconnecting';
  CLOSED: 'closed';
}>;

export declare function backoffDelayMs(
  attempt: number,
  options?: { initialDelayMs?: number; maxDelayMs?: number; random?: () => number },
): number;
export declare function tokenExpiryMs(token: string): number | null;

export declare class EvaWsClient extends EventTarget {
  constructor(options: EvaWsClientOptions);
  readonly state: ClientState;
  connect(): void;
  close(code?: number, reason?: string): void;
  setToken(token: string): void;
  subscribe(channel: Channel, filters?: Filters, handlers?: SubscriptionHandlers): Subscription;
  unsubscribe(subscription: Subscription): void;
  on<K extends keyof ClientEventMap>(type: K, listener: (detail: ClientEventMap[K]) => void): () => void;
}

export default EvaWsClient;
