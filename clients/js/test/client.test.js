// Unit tests of eva-ws-client.js against a fake WebSocket: run with `node --test clients/js/test/`.
import assert from 'node:assert/strict';
import { afterEach, beforeEach, describe, test } from 'node:test';
import { inspect } from 'node:util';

import { backoffDelayMs, DISCONNECTED_BY_SERVER_CODE, EvaWsClient, Position, tokenExpiryMs } from '../eva-ws-client.js';
import { event, FakeWebSocket, record, until } from '../testing/fake-websocket.js';

function jwt(claims) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString('base64url');
  return `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}.signature`;
}

const clients = [];
function makeClient(options = {}) {
  const client = new EvaWsClient({
    url: 'ws://eva.test/ws/transactions',
    token: 'tok-1',
    customerId: 'C1',
    WebSocket: FakeWebSocket,
    initialDelayMs: 1,
    maxDelayMs: 4,
    pingIntervalMs: 0,
    ...options,
  });
  clients.push(client);
  return client;
}

/** Open the client's socket and acknowledge every subscribe it sends. */
async function openAndAck(client, ackOptions = {}) {
  const ws = await until(() => FakeWebSocket.last && FakeWebSocket.last.readyState === 0 && FakeWebSocket.last, 'a socket');
  ws.open();
  for (const subscribe of ws.sentOf('subscribe')) ws.ack(subscribe, ackOptions);
  return ws;
}

beforeEach(() => FakeWebSocket.reset());
afterEach(() => {
  for (const client of clients.splice(0)) client.close();
});

describe('backoff', () => {
  test('full jitter spans zero to the doubled ceiling', () => {
    const options = { initialDelayMs: 1000, maxDelayMs: 30000 };
    assert.equal(backoffDelayMs(0, { ...options, random: () => 0 }), 0);
    assert.equal(backoffDelayMs(0, { ...options, random: () => 0.999 }), 999);
    assert.equal(backoffDelayMs(3, { ...options, random: () => 0.5 }), 4000);
  });

  test('the ceiling is capped at maxDelayMs however many attempts failed', () => {
    const random = () => 0.999999;
    assert.equal(backoffDelayMs(50, { initialDelayMs: 1000, maxDelayMs: 30000, random }), 29999);
    assert.equal(backoffDelayMs(5000, { initialDelayMs: 1000, maxDelayMs: 30000, random }), 29999);
  });

  test('delays of many clients spread over the whole window rather than bunching', () => {
    const delays = Array.from({ length: 2000 }, () => backoffDelayMs(2, { initialDelayMs: 1000, maxDelayMs: 30000 }));
    assert.ok(delays.every((d) => d >= 0 && d < 4000));
    const quarters = [0, 1, 2, 3].map((q) => delays.filter((d) => Math.floor(d / 1000) === q).length);
    assert.ok(quarters.every((n) => n > 300), `uneven spread ${quarters}`);
  });
});

describe('token expiry', () => {
  test('reads exp from a JWT and tolerates anything else', () => {
    assert.equal(tokenExpiryMs(jwt({ sub: 'u', exp: 1700000000 })), 1700000000000);
    assert.equal(tokenExpiryMs('not-a-jwt'), null);
    assert.equal(tokenExpiryMs(jwt({ sub: 'u' })), null);
  });
});

describe('position bookkeeping', () => {
  test('offsets may skip but never repeat within an epoch', () => {
    const position = new Position();
    assert.equal(position.since, undefined);
    position.reset({ offset: 4, epoch: 'e1' });
    assert.ok(position.accept(7, 'e1'));
    assert.ok(position.accept(12, 'e1'));
    assert.equal(position.accept(12, 'e1'), false);
    assert.equal(position.accept(9, 'e1'), false);
    assert.deepEqual(position.since, { offset: 12, epoch: 'e1' });
    assert.ok(position.accept(1, 'e2'));
    assert.deepEqual(position.since, { offset: 1, epoch: 'e2' });
  });
});

