// A WebSocket stand-in that records what the client sends and lets a test play the server.

export class FakeWebSocket {
  static instances = [];

  constructor(url) {
    this.url = new URL(url);
    this.readyState = 0;
    this.sent = [];
    this.closedWith = null;
    FakeWebSocket.instances.push(this);
  }

  static reset() {
    FakeWebSocket.instances = [];
  }

  static get last() {
    return FakeWebSocket.instances.at(-1);
  }

  send(text) {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(JSON.parse(text));
  }

  close(code, reason) {
    this.closedWith = { code, reason };
    this.readyState = 3;
  }

  // -- the server's side --

  open() {
    this.readyState = 1;
    this.onopen?.({});
  }

  receive(message) {
    this.onmessage?.({ data: typeof message === 'string' ? message : JSON.stringify(message) });
  }

  serverClose(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }

  /** Messages of one type the client sent on this socket. */
  sentOf(type) {
    return this.sent.filter((m) => m.type === type);
  }

  /** Acknowledge the client's last subscribe the way the server does. */
  ack(subscribe, { offset = 0, epoch = 'e1', recovered, replayed = 0, key, position } = {}) {
    const ack = {
      type: 'subscribed',
      channel: subscribe.channel,
      subscription: key ?? `${subscribe.channel}:${subscribe.filters?.customerId ?? 'C1'}`,
      filters: subscribe.filters ?? {},
      position: position ?? (subscribe.since && recovered ? subscribe.since : { offset, epoch }),
      correlationId: subscribe.correlationId,
      timestamp: new Date().toISOString(),
    };
    if (recovered !== undefined) Object.assign(ack, { recovered, replayed });
    if (subscribe.snapshot) ack.snapshot = true;
    this.receive(ack);
    return ack;
  }
}

export function event(offset, { epoch = 'e1', key = 'transactions:C1', id = `T${offset}`, type = 'transaction_update' } = {}) {
  return {
    type,
    channel: key.split(':')[0],
    subscription: key,
    offset,
    epoch,
    data: { id, status: 'pending', stage: 'kyc' },
    timestamp: new Date().toISOString(),
    correlationId: `c-${offset}`,
  };
}

/** Poll until `check()` is truthy; fail with `what` after a generous deadline. */
export async function until(check, what = 'condition', deadlineMs = 5000) {
  const start = Date.now();
  for (;;) {
    const value = check();
    if (value) return value;
    if (Date.now() - start > deadlineMs) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 2));
  }
}

/** Collect every `detail` of a client event type. */
export function record(client, type) {
  const seen = [];
  client.on(type, (detail) => seen.push(detail));
  return seen;
}
