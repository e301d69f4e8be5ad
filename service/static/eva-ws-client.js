// eva-ws browser client: one WebSocket, subscriptions that survive reconnects, exactly-once events.
//
// Dependency-free ES module. Works in browsers and in Node >= 20 (pass `WebSocket` in the
// options where the runtime has none). The protocol is described in docs/asyncapi.yaml and
// docs/clients.md; the close codes below mirror service/protocol.py.

/**
 * The server's close codes (docs/protocol.md, service/protocol.py's CloseCode): what each means,
 * and whether this client reconnects after it. `false` where the server advises against it: the
 * session was ended on purpose, or the same client would fail the same way again ("fix the
 * client"). 4001 reconnects only with a new token. Codes not listed reconnect with backoff.
 */
export const CLOSE_CODES = Object.freeze({
  1000: Object.freeze({ meaning: 'normal closure', reconnect: false }),
  1001: Object.freeze({ meaning: 'going away', reconnect: true }),
  1002: Object.freeze({ meaning: 'protocol error', reconnect: false }),
  1003: Object.freeze({ meaning: 'unsupported data', reconnect: false }),
  1006: Object.freeze({ meaning: 'connection lost without a close frame', reconnect: true }),
  1007: Object.freeze({ meaning: 'invalid text', reconnect: false }),
  // Sustained rate-limit abuse: reconnecting at once would be the same abuse again.
  1008: Object.freeze({ meaning: 'policy violation', reconnect: false }),
  1009: Object.freeze({ meaning: 'message too big', reconnect: false }),
  1011: Object.freeze({ meaning: 'server error', reconnect: true }),
  1012: Object.freeze({ meaning: 'service restart', reconnect: true }),
  4001: Object.freeze({ meaning: 'token expired', reconnect: 'with a new token' }),
  4003: Object.freeze({ meaning: 'disconnected by the server', reconnect: false }),
  4008: Object.freeze({ meaning: 'slow consumer', reconnect: true }),
  4013: Object.freeze({ meaning: 'rebalance', reconnect: true }),
});
/** Close codes after which reconnecting would not help (or is forbidden for a while). */
export const NO_RECONNECT_CODES = Object.freeze(new Set(
  Object.entries(CLOSE_CODES).filter(([, { reconnect }]) => reconnect === false).map(([code]) => Number(code)),
));
/** An operator disconnected the user or revoked its token: do not reconnect; the user must sign in again. */
export const DISCONNECTED_BY_SERVER_CODE = 4003;
/** The token expired without a refresh: reconnect only with a new token. */
export const TOKEN_EXPIRED_CODE = 4001;

// Errors after which a subscribe is worth retrying later; every other error code is final.
const RETRYABLE_SUBSCRIBE_ERRORS = new Set(['unavailable', 'rate_limited', 'internal_error']);

// CustomEvent where the runtime has it (browsers, Node >= 19); an Event with `detail` elsewhere.
function makeEvent(type, detail) {
  if (typeof CustomEvent === 'function') return new CustomEvent(type, { detail });
  return Object.assign(new Event(type), { detail });
}

/** The states a client moves through; `closed` is final until connect() or setToken(). */
export const State = Object.freeze({
  IDLE: 'idle',
  CONNECTING: 'connecting',
  OPEN: 'open',
  RECONNECTING: 'reconnecting',
  CLOSED: 'closed',
});

/**
 * Delay before reconnect attempt `attempt` (0-based): "full jitter", uniform in
 * [0, min(maxDelayMs, initialDelayMs * 2^attempt)). Spreading every client over the
 * whole window is what keeps a rolling deploy from turning into a reconnect storm.
 */
export function backoffDelayMs(attempt, { initialDelayMs = 1000, maxDelayMs = 30000, random = Math.random } = {}) {
  const ceiling = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * ceiling);
}

/** The `exp` claim of a JWT in milliseconds, or null when the token is not a readable JWT. */
export function tokenExpiryMs(token) {
  try {
    const payload = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const exp = JSON.parse(atob(payload.padEnd(payload.length + ((4 - (payload.length % 4)) % 4), '='))).exp;
    return typeof exp === 'number' ? exp * 1000 : null;
  } catch {
    return null;
  }
}

/**
 * Where one subscription stands in its stream: the last offset and epoch delivered (or
 * acknowledged). Offsets increase per subscription but skip the events that filters drop,
 * so "new" means "greater than the last one", never "exactly one more".
 */
export class Position {
  constructor() {
    this.offset = null;
    this.epoch = null;
  }

