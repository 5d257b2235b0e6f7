// The whole path users run: the official PocketBase JS SDK (with the
// `eventsource` polyfill) -> real nginx (deploy/nginx, least_conn), no stickiness -> three
// fanout nodes -> Redis.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import PocketBase from "pocketbase";
import { startNode, startRedisTopology, startNginx, waitFor, publish } from "./lib.mjs";

// The Redis behind the nodes: FANOUT_E2E_REDIS=standalone (default),
// cluster or sentinel; scripts/test runs this file once for each.
const TOPOLOGY = process.env.FANOUT_E2E_REDIS ?? "standalone";
let redis, nginx;
const nodes = [];
// Behind a proxy a publish key is required: without one, a node refuses
// publishes that carry X-Forwarded-For (see docs/operations.md).
const KEY = "e2e-publish-key";
const pub = (base, body) => publish(base, body, KEY);
const env = () => ({
  FANOUT_REDIS_URL: redis.url,
  FANOUT_PUBLISH_KEY: KEY,
  FANOUT_TRUSTED_PROXIES: "127.0.0.1",
  FANOUT_HEARTBEAT_INTERVAL: "300ms",
  // Three heartbeats must exceed it, or the node refuses to start.
  FANOUT_FORWARD_TIMEOUT: "800ms",
});

before(async () => {
  redis = await startRedisTopology(TOPOLOGY);
  for (let i = 0; i < 3; i++) nodes.push(await startNode(env()));
  nginx = await startNginx(nodes.map((n) => n.port));
});

after(async () => {
  const clients = globalThis.__sdkClients ?? [];
  for (const pb of clients) pb.realtime.unsubscribe().catch(() => {});
  nginx?.stop();
  for (const n of nodes) await n.stop("SIGKILL");
  redis?.stop();
});

/** An SDK client through nginx, recording what it receives. */
function sdkClient() {
  const pb = new PocketBase(nginx.base);
  (globalThis.__sdkClients ??= []).push(pb);
  return pb;
}

/** The node currently holding a client's stream (tag = id prefix). */
const ownerOf = (pb) => nodes.findIndex((n) => pb.realtime.clientId?.startsWith(n.tag));

test(`[${TOPOLOGY}] 30+ SDK clients through nginx get exactly their messages, in order`, async () => {
  const topics = ["alpha", "beta", "gamma"];
  // i % 4: alpha | beta | alpha+beta | gamma with options
  const clients = [];
  for (let i = 0; i < 32; i++) {
    const pb = sdkClient();
    const got = [];
    const kind = i % 4;
    if (kind === 0 || kind === 2) await pb.realtime.subscribe("alpha", (e) => got.push(["alpha", e.n]));
    if (kind === 1 || kind === 2) await pb.realtime.subscribe("beta", (e) => got.push(["beta", e.n]));
    if (kind === 3)
      await pb.realtime.subscribe("gamma", (e) => got.push(["gamma", e.n]), {
        query: { expand: "author" },
        headers: { "X-Trace": "e2e" },
      });
    clients.push({ pb, got, kind });
  }
  // Streams are spread over the nodes (least_conn: each new one goes to the node with fewest).
  const spread = new Set(clients.map((c) => ownerOf(c.pb)));
  assert.equal(spread.size, 3, "every node holds some streams");

  const published = [];
  for (let n = 0; n < 30; n++) {
    const topic = topics[n % 3];
    await pub(nodes[n % 3].base, { topic, data: { n } }); // through each node directly
    published.push([topic, n]);
  }
  const wants = (kind) =>
    published.filter(([t]) =>
      kind === 0 ? t === "alpha" : kind === 1 ? t === "beta" : kind === 2 ? t !== "gamma" : t === "gamma",
    );
  await waitFor(() => clients.every((c) => c.got.length >= wants(c.kind).length), "all deliveries");
  // Order is kept per topic (messages of different topics may interleave
  // differently on different nodes, as in PocketBase).
  const byTopic = (list) => Object.fromEntries(topics.map((t) => [t, list.filter(([x]) => x === t)]));
  for (const c of clients) assert.deepEqual(byTopic(c.got), byTopic(wants(c.kind)));

  // Unsubscribe works: the alpha+beta clients drop alpha.
  for (const c of clients.filter((c) => c.kind === 2)) await c.pb.realtime.unsubscribe("alpha");
  await pub(nodes[1].base, { topic: "alpha", data: { n: 100 } });
  await pub(nodes[2].base, { topic: "beta", data: { n: 101 } });
  await waitFor(() => clients.filter((c) => c.kind !== 3).every((c) => c.got.at(-1)?.[1] >= 100), "last round");
  for (const c of clients.filter((c) => c.kind === 2)) assert.deepEqual(c.got.slice(-1), [["beta", 101]]);
  for (const c of clients) await c.pb.realtime.unsubscribe();
});

