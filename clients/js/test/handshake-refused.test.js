// The client against a real HTTP server that refuses the WebSocket upgrade, with the runtime's
// own WebSocket (Node 20 needs --experimental-websocket; tests/test_js_client.py passes it).
import assert from 'node:assert/strict';
import http from 'node:http';
import { after, before, describe, test } from 'node:test';

import { EvaWsClient } from '../eva-ws-client.js';
import { FakeWebSocket, until } from '../testing/fake-websocket.js';

describe('a refused handshake with the real WebSocket', () => {
  let server;
  let port;
  const upgrades = [];
  before(async () => {
    // A proxy with no backend answers 502; the service answers 401 to a bad token.
    server = http.createServer((request, response) => response.writeHead(404).end());
    server.on('upgrade', (request, socket) => {
      const status = request.url.startsWith('/bad-gateway') ? '502 Bad Gateway' : '401 Unauthorized';
      upgrades.push(status);
      socket.end(`HTTP/1.1 ${status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`);
    });
    await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
    port = server.address().port;
  });
  after(() => server.close());

  for (const path of ['/bad-gateway', '/unauthorized']) {
    test(`${path}: the client reports 1006 and reconnects with backoff`, async () => {
      assert.equal(typeof globalThis.WebSocket, 'function', 'no global WebSocket: on Node 20 run with --experimental-websocket');
      const states = [];
      const client = new EvaWsClient({
        url: `ws://127.0.0.1:${port}${path}`, token: 'tok', initialDelayMs: 50, maxDelayMs: 100, pingIntervalMs: 0,
      });
      client.on('state', (detail) => states.push(detail));
      const before = upgrades.length;
      client.connect();
      try {
        // The first refusal schedules a reconnect, and the reconnect is refused again.
        await until(() => states.filter((s) => s.state === 'reconnecting' && s.code === 1006).length >= 2, 'two reconnects');
        await until(() => upgrades.length >= before + 2, 'a second handshake');
      } finally {
        client.close();
      }
      const first = states.find((s) => s.code === 1006);
      assert.equal(first.previous, 'connecting');
      assert.equal(first.attempt, 1);
      assert.equal(typeof first.delayMs, 'number');
      // One refusal is one reconnect: a close that follows the error is not handled twice.
      const reconnects = states.filter((s) => s.state === 'reconnecting' && s.delayMs !== undefined);
      assert.deepEqual(reconnects.map((s) => s.attempt), reconnects.map((_, i) => i + 1));
    });
  }
});

test('an error followed by a close, as browsers report a refusal, is one reconnect', async () => {
  FakeWebSocket.reset();
  const client = new EvaWsClient({
    url: 'ws://eva.test/ws/transactions', token: 'tok', WebSocket: FakeWebSocket, initialDelayMs: 1, maxDelayMs: 4, pingIntervalMs: 0,
  });
  const states = [];
  client.on('state', (detail) => states.push(detail));
  client.connect();
  try {
    const ws = await until(() => FakeWebSocket.last, 'a socket');
    ws.onerror?.({});
    ws.serverClose(1006);
    await until(() => FakeWebSocket.instances.length === 2, 'the reconnect');
    const reconnects = states.filter((s) => s.state === 'reconnecting' && s.delayMs !== undefined);
    assert.deepEqual(reconnects.map(({ code, attempt }) => ({ code, attempt })), [{ code: 1006, attempt: 1 }]);
    assert.deepEqual(ws.closedWith, { code: undefined, reason: undefined });
  } finally {
    client.close();
  }
});