  /** The `since` to send when re-subscribing, or undefined before the first acknowledgement. */
  get since() {
    return this.epoch === null ? undefined : { offset: this.offset, epoch: this.epoch };
  }

  /** Move to a position the server stated (ack or resync). */
  reset(position) {
    this.offset = position.offset;
    this.epoch = position.epoch;
  }

  /**
   * Record an event; false when it was already delivered (same epoch, offset not beyond the
   * last). An event of another epoch is a new stream: it is accepted and the epoch adopted.
   */
  accept(offset, epoch) {
    if (epoch === this.epoch && offset <= this.offset) return false;
    this.offset = offset;
    this.epoch = epoch;
    return true;
  }
}

/**
 * The order key of a transaction's data, as the server's state store orders it: an integer
 * `version`, else an `updatedAt` string, else none (no order: the newest message wins).
 */
export function versionOf(data) {
  if (data && Number.isInteger(data.version)) return { kind: 'n', value: data.version };
  if (data && typeof data.updatedAt === 'string') return { kind: 's', value: data.updatedAt };
  return null;
}

/** Whether `version` is older than `than`: both of one kind, and smaller. */
export function isOlder(version, than) {
  if (!version || !than || version.kind !== than.kind) return false;
  return version.value < than.value;
}

const TRANSACTION_EVENTS = new Set(['transaction_new', 'transaction_update', 'stage_change', 'transaction_delete']);

/** One wanted subscription. It lives across reconnects until unsubscribe() is called. */
export class Subscription {
  // Private: events carry the subscription, and the client holds the token. Nothing that
  // serialises or inspects an event (JSON.stringify, console, an error reporter) reaches it.
  #client;

  constructor(client, id, channel, filters, handlers) {
    this.#client = client;
    this.id = id;
    this.channel = channel;
    this.filters = filters;
    this.handlers = handlers;
    /** The server's subscription key ("transactions:CUST-001"), known after the first ack. */
    this.key = null;
    this.position = new Position();
    /** True between the server's ack and the next disconnect. */
    this.active = false;
    this.closed = false;
    this.retryTimer = null;
    /** Asked with `{snapshot: true}`: the current transactions by id, kept up to date by events. */
    this.state = handlers.snapshot ? new Map() : null;
    this.snapshotParts = null; // transactions of a snapshot whose last message has not arrived
    this.ack = null;
    this.ready = new Promise((resolve, reject) => {
      this.resolveReady = resolve;
      this.rejectReady = reject;
    });
    // Callers that never await `ready` must not get an unhandled rejection.
    this.ready.catch(() => {});
  }

  /** Stop receiving; see EvaWsClient.unsubscribe. */
  unsubscribe() {
    this.#client.unsubscribe(this);
  }

  /** What JSON.stringify writes: the public fields, without handlers or timers. */
  toJSON() {
    const { id, channel, filters, key, active, closed } = this;
    return { id, channel, filters, key, position: { offset: this.position.offset, epoch: this.position.epoch }, active, closed };
  }
}

/**
 * The client. Events (all CustomEvent, payload in `detail`):
 *   state       {state, previous, code?, reason?, attempt?, delayMs?}
 *   event       {message, subscription}             one server event, exactly once
 *   subscribed  {subscription, ack}
 *   resumed     {subscription, replayed}            resume succeeded; `replayed` missed events follow
 *   resync      {subscription, position, reason}    events were lost: refetch the state (a snapshot follows
 *                                                   for a subscription made with {snapshot: true})
 *   snapshot    {subscription, transactions, position} the current state of a {snapshot: true} subscription
 *   reconnected {missed, resynced}                  every subscription is back after a reconnect
 *   unsubscribed {subscription}
 *   tokenrefreshed {expiresAt}
 *   error       {code, message, correlationId?, subscription?}
 */
