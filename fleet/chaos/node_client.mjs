// Browser clients of `scripts/chaos` running in Node: the real eva-ws-client.js, one per entry of the
// JSON config in argv[2]. Every message a client's live socket receives (acknowledgements, resync
// notices, events) is written to stdout as one JSON line; the harness judges those lines.
// Needs `node --experimental-websocket` (Node 20 has no global WebSocket otherwise). Closing stdin
// (or SIGTERM) closes every client with 1000 and exits.
import { EvaWsClient } from '../../service/static/eva-ws-client.js';

const config = JSON.parse(process.argv[2]);
const RECORDED = new Set(['subscribed', 'resync']);

function record(name, message) {
  const kind = RECORDED.has(message.type) ? message.type : (typeof message.offset === 'number' ? 'event' : null);
  if (kind === null) return;
  const position = kind === 'event' ? message : message.position;
  const line = {
    client: name,
    kind,
    subscription: message.subscription,
    offset: position.offset,
    epoch: position.epoch,
    at_s: Date.now() / 1000,
    recovered: typeof message.recovered === 'boolean' ? message.recovered : null,
    event_id: kind === 'event' ? message.correlationId : null,
    event_type: kind === 'event' ? message.type : null,
    data: kind === 'event' ? message.data : null,
  };
  process.stdout.write(JSON.stringify(line) + '\n');
}

// The client's sockets, tapped: a message is recorded only while the client still listens to
// that socket (it clears onmessage when it gives a socket up).
//
// Node 20's WebSocket (undici) fires `error` but never `close` when the handshake is refused (a
// 502 from nginx while every worker is marked down): readyState stays CONNECTING forever. A
// browser always follows that error with a close event (code 1006), and the client waits for it,
// so the socket here does what a browser does; stderr says each time it had to.
function tappedWebSocket(name) {
  return class TappedWebSocket extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols);
      let closed = false;
      this.addEventListener('close', () => { closed = true; });
      this.addEventListener('error', () => setTimeout(() => {
        if (closed || this.readyState === WebSocket.OPEN) return;
        process.stderr.write(`${new Date().toISOString()} ${name} handshake failed without a close event: closing with 1006\n`);
        this.dispatchEvent(Object.assign(new Event('close'), { code: 1006, reason: '', wasClean: false }));
      }, 100));
      this.addEventListener('message', (event) => {
        if (this.onmessage === null || typeof event.data !== 'string') return;
        record(name, JSON.parse(event.data));
      });
    }
  };
}

const clients = config.clients.map((spec) => {
  const client = new EvaWsClient({
    url: spec.url,
    token: spec.token,
    customerId: spec.customers[0],
    WebSocket: tappedWebSocket(spec.name),
    initialDelayMs: 100,
    maxDelayMs: 2000,
    pingIntervalMs: 5000,
    pongTimeoutMs: 5000,
  });
  for (const customerId of spec.customers) client.subscribe('transactions', { customerId });
  // State changes go to stderr (the run's node-clients.log), to follow a client through the faults.
  client.addEventListener('state', (event) => {
    const { state, code, reason } = event.detail;
    process.stderr.write(`${new Date().toISOString()} ${spec.name} ${state} ${code ?? ''} ${reason ?? ''}\n`);
  });
  return client;
});

let stopping = false;
function stop() {
  if (stopping) return;
  stopping = true;
  for (const client of clients) client.close(1000, 'run over');
  setTimeout(() => process.exit(0), 500);
}
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.resume();
process.on('SIGTERM', stop);
