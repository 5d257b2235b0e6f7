// Benchmark-only (bench/compare-companion.sh): POST /api/bench/users
// {"from": F, "n": N}, superusers only, creates the users bench<F>… bench<F+N-1>
// and answers ["<id> <token>", …]. One password is hashed per call and its
// hash copied to the others, so a thousand users take a second, not the
// minutes a thousand bcrypt hashes take on a loaded core.
routerAdd("POST", "/api/bench/users", (e) => {
  if (!e.hasSuperuserAuth()) throw new ForbiddenError("superusers only");
  const body = e.requestInfo().body;
  const col = $app.findCollectionByNameOrId("users");
  const first = new Record(col);
  first.set("email", "bench-first" + body.from + "@fanout.test");
  first.setPassword("bench-pass-123");
  $app.save(first);
  const hash = first.getRaw("password");
  const out = [];
  $app.runInTransaction((txApp) => {
    for (let i = body.from; i < body.from + body.n; i++) {
      const r = new Record(col);
      r.set("email", "bench" + i + "@fanout.test");
      r.setRaw("password", hash);
      txApp.save(r);
      out.push(r.id + " " + r.newAuthToken());
    }
  });
  return e.json(200, out);
});