export class EvaWsClient extends EventTarget {
  /**
   * @param {object} options see eva-ws-client.d.ts (EvaWsClientOptions)
   */
  constructor(options) {
    super();
    if (!options || !options.url) throw new TypeError('EvaWsClient needs options.url');
    if (options.token === undefined) throw new TypeError('EvaWsClient needs options.token (a string or a function)');
    this.options = {
      initialDelayMs: 1000,
      maxDelayMs: 30000,
      pingIntervalMs: 30000,
      pongTimeoutMs: 10000,
      tokenTimeoutMs: 15000,
      random: Math.random,
      ...options,
    };
    this.WebSocket = options.WebSocket || globalThis.WebSocket;
    if (!this.WebSocket) throw new TypeError('no WebSocket implementation: pass options.WebSocket');
    this.state = State.IDLE;
    this.token = typeof options.token === 'string' ? options.token : null;
    this.subscriptions = new Map(); // correlationId of the last subscribe -> Subscription
    this.wanted = new Set(); // every Subscription not yet unsubscribed, in subscribe order
    this.ws = null;
    this.attempt = 0; // failed attempts since the last connection that stayed up
    this.reconnects = 0; // reconnect attempts in the current outage, sent as ?reconnect=N
    this.timers = new Set();
    this.seq = 0;
    this.generation = 0; // bumped by every open() and close(): a stale open() gives up
    this.pendingAcks = null; // {missed, resynced, waiting:Set} while re-subscribing after a reconnect
    this.lastInboundAt = 0;
    // The newest version shown per transaction id, across subscriptions and channels: an
    // update older than it is not delivered (a transaction may arrive on several channels).
    this.versions = new Map();
    if (options.autoConnect !== false) queueMicrotask(() => this.state === State.IDLE && this.connect());
  }

  // -- public API -------------------------------------------------------------------

  /** Open the connection (again). Called automatically unless `autoConnect: false`. */
  connect() {
    if (this.state === State.CONNECTING || this.state === State.OPEN) return;
    this.clearTimers();
    this.attempt = 0;
    // While reconnecting this retries at once; after close() it starts afresh (and still
    // resumes every wanted subscription from its position).
    if (this.state !== State.RECONNECTING) this.reconnects = 0;
    this.open('connect');
  }

  /** Close for good: no reconnect until connect() is called again. */
  close(code = 1000, reason = 'client closed') {
    this.generation += 1;
    this.clearTimers();
    const ws = this.ws;
    this.detach();
    if (ws) ws.close(code, reason);
    this.setState(State.CLOSED, { code, reason });
  }

  /** Replace a static token; after a 4001 close this also reconnects. */
  setToken(token) {
    this.token = token;
    if (this.state === State.OPEN) this.sendRefresh(token);
    else if (this.state === State.CLOSED && this.closedForToken) this.connect();
  }

  /**
   * Subscribe to a channel with filters. Works in any state: the subscription is part of
   * the wanted set and is (re)sent whenever a connection opens, with `since` once the
   * server has acknowledged it. Returns a Subscription; `await sub.ready` for the first ack.
   * With `handlers.snapshot: true` the server sends the current state first: `sub.ready`
   * resolves once it arrived, with the ack and `transactions` (also in `sub.state`), and
   * the events that follow are the changes after it.
   */
  subscribe(channel, filters = {}, handlers = {}) {
    const sub = new Subscription(this, ++this.seq, channel, filters, handlers);
    this.wanted.add(sub);
    if (this.state === State.OPEN) this.sendSubscribe(sub);
    return sub;
  }

  /**
   * Stop a subscription. Offline this just forgets it (the server dropped every subscription
   * with the connection); online it also tells the server. Events still in flight for it are
   * dropped.
   */
  unsubscribe(sub) {
    if (sub.closed) return;
    sub.closed = true;
    this.wanted.delete(sub);
    clearTimeout(sub.retryTimer);
    sub.rejectReady(new Error('unsubscribed'));
    this.settleReconnect(sub, 0, 0);
    if (this.state === State.OPEN && sub.active) {
      this.send({ type: 'unsubscribe', channel: sub.channel, filters: sub.filters, correlationId: this.nextId('unsub') });
    }
    sub.active = false;
  }

  /** Register a listener; returns a function that removes it. */
  on(type, listener) {
    const wrapped = (event) => listener(event.detail);
    this.addEventListener(type, wrapped);
    return () => this.removeEventListener(type, wrapped);
  }

  // -- connection life --------------------------------------------------------------

