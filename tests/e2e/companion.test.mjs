// The companion's differential test: one scripted scenario, run twice with
// the official PocketBase JS SDK. First against PocketBase alone; then
// through nginx (deploy/nginx/pocketbase.conf) in front of the same kind of
// PocketBase, three Fanout nodes in companion mode and Redis. Every client
// must receive the same events in both runs.
//
// PocketBase sends each realtime message from its own goroutine, so it does
// not promise an order across events (docs/pocketbase.md); the runs are
// compared per client as multisets of (key, data), with record ids, times
// and tokens replaced by names.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import PocketBase from "pocketbase";
import { startNode, startRedis, startNginx, startPocketBase, waitFor } from "./lib.mjs";

const SECRET = "e2e-companion-secret";

// The app's own hooks: PocketBase's "Realtime messaging" example, and a
// subscription hook refusing the key `forbidden`.
const APP_HOOKS = `
routerAdd("POST", "/api/app/notify", (e) => {
  const message = new SubscriptionMessage({ name: "example", data: JSON.stringify(e.requestInfo().body) });
  const clients = $app.subscriptionsBroker().clients();
  for (let id in clients) {
    if (clients[id].hasSubscription("example")) { clients[id].send(message); }
  }
  return e.json(200, {});
});
onRealtimeSubscribeRequest((e) => {
  if (e.subscriptions.indexOf("forbidden") >= 0) throw new ForbiddenError("This app forbids that topic.");
  e.next();
});
`;

const stops = [];
after(async () => {
  for (const pb of globalThis.__companionClients ?? []) pb.realtime.unsubscribe().catch(() => {});
  for (const stop of stops.reverse()) await stop();
});

