// Type-checked against the installed package: its `exports` types entry must resolve, and a
// misuse must be an error (so the types are really read, not an implicit `any`).
import { EvaWsClient, type ServerEvent } from 'eva-ws-client';

const client: EvaWsClient = new EvaWsClient({ url: 'wss://ws.example.com/ws/transactions', token: async () => 'jwt' });
const sub = client.subscribe('transactions', { customerId: 'CUST-001' }, {
  onEvent(message: ServerEvent) {
    const offset: number = message.offset;
    console.log(offset, message.data);
  },
});
client.on('state', ({ state }) => console.log(state));
sub.unsubscribe();

// @ts-expect-error 'everything' is not a channel
client.subscribe('everything');
