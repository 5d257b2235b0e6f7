#!/usr/bin/env python3
"""Collections, users and tokens for bench/compare-companion.sh.

    pocketbase_setup.py BASE SUPERUSER_EMAIL SUPERUSER_PASSWORD USERS TOKENS_FILE

On the PocketBase at BASE (e.g. http://127.0.0.1:8090) it creates:

* `posts`: the public feed (list/view/create rules "": anyone reads, anyone
  creates), number fields s, t, p, k and text x, the fields fanout-bench
  writes and reads;
* `notes`: the per-user feed, the same fields plus `owner` (a relation to
  `users`), list/view rule `owner = @request.auth.id`, create rule "";
* USERS users, through bench/peers/bench-users.pb.js (which must be in
  PocketBase's pb_hooks), each with an auth token minted by PocketBase; one
  line per user, in order, `<user id> <token>`, is written to TOKENS_FILE.

Only the standard library: it runs wherever python3 does.
"""

import json
import sys
import urllib.request


def rest(base, method, path, token=None, body=None):
    req = urllib.request.Request(
        base + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"content-type": "application/json", **({"authorization": token} if token else {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as res:
            text = res.read()
    except urllib.error.HTTPError as e:
        raise SystemExit(f"{method} {path}: {e.code} {e.read().decode(errors='replace')}")
    return json.loads(text) if text else None


def main():
    base, email, password, users, tokens_file = sys.argv[1:6]
    users = int(users)
    su = rest(base, "POST", "/api/collections/_superusers/auth-with-password", None,
              {"identity": email, "password": password})["token"]
    fields = [{"name": n, "type": "number"} for n in ("s", "t", "p", "k")] + [{"name": "x", "type": "text"}]
    rest(base, "POST", "/api/collections", su, {
        "name": "posts", "type": "base", "listRule": "", "viewRule": "", "createRule": "",
        "fields": fields,
    })
    rest(base, "POST", "/api/collections", su, {
        "name": "notes", "type": "base",
        "listRule": "owner = @request.auth.id", "viewRule": "owner = @request.auth.id",
        "createRule": "",
        "fields": fields + [{"name": "owner", "type": "relation",
                             "collectionId": "_pb_users_auth_", "maxSelect": 1}],
    })

    # bench/peers/bench-users.pb.js: users in batches, tokens minted by
    # PocketBase (record.newAuthToken()), as a login would give.
    lines = []
    for start in range(0, users, 500):
        lines += rest(base, "POST", "/api/bench/users", su, {"from": start, "n": min(500, users - start)})
    with open(tokens_file, "w") as f:
        f.write("".join(line + "\n" for line in lines))


if __name__ == "__main__":
    main()