describe('connecting', () => {
  test('the first connection carries the token and routing key but no reconnect count', async () => {
    const client = makeClient();
    const states = record(client, 'state');
    const ws = await openAndAck(client);
    assert.equal(ws.url.searchParams.get('token'), 'tok-1');
    assert.equal(ws.url.searchParams.get('customerId'), 'C1');
    assert.equal(ws.url.searchParams.get('reconnect'), null);
    assert.deepEqual(states.map((s) => s.state), ['connecting', 'open']);
  });

  test('an http URL is turned into a ws URL', async () => {
    makeClient({ url: 'https://eva.test/ws/transactions' });
    const ws = await until(() => FakeWebSocket.last, 'a socket');
    assert.equal(ws.url.protocol, 'wss:');
  });
});

describe('offline queue', () => {
  test('subscriptions made before the socket opens are sent when it opens', async () => {
    const client = makeClient();
    const sub = client.subscribe('transactions', { customerId: 'C1' });
    const ws = await until(() => FakeWebSocket.last, 'a socket');
    assert.equal(ws.sent.length, 0);
    ws.open();
    const [subscribe] = ws.sentOf('subscribe');
    assert.deepEqual(subscribe.filters, { customerId: 'C1' });
    assert.equal(subscribe.since, undefined);
    ws.ack(subscribe, { offset: 3 });
    const ack = await sub.ready;
    assert.equal(ack.subscription, 'transactions:C1');
    assert.equal(sub.key, 'transactions:C1');
  });

  test('a subscription dropped while offline is never sent', async () => {
    const client = makeClient();
    const kept = client.subscribe('transactions', { customerId: 'C1' });
    const dropped = client.subscribe('transactions', { customerId: 'C2' });
    dropped.unsubscribe();
    await assert.rejects(dropped.ready, /unsubscribed/);
    const ws = await openAndAck(client);
    assert.deepEqual(ws.sentOf('subscribe').map((m) => m.filters.customerId), ['C1']);
    assert.equal(ws.sentOf('unsubscribe').length, 0);
    await kept.ready;
  });

  test('unsubscribing while the subscribe is in flight unsubscribes once the ack arrives', async () => {
    const client = makeClient();
    const ws = await until(() => FakeWebSocket.last, 'a socket');
    ws.open();
    const sub = client.subscribe('transactions', { customerId: 'C1' });
    sub.unsubscribe();
    ws.ack(ws.sentOf('subscribe')[0]);
    assert.deepEqual(ws.sentOf('unsubscribe').map((m) => m.filters), [{ customerId: 'C1' }]);
  });
});

describe('events', () => {
  test('each event is delivered once, in order, though offsets skip', async () => {
    const client = makeClient();
    const received = [];
    client.subscribe('transactions', { customerId: 'C1' }, { onEvent: (m) => received.push(m.offset) });
    const ws = await openAndAck(client, { offset: 10 });
    for (const offset of [11, 14, 14, 13, 20, 11]) ws.receive(event(offset));
    assert.deepEqual(received, [11, 14, 20]);
  });

  test('events replayed from before the acknowledged position are dropped', async () => {
    const client = makeClient();
    const seen = record(client, 'event');
    client.subscribe('transactions', { customerId: 'C1' });
    const ws = await openAndAck(client, { offset: 10 });
    ws.receive(event(9));
    ws.receive(event(10));
    ws.receive(event(11));
    assert.deepEqual(seen.map((d) => d.message.offset), [11]);
  });

  test('events for a subscription that was dropped are ignored', async () => {
    const client = makeClient();
    const seen = record(client, 'event');
    const sub = client.subscribe('transactions', { customerId: 'C1' });
    const ws = await openAndAck(client);
    sub.unsubscribe();
    ws.receive(event(1));
    assert.equal(seen.length, 0);
    assert.deepEqual(ws.sentOf('unsubscribe').map((m) => m.channel), ['transactions']);
  });

  test('a server resync moves the position and asks the app to refetch', async () => {
    const client = makeClient();
    const resyncs = record(client, 'resync');
    const sub = client.subscribe('transactions', { customerId: 'C1' });
    const ws = await openAndAck(client, { offset: 5 });
    ws.receive({ type: 'resync', channel: 'transactions', subscription: 'transactions:C1', position: { offset: 90, epoch: 'e1' }, timestamp: 'x' });
    assert.equal(resyncs[0].reason, 'server_resync');
    assert.deepEqual(sub.position.since, { offset: 90, epoch: 'e1' });
  });

  test('garbage from the server is reported, not thrown', async () => {
    const client = makeClient();
    const errors = record(client, 'error');
    const ws = await openAndAck(client);
    ws.receive('not json');
    ws.receive({ type: 'mystery' });
    assert.deepEqual(errors.map((e) => e.code), ['invalid_server_message', 'invalid_server_message']);
  });
});

