// The socket.io side's load generator: the official socket.io-client on
// WebSocket, doing what fanout-bench does against Fanout and printing the
// same JSON result line (bench/src/run.rs `Report`), so one report holds
// both. Client i joins room "bench<i % topics>" through server i % servers;
// publisher p posts through server p % servers; every delivery is checked
// for order per publisher and timed from publish to receipt.
//
//   node loadgen.mjs --servers 127.0.0.1:3001,127.0.0.1:3002 --clients 6000 \
//     --topics 10 --messages 2000 --publishers 6 [--rate 0] --pids 1,2 \
//     --label socketio-3-nodes+redis --scenario cluster [--json-out r.jsonl]
import { io } from "socket.io-client";
import http from "node:http";
import { appendFileSync, readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";

const arg = (name, fallback) => {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 ? process.argv[i + 1] : fallback;
};
const servers = arg("servers").split(",");
const clients = Number(arg("clients", 1000));
const topics = Number(arg("topics", 1));
const messages = Number(arg("messages", 100));
const publishers = Number(arg("publishers", 1));
const rate = Number(arg("rate", 0));
const payload = Number(arg("payload-bytes", 64)); // fanout-bench's default
const settleMs = Number(arg("settle-ms", 5000));
const pids = (arg("pids", "") || "").split(",").filter(Boolean);
const label = arg("label", "socketio");
const scenario = arg("scenario", "cluster");
const jsonOut = arg("json-out");
const concurrency = Number(arg("connect-concurrency", 200));

const rssKib = () =>
  pids.reduce((sum, pid) => {
    try {
      const m = /VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
      return sum + (m ? Number(m[1]) : 0);
    } catch {
      return sum;
    }
  }, 0);
const cpuOf = (pid) => {
  const f = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(f[11]) + Number(f[12])) / 100; // utime + stime, in USER_HZ
};
const serversCpu = () => pids.reduce((s, p) => s + cpuOf(p), 0);
const benchCpu = () => {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
};

// ---- connect and subscribe
const stats = { received: 0, duplicated: 0, outOfOrder: 0, misrouted: 0, lastMs: 0 };
const latencies = [];
const t0 = performance.now();
const baseline = rssKib();
let connected = 0;
let connectErrors = 0;
const subscribers = new Array(topics).fill(0); // per topic, as acknowledged
const sockets = [];
function connectOne(i) {
  return new Promise((resolve) => {
    const topic = i % topics;
    const socket = io(`http://${servers[i % servers.length]}`, {
      transports: ["websocket"],
      reconnection: false,
      forceNew: true,
      timeout: 30000,
    });
    const next = new Array(publishers).fill(0);
    socket.on("message", (_room, d) => {
      const now = performance.now();
      if (d.k !== topic || next[d.p] === undefined) return void stats.misrouted++;
      if (d.s < next[d.p]) return void stats.duplicated++;
      if (d.s > next[d.p]) stats.outOfOrder++;
      next[d.p] = d.s + 1;
      stats.received++;
      stats.lastMs = now;
      latencies.push(now - d.t);
    });
    socket.once("connect", () =>
      socket.emit("subscribe", [`bench${topic}`], () => {
        connected++;
        subscribers[topic]++;
        resolve();
      }),
    );
    socket.once("connect_error", () => {
      connectErrors++;
      resolve();
    });
    sockets.push(socket);
  });
}
const connectStart = performance.now();
for (let i = 0; i < clients; i += concurrency) {
  const batch = [];
  for (let j = i; j < Math.min(clients, i + concurrency); j++) batch.push(connectOne(j));
  await Promise.all(batch);
}
const connectSecs = (performance.now() - connectStart) / 1000;
await new Promise((r) => setTimeout(r, 1000));
const connectedRss = rssKib();
let peak = connectedRss;
const sampler = setInterval(() => (peak = Math.max(peak, rssKib())), 100);

