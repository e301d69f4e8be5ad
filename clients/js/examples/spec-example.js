// Frontend connection
const ws = new WebSocket('wss://api.eva-platform.com/ws/transactions?token=' + authToken);

ws.onopen = () => {
  // Subscribe to updates
  ws.send(
    JSON.stringify({
      type: 'subscribe',
      channel: 'transactions',
      filters: {
        customerId: 'CUST-001',
      },
    })
  );
};

ws.onmessage = event => {
  const message = JSON.parse(event.data);
  // Handle transaction updates
};