describe('reconnect and resume', () => {
  test('after a restart close the client reconnects and resumes from its last offset', async () => {
    const reasons = [];
    const client = makeClient({ token: ({ reason }) => { reasons.push(reason); return `tok-${reasons.length}`; } });
    const seen = record(client, 'event');
    const resumed = record(client, 'resumed');
    const reconnected = record(client, 'reconnected');
    client.subscribe('transactions', { customerId: 'C1' });
    client.subscribe('transactions', { customerId: 'C2' });
    const first = await openAndAck(client, { offset: 2 });
    first.receive(event(4));
    first.receive(event(7, { key: 'transactions:C2' }));
    first.serverClose(1012, 'service restart');

    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    assert.equal(second.url.searchParams.get('reconnect'), '1');
    assert.equal(second.url.searchParams.get('token'), 'tok-2');
    assert.deepEqual(reasons, ['connect', 'reconnect']);
    second.open();
    const subscribes = second.sentOf('subscribe');
    assert.deepEqual(subscribes.map((m) => m.since), [{ offset: 4, epoch: 'e1' }, { offset: 7, epoch: 'e1' }]);
    // As the server does, the ack repeats the `since` it was sent; the replayed events follow.
    second.ack(subscribes[0], { recovered: true, replayed: 2, position: { offset: 4, epoch: 'e1' } });
    second.receive(event(4)); // a duplicate of what arrived before the restart
    second.receive(event(5));
    second.receive(event(6));
    second.ack(subscribes[1], { recovered: true, replayed: 0, position: { offset: 7, epoch: 'e1' } });
    assert.deepEqual(seen.map((d) => d.message.offset), [4, 7, 5, 6]);
    assert.deepEqual(resumed.map((r) => r.replayed), [2, 0]);
    assert.deepEqual(reconnected, [{ missed: 2, resynced: 0 }]);
  });

  test('a resume the server cannot serve becomes a resync from the new position', async () => {
    const client = makeClient();
    const resyncs = record(client, 'resync');
    const reconnected = record(client, 'reconnected');
    const sub = client.subscribe('transactions', { customerId: 'C1' });
    const first = await openAndAck(client, { offset: 8, epoch: 'old' });
    first.serverClose(1006);
    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    second.open();
    const [subscribe] = second.sentOf('subscribe');
    assert.deepEqual(subscribe.since, { offset: 8, epoch: 'old' });
    second.ack(subscribe, { recovered: false, offset: 0, epoch: 'new' });
    assert.equal(resyncs[0].reason, 'not_recovered');
    assert.deepEqual(sub.position.since, { offset: 0, epoch: 'new' });
    assert.deepEqual(reconnected, [{ missed: 0, resynced: 1 }]);
    const seen = record(client, 'event');
    second.receive(event(1, { epoch: 'new' }));
    assert.equal(seen.length, 1);
  });

  test('a lost position is where the events history still holds resume: they count as missed', async () => {
    const client = makeClient();
    const resyncs = record(client, 'resync');
    const reconnected = record(client, 'reconnected');
    client.subscribe('transactions', { customerId: 'C1' });
    const first = await openAndAck(client, { offset: 8, epoch: 'old' });
    first.serverClose(1006);
    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    second.open();
    const [subscribe] = second.sentOf('subscribe');
    second.ack(subscribe, { recovered: false, replayed: 2, offset: 0, epoch: 'new' });
    const seen = record(client, 'event');
    second.receive(event(1, { epoch: 'new' }));
    second.receive(event(2, { epoch: 'new' }));
    assert.deepEqual(resyncs.map((r) => r.reason), ['not_recovered']);
    assert.deepEqual(seen.map((d) => d.message.offset), [1, 2]);
    assert.deepEqual(reconnected, [{ missed: 2, resynced: 1 }]);
  });

  test('an outage counts reconnect attempts and backs off between them', async () => {
    const client = makeClient();
    const states = record(client, 'state');
    await openAndAck(client);
    FakeWebSocket.last.serverClose(1006);
    for (let attempt = 2; attempt <= 4; attempt += 1) {
      const ws = await until(() => FakeWebSocket.instances.length === attempt && FakeWebSocket.last, `attempt ${attempt}`);
      assert.equal(ws.url.searchParams.get('reconnect'), String(attempt - 1));
      ws.serverClose(1006); // never opened: as a browser reports a refused handshake
    }
    const waits = states.filter((s) => s.state === 'reconnecting' && s.delayMs !== undefined);
    assert.deepEqual(waits.map((s) => s.attempt).slice(0, 3), [1, 2, 3]);
  });

  test('close code 4003 (disconnected by an operator) closes for good and says why', async () => {
    const client = makeClient();
    const states = [];
    client.addEventListener('state', (e) => states.push(e.detail));
    const ws = await openAndAck(client);
    ws.serverClose(DISCONNECTED_BY_SERVER_CODE, 'token revoked');
    assert.equal(client.state, 'closed');
    assert.deepEqual(
      { code: states.at(-1).code, reason: states.at(-1).reason },
      { code: 4003, reason: 'token revoked' },
    );
    await new Promise((resolve) => setTimeout(resolve, 30));
    assert.equal(FakeWebSocket.instances.length, 1);
  });

  for (const code of [1000, 1008, 1009]) {
    test(`close code ${code} ends the connection for good`, async () => {
      const client = makeClient();
      const ws = await openAndAck(client);
      ws.serverClose(code);
      assert.equal(client.state, 'closed');
      await new Promise((resolve) => setTimeout(resolve, 30));
      assert.equal(FakeWebSocket.instances.length, 1);
    });
  }

  test('close() stops reconnecting and a later connect() starts afresh', async () => {
    const client = makeClient();
    const ws = await openAndAck(client);
    client.close();
    assert.deepEqual(ws.closedWith, { code: 1000, reason: 'client closed' });
    assert.equal(client.state, 'closed');
    client.connect();
    const again = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a new socket');
    assert.equal(again.url.searchParams.get('reconnect'), null);
  });

  test('a socket that stops answering pings is replaced', async () => {
    const client = makeClient({ pingIntervalMs: 5, pongTimeoutMs: 20 });
    const first = await openAndAck(client);
    await until(() => first.sentOf('ping').length > 0, 'a ping');
    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a replacement socket');
    assert.equal(first.closedWith.code, 4000);
    assert.equal(second.url.searchParams.get('reconnect'), '1');
  });

  test('a socket that answers pings stays', async () => {
    const client = makeClient({ pingIntervalMs: 5, pongTimeoutMs: 20 });
    const ws = await openAndAck(client);
    for (let answered = 0; answered < 6; answered += 1) {
      await until(() => ws.sentOf('ping').length > answered, 'a ping');
      ws.receive({ type: 'pong', correlationId: ws.sentOf('ping')[answered].correlationId, timestamp: 'x' });
    }
    assert.equal(FakeWebSocket.instances.length, 1);
    assert.equal(client.state, 'open');
  });
});

