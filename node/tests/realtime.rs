//! The PocketBase realtime protocol over real sockets: the stream, the
//! subscription POST (PocketBase's TestRealtimeSubscribe table), the SDK
//! flow, auth binding, and bad input.

mod common;

use std::collections::HashSet;

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

/// The first bytes on the wire: headers, then exactly PocketBase's
/// PB_CONNECT event, in one chunk.
#[tokio::test]
async fn connect_sends_pb_connect_bytes_first() {
    let node = start().await;
    let mut r =
        BufReader::new(raw(&node, b"GET /api/realtime HTTP/1.1\r\nHost: test\r\n\r\n").await);
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
        headers.push(line.trim_end().to_ascii_lowercase());
    }
    assert_eq!(headers[0], "http/1.1 200 ok");
    for h in [
        "content-type: text/event-stream",
        "cache-control: no-store",
        "x-accel-buffering: no",
        "transfer-encoding: chunked",
    ] {
        assert!(headers.iter().any(|l| l == h), "missing {h}: {headers:?}");
    }
    let mut size = String::new();
    r.read_line(&mut size).await.unwrap();
    let size = usize::from_str_radix(size.trim(), 16).unwrap();
    let mut chunk = vec![0; size];
    r.read_exact(&mut chunk).await.unwrap();
    let chunk = String::from_utf8(chunk).unwrap();
    let id = chunk
        .strip_prefix("id:")
        .and_then(|s| s.split('\n').next())
        .unwrap()
        .to_owned();
    assert_eq!(id.len(), 40);
    assert!(id.bytes().all(|b| b.is_ascii_alphanumeric()));
    assert_eq!(
        chunk,
        format!("id:{id}\nevent:PB_CONNECT\ndata:{{\"clientId\":\"{id}\"}}\n\n")
    );
    // The id the stream announced is the one POST accepts.
    node.subscribe(&id, &["x"]).await;
    // Closing the socket unregisters the client.
    drop(r);
    let hub = node.server.broker().hub().clone();
    wait_until("unregister on disconnect", || {
        hub.client_by_id(&id).is_none()
    })
    .await;
}

fn subs_of(node: &Node, id: &str) -> HashSet<String> {
    node.server
        .broker()
        .hub()
        .client_by_id(id)
        .expect("client registered")
        .subscriptions(&[])
        .into_keys()
        .collect()
}