// ---- publish
const agent = new http.Agent({ keepAlive: true, maxSockets: publishers });
function post(server, body) {
  return new Promise((resolve) => {
    const req = http.request(
      { host: server.split(":")[0], port: Number(server.split(":")[1]), path: "/api/publish", method: "POST", agent,
        headers: { "content-type": "application/json", "content-length": Buffer.byteLength(body) } },
      (res) => {
        res.resume();
        res.on("end", () => resolve(res.statusCode === 200));
      },
    );
    req.on("error", () => resolve(false));
    req.end(body);
  });
}
let publishErrors = 0;
let expected = 0;
for (let j = 0; j < messages; j++) expected += subscribers[j % topics];
const pad = "x".repeat(payload);
const cpuBefore = [serversCpu(), benchCpu()];
const publishStart = performance.now();
await Promise.all(
  Array.from({ length: publishers }, async (_, p) => {
    const server = servers[p % servers.length];
    const seq = new Array(topics).fill(0);
    const interval = rate > 0 ? (publishers / rate) * 1000 : 0;
    let due = performance.now();
    for (let j = p; j < messages; j += publishers) {
      if (interval) {
        due += interval;
        const wait = due - performance.now();
        if (wait > 0) await new Promise((r) => setTimeout(r, wait));
      }
      const k = j % topics;
      const data = { s: seq[k]++, t: performance.now(), p, k, x: pad };
      if (!(await post(server, JSON.stringify({ topic: `bench${k}`, data })))) publishErrors++;
    }
  }),
);
const publishSecs = (performance.now() - publishStart) / 1000;
let last = [stats.received, performance.now()];
while (stats.received < expected) {
  await new Promise((r) => setTimeout(r, 50));
  if (stats.received !== last[0]) last = [stats.received, performance.now()];
  else if (performance.now() - last[1] > settleMs) break;
}
clearInterval(sampler);
const cpuAfter = [serversCpu(), benchCpu()];
const deliverSecs = (stats.lastMs - publishStart) / 1000;

latencies.sort((a, b) => a - b);
const q = (x) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(x * latencies.length))] : 0);
const report = {
  scenario, label, nodes: servers.length, clients, connected, connect_errors: connectErrors, slow_clients: 0,
  topics, messages, publishers, payload_bytes: payload, publish_errors: publishErrors,
  expected, received: stats.received, missing: Math.max(0, expected - stats.received),
  duplicated: stats.duplicated, out_of_order: stats.outOfOrder, misrouted: stats.misrouted,
  deliveries_per_sec: stats.received / Math.max(deliverSecs, 1e-9), publish_secs: publishSecs, deliver_secs: deliverSecs,
  connect_per_sec: clients / connectSecs,
  latency_ms: { p50: q(0.5), p90: q(0.9), p99: q(0.99), p999: q(0.999), max: latencies.at(-1) ?? 0 },
  rss_kib: { baseline, connected: connectedRss, peak,
    per_connection_bytes: Math.round(((connectedRss - baseline) * 1024) / Math.max(connected, 1)) },
  cpu_secs: { server: cpuAfter[0] - cpuBefore[0], bench: cpuAfter[1] - cpuBefore[1] },
  server_counters: {},
};
const r = report;
process.stderr.write(
  `${label} / ${scenario}: ${connected}/${clients} connected on ${servers.length} server(s), ${topics} topics; connect ${r.connect_per_sec.toFixed(0)}/s\n` +
    `  memory: baseline ${baseline} KiB, connected ${connectedRss} KiB (${r.rss_kib.per_connection_bytes} B/conn), peak ${peak} KiB\n` +
    `  deliveries ${r.received}/${expected} (missing ${r.missing}, dup ${r.duplicated}, out of order ${r.out_of_order}) ` +
    `${r.deliveries_per_sec.toFixed(0)}/s; latency ms p50 ${r.latency_ms.p50.toFixed(2)} p99 ${r.latency_ms.p99.toFixed(2)}; ` +
    `cpu s: servers ${r.cpu_secs.server.toFixed(2)}, generator ${r.cpu_secs.bench.toFixed(2)}\n`,
);
const line = JSON.stringify(report);
console.log(line);
if (jsonOut) appendFileSync(jsonOut, line + "\n");
for (const s of sockets) s.close();
agent.destroy();
process.exit(0);