test(`[${TOPOLOGY}] killing a node: its SDK clients reconnect through nginx and resubscribe`, async () => {
  const clients = [];
  for (let i = 0; i < 12; i++) {
    const pb = sdkClient();
    const got = [];
    await pb.realtime.subscribe("after-kill", (e) => got.push(e.n));
    clients.push({ pb, got, id: pb.realtime.clientId });
  }
  const victim = 1;
  const affected = clients.filter((c) => ownerOf(c.pb) === victim);
  assert.ok(affected.length > 0, "some streams on the victim");
  const killedAt = Date.now();
  await nodes[victim].stop("SIGKILL");

  // Reconnected: a new client id on a surviving node.
  const back = new Map();
  await waitFor(() => {
    for (const c of affected) {
      if (!back.has(c) && c.pb.realtime.clientId && c.pb.realtime.clientId !== c.id) back.set(c, Date.now());
    }
    return back.size === affected.length;
  }, "affected clients reconnected");
  const gaps = [...back.values()].map((t) => t - killedAt);
  console.log(`# without a connection after the kill: max ${Math.max(...gaps)} ms, mean ${Math.round(gaps.reduce((a, b) => a + b) / gaps.length)} ms`);

  // Published afterwards: everyone receives, including the reconnected.
  let n = 0;
  await waitFor(async () => {
    await pub(nodes[0].base, { topic: "after-kill", data: { n: ++n } });
    await new Promise((r) => setTimeout(r, 50));
    return clients.every((c) => c.got.length > 0);
  }, "delivery after the kill");
  for (const c of clients) {
    assert.notEqual(ownerOf(c.pb), victim);
    await c.pb.realtime.unsubscribe();
  }
  // Bring the node back on its port for the next test.
  nodes[victim] = await startNode(env(), nodes[victim].port);
});

