// Node.js peer: Socket.IO 4 with @socket.io/redis-adapter, websocket transport only, compression off.
// Publishers reach it through Redis in the @socket.io/redis-emitter format.
// Usage: node server.js --port P --redis-url redis://127.0.0.1:N   (BENCH_JWT_SECRET in the environment)
"use strict";

const http = require("node:http");
const { Server } = require("socket.io");
const { createAdapter } = require("@socket.io/redis-adapter");
const { createClient } = require("redis");
const jwt = require("jsonwebtoken");

function arg(name) {
  const i = process.argv.indexOf(name);
  if (i < 0 || i + 1 >= process.argv.length) throw new Error(`missing ${name}`);
  return process.argv[i + 1];
}

async function main() {
  const port = Number(arg("--port"));
  const redisUrl = arg("--redis-url");
  const secret = process.env.BENCH_JWT_SECRET;
  if (!secret) throw new Error("BENCH_JWT_SECRET is not set");

  const pubClient = createClient({ url: redisUrl });
  const subClient = pubClient.duplicate();
  await Promise.all([pubClient.connect(), subClient.connect()]);

  const httpServer = http.createServer();
  const io = new Server(httpServer, {
    adapter: createAdapter(pubClient, subClient),
    transports: ["websocket"],
    perMessageDeflate: false,
    httpCompression: false,
    serveClient: false,
  });

  io.use((socket, next) => {
    try {
      const claims = jwt.verify(String(socket.handshake.auth?.token ?? ""), secret, { algorithms: ["HS256"] });
      const ids = claims.customerIds ?? (claims.customerId ? [claims.customerId] : []);
      socket.data.customers = new Set(ids.map(String));
      next();
    } catch (err) {
      next(new Error("unauthorized"));
    }
  });

  io.on("connection", (socket) => {
    socket.on("subscribe", async (data, ack) => {
      const customer = String(data?.customerId ?? "");
      if (!socket.data.customers.has(customer)) {
        if (typeof ack === "function") ack({ type: "error", code: "forbidden" });
        return;
      }
      // The adapter SUBSCRIBEs the room's Redis channel; ack only once that is in effect.
      await socket.join(`transactions:${customer}`);
      if (typeof ack === "function") ack({ type: "subscribed" });
    });
  });

  // Node's default listen backlog (511).
  httpServer.listen(port, "127.0.0.1");

  const stop = () => {
    io.close();
    Promise.allSettled([pubClient.quit(), subClient.quit()]).then(() => process.exit(0));
    setTimeout(() => process.exit(0), 2000).unref();
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
