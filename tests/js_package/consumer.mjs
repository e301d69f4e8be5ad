// A Node application that installed the packed client: subscribes through a real eva-ws,
// publishes one event and prints what it received. Arguments: service URL, user token, publisher token.
import EvaWsClientDefault, { EvaWsClient, State } from 'eva-ws-client';

const [url, token, publisherToken] = process.argv.slice(2);
if (EvaWsClientDefault !== EvaWsClient) throw new Error('the default export is not EvaWsClient');

const client = new EvaWsClient({ url: `${url}/ws/transactions`, token, customerId: 'CUST-001' });
const received = new Promise((resolve) => client.on('event', ({ message }) => resolve(message)));
const sub = client.subscribe('transactions', { customerId: 'CUST-001' });
await sub.ready;

const event = { type: 'transaction_new', data: { id: 'TXN-PKG-1', customerId: 'CUST-001', status: 'pending' } };
const response = await fetch(`${url}/api/v1/publish`, {
  method: 'POST',
  headers: { Authorization: `Bearer ${publisherToken}`, 'Content-Type': 'application/json' },
  body: JSON.stringify(event),
});
if (response.status !== 202) throw new Error(`publish answered ${response.status}`);

const message = await received;
console.log(JSON.stringify({ state: client.state, open: client.state === State.OPEN, type: message.type, id: message.data.id }));
client.close();
