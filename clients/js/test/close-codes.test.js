// The client follows the reconnect advice of docs/protocol.md's close-code table, read from the
// document itself so that the two cannot drift apart.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { afterEach, beforeEach, describe, test } from 'node:test';

import { CLOSE_CODES, EvaWsClient } from '../eva-ws-client.js';
import { FakeWebSocket, until } from '../testing/fake-websocket.js';

/** `[{code, advice}]` of the table under "### Close codes" in docs/protocol.md. */
function documentedCloseCodes() {
  const text = readFileSync(new URL('../../../docs/protocol.md', import.meta.url), 'utf8');
  const section = text.slice(text.indexOf('### Close codes'));
  const rows = [];
  for (const line of section.split('\n').slice(1)) {
    if (rows.length && !line.startsWith('|')) break;
    const cells = line.split('|').slice(1, -1).map((cell) => cell.trim());
    if (/^\d{4}$/.test(cells[0] ?? '')) rows.push({ code: Number(cells[0]), advice: cells.at(-1) });
  }
  return rows;
}

/** What the advice asks of a client: reconnect, reconnect with a new token, or stay closed. */
function expected(advice) {
  if (/^yes\b/.test(advice)) return true;
  if (advice === 'with a new token') return 'with a new token';
  if (/^(no\b|fix the client|only after a long backoff|the client's own choice)/.test(advice)) return false;
  throw new Error(`docs/protocol.md has advice this test does not know: ${advice}`);
}

const clients = [];
function makeClient(token) {
  const client = new EvaWsClient({
    url: 'ws://eva.test/ws/transactions', token, WebSocket: FakeWebSocket, initialDelayMs: 1, maxDelayMs: 4, pingIntervalMs: 0,
  });
  clients.push(client);
  client.connect();
  return client;
}

async function openSocket() {
  const ws = await until(() => FakeWebSocket.last && FakeWebSocket.last.readyState === 0 && FakeWebSocket.last, 'a socket');
  ws.open();
  return ws;
}

beforeEach(() => FakeWebSocket.reset());
afterEach(() => {
  for (const client of clients.splice(0)) client.close();
});

describe('close codes as docs/protocol.md advises', () => {
  const documented = documentedCloseCodes();

  test('the table is read and the client knows exactly its codes', () => {
    assert.ok(documented.length >= 14, `only ${documented.length} close codes read from docs/protocol.md`);
    assert.deepEqual(
      Object.keys(CLOSE_CODES).map(Number),
      documented.map(({ code }) => code),
    );
    for (const { code, advice } of documented) assert.equal(CLOSE_CODES[code].reconnect, expected(advice), `${code}: ${advice}`);
  });

  for (const { code, advice } of documented) {
    const want = expected(advice);
    test(`${code} (${advice}): ${want === false ? 'stays closed' : 'reconnects'}`, async () => {
      const reasons = [];
      const client = makeClient(async ({ reason }) => {
        reasons.push(reason);
        return 'tok';
      });
      const ws = await openSocket();
      ws.serverClose(code, 'why');
      if (want === false) {
        assert.equal(client.state, 'closed');
        assert.equal(FakeWebSocket.instances.length, 1);
        return;
      }
      assert.equal(client.state, 'reconnecting');
      await until(() => FakeWebSocket.instances.length === 2, 'a new socket');
      assert.equal(reasons.at(-1), want === true ? 'reconnect' : 'expired');
    });

    if (want === 'with a new token') {
      test(`${code} with a fixed token stays closed until setToken()`, async () => {
        const client = makeClient('tok');
        const ws = await openSocket();
        ws.serverClose(code, 'why');
        assert.equal(client.state, 'closed');
        client.setToken('tok-2');
        await until(() => FakeWebSocket.instances.length === 2, 'a socket with the new token');
        assert.equal(FakeWebSocket.last.url.searchParams.get('token'), 'tok-2');
      });
    }
  }
});
