//! Hostile and careless input on an in-process node: CORS on publish,
//! publishing without a key from a browser or through a proxy, forwarded
//! addresses with ports or garbage, pipelining behind a stream, and the
//! library's own checks.

mod common;

use common::*;
use fanout::{Audience, broker::PublishError};
use reqwest::StatusCode;
use serde_json::json;

#[tokio::test]
async fn publish_answers_no_cors_preflight_unless_origins_are_configured() {
    let preflight = |api: &Api, origin: &'static str| {
        let req = api
            .http
            .request(
                reqwest::Method::OPTIONS,
                format!("{}/api/publish", api.base),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "content-type");
        async move { req.send().await.unwrap() }
    };
    let node = start().await;
    let res = preflight(&node.api, "http://evil.example").await;
    assert!(
        res.headers().get("access-control-allow-origin").is_none(),
        "{:?}",
        res.headers()
    );
    // The realtime endpoints keep PocketBase's open CORS.
    let res = node
        .http
        .request(
            reqwest::Method::OPTIONS,
            format!("{}/api/realtime", node.base),
        )
        .header("origin", "http://app.example")
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap();
    assert!(res.headers().get("access-control-allow-origin").is_some());

    let node = start_with(|c| {
        c.publish_key = Some("k".into());
        c.publish_cors_origins = vec!["http://admin.example".into()];
    })
    .await;
    let res = preflight(&node.api, "http://admin.example").await;
    assert_eq!(
        res.headers()["access-control-allow-origin"],
        "http://admin.example"
    );
    let res = preflight(&node.api, "http://evil.example").await;
    assert!(res.headers().get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn without_a_key_publishes_from_a_page_or_through_a_proxy_are_refused() {
    let node = start().await;
    for (name, value) in [
        ("origin", "http://localhost:3000"),
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9"),
        ("x-real-ip", "203.0.113.9"),
    ] {
        let (status, body) = node
            .publish_raw(json!({"topic": "t", "data": 1}), &[(name, value)])
            .await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{name}: {body}");
        assert_eq!(body["status"], 403);
    }
    // A local backend (no such headers) still publishes.
    node.publish("t", json!(1)).await;
}

#[tokio::test]
async fn forwarded_for_entries_with_ports_bind_the_real_ip_and_garbage_is_400() {
    let node = start_with(|c| c.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()]).await;
    let s = node
        .connect_with(&[("x-forwarded-for", "9.9.9.9:5555")])
        .await;
    let ip = node
        .server
        .broker()
        .hub()
        .client_by_id(&s.client_id)
        .unwrap()
        .ip();
    assert_eq!(ip.to_string(), "9.9.9.9");
    // The same client from another port of the same address: accepted.
    let (status, body) = node
        .post_subscriptions(
            json!({"clientId": s.client_id, "subscriptions": ["t"]}),
            &[("x-forwarded-for", "9.9.9.9:6666")],
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // From the proxy itself (no header): another IP, refused as before.
    let (status, _) = node
        .post_subscriptions(
            json!({"clientId": s.client_id, "subscriptions": ["t"]}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    for garbage in ["garbage", "9.9.9.9:x", "1.2.3.4, ???"] {
        let res = node
            .http
            .get(format!("{}/api/realtime", node.base))
            .header("x-forwarded-for", garbage)
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{garbage}");
        let (status, _) = node
            .post_subscriptions(
                json!({"clientId": s.client_id, "subscriptions": ["t"]}),
                &[("x-forwarded-for", garbage)],
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{garbage}");
    }
}

#[tokio::test]
async fn a_request_pipelined_behind_a_realtime_get_is_refused_with_400() {
    let node = start().await;
    let mut sock = raw(
        &node,
        b"GET /api/realtime HTTP/1.1\r\nHost: x\r\n\r\nGET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    let answer = read_until(&mut sock, "}").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("pipelined"), "{answer}");
    assert_eq!(node.server.broker().hub().total_clients(), 0);
}

#[tokio::test]
async fn library_calls_refuse_line_breaks_in_release_builds_too() {
    let node = start().await;
    let broker = node.server.broker();
    for (topic, data) in [("a\nb", "1"), ("t", "{\"a\":\n1}"), ("t\r", "1")] {
        let e = broker
            .publish(vec![fanout::Publication {
                topic: topic.into(),
                data: bytes::Bytes::copy_from_slice(data.as_bytes()),
                audience: Audience::All,
                id: None,
            }])
            .await
            .unwrap_err();
        assert_eq!(e, PublishError::NotLineSafe { index: 0 });
    }
    let client = broker.hub().register("127.0.0.1".parse().unwrap());
    assert_eq!(
        broker.hub().subscribe(&client, &["ok", "x\r\nevent:y"]),
        Err(fanout::hub::SubscribeError::NotLineSafe)
    );
    assert!(!client.has_subscription("ok"));
    // A message whose data has a line break is not dispatched at all.
    broker.hub().subscribe(&client, &["t"]).unwrap();
    assert_eq!(broker.hub().dispatch("t", b"1\n2", &Audience::All), 0);
}

#[tokio::test]
async fn library_subscription_changes_follow_on_redis() {
    let redis = fanout_testkit::RedisServer::start().await;
    let node = start_with(|c| c.redis_url = Some(redis.url())).await;
    let hub = node.server.broker().hub().clone();
    let numsub = |channel: &'static str| {
        let redis = &redis;
        async move {
            let v: Vec<redis::Value> = redis.cmd(&["PUBSUB", "NUMSUB", channel]).await;
            matches!(v[1], redis::Value::Int(1))
        }
    };
    let client = hub.register("127.0.0.1".parse().unwrap());
    hub.subscribe(&client, &["lib"]).unwrap();
    fanout_testkit::wait_for("subscribe reaches Redis", || numsub("fanout:t:lib")).await;
    hub.unsubscribe(&client, &["lib"]);
    fanout_testkit::wait_for("unsubscribe reaches Redis", || async {
        !numsub("fanout:t:lib").await
    })
    .await;
    hub.set_subscriptions(&client, &["set".into()], None)
        .unwrap();
    fanout_testkit::wait_for("a replaced set reaches Redis", || numsub("fanout:t:set")).await;
    hub.unregister(client.id());
    fanout_testkit::wait_for("unregister reaches Redis", || async {
        !numsub("fanout:t:set").await
    })
    .await;
}

/// The subscription key the JS SDK makes for `subscribe(topic, cb, {since})`.
fn since_key(topic: &str, since: &str) -> String {
    let options = json!({"query": {"since": since}}).to_string();
    let encoded: String = form_urlencoded::byte_serialize(options.as_bytes()).collect();
    format!("{topic}?options={encoded}")
}

#[tokio::test]
async fn without_redis_a_subscription_with_since_replays_what_followed_then_goes_live() {
    let node = start().await;
    for i in 0..10 {
        let (status, body) = node
            .publish_raw(
                json!({"topic": "chat", "id": format!("m{i}"), "data": i}),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    let mut sse = node.connect().await;
    let key = since_key("chat", "m4");
    node.subscribe(&sse.client_id, &[&key]).await;
    for i in 5..10 {
        assert_eq!(sse.next_json().await, (key.clone(), json!(i)));
    }
    node.publish("chat", json!(10)).await;
    assert_eq!(sse.next_json().await, (key.clone(), json!(10)));
    // A cursor the history does not hold: live only.
    let mut other = node.connect().await;
    let unknown = since_key("chat", "nope");
    node.subscribe(&other.client_id, &[&unknown]).await;
    node.publish("chat", json!(11)).await;
    assert_eq!(other.next_json().await, (unknown, json!(11)));
    assert_eq!(sse.next_json().await, (key, json!(11)));
    // An id must be a short line.
    let (status, body) = node
        .publish_raw(json!({"topic": "chat", "id": "a\nb", "data": 1}), &[])
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["data"]["id"]["code"], "validation_length_out_of_range");
}

/// `t` and fifteen `t?options=…` keys, as an SDK subscribing to one topic
/// with sixteen option sets holds them.
fn sixteen_keys_of(topic: &str) -> Vec<String> {
    std::iter::once(topic.to_owned())
        .chain((1..16).map(|i| format!("{topic}?options={{\"query\":{{\"n\":\"{i}\"}}}}")))
        .collect()
}

/// Read `keys.len()` events and check that each key got `data` once.
async fn expect_one_event_per_key(sse: &mut Sse, keys: &[String], data: &serde_json::Value) {
    let mut seen = std::collections::HashSet::new();
    for _ in 0..keys.len() {
        let (name, got) = sse.next_json().await;
        assert!(&got == data, "event {name} carries other data");
        assert!(seen.insert(name.clone()), "{name} twice");
    }
    assert_eq!(seen, keys.iter().cloned().collect());
}

/// Issue 17 item 6: one 256 KiB publication (within the default payload
/// limit) matching sixteen keys of a client that reads promptly reaches
/// all sixteen, and the client stays connected. The data is held once, so
/// it is charged once against the 4 MiB queue bound, not sixteen times.
#[tokio::test]
async fn a_publication_within_the_payload_limit_reaches_sixteen_keys_of_a_prompt_reader() {
    let node = start().await;
    let mut sse = node.connect().await;
    let keys = sixteen_keys_of("t");
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    node.subscribe(&sse.client_id, &refs).await;
    // `"…"`: exactly the default 262,144 bytes of JSON.
    let data = json!("x".repeat(256 * 1024 - 2));
    node.publish("t", data.clone()).await;
    expect_one_event_per_key(&mut sse, &keys, &data).await;
    node.publish("t", json!("after")).await;
    expect_one_event_per_key(&mut sse, &keys, &json!("after")).await;
}

/// Issue 17 item 6, the large-payload variant: a payload limit that no
/// client queue can carry is refused at start, naming both settings,
/// instead of answering 200 to a publish that then disconnects every
/// subscriber of its topic.
#[tokio::test]
async fn a_payload_limit_no_client_queue_can_carry_is_refused_at_start() {
    let mut config = fanout::Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.max_body_bytes = 8 << 20;
    config.max_payload_bytes = (4 << 20) + 1024;
    let e = match fanout::Server::start(config).await {
        Ok(_) => panic!("a 4 MiB + 1 KiB payload limit with a 4 MiB client queue started"),
        Err(e) => e.to_string(),
    };
    assert!(
        e.contains("--max-payload-bytes") && e.contains("--client-queue-bytes"),
        "{e}"
    );
}

/// At the largest payload limit the client queue admits, a publication of
/// exactly that size reaches several keys of a prompt reader, and one byte
/// more is refused with PocketBase's 413 error JSON: nothing is answered
/// 200 that a subscriber could not receive.
#[tokio::test]
async fn at_the_largest_payload_limit_a_full_size_publication_is_delivered_and_one_byte_more_is_413()
 {
    let queue = 4usize << 20;
    let limit = queue - fanout::protocol::MAX_EVENT_OVERHEAD;
    let node = start_with(|c| {
        c.client_queue_bytes = queue as u64;
        c.max_payload_bytes = limit;
        c.max_body_bytes = 8 << 20;
    })
    .await;
    let mut sse = node.connect().await;
    let keys: Vec<String> = sixteen_keys_of("big").into_iter().take(4).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    node.subscribe(&sse.client_id, &refs).await;

    let (status, body) = node
        .publish_raw(json!({"topic": "big", "data": "x".repeat(limit - 1)}), &[])
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["status"], 413, "{body}");
    assert_eq!(
        body["data"]["data"]["code"], "validation_length_too_long",
        "{body}"
    );

    let data = json!("x".repeat(limit - 2));
    node.publish("big", data.clone()).await;
    expect_one_event_per_key(&mut sse, &keys, &data).await;
    node.publish("big", json!("after")).await;
    expect_one_event_per_key(&mut sse, &keys, &json!("after")).await;
}

/// A batch whose messages together exceed what a client queue holds would
/// disconnect a prompt subscriber of its topic in one request: it gets 413
/// with PocketBase's error JSON instead of 200, and the subscriber stays.
#[tokio::test]
async fn a_batch_larger_than_a_client_queue_is_413_and_its_subscriber_stays() {
    let node = start_with(|c| {
        c.client_queue_bytes = 64 * 1024;
        c.max_payload_bytes = 32 * 1024;
    })
    .await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["t"]).await;
    let data = json!("x".repeat(30 * 1024));
    let messages: Vec<_> = (0..10)
        .map(|_| json!({"topic": "t", "data": data}))
        .collect();
    let (status, body) = node.publish_raw(json!({"messages": messages}), &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
    assert_eq!(body["status"], 413, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("--client-queue-bytes")
    );
    // Two of them fit, and arrive.
    let (status, body) = node
        .publish_raw(json!({"messages": &messages[..2]}), &[])
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for _ in 0..2 {
        assert_eq!(sse.next_json().await, ("t".to_owned(), data.clone()));
    }
}

/// The same refusal from the `fanout` binary an operator starts: it exits
/// with an error naming both settings instead of serving.
#[tokio::test]
async fn the_binary_exits_naming_both_settings_when_no_client_queue_can_carry_the_payload_limit() {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .env("FANOUT_LISTEN", "127.0.0.1:0")
        .env("FANOUT_MAX_PAYLOAD_BYTES", ((4 << 20) + 1024).to_string())
        .env("FANOUT_MAX_BODY_BYTES", (8 << 20).to_string())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(WAIT, out)
        .await
        .expect("the binary exits instead of serving")
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--max-payload-bytes")
            && stderr.contains("FANOUT_CLIENT_QUEUE_BYTES")
            && stderr.contains("--client-queue-bytes"),
        "{stderr}"
    );
}

/// A reconnect storm: more clients connect at once than
/// `--max-http-connections`, all before any of them has sent its head, and
/// send it only after the eviction grace.
/// Each must get its stream; none may be closed to make room for the
/// others (they wait in the listen backlog instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_beyond_the_http_connection_cap_is_served_not_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const CLIENTS: usize = 300;
    let node = start_with(|c| c.max_http_connections = 8).await;
    let addr = node.server.local_addr();
    // Every handshake completes first (the kernel does it), so all of them
    // are waiting when the node starts reading heads.
    let mut socks = Vec::new();
    for _ in 0..CLIENTS {
        socks.push(tokio::net::TcpStream::connect(addr).await.unwrap());
    }
    // Longer than the grace: a client that has sent nothing yet (its head
    // on its way) is never closed to make room.
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for mut sock in socks {
        tasks.spawn(async move {
            sock.write_all(b"GET /api/realtime HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut all = Vec::new();
            let mut buf = [0u8; 1024];
            let got = tokio::time::timeout(WAIT, async {
                while !String::from_utf8_lossy(&all).contains("PB_CONNECT") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return false,
                        Ok(n) => all.extend_from_slice(&buf[..n]),
                    }
                }
                true
            })
            .await;
            (matches!(got, Ok(true)), sock)
        });
    }
    let results = tasks.join_all().await;
    let closed = results.iter().filter(|(ok, _)| !ok).count();
    assert_eq!(closed, 0, "{closed} of {CLIENTS} closed before PB_CONNECT");
    assert_eq!(node.server.broker().hub().total_clients(), CLIENTS);
}

/// The burst fix keeps the slowloris protection: at the cap, a half-sent
/// request is closed for a newcomer once it has waited its grace, so a
/// health check still gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_cap_a_half_sent_request_is_closed_after_its_grace_for_a_health_check() {
    use tokio::io::AsyncReadExt;
    let node = start_with(|c| c.max_http_connections = 4).await;
    let mut half = Vec::new();
    for _ in 0..4 {
        half.push(raw(&node, b"GET /api/hea").await);
    }
    let started = std::time::Instant::now();
    let (status, _) = tokio::time::timeout(WAIT, node.get_json("/api/health"))
        .await
        .expect("a health check answers");
    assert_eq!(status, StatusCode::OK);
    // Not before the grace (1 s): they were fresh connections.
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    let mut buf = [0u8; 64];
    let first = tokio::time::timeout(WAIT, half[0].read(&mut buf)).await;
    assert!(
        matches!(first, Ok(Ok(0)) | Ok(Err(_))),
        "the oldest was closed"
    );
}