  async open(reason) {
    const generation = ++this.generation;
    this.setState(this.reconnects > 0 ? State.RECONNECTING : State.CONNECTING, { attempt: this.reconnects });
    let token;
    try {
      token = await this.currentToken(reason);
    } catch (error) {
      this.emit('error', { code: 'token_provider_failed', message: String(error && error.message ? error.message : error) });
      this.scheduleReconnect(null, 'token provider failed');
      return;
    }
    // close() or another connect() while the token was being fetched.
    if (generation !== this.generation || this.state === State.CLOSED) return;
    const url = new URL(this.options.url, globalThis.location ? globalThis.location.href : undefined);
    if (url.protocol === 'http:' || url.protocol === 'https:') url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.searchParams.set('token', token);
    if (this.options.customerId) url.searchParams.set('customerId', this.options.customerId);
    if (this.reconnects > 0) url.searchParams.set('reconnect', String(this.reconnects));
    const ws = new this.WebSocket(url.toString());
    this.ws = ws;
    ws.onopen = () => this.onOpen(ws);
    ws.onmessage = (event) => this.onMessage(ws, event);
    ws.onclose = (event) => this.onClose(ws, event.code, event.reason);
    // Browsers follow every error with a close event (1006 for a refused handshake), but Node 20's
    // WebSocket fires only `error` and stays CONNECTING: treat an error before `open` as that close.
    // onClose() detaches the socket, so a close that does follow is not handled again.
    ws.onerror = () => {
      if (ws.readyState !== 0) return;
      this.onClose(ws, 1006, 'the handshake failed');
      try {
        ws.close();
      } catch {
        // Already closing: nothing to release.
      }
    };
  }