/// PocketBase's TestRealtimeSubscribe rows that need no database.
#[tokio::test]
async fn subscribe_table_matches_pocketbase() {
    let node = start_with(|c| {
        c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
        c.jwt_secret = Some("secret".into());
    })
    .await;
    let sse = node.connect().await;
    let id = sse.client_id.clone();
    assert_eq!(sse.connect_id, id, "PB_CONNECT id: equals the clientId");

    // missing client
    let (s, b) = node
        .post_subscriptions(
            json!({"clientId":"missing","subscriptions":["test1","test2"]}),
            &[],
        )
        .await;
    assert_eq!((s, &b["data"]), (StatusCode::NOT_FOUND, &json!({})));
    assert_eq!(b["message"], "Missing or invalid client id.");
    assert_eq!(b["status"], 404);

    // empty data
    let (s, b) = node.post_subscriptions(json!({}), &[]).await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(b["data"]["clientId"]["code"], "validation_required");
    assert!(b["data"].get("subscriptions").is_none());

    // invalid subscriptions limit
    node.subscribe(&id, &["test0"]).await;
    let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
    let (s, b) = node
        .post_subscriptions(json!({"clientId": id, "subscriptions": many}), &[])
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b["data"]["subscriptions"]["code"],
        "validation_length_too_long"
    );
    assert_eq!(subs_of(&node, &id), HashSet::from(["test0".to_owned()]));

    // valid subscriptions limit: replaces the old set
    let (s, _) = node
        .post_subscriptions(json!({"clientId": id, "subscriptions": &many[..1000]}), &[])
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let subs = subs_of(&node, &id);
    assert_eq!(subs.len(), 1000);
    assert!(!subs.contains("test0"));

    // invalid topic length
    node.subscribe(&id, &["test0"]).await;
    let (s, b) = node
        .post_subscriptions(
            json!({"clientId": id, "subscriptions": ["abc", "a".repeat(2501)]}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b["data"]["subscriptions"]["1"]["code"],
        "validation_length_too_long"
    );

    // different IP (through a trusted proxy)
    let (s, b) = node
        .post_subscriptions(
            json!({"clientId": id, "subscriptions": ["a"]}),
            &[("x-forwarded-for", "127.0.0.2")],
        )
        .await;
    assert_eq!((s, &b["data"]), (StatusCode::BAD_REQUEST, &json!({})));
    assert_eq!(b["message"], "Invalid realtime client.");

    // valid topic length
    let long = "a".repeat(2500);
    node.subscribe(&id, &["abc", &long]).await;
    assert_eq!(subs_of(&node, &id), HashSet::from(["abc".to_owned(), long]));

    // empty subscriptions
    node.subscribe(&id, &[]).await;
    assert!(subs_of(&node, &id).is_empty());

    // 2 new subscriptions
    node.subscribe(&id, &["test0"]).await;
    node.subscribe(&id, &["test1", "test2"]).await;
    assert_eq!(
        subs_of(&node, &id),
        HashSet::from(["test1".to_owned(), "test2".to_owned()])
    );

    // guest -> authorized; same auth; mismatched auth; unauthorized client
    let hub = node.server.broker().hub().clone();
    let auth_of = || hub.client_by_id(&id).unwrap().auth().map(|a| a.id.clone());
    let t1 = user_token("secret", "user1");
    let t2 = user_token("secret", "user2");
    node.subscribe_as(&id, &["a"], &t1).await;
    assert_eq!(auth_of().as_deref(), Some("user1"));
    let bearer = format!("Bearer {t1}");
    node.subscribe_as(&id, &["a"], &bearer).await;
    for auth in [Some(t2.as_str()), None, Some("garbage.token.value")] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|t| ("authorization", *t)).collect();
        let (s, b) = node
            .post_subscriptions(json!({"clientId": id, "subscriptions": ["b"]}), &headers)
            .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{auth:?}");
        assert_eq!(b["data"], json!({}));
        assert_eq!(
            b["message"],
            "The current and the previous request authorization don't match."
        );
        assert_eq!(auth_of().as_deref(), Some("user1"));
        assert_eq!(subs_of(&node, &id), HashSet::from(["a".to_owned()]));
    }
}

/// An invalid token on a guest stays a guest, as in PocketBase.
#[tokio::test]
async fn garbage_token_on_a_guest_is_a_guest() {
    let node = start_with(|c| c.jwt_secret = Some("secret".into())).await;
    let sse = node.connect().await;
    let (s, _) = node
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["a"]}),
            &[("authorization", "garbage")],
        )
        .await;
    assert_eq!(s, StatusCode::NO_CONTENT);
    let c = node
        .server
        .broker()
        .hub()
        .client_by_id(&sse.client_id)
        .unwrap();
    assert!(c.auth().is_none());
}

/// What the JS SDK does: subscribe two topics (one with options) in one
/// POST, receive on both, unsubscribe one by re-POSTing the rest, and then
/// receive nothing more on it.
#[tokio::test]
async fn sdk_flow_subscribe_receive_unsubscribe() {
    let node = start().await;
    let mut sse = node.connect().await;
    let with_options = "chat?options=%7B%22query%22%3A%7B%22expand%22%3A%22author%22%7D%2C%22headers%22%3A%7B%7D%7D";
    node.subscribe(&sse.client_id, &["PB_CONNECT", "news", with_options])
        .await;

    node.publish("news", json!({"n": 1})).await;
    assert_eq!(sse.next_json().await, ("news".into(), json!({"n": 1})));
    node.publish("chat", json!({"text": "hi"})).await;
    assert_eq!(
        sse.next_json().await,
        (with_options.into(), json!({"text": "hi"}))
    );

    // Unsubscribe "chat": the SDK re-posts the remaining keys.
    node.subscribe(&sse.client_id, &["PB_CONNECT", "news"])
        .await;
    node.publish("chat", json!({"text": "gone"})).await;
    node.publish("news", json!({"n": 2})).await;
    // Delivery is in publish order, so "chat" would have come first.
    assert_eq!(sse.next_json().await, ("news".into(), json!({"n": 2})));
}