test(`[${TOPOLOGY}] rolling restart of every node while publishing: nothing lost once resubscribed`, async () => {
  const clients = [];
  for (let i = 0; i < 15; i++) {
    const pb = sdkClient();
    const c = { pb, got: [], connects: [] };
    await pb.realtime.subscribe("roll", (e) => c.got.push(e.n));
    // The SDK calls PB_CONNECT listeners after it has re-posted its
    // subscriptions: from then on, nothing may be missed.
    await pb.realtime.subscribe("PB_CONNECT", () => c.connects.push(Date.now()));
    clients.push(c);
  }
  const sent = []; // [n, time the publish started]
  let running = true;
  const publisher = (async () => {
    let n = 0;
    while (running) {
      const at = Date.now();
      try {
        await pub(nginx.base, { topic: "roll", data: { n } });
        sent.push([n, at]);
      } catch {
        // A publish refused mid-restart is not sent; it is not expected.
      }
      n++;
      await new Promise((r) => setTimeout(r, 40));
    }
  })();

  for (let i = 0; i < nodes.length; i++) {
    await new Promise((r) => setTimeout(r, 500));
    await nodes[i].stop("SIGTERM"); // graceful: streams end, clients reconnect
    nodes[i] = await startNode(env(), nodes[i].port);
  }
  await new Promise((r) => setTimeout(r, 1000));
  running = false;
  await publisher;
  assert.ok(sent.length > 0, "some publishes were accepted");
  const last = sent.at(-1)[0];
  try {
    await waitFor(() => clients.every((c) => c.got.includes(last)), "the last message everywhere", 15000);
  } catch (e) {
    for (const c of clients)
      console.log(`# client ${c.pb.realtime.clientId} connected=${c.pb.realtime.isConnected} got=${c.got.length} last=${c.got.at(-1)} connects=${c.connects.length} want=${last}`);
    throw e;
  }

  let totalMissed = 0;
  for (const c of clients) {
    const got = new Set(c.got);
    for (let i = 1; i < c.got.length; i++) assert.ok(c.got[i] > c.got[i - 1], "in order, no duplicates");
    const resubscribed = c.connects.at(-1) ?? 0;
    const mustHave = sent.filter(([, at]) => at > resubscribed + 5).map(([n]) => n);
    for (const n of mustHave) assert.ok(got.has(n), `message ${n} after the last resubscribe`);
    totalMissed += sent.filter(([n]) => !got.has(n)).length;
  }
  console.log(`# rolling restart: ${sent.length} published, ${clients.length} clients, ${totalMissed} deliveries missed in all, each inside its own reconnect`);
  for (const c of clients) await c.pb.realtime.unsubscribe();
});

test(`[${TOPOLOGY}] rolling restart with the resume recipe: nothing missing, nothing twice`, async () => {
  // The recipe of docs/protocol.md: the publisher gives every message an
  // id (and puts it in the data), the app subscribes with {since: <last id
  // it saw>} and ignores ids it has seen. The SDK re-posts that key on its
  // own reconnects; the node replays what followed the cursor.
  await pub(nginx.base, { topic: "resume", id: "start", data: { id: "start" } });
  const clients = [];
  for (let i = 0; i < 15; i++) {
    const pb = sdkClient();
    const c = { pb, seen: new Set(), got: [], raw: 0 };
    await pb.realtime.subscribe(
      "resume",
      (e) => {
        c.raw++;
        if (c.seen.has(e.id)) return;
        c.seen.add(e.id);
        c.got.push(e.n);
      },
      { since: "start" },
    );
    clients.push(c);
  }
  const sent = [];
  let running = true;
  const publisher = (async () => {
    let n = 0;
    while (running) {
      try {
        await pub(nginx.base, { topic: "resume", id: `r${n}`, data: { id: `r${n}`, n } });
        sent.push(n);
      } catch {
        // Refused mid-restart (503): not acknowledged, not expected.
      }
      n++;
      await new Promise((r) => setTimeout(r, 40));
    }
  })();
  for (let i = 0; i < nodes.length; i++) {
    await new Promise((r) => setTimeout(r, 500));
    await nodes[i].stop("SIGTERM");
    nodes[i] = await startNode(env(), nodes[i].port);
  }
  await new Promise((r) => setTimeout(r, 1000));
  running = false;
  await publisher;
  const last = sent.at(-1);
  await waitFor(() => clients.every((c) => c.got.includes(last)), "the last message everywhere", 15000);
  let replayedAgain = 0;
  for (const c of clients) {
    const missing = sent.filter((n) => !c.got.includes(n));
    assert.deepEqual(missing, [], "acknowledged messages missed");
    assert.equal(c.got.length, new Set(c.got).size, "nothing twice after the app's own check");
    for (let i = 1; i < c.got.length; i++) assert.ok(c.got[i] > c.got[i - 1], "in order");
    replayedAgain += c.raw - c.got.length;
  }
  console.log(
    `# resume recipe: ${sent.length} published, ${clients.length} clients, 0 missing, 0 twice; ${replayedAgain} replayed events the apps ignored as seen`,
  );
  for (const c of clients) await c.pb.realtime.unsubscribe();
});