describe('tokens', () => {
  test('token_expiring gets a fresh token from the provider sent as refresh', async () => {
    const reasons = [];
    const client = makeClient({ token: ({ reason }) => { reasons.push(reason); return Promise.resolve(`tok-${reasons.length}`); } });
    const refreshed = record(client, 'tokenrefreshed');
    const ws = await openAndAck(client);
    ws.receive({ type: 'error', code: 'token_expiring', message: 'send refresh', correlationId: null, timestamp: 'x' });
    const [refresh] = await until(() => ws.sentOf('refresh').length && ws.sentOf('refresh'), 'a refresh');
    assert.equal(refresh.token, 'tok-2');
    assert.deepEqual(reasons, ['connect', 'expiring']);
    ws.receive({ type: 'refreshed', expiresAt: '2030-01-01T00:00:00Z', correlationId: refresh.correlationId, timestamp: 'x' });
    assert.deepEqual(refreshed, [{ expiresAt: '2030-01-01T00:00:00Z' }]);
  });

  test('close 4001 with a provider reconnects with a fresh token', async () => {
    const reasons = [];
    const client = makeClient({ token: ({ reason }) => { reasons.push(reason); return `tok-${reasons.length}`; } });
    (await openAndAck(client)).serverClose(4001, 'token expired');
    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    assert.equal(second.url.searchParams.get('token'), 'tok-2');
    assert.deepEqual(reasons, ['connect', 'expired']);
  });

  test('close 4001 with a fixed token waits for setToken()', async () => {
    const client = makeClient();
    (await openAndAck(client)).serverClose(4001, 'token expired');
    assert.equal(client.state, 'closed');
    client.setToken('tok-new');
    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    assert.equal(second.url.searchParams.get('token'), 'tok-new');
  });

  test('a fixed token that has expired is not retried forever', async () => {
    const client = makeClient({ token: jwt({ sub: 'u', exp: Math.floor(Date.now() / 1000) - 10 }) });
    (await until(() => FakeWebSocket.last, 'a socket')).serverClose(1006);
    assert.equal(client.state, 'closed');
  });

  test('a failing provider is retried with backoff', async () => {
    let calls = 0;
    const client = makeClient({ token: () => { calls += 1; if (calls < 3) throw new Error('offline'); return 'tok'; } });
    const errors = record(client, 'error');
    const ws = await until(() => FakeWebSocket.last, 'a socket after two failures');
    assert.equal(ws.url.searchParams.get('token'), 'tok');
    assert.deepEqual(errors.map((e) => e.code), ['token_provider_failed', 'token_provider_failed']);
  });
});