/** JSON of a request to PocketBase's REST API (directly, not via nginx). */
async function rest(base, method, path, token, body) {
  const res = await fetch(`${base}${path}`, {
    method,
    headers: { "content-type": "application/json", ...(token ? { authorization: token } : {}) },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${path}: ${res.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Collections, users and a first post; the names of every id made. */
async function setUp(pbBase, superuser) {
  const su = (await rest(pbBase, "POST", "/api/collections/_superusers/auth-with-password", null, {
    identity: superuser.email,
    password: superuser.password,
  })).token;
  const users = {};
  for (const name of ["alice", "bob"]) {
    const email = `${name}@fanout.test`;
    const rec = await rest(pbBase, "POST", "/api/collections/users/records", su, {
      email, password: "pass-pass-123", passwordConfirm: "pass-pass-123", name, emailVisibility: false,
    });
    users[name] = { id: rec.id, email };
  }
  await rest(pbBase, "POST", "/api/collections", su, {
    name: "posts", type: "base", listRule: "", viewRule: "",
    fields: [
      { name: "title", type: "text" },
      { name: "secret", type: "text", hidden: true },
      { name: "owner", type: "relation", collectionId: "_pb_users_auth_", maxSelect: 1 },
    ],
  });
  await rest(pbBase, "POST", "/api/collections", su, {
    name: "notes", type: "base",
    listRule: "owner = @request.auth.id", viewRule: "owner = @request.auth.id",
    fields: [
      { name: "text", type: "text" },
      { name: "owner", type: "relation", collectionId: "_pb_users_auth_", maxSelect: 1 },
    ],
  });
  const posts = await rest(pbBase, "GET", "/api/collections/posts", su);
  await rest(pbBase, "POST", "/api/collections", su, {
    name: "comments", type: "base",
    listRule: "post.owner = @request.auth.id", viewRule: "post.owner = @request.auth.id",
    fields: [
      { name: "text", type: "text" },
      { name: "post", type: "relation", collectionId: posts.id, maxSelect: 1, cascadeDelete: true },
    ],
  });
  const p1 = await rest(pbBase, "POST", "/api/collections/posts/records", su, {
    title: "first", secret: "s1", owner: users.alice.id,
  });
  return { su, users, ids: { [users.alice.id]: "ALICE", [users.bob.id]: "BOB", [p1.id]: "P1" }, p1 };
}

/**
 * Replace every id we made, and times, by names, so two runs compare; and
 * sort object keys: PocketBase's `fields` picking orders keys differently
 * from one event to the next (Go map order), in both runs alike.
 */
function normalize(value, ids) {
  let s = JSON.stringify(value);
  for (const [id, name] of Object.entries(ids)) s = s.split(id).join(name);
  const sorted = (v) =>
    v && typeof v === "object" && !Array.isArray(v)
      ? Object.fromEntries(Object.keys(v).sort().map((k) => [k, sorted(v[k])]))
      : Array.isArray(v)
        ? v.map(sorted)
        : v;
  return sorted(JSON.parse(s, (k, v) => (k === "created" || k === "updated" ? "T" : v)));
}

/**
 * The scenario: subscribe every client through `base`, act on PocketBase at
 * `pbBase`, and collect what each client received, normalized.
 */
async function scenario(base, pbBase, superuser) {
  const { su, users, ids, p1 } = await setUp(pbBase, superuser);
  const clients = {};
  const made = [];
  const client = async (name, auth) => {
    const pb = new PocketBase(base);
    pb.autoCancellation(false);
    (globalThis.__companionClients ??= []).push(pb);
    made.push(pb);
    if (auth === "superuser") await pb.collection("_superusers").authWithPassword(superuser.email, superuser.password);
    else if (auth) await pb.collection("users").authWithPassword(users[auth].email, "pass-pass-123");
    const got = [];
    clients[name] = { pb, got };
    return { pb, on: (key) => (e) => got.push([key, e]) };
  };
  const sub = async (c, topic, opts) => c.pb.realtime.subscribe(topic, c.on(topic + (opts ? JSON.stringify(opts) : "")), opts);
  const collection = async (c, col, topic, opts) =>
    c.pb.collection(col).subscribe(topic, c.on(`${col}/${topic}${opts ? JSON.stringify(opts) : ""}`), opts);

  // Spread over the nodes by nginx's round robin: one stream each.
  const g1 = await client("guest-posts");
  await collection(g1, "posts", "*");
  const g2 = await client("guest-filter");
  await collection(g2, "posts", "*", { filter: 'title ~ "keep"' });
  const g3 = await client("guest-fields");
  await collection(g3, "posts", "*", { fields: "id,title" });
  const g4 = await client("guest-one-post");
  await collection(g4, "posts", p1.id);
  const a1 = await client("alice-notes-comments", "alice");
  await collection(a1, "notes", "*");
  await collection(a1, "comments", "*");
  const b1 = await client("bob-notes-comments", "bob");
  await collection(b1, "notes", "*");
  await collection(b1, "comments", "*");
  const a2 = await client("alice-expand", "alice");
  await collection(a2, "posts", "*", { expand: "owner" });
  const s1 = await client("superuser-posts", "superuser");
  await collection(s1, "posts", "*");
  // A token with alice's claims and someone else's signature: a guest.
  const f1 = await client("forged-alice");
  const real = (await rest(pbBase, "POST", "/api/collections/users/auth-with-password", null, {
    identity: users.alice.email, password: "pass-pass-123",
  })).token;
  const [h, p] = real.split(".");
  f1.pb.authStore.save(`${h}.${p}.${Buffer.from("forged-signature").toString("base64url")}`, null);
  await collection(f1, "notes", "*");
  // Subscribed as a guest, then logged in: the SDK does not POST again, so
  // the stream stays a guest in PocketBase and in Fanout alike.
  const l1 = await client("guest-then-login");
  await collection(l1, "notes", "*");
  await l1.pb.collection("users").authWithPassword(users.alice.email, "pass-pass-123");
  const c1 = await client("custom-example");
  await sub(c1, "example");
  // An auth change on a bound stream is refused with 403.
  const x1 = await client("auth-change", "alice");
  await collection(x1, "notes", "*");
  await x1.pb.collection("users").authWithPassword(users.bob.email, "pass-pass-123");
  const authChange = await collection(x1, "comments", "*").then(() => 204, (e) => e.status);
  // The app's hook refuses a key: its 403 reaches the SDK as sent.
  const r1 = await client("refused");
  const refused = await sub(r1, "forbidden").then(() => 204, (e) => [e.status, e.response?.message]);

  // Actions, as the superuser, on PocketBase itself.
  const p2 = await rest(pbBase, "POST", "/api/collections/posts/records", su, { title: "keep 1", secret: "s2", owner: users.alice.id });
  ids[p2.id] = "P2";
  await rest(pbBase, "PATCH", `/api/collections/posts/records/${p1.id}`, su, { title: "keep 2" });
  const na = await rest(pbBase, "POST", "/api/collections/notes/records", su, { text: "for alice", owner: users.alice.id });
  ids[na.id] = "NOTE_A";
  const nb = await rest(pbBase, "POST", "/api/collections/notes/records", su, { text: "for bob", owner: users.bob.id });
  ids[nb.id] = "NOTE_B";
  const cm = await rest(pbBase, "POST", "/api/collections/comments/records", su, { text: "on p2", post: p2.id });
  ids[cm.id] = "COMMENT";
  await rest(pbBase, "POST", "/api/app/notify", null, { hi: 1 });
  // Deleting p2 cascades to its comment: alice (p2's owner) still gets the
  // comment's delete, although the rule's parent row is gone.
  await rest(pbBase, "DELETE", `/api/collections/posts/records/${p2.id}`, su);
  await rest(pbBase, "DELETE", `/api/collections/posts/records/${p1.id}`, su);

  const received = () => Object.fromEntries(
    Object.entries(clients).map(([name, c]) => [
      name,
      c.got.map(([key, e]) => JSON.stringify(normalize([key, e], ids))).sort(),
    ]),
  );
  return { clients, received, authChange, refused, made };
}

/** Wait until no client received anything for `quiet` ms. */
async function settled(clients, quiet = 1000) {
  let last = -1;
  let since = Date.now();
  await waitFor(() => {
    const n = Object.values(clients).reduce((a, c) => a + c.got.length, 0);
    if (n !== last) {
      last = n;
      since = Date.now();
    }
    return Date.now() - since >= quiet;
  }, "the clients to go quiet", 30000);
}

test("every SDK client receives the same events through nginx + 3 Fanout nodes as from PocketBase alone", async () => {
  // Run 1: PocketBase alone.
  const alone = await startPocketBase({ secret: SECRET, hooks: { "app.pb.js": APP_HOOKS } });
  stops.push(alone.stop);
  const direct = await scenario(alone.base, alone.base, alone.superuser);
  await settled(direct.clients);
  const expected = direct.received();
  for (const pb of direct.made) pb.realtime.unsubscribe().catch(() => {});

  // Run 2: the same app behind nginx, with /api/realtime on three Fanout
  // nodes in companion mode.
  const pb = await startPocketBase({ secret: SECRET, hooks: { "app.pb.js": APP_HOOKS } });
  stops.push(pb.stop);
  const redis = await startRedis();
  stops.push(async () => redis.stop());
  const nodes = [];
  for (let i = 0; i < 3; i++) {
    const node = await startNode({
      FANOUT_REDIS_URL: redis.url,
      FANOUT_TRUSTED_PROXIES: "127.0.0.1",
      FANOUT_POCKETBASE_URL: pb.base,
      FANOUT_POCKETBASE_SECRET: SECRET,
      FANOUT_HEARTBEAT_INTERVAL: "500ms",
      FANOUT_FORWARD_TIMEOUT: "1s",
    });
    nodes.push(node);
    stops.push(() => node.stop("SIGKILL"));
  }
  const nginx = await startNginx(nodes.map((n) => n.port), { site: "pocketbase.conf", pocketbase: pb.port });
  stops.push(async () => nginx.stop());
  const fronted = await scenario(nginx.base, pb.base, pb.superuser);
  // Wait for as many events as PocketBase alone sent each client, then for
  // quiet, so that extra events would show too.
  await waitFor(
    () => Object.entries(fronted.clients).every(([name, c]) => c.got.length >= expected[name].length),
    "every client to have PocketBase's event count",
    30000,
  );
  await settled(fronted.clients);

  // The streams really are spread over the three nodes.
  const tags = new Set(Object.values(fronted.clients).map((c) => c.pb.realtime.clientId?.slice(0, 8)));
  assert.ok(nodes.every((n) => tags.has(n.tag)), `clients on every node: ${[...tags]}`);
  assert.deepEqual(fronted.received(), expected);
  assert.equal(direct.authChange, 403);
  assert.equal(fronted.authChange, 403);
  assert.deepEqual(fronted.refused, direct.refused);
  assert.deepEqual(direct.refused, [403, "This app forbids that topic."]);
  // Every client received something where PocketBase sent something: the
  // comparison is not vacuous.
  assert.ok(expected["guest-posts"].length >= 4, JSON.stringify(expected["guest-posts"]));
  assert.ok(expected["alice-notes-comments"].length >= 3, JSON.stringify(expected["alice-notes-comments"]));
});
