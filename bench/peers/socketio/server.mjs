// The cluster a team would pick instead of Fanout: a socket.io 4 server
// with @socket.io/redis-adapter, so a broadcast from any server reaches the
// room's members on every server. It offers what Fanout's cluster scenario
// uses, with socket.io's own means:
//   - a client emits "subscribe" with a list of rooms (acknowledged once
//     joined);
//   - POST /api/publish {"topic","data"} on any server broadcasts
//     io.to(topic).emit("message", topic, data), as Fanout's publish does;
//   - GET /api/health answers 200.
//
//   PORT=3001 REDIS_URL=redis://127.0.0.1:6379 node server.mjs
//   PORT=3001 NOOP=1 node server.mjs    # the load generator's ceiling (below)
//
// NOOP=1 runs no socket.io at all: a bare WebSocket server that speaks just
// enough Engine.IO/socket.io for socket.io-client, and writes each
// publication to its room's sockets as one pre-encoded frame. Against it the
// load generator's own receive rate is the bottleneck, which shows how far
// that rate is from the socket.io figures.
import http from "node:http";

const port = Number(process.env.PORT ?? 3001);

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

function httpHandler(publish) {
  return async (req, res) => {
    if (req.url === "/api/health") {
      res.writeHead(200, { "content-type": "application/json" }).end('{"code":200}');
    } else if (req.url === "/api/publish" && req.method === "POST") {
      try {
        const { topic, data } = JSON.parse(await readBody(req));
        await publish(topic, data);
        res.writeHead(200, { "content-type": "application/json" }).end("{}");
      } catch (e) {
        res.writeHead(400).end(String(e));
      }
    } else if (!req.url.startsWith("/socket.io/")) {
      res.writeHead(404).end();
    }
  };
}

if (process.env.NOOP) {
  const { WebSocketServer } = await import("ws");
  const rooms = new Map(); // topic -> Set<ws>
  const server = http.createServer(
    httpHandler(async (topic, data) => {
      const frame = `42${JSON.stringify(["message", topic, data])}`;
      for (const ws of rooms.get(topic) ?? []) ws.send(frame);
    }),
  );
  const wss = new WebSocketServer({ server, path: "/socket.io/" });
  let next = 0;
  wss.on("connection", (ws) => {
    const sid = `s${next++}`;
    ws.send(`0${JSON.stringify({ sid, upgrades: [], pingInterval: 25000, pingTimeout: 20000, maxPayload: 1e6 })}`);
    ws.on("message", (raw) => {
      const msg = raw.toString();
      if (msg === "40") ws.send(`40{"sid":"${sid}"}`);
      else if (msg.startsWith("42")) {
        // 42<ackId>["subscribe",[topics]]
        const m = /^42(\d*)(.*)$/s.exec(msg);
        const [event, topics] = JSON.parse(m[2]);
        if (event === "subscribe") {
          for (const t of topics) (rooms.get(t) ?? rooms.set(t, new Set()).get(t)).add(ws);
          if (m[1]) ws.send(`43${m[1]}[]`);
        }
      }
    });
    ws.on("close", () => {
      for (const members of rooms.values()) members.delete(ws);
    });
  });
  server.listen(port, "127.0.0.1");
} else {
  const { Server } = await import("socket.io");
  const server = http.createServer();
  const io = new Server(server, { transports: ["websocket"], serveClient: false });
  if (process.env.REDIS_URL) {
    const { createAdapter } = await import("@socket.io/redis-adapter");
    const { createClient } = await import("redis");
    const pub = createClient({ url: process.env.REDIS_URL });
    const sub = pub.duplicate();
    await Promise.all([pub.connect(), sub.connect()]);
    io.adapter(createAdapter(pub, sub));
  }
  const handler = httpHandler(async (topic, data) => {
    io.to(topic).emit("message", topic, data);
  });
  // socket.io answers /socket.io/ itself; everything else is ours.
  server.on("request", (req, res) => {
    if (!req.url.startsWith("/socket.io/")) handler(req, res);
  });
  io.on("connection", (socket) => {
    socket.on("subscribe", (topics, ack) => {
      socket.join(topics);
      if (typeof ack === "function") ack();
    });
  });
  server.listen(port, "127.0.0.1");
}