test('a provider that never answers is given up on and asked again', async () => {
  let calls = 0;
  const client = makeClient({
    tokenTimeoutMs: 20,
    token: () => { calls += 1; return calls === 1 ? new Promise(() => {}) : 'tok'; },
  });
  const errors = record(client, 'error');
  const ws = await until(() => FakeWebSocket.last, 'a socket after the first provider call hung');
  assert.equal(ws.url.searchParams.get('token'), 'tok');
  assert.equal(errors[0].message, 'the token provider timed out');
});

describe('subscribe errors', () => {
  test('a forbidden subscription fails for good', async () => {
    const client = makeClient();
    const sub = client.subscribe('transactions', { customerId: 'C9' });
    const ws = await until(() => FakeWebSocket.last, 'a socket');
    ws.open();
    const [subscribe] = ws.sentOf('subscribe');
    ws.receive({ type: 'error', code: 'forbidden', message: 'no', correlationId: subscribe.correlationId, timestamp: 'x' });
    await assert.rejects(sub.ready, (error) => error.code === 'forbidden');
    ws.serverClose(1012);
    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    second.open();
    assert.equal(second.sentOf('subscribe').length, 0);
  });

  test('an unavailable subscription is asked for again', async () => {
    const client = makeClient();
    const sub = client.subscribe('transactions', { customerId: 'C1' });
    const ws = await until(() => FakeWebSocket.last, 'a socket');
    ws.open();
    const [first] = ws.sentOf('subscribe');
    ws.receive({ type: 'error', code: 'unavailable', message: 'retry', correlationId: first.correlationId, timestamp: 'x' });
    const retry = await until(() => ws.sentOf('subscribe')[1], 'a second subscribe');
    ws.ack(retry);
    assert.equal((await sub.ready).subscription, 'transactions:C1');
  });
});

describe('server-ended subscriptions', () => {
  test('an unsubscribed with a reason stops wanting the subscription', async () => {
    const client = makeClient({ token: 't' });
    const ended = record(client, 'unsubscribed');
    client.subscribe('transactions', { customerId: 'C1' });
    const socket = await openAndAck(client, { offset: 0 });
    socket.receive({ type: 'unsubscribed', channel: 'transactions', subscription: 'transactions:C1', filters: { customerId: 'C1' }, reason: 'forbidden', correlationId: null, timestamp: '2026-01-01T00:00:00.000Z' });
    assert.deepEqual(ended, [{ subscription: 'transactions:C1', reason: 'forbidden' }]);
    assert.equal(client.wanted.size, 0);
    assert.equal(socket.sentOf('unsubscribe').length, 0);
  });
});

