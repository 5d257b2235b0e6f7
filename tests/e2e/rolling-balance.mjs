// A measurement, not a test: how evenly nginx spreads SSE streams over 3
// nodes after a rolling restart, with round robin and with least_conn
// (deploy/nginx/upstream.compose.conf). For each: redis-server, 3 nodes,
// nginx with deploy/nginx/fanout.conf, CLIENTS PocketBase SDK clients
// subscribed through nginx; then each node in turn gets SIGTERM (its
// clients reconnect through nginx), is started again on its port, and the
// next one follows once every client is connected again. Prints each
// node's streams before and after, one JSON line per method.
//
//   cd tests/e2e && npm ci && CLIENTS=300 node rolling-balance.mjs
//
// (docs/operations.md quotes its output; FANOUT_BIN as for the tests.)
import PocketBase from "pocketbase";
import { startNode, startRedis, startNginx, waitFor } from "./lib.mjs";

const CLIENTS = Number(process.env.CLIENTS ?? 300);
// How long each restarted node runs before the next one is stopped.
const SETTLE_MS = Number(process.env.SETTLE_MS ?? 2000);

async function streams(nodes) {
  return Promise.all(
    nodes.map(async (n) => {
      try {
        return (await (await fetch(`${n.base}/api/health`)).json()).data.connections ?? 0;
      } catch {
        return 0;
      }
    }),
  );
}

const sum = (xs) => xs.reduce((a, b) => a + b, 0);

for (const balance of ["round_robin", "least_conn"]) {
  const redis = await startRedis();
  const env = { FANOUT_REDIS_URL: redis.url, FANOUT_TRUSTED_PROXIES: "127.0.0.1" };
  const nodes = [];
  for (let i = 0; i < 3; i++) nodes.push(await startNode(env));
  const nginx = await startNginx(
    nodes.map((n) => n.port),
    { balance },
  );
  const clients = [];
  for (let i = 0; i < CLIENTS; i++) {
    const pb = new PocketBase(nginx.base);
    await pb.realtime.subscribe("balance", () => {});
    clients.push(pb);
  }
  const all = async () => sum(await streams(nodes)) === CLIENTS;
  await waitFor(all, "every client connected", 60000);
  const before = await streams(nodes);
  const started = Date.now();
  for (let i = 0; i < nodes.length; i++) {
    await nodes[i].stop("SIGTERM");
    nodes[i] = await startNode(env, nodes[i].port);
    await waitFor(all, "every client connected again", 60000);
    await new Promise((r) => setTimeout(r, SETTLE_MS));
  }
  const after = await streams(nodes);
  const mean = CLIENTS / nodes.length;
  console.log(
    JSON.stringify({
      balance,
      clients: CLIENTS,
      before,
      after,
      maxOverMean: +(Math.max(...after) / mean).toFixed(2),
      minOverMean: +(Math.min(...after) / mean).toFixed(2),
      rollSeconds: +((Date.now() - started) / 1000).toFixed(1),
    }),
  );
  for (const pb of clients) pb.realtime.unsubscribe().catch(() => {});
  nginx.stop();
  for (const n of nodes) await n.stop("SIGKILL");
  redis.stop();
}
process.exit(0);
