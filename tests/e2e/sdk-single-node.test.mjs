// The official PocketBase JS SDK against one embedded-mode fanout node.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import PocketBase from "pocketbase";
import { startNode, waitFor, publish } from "./lib.mjs";

let node;
before(async () => {
  node = await startNode();
});
after(async () => {
  await node?.stop();
});

test("subscribe (with and without options), receive, unsubscribe", async () => {
  const pb = new PocketBase(node.base);
  const got = [];
  await pb.realtime.subscribe("news", (e) => got.push(["news", e]));
  await pb.realtime.subscribe("chat", (e) => got.push(["chat", e]), {
    query: { expand: "author" },
    headers: { "X-Token": "abc" },
  });
  assert.ok(pb.realtime.isConnected);
  assert.equal(pb.realtime.clientId.length, 40);

  await publish(node.base, { topic: "news", data: { n: 1 } });
  await publish(node.base, { topic: "chat", data: { text: "hi" } });
  await waitFor(() => got.length === 2, "two events");
  assert.deepEqual(got, [
    ["news", { n: 1 }],
    ["chat", { text: "hi" }],
  ]);

  await pb.realtime.unsubscribe("chat");
  await publish(node.base, { topic: "chat", data: { text: "gone" } });
  await publish(node.base, { topic: "news", data: { n: 2 } });
  await waitFor(() => got.length >= 3, "the news event");
  // Published in order, so a chat event would have arrived first.
  assert.deepEqual(got[2], ["news", { n: 2 }]);
  assert.equal(got.length, 3);

  await pb.realtime.unsubscribe();
  assert.equal(pb.realtime.isConnected, false);
});

test("record-style subscriptions get {action, record}", async () => {
  const pb = new PocketBase(node.base);
  const events = [];
  await pb.collection("posts").subscribe("*", (e) => events.push(e));
  await pb.collection("posts").subscribe("abc", (e) => events.push(e));
  await publish(node.base, {
    topic: "posts/*",
    data: { action: "create", record: { id: "abc", title: "Hello" } },
  });
  await publish(node.base, {
    topic: "posts/abc",
    data: { action: "update", record: { id: "abc", title: "Hello!" } },
  });
  await waitFor(() => events.length === 2, "record events");
  assert.equal(events[0].action, "create");
  assert.equal(events[0].record.title, "Hello");
  assert.equal(events[1].action, "update");
  await pb.collection("posts").unsubscribe();
});

test("the SDK reconnects and resubscribes after the server ends its stream", async () => {
  const short = await startNode({ FANOUT_MAX_LIFETIME: "1s" });
  try {
    const pb = new PocketBase(short.base);
    const got = [];
    await pb.realtime.subscribe("t", (e) => got.push(e.n));
    const firstId = pb.realtime.clientId;
    await waitFor(
      () => pb.realtime.clientId && pb.realtime.clientId !== firstId,
      "a new client id after the stream ended",
    );
    // Resubscribed by the SDK itself: wait until a publish lands.
    let n = 0;
    await waitFor(async () => {
      await publish(short.base, { topic: "t", data: { n: ++n } });
      await new Promise((r) => setTimeout(r, 50));
      return got.length > 0;
    }, "delivery after reconnect");
    await pb.realtime.unsubscribe();
  } finally {
    await short.stop();
  }
});