describe('the token stays out of events', () => {
  /** Every event the client dispatches, whatever its type (including types added later). */
  function recordEverything(client) {
    const seen = [];
    const dispatch = client.dispatchEvent.bind(client);
    client.dispatchEvent = (event) => {
      seen.push(event);
      return dispatch(event);
    };
    return seen;
  }

  /** Each way an app or an error reporter may turn an event detail or an error into text. */
  function renderings(value) {
    return [JSON.stringify(value), inspect(value, { depth: null, showHidden: true })];
  }

  function assertNoToken(values, tokens) {
    for (const value of values) {
      for (const text of renderings(value)) {
        for (const token of tokens) assert.ok(!text.includes(token), `a token in ${text.slice(0, 300)}`);
      }
    }
  }

  const serverError = (code, correlationId = null) => ({ type: 'error', code, message: code, correlationId, timestamp: 'x' });

  test('no detail of any event or error carries a token, as JSON or inspected', async () => {
    const tokens = [];
    let failNext = false;
    const client = makeClient({
      token: () => {
        if (failNext) {
          failNext = false;
          throw new Error('the identity provider is down');
        }
        tokens.push(`secret-token-${tokens.length}-${'x'.repeat(20)}`);
        return tokens.at(-1);
      },
    });
    const events = recordEverything(client);
    const errors = [];
    const kept = client.subscribe('transactions', { customerId: 'C1' });
    const lost = client.subscribe('transactions', { customerId: 'C2' });
    const refused = client.subscribe('transactions', { customerId: 'C9' });
    refused.ready.catch((error) => errors.push(error));
    const first = await until(() => FakeWebSocket.last, 'a socket');
    first.open();
    const [c1, c2, c9] = first.sentOf('subscribe');
    first.receive(serverError('unavailable', c1.correlationId)); // retried later: a timer on the subscription
    first.receive(serverError('forbidden', c9.correlationId));
    first.ack(await until(() => first.sentOf('subscribe')[3], 'the retried subscribe'), { offset: 1 });
    first.ack(c2, { offset: 1, key: 'transactions:C2' });
    first.receive(event(2));
    first.receive({ type: 'resync', channel: 'transactions', subscription: 'transactions:C1', position: { offset: 5, epoch: 'e1' }, timestamp: 'x' });
    first.receive(event(6, { epoch: 'e2' }));
    first.receive('not json');
    first.receive(serverError('token_expiring'));
    const [refresh] = await until(() => first.sentOf('refresh').length && first.sentOf('refresh'), 'a refresh');
    first.receive({ type: 'refreshed', expiresAt: '2030-01-01T00:00:00Z', correlationId: refresh.correlationId, timestamp: 'x' });
    failNext = true;
    first.serverClose(1012, 'service restart');

    const second = await until(() => FakeWebSocket.instances.length === 2 && FakeWebSocket.last, 'a second socket');
    second.open();
    const [again1, again2] = second.sentOf('subscribe');
    second.ack(again1, { recovered: true, replayed: 0, position: again1.since });
    second.ack(again2, { recovered: false, offset: 0, epoch: 'e9', key: 'transactions:C2' });
    second.receive({ type: 'unsubscribed', channel: 'transactions', subscription: 'transactions:C2', filters: {}, reason: 'forbidden', correlationId: null, timestamp: 'x' });
    kept.unsubscribe();
    lost.ready.catch(() => {});
    second.serverClose(4001, 'token expired');
    await until(() => FakeWebSocket.instances.length === 3, 'a third socket');
    client.close();

    const fixed = makeClient({ token: 'fixed-secret-token-abcdefghijklmnopqrstuvwxyz' });
    const fixedEvents = recordEverything(fixed);
    fixed.subscribe('transactions', { customerId: 'C1' });
    const only = await openAndAck(fixed);
    only.receive(serverError('token_expiring'));
    fixed.setToken('fixed-secret-token-the-second-one-0123456789');
    only.serverClose(4001, 'token expired');
    fixed.close();

    const types = new Set([...events, ...fixedEvents].map((e) => e.type));
    for (const type of ['state', 'event', 'subscribed', 'resumed', 'resync', 'reconnected', 'unsubscribed', 'tokenrefreshed', 'tokenexpiring', 'error']) {
      assert.ok(types.has(type), `the scenario emits ${type}`);
    }
    assert.equal(errors.length, 1);
    tokens.push('fixed-secret-token-abcdefghijklmnopqrstuvwxyz', 'fixed-secret-token-the-second-one-0123456789');
    assertNoToken([...events, ...fixedEvents].map((e) => e.detail), tokens);
    assertNoToken(errors, tokens);
  });
});