/// One event per matching key, each named after its own key; a publish to
/// `T` does not reach `T2` or another topic.
#[tokio::test]
async fn each_matching_key_gets_its_own_event() {
    let node = start().await;
    let mut a = node.connect().await;
    let mut b = node.connect().await;
    node.subscribe(&a.client_id, &["t", "t?options=%7B%7D", "t2"])
        .await;
    node.subscribe(&b.client_id, &["t2", "other"]).await;
    node.publish("t", json!("x")).await;
    node.publish("t2", json!("y")).await;
    let mut got = vec![a.next_json().await, a.next_json().await];
    got.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        got,
        vec![
            ("t".to_owned(), json!("x")),
            ("t?options=%7B%7D".to_owned(), json!("x"))
        ]
    );
    assert_eq!(a.next_json().await, ("t2".into(), json!("y")));
    assert_eq!(b.next_json().await, ("t2".into(), json!("y")));
}

#[tokio::test]
async fn batch_and_directed_publishes() {
    let node = start_with(|c| c.jwt_secret = Some("secret".into())).await;
    let mut a = node.connect().await;
    let mut b = node.connect().await;
    node.subscribe(&a.client_id, &["t"]).await;
    let t = user_token("secret", "u9");
    node.subscribe_as(&b.client_id, &["t"], &t).await;
    let (s, body) = node
        .publish_raw(
            json!({"messages": [
                {"topic": "t", "data": 1},
                {"topic": "t", "data": 2, "clientId": a.client_id},
                {"topic": "t", "data": 3, "userId": "u9"},
                {"topic": "t", "data": null}
            ]}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{body}");
    assert_eq!(body["published"], 4);
    for expected in [1, 2] {
        assert_eq!(a.next_json().await.1, json!(expected));
    }
    assert_eq!(a.next_json().await.1, Value::Null);
    for expected in [json!(1), json!(3), Value::Null] {
        assert_eq!(b.next_json().await.1, expected);
    }
}

/// Every kind of bad input gets its 4xx with the error JSON, and a client
/// subscribed elsewhere keeps receiving, in order, throughout.
#[tokio::test]
async fn bad_input_is_refused_and_harms_no_one() {
    let node = start_with(|c| {
        c.publish_key = Some("pubkey".into());
        c.jwt_secret = Some("secret".into());
    })
    .await;
    let key = [("authorization", "Bearer pubkey")];
    let mut watcher = node.connect().await;
    node.subscribe(&watcher.client_id, &["watch"]).await;
    let victim = node.connect().await;
    let t = user_token("secret", "u1");
    node.subscribe_as(&victim.client_id, &["v"], &t).await;

    let url = |p: &str| format!("{}{p}", node.base);
    let raw = |path: &'static str, ct: &'static str, body: Vec<u8>| {
        let req = node
            .http
            .post(url(path))
            .header("content-type", ct)
            .header("authorization", "Bearer pubkey")
            .body(body);
        async move {
            let res = req.send().await.unwrap();
            let status = res.status();
            let v: Value = serde_json::from_str(&res.text().await.unwrap()).unwrap_or(Value::Null);
            (status, v)
        }
    };

    let mut seq = 0;
    let mut check_watcher = async |node: &Node, watcher: &mut Sse| {
        seq += 1;
        let (s, _) = node
            .publish_raw(json!({"topic": "watch", "data": seq}), &key)
            .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(watcher.next_json().await, ("watch".into(), json!(seq)));
    };

    let mut cases: Vec<(&str, (StatusCode, Value), StatusCode)> = Vec::new();
    cases.push((
        "malformed JSON",
        raw(
            "/api/realtime",
            "application/json",
            b"{\"clientId\":".to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
    ));
    check_watcher(&node, &mut watcher).await;
    cases.push((
        "wrong types",
        raw(
            "/api/realtime",
            "application/json",
            br#"{"clientId":5,"subscriptions":{"a":1}}"#.to_vec(),
        )
        .await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "10 MB body",
        raw("/api/realtime", "application/json", vec![b' '; 10 << 20]).await,
        StatusCode::PAYLOAD_TOO_LARGE,
    ));
    check_watcher(&node, &mut watcher).await;
    cases.push((
        "2501-byte topic",
        node.post_subscriptions(
            json!({"clientId": victim.client_id, "subscriptions": ["a".repeat(2501)]}),
            &[],
        )
        .await,
        StatusCode::BAD_REQUEST,
    ));
    let many: Vec<String> = (0..1001).map(|i| i.to_string()).collect();
    cases.push((
        "1001 topics",
        node.post_subscriptions(
            json!({"clientId": victim.client_id, "subscriptions": many}),
            &[],
        )
        .await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "CR/LF in a topic",
        node.post_subscriptions(
            json!({"clientId": victim.client_id, "subscriptions": ["ok", "x\r\nevent:evil"]}),
            &[],
        )
        .await,
        StatusCode::BAD_REQUEST,
    ));
    check_watcher(&node, &mut watcher).await;
    cases.push((
        "unknown client id",
        node.post_subscriptions(json!({"clientId": "nope", "subscriptions": ["a"]}), &[])
            .await,
        StatusCode::NOT_FOUND,
    ));
    cases.push((
        "garbage token",
        node.post_subscriptions(
            json!({"clientId": victim.client_id, "subscriptions": ["a"]}),
            &[("authorization", "Bearer not.a.jwt")],
        )
        .await,
        StatusCode::FORBIDDEN,
    ));
    cases.push((
        "publish without the key",
        node.publish_raw(json!({"topic": "watch", "data": 0}), &[])
            .await,
        StatusCode::UNAUTHORIZED,
    ));
    cases.push((
        "publish with a wrong key",
        node.publish_raw(
            json!({"topic": "watch", "data": 0}),
            &[("authorization", "Bearer wrong")],
        )
        .await,
        StatusCode::FORBIDDEN,
    ));
    check_watcher(&node, &mut watcher).await;
    cases.push((
        "publish: CR/LF in topic",
        node.publish_raw(json!({"topic": "a\nb", "data": 1}), &key)
            .await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "publish: missing data",
        node.publish_raw(json!({"topic": "a"}), &key).await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "publish: missing topic",
        node.publish_raw(json!({"data": 1}), &key).await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "publish: wrong types",
        node.publish_raw(json!({"topic": 5, "data": 1}), &key).await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "publish: oversized payload",
        node.publish_raw(json!({"topic": "a", "data": "x".repeat(300 * 1024)}), &key)
            .await,
        StatusCode::PAYLOAD_TOO_LARGE,
    ));
    cases.push((
        "publish: malformed JSON",
        raw("/api/publish", "application/json", b"{\"topic\"".to_vec()).await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "publish: bad batch item",
        node.publish_raw(
            json!({"messages": [{"topic": "ok", "data": 1}, {"topic": "", "data": 1}]}),
            &key,
        )
        .await,
        StatusCode::BAD_REQUEST,
    ));
    cases.push((
        "unknown route",
        {
            let res = node.http.get(url("/api/nope")).send().await.unwrap();
            (res.status(), res.json().await.unwrap())
        },
        StatusCode::NOT_FOUND,
    ));
    check_watcher(&node, &mut watcher).await;

    for (name, (status, body), want) in cases {
        assert_eq!(status, want, "{name}: {body}");
        assert_eq!(body["status"], want.as_u16(), "{name}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );
        assert!(body["data"].is_object(), "{name}: {body}");
    }
    // Nothing above changed the victim's subscriptions.
    assert_eq!(
        subs_of(&node, &victim.client_id),
        HashSet::from(["v".to_owned()])
    );
}

/// PocketBase's documented Go example, in Rust, through the library API:
/// notify every client subscribed to `example`, in chunks of 300.
#[tokio::test]
async fn library_chunked_notify_example() {
    let node = start().await;
    let mut subscribed = Vec::new();
    for _ in 0..5 {
        let sse = node.connect().await;
        node.subscribe(&sse.client_id, &["example"]).await;
        subscribed.push(sse);
    }
    let mut other = node.connect().await;
    node.subscribe(&other.client_id, &["example?options=%7B%7D", "marker"])
        .await;

    let broker = node.server.broker().clone();
    let message = fanout::Message::json("example", &json!({"hello": "world"})).unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for chunk in broker.hub().chunked_clients(300) {
        let message = message.clone();
        tasks.spawn(async move {
            for client in chunk {
                if client.has_subscription("example") {
                    let _ = client.send(&message);
                }
            }
        });
    }
    tasks.join_all().await;

    for sse in &mut subscribed {
        assert_eq!(
            sse.next_json().await,
            ("example".into(), json!({"hello": "world"}))
        );
    }
    // has_subscription is exact: the options variant got nothing.
    node.publish("marker", json!(1)).await;
    assert_eq!(other.next_json().await, ("marker".into(), json!(1)));
}