  async currentToken(reason) {
    const provider = this.options.token;
    if (typeof provider !== 'function') return this.token;
    // A provider stuck on a dead HTTP connection must not stall reconnecting forever.
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error('the token provider timed out')), this.options.tokenTimeoutMs);
    });
    try {
      this.token = await Promise.race([provider({ reason }), timeout]);
    } finally {
      clearTimeout(timer);
    }
    if (typeof this.token !== 'string' || !this.token) throw new Error('the token provider returned no token');
    return this.token;
  }

  onOpen(ws) {
    if (ws !== this.ws) return;
    this.lastInboundAt = Date.now();
    this.closedForToken = false;
    const wasReconnect = this.reconnects > 0;
    this.reconnects = 0;
    this.setState(State.OPEN, {});
    // A connection that stays up this long proves the server healthy: start backoff afresh.
    this.later(() => { this.attempt = 0; }, Math.max(5000, this.options.initialDelayMs));
    this.startHeartbeat(ws);
    const subs = [...this.wanted];
    this.pendingAcks = wasReconnect && subs.length ? { missed: 0, resynced: 0, waiting: new Set(subs) } : null;
    for (const sub of subs) this.sendSubscribe(sub);
  }

  onClose(ws, code, reason) {
    if (ws !== this.ws) return;
    this.detach();
    this.afterDisconnect(code, reason);
  }

  afterDisconnect(code, reason) {
    if (code === TOKEN_EXPIRED_CODE) {
      if (typeof this.options.token === 'function') {
        this.scheduleReconnect(code, reason, 'expired');
      } else {
        this.closedForToken = true;
        this.setState(State.CLOSED, { code, reason: 'token expired: call setToken() with a new token' });
      }
      return;
    }
    if (code !== null && NO_RECONNECT_CODES.has(code)) {
      this.setState(State.CLOSED, { code, reason });
      return;
    }
    // A static token that has expired can never open a connection again; say so instead of looping.
    const expiry = typeof this.options.token === 'string' ? tokenExpiryMs(this.token) : null;
    if (expiry !== null && expiry <= Date.now()) {
      this.closedForToken = true;
      this.setState(State.CLOSED, { code, reason: 'token expired: call setToken() with a new token' });
      return;
    }
    this.scheduleReconnect(code, reason);
  }

  scheduleReconnect(code, reason, tokenReason = 'reconnect') {
    const delayMs = backoffDelayMs(this.attempt, this.options);
    this.attempt += 1;
    this.reconnects += 1;
    this.setState(State.RECONNECTING, { code, reason, attempt: this.reconnects, delayMs });
    this.later(() => this.open(tokenReason), delayMs);
  }

  detach() {
    const ws = this.ws;
    this.ws = null;
    this.clearTimers();
    this.pendingAcks = null;
    for (const sub of this.wanted) {
      sub.active = false;
      clearTimeout(sub.retryTimer);
    }
    this.subscriptions.clear();
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
  }

  // Application-level ping. WebSocket pings from the server are answered by the browser
  // itself, but a browser never notices a half-open connection on its own: when nothing at
  // all arrives within pongTimeoutMs of a ping, the socket is abandoned and replaced.
  startHeartbeat(ws) {
    const { pingIntervalMs, pongTimeoutMs } = this.options;
    if (!pingIntervalMs) return;
    const tick = () => {
      if (ws !== this.ws) return;
      const sentAt = Date.now();
      this.send({ type: 'ping', correlationId: this.nextId('ping') });
      this.later(() => {
        if (ws !== this.ws || this.lastInboundAt >= sentAt) return;
        this.detach();
        try {
          ws.close(4000, 'no pong');
        } catch { /* the socket may already be gone */ }
        this.afterDisconnect(null, 'no pong');
      }, pongTimeoutMs);
      this.later(tick, pingIntervalMs);
    };
    this.later(tick, pingIntervalMs);
  }

  // -- messages ---------------------------------------------------------------------

  onMessage(ws, event) {
    if (ws !== this.ws) return;
    this.lastInboundAt = Date.now();
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      this.emit('error', { code: 'invalid_server_message', message: 'the server sent a frame that is not JSON' });
      return;
    }
    this.handleMessage(message);
  }

  onUnsubscribed(message) {
    if (message.reason) {
      // The server ended it (a refreshed token no longer allows it, or an operator ended it):
      // stop wanting it, so a reconnect does not ask for it again.
      const sub = [...this.wanted].find((s) => s.key === message.subscription);
      if (sub) {
        sub.active = false; // already gone on the server: nothing to send
        this.unsubscribe(sub);
      }
    }
    this.emit('unsubscribed', { subscription: message.subscription, reason: message.reason });
  }

  handleMessage(message) {
    switch (message.type) {
      case 'subscribed': return this.onSubscribed(message);
      case 'unsubscribed': return this.onUnsubscribed(message);
      case 'resync': return this.onResync(message);
      case 'snapshot': return this.onSnapshot(message);
      case 'error': return this.onError(message);
      case 'refreshed': return this.emit('tokenrefreshed', { expiresAt: message.expiresAt });
      case 'pong': return undefined;
      default: return this.onEvent(message);
    }
  }

  onSubscribed(ack) {
    const sub = this.subscriptions.get(ack.correlationId);
    if (!sub) return;
    if (sub.closed) {
      // unsubscribe() ran while this subscribe was in flight: the server holds it now.
      this.send({ type: 'unsubscribe', channel: sub.channel, filters: sub.filters, correlationId: this.nextId('unsub') });
      return;
    }
    sub.key = ack.subscription;
    sub.active = true;
    const resumed = ack.recovered === true;
    // The ack's position is where the subscription starts (after a resume: the `since` sent);
    // the `replayed` missed events follow it.
    sub.position.reset(ack.position);
    if (resumed) {
      this.emit('resumed', { subscription: sub, replayed: ack.replayed });
      sub.handlers.onResumed?.(ack.replayed);
    }
    if (ack.recovered === false) this.resync(sub, ack.position, 'not_recovered');
    // Lost or not, the `replayed` events follow the ack: a lost position is where they start.
    this.settleReconnect(sub, ack.replayed ?? 0, ack.recovered === false ? 1 : 0);
    this.emit('subscribed', { subscription: sub, ack });
    sub.ack = ack;
    // A snapshot subscription is ready once its snapshot arrived (see onSnapshot).
    if (!ack.snapshot || resumed) sub.resolveReady(ack);
  }

  onSnapshot(message) {
    const sub = this.byKey(message.subscription);
    if (!sub || !sub.state) return;
    sub.snapshotParts = (sub.snapshotParts || []).concat(message.data.transactions);
    if (!message.data.last) return;
    const transactions = sub.snapshotParts;
    sub.snapshotParts = null;
    sub.position.reset(message.position);
    sub.state.clear();
    for (const data of transactions) {
      // The snapshot is what the server holds now: it is what this client shows from here on.
      sub.state.set(data.id, data);
      this.versions.set(data.id, versionOf(data));
    }
    sub.handlers.onSnapshot?.(transactions, message.position);
    this.emit('snapshot', { subscription: sub, transactions, position: message.position });
    sub.resolveReady({ ...sub.ack, transactions });
  }

  /** False for a transaction event older than the version this client shows; records the newer. */
  isCurrent(message) {
    const data = message.data;
    if (!TRANSACTION_EVENTS.has(message.type) || !data || data.id === undefined) return true;
    const version = versionOf(data);
    if (isOlder(version, this.versions.get(data.id))) return false;
    if (version) this.versions.set(data.id, version);
    return true;
  }

  onResync(message) {
    const sub = this.byKey(message.subscription);
    if (sub) {
      sub.position.reset(message.position);
      this.resync(sub, message.position, 'server_resync');
    }
  }

  onEvent(message) {
    if (typeof message.subscription !== 'string' || typeof message.offset !== 'number') {
      this.emit('error', { code: 'invalid_server_message', message: `unexpected message type ${message.type}` });
      return;
    }
    const sub = this.byKey(message.subscription);
    if (!sub) return; // unsubscribed while the event was in flight
    const previousEpoch = sub.position.epoch;
    if (!sub.position.accept(message.offset, message.epoch)) return; // a duplicate
    if (previousEpoch !== null && message.epoch !== previousEpoch) {
      // Offsets of another epoch say nothing about what was missed in between.
      this.resync(sub, { offset: message.offset, epoch: message.epoch }, 'epoch_changed');
    }
    if (!this.isCurrent(message)) return; // an older version than the one shown: superseded
    if (sub.state && message.data && message.data.id !== undefined && TRANSACTION_EVENTS.has(message.type)) {
      if (message.type === 'transaction_delete') sub.state.delete(message.data.id);
      else sub.state.set(message.data.id, message.data);
    }
    sub.handlers.onEvent?.(message);
    this.emit('event', { message, subscription: sub });
  }

  onError(error) {
    const sub = error.correlationId ? this.subscriptions.get(error.correlationId) : undefined;
    if (error.code === 'token_expiring') {
      this.refreshToken();
    } else if (sub && !sub.active && !sub.closed) {
      this.subscriptions.delete(error.correlationId);
      if (RETRYABLE_SUBSCRIBE_ERRORS.has(error.code)) {
        sub.retryTimer = setTimeout(() => this.state === State.OPEN && this.sendSubscribe(sub),
          backoffDelayMs(2, this.options));
      } else {
        // Forbidden, invalid filters, too many subscriptions: asking again cannot help.
        this.wanted.delete(sub);
        sub.closed = true;
        sub.rejectReady(Object.assign(new Error(error.message), { code: error.code }));
        this.settleReconnect(sub, 0, 0);
      }
    }
    this.emit('error', { code: error.code, message: error.message, correlationId: error.correlationId, subscription: sub });
  }

  async refreshToken() {
    if (typeof this.options.token !== 'function') {
      // A static token cannot be renewed here; the app may call setToken() within the grace period.
      this.emit('tokenexpiring', {});
      return;
    }
    const ws = this.ws;
    try {
      const token = await this.currentToken('expiring');
      if (ws === this.ws && this.state === State.OPEN) this.sendRefresh(token);
    } catch (error) {
      this.emit('error', { code: 'token_provider_failed', message: String(error && error.message ? error.message : error) });
    }
  }

  sendRefresh(token) {
    this.send({ type: 'refresh', token, correlationId: this.nextId('refresh') });
  }

  sendSubscribe(sub) {
    const correlationId = this.nextId('sub');
    this.subscriptions.set(correlationId, sub);
    const message = { type: 'subscribe', channel: sub.channel, filters: sub.filters, correlationId };
    const since = sub.position.since;
    if (since) message.since = since;
    if (sub.state) message.snapshot = true;
    this.send(message);
  }

  // After a reconnect, 'reconnected' sums up once every wanted subscription is settled.
  settleReconnect(sub, missed, resynced) {
    const pending = this.pendingAcks;
    if (!pending || !pending.waiting.delete(sub)) return;
    pending.missed += missed;
    pending.resynced += resynced;
    if (pending.waiting.size > 0) return;
    this.pendingAcks = null;
    this.emit('reconnected', { missed: pending.missed, resynced: pending.resynced });
  }

  resync(sub, position, reason) {
    sub.handlers.onResync?.(position, reason);
    this.emit('resync', { subscription: sub, position, reason });
  }

  // -- small utilities --------------------------------------------------------------

  byKey(key) {
    for (const sub of this.wanted) if (sub.key === key && sub.active) return sub;
    return undefined;
  }

  send(message) {
    if (this.ws && this.ws.readyState === 1) this.ws.send(JSON.stringify(message));
  }

  nextId(prefix) {
    return `${prefix}-${++this.seq}`;
  }

  later(fn, delayMs) {
    const timer = setTimeout(() => {
      this.timers.delete(timer);
      fn();
    }, delayMs);
    this.timers.add(timer);
  }

  clearTimers() {
    for (const timer of this.timers) clearTimeout(timer);
    this.timers.clear();
  }

  setState(state, info) {
    const previous = this.state;
    this.state = state;
    this.emit('state', { state, previous, ...info });
  }

  emit(type, detail) {
    this.dispatchEvent(makeEvent(type, detail));
  }
}

export default EvaWsClient;