describe('snapshots', () => {
  function snapshot(position, transactions, last = true) {
    return { type: 'snapshot', channel: 'transactions', subscription: 'transactions:C1', position, data: { transactions, last }, timestamp: 'x' };
  }
  function change(offset, data, type = 'transaction_update', key = 'transactions:C1') {
    return { ...event(offset, { key, type }), data };
  }

  test('a snapshot subscription resolves with the state, then applies the changes after it', async () => {
    const client = makeClient();
    const sub = client.subscribe('transactions', { customerId: 'C1' }, { snapshot: true });
    const ws = await openAndAck(client, { offset: 6 });
    assert.equal(ws.sentOf('subscribe')[0].snapshot, true);
    ws.receive(snapshot({ offset: 6, epoch: 'e1' }, [{ id: 'T1', version: 3 }], false));
    ws.receive(snapshot({ offset: 6, epoch: 'e1' }, [{ id: 'T3', version: 1 }], false));
    let settled = false;
    sub.ready.then(() => { settled = true; });
    await new Promise((resolve) => setTimeout(resolve, 5));
    assert.equal(settled, false, 'ready before the last snapshot message');
    ws.receive(snapshot({ offset: 6, epoch: 'e1' }, [], true));
    const ready = await sub.ready;
    assert.deepEqual(ready.transactions.map((t) => t.id), ['T1', 'T3']);
    ws.receive(change(7, { id: 'T3', version: 2, status: 'approved' }));
    ws.receive(change(8, { id: 'T1', version: 3 }, 'transaction_delete'));
    assert.deepEqual([...sub.state.values()], [{ id: 'T3', version: 2, status: 'approved' }]);
    assert.deepEqual(sub.position.since, { offset: 8, epoch: 'e1' });
  });

  test('an update older than the version shown is ignored, also when it comes on another channel', async () => {
    const client = makeClient();
    const seen = [];
    client.on('event', ({ message }) => seen.push([message.subscription, message.offset]));
    const sub = client.subscribe('transactions', { customerId: 'C1' }, { snapshot: true });
    client.subscribe('user_updates', {});
    const ws = await until(() => FakeWebSocket.last && FakeWebSocket.last.readyState === 0 && FakeWebSocket.last, 'a socket');
    ws.open();
    const [transactions, user] = ws.sentOf('subscribe');
    ws.ack(transactions, { offset: 1 });
    ws.ack(user, { offset: 0, key: 'user_updates:u1' });
    ws.receive(snapshot({ offset: 1, epoch: 'e1' }, [{ id: 'T1', version: 5, status: 'approved' }]));
    await sub.ready;
    ws.receive(change(2, { id: 'T1', version: 4, status: 'stale' }));
    ws.receive(change(1, { id: 'T1', version: 4, status: 'stale' }, 'transaction_update', 'user_updates:u1'));
    ws.receive(change(2, { id: 'T1', version: 6, status: 'paid' }, 'transaction_update', 'user_updates:u1'));
    ws.receive(change(3, { id: 'T1', version: 5, status: 'stale' }));
    assert.deepEqual(seen, [['user_updates:u1', 2]]);
    assert.equal(sub.state.get('T1').status, 'approved');
    assert.deepEqual(sub.position.since, { offset: 3, epoch: 'e1' });
  });

  test('a resync of a snapshot subscription replaces the state with the fresh snapshot', async () => {
    const client = makeClient();
    const snapshots = record(client, 'snapshot');
    const sub = client.subscribe('transactions', { customerId: 'C1' }, { snapshot: true });
    const ws = await openAndAck(client, { offset: 2 });
    ws.receive(snapshot({ offset: 2, epoch: 'e1' }, [{ id: 'T1', version: 9 }]));
    await sub.ready;
    ws.receive({ type: 'resync', channel: 'transactions', subscription: 'transactions:C1', position: { offset: 0, epoch: 'e2' }, timestamp: 'x' });
    ws.receive(snapshot({ offset: 0, epoch: 'e2' }, [{ id: 'T2', version: 1 }]));
    assert.deepEqual([...sub.state.keys()], ['T2']);
    assert.equal(snapshots.length, 2);
    ws.receive(change(1, { id: 'T2', version: 2 }, 'transaction_update'));
    assert.equal(sub.state.get('T2').version, 2);
  });
});
