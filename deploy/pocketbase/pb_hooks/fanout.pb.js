/// <reference path="../pb_data/types.d.ts" />
// Fanout companion hooks. Copy this file into your app's pb_hooks/ and set
// FANOUT_SECRET in PocketBase's environment to the value Fanout has in
// FANOUT_POCKETBASE_SECRET. Without FANOUT_SECRET every route here refuses.
//
// It adds nothing a browser can use: both hooks act only for requests that
// carry the shared secret in `X-Fanout-Secret`, which only Fanout nodes hold.
// See Fanout's docs/pocketbase.md.

// POST /api/fanout/verify {"token": "<auth token>"}
//   200 {"id","collectionId","collectionName","exp"}  the token is a valid auth token
//   401 {...}                                          it is not (invalid, expired, revoked)
//   403 {...}                                          the secret is missing or wrong
//
// It verifies with $app.findAuthRecordByToken(token, "auth"), the function
// PocketBase's own realtime POST uses (apis/middlewares.go loadAuthToken),
// so Fanout accepts exactly the tokens PocketBase accepts.
routerAdd("POST", "/api/fanout/verify", (e) => {
  const secret = $os.getenv("FANOUT_SECRET");
  const given = e.request.header.get("X-Fanout-Secret");
  if (!secret || !given || !$security.equal(given, secret)) {
    throw new ForbiddenError("Missing or invalid Fanout secret.");
  }
  const token = String(e.requestInfo().body["token"] || "");
  let record;
  try {
    record = $app.findAuthRecordByToken(token, "auth");
  } catch (_) {
    throw new UnauthorizedError("The token is not a valid auth token.");
  }
  const claims = $security.parseUnverifiedJWT(token);
  const collection = record.collection();
  return e.json(200, {
    id: record.id,
    collectionId: collection.id,
    collectionName: collection.name,
    exp: claims["exp"],
  });
});

// Fanout's bridge connections (one per verified identity per Fanout node)
// carry the secret; they get long idle and maximum timeouts, so PocketBase
// does not close them every 5 minutes. Every other client keeps PocketBase's
// defaults.
onRealtimeConnectRequest((e) => {
  const secret = $os.getenv("FANOUT_SECRET");
  const given = e.requestInfo().headers["x_fanout_secret"];
  if (secret && given && $security.equal(given, secret)) {
    e.idleTimeout = 24 * 60 * 60 * 1000 * 1000 * 1000; // 24 h, in ns
    e.maxTimeout = 24 * 60 * 60 * 1000 * 1000 * 1000;
  }
  e.next();
});
