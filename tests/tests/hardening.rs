//! Bounded under hostile input: the attacks of the review, against the real
//! binary, with its resident memory read from /proc.

use std::time::{Duration, Instant};

use fanout_testkit::{Api, NodeProcess, StatusCode, wait_for};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

const MIB: u64 = 1024;

/// A raw connection that has sent `request`.
async fn raw(node: &NodeProcess, request: &[u8]) -> TcpStream {
    let mut sock = TcpStream::connect(node.addr()).await.unwrap();
    sock.set_nodelay(true).unwrap();
    sock.write_all(request).await.unwrap();
    sock
}

/// Read until `needle` shows up, within `within`; what was read.
async fn read_until(sock: &mut TcpStream, needle: &str, within: Duration) -> String {
    let mut all = String::new();
    let mut buf = vec![0; 8192];
    let found = tokio::time::timeout(within, async {
        while !all.contains(needle) {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => all.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        true
    })
    .await;
    assert!(matches!(found, Ok(true)), "no {needle:?} in time: {all}");
    all
}

/// Whether the server closes the connection within `within` (what it
/// sends before is discarded).
async fn closed_within(sock: &mut TcpStream, within: Duration) -> bool {
    let mut buf = vec![0; 8192];
    tokio::time::timeout(within, async {
        loop {
            match sock.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

async fn wait_connections(api: &Api, n: u64) {
    wait_for("connection count", || async {
        api.get_json("/api/health").await.1["data"]["connections"] == n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_dribbled_one_byte_per_packet_costs_memory_in_proportion_to_the_bytes_received() {
    let node = NodeProcess::start(&[("FANOUT_PUBLISH_KEY", "k")]).await;
    let before = node.rss_kib();
    let mut tasks = JoinSet::new();
    for i in 0..20 {
        let head = if i % 2 == 0 {
            "POST /api/realtime HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 4000000\r\n\r\n"
        } else {
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\nContent-Type: application/json\r\nContent-Length: 4000000\r\n\r\n"
        };
        let mut sock = raw(&node, head.as_bytes()).await;
        tasks.spawn(async move {
            for _ in 0..3000 {
                sock.write_all(b" ").await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            sock
        });
    }
    let socks = tasks.join_all().await;
    let grown = node.rss_kib().saturating_sub(before);
    // 60,000 body bytes were received; a read buffer kept per byte would
    // be 100+ MiB.
    assert!(grown < 16 * MIB, "grew {grown} KiB for 60,000 body bytes");
    drop(socks);
}

#[tokio::test]
async fn the_publish_key_is_checked_before_the_body_is_read() {
    let node = NodeProcess::start(&[("FANOUT_PUBLISH_KEY", "k")]).await;
    // The body never comes: the answer must not wait for it.
    let mut sock = raw(
        &node,
        b"POST /api/publish HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n",
    )
    .await;
    let answer = read_until(&mut sock, "\r\n\r\n", Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_before_any_body_byte() {
    let node = NodeProcess::start(&[("FANOUT_MAX_BODY_BYTES", "1000")]).await;
    for path in ["/api/realtime", "/api/publish"] {
        let mut sock = raw(
            &node,
            format!("POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1001\r\n\r\n").as_bytes(),
        )
        .await;
        let answer = read_until(&mut sock, "}", Duration::from_secs(3)).await;
        assert!(answer.starts_with("HTTP/1.1 413"), "{path}: {answer}");
        assert!(answer.contains(r#""status":413"#), "{answer}");
    }
}

#[tokio::test]
async fn a_body_that_does_not_arrive_within_the_body_timeout_gets_408_and_the_connection_closes() {
    let node = NodeProcess::start(&[("FANOUT_BODY_TIMEOUT", "1s")]).await;
    let started = Instant::now();
    let mut sock = raw(
        &node,
        b"POST /api/realtime HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{",
    )
    .await;
    let answer = read_until(&mut sock, "}", Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(closed_within(&mut sock, Duration::from_secs(3)).await);
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_large_publish_matching_1000_keys_of_stalled_clients_stays_within_a_few_mib() {
    // The stalled clients are closed by the write timeout: their queues
    // now hold the publication (its data charged once per client, issue 17
    // item 6), so they are no longer dropped as slow. 2 s, well inside the
    // wait below, instead of the 15 s default that raced it.
    let node = NodeProcess::start(&[("FANOUT_WRITE_TIMEOUT", "2s")]).await;
    let keys: Vec<String> = (0..1000).map(|i| format!("amp?k={i}")).collect();
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let (sock, id) = node.stalled_stream().await;
        let (status, body) = node
            .post_subscriptions(json!({"clientId": id, "subscriptions": keys}), &[])
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        stalled.push(sock);
    }
    let before = node.rss_kib();
    let data = "x".repeat(244 * 1024);
    node.publish("amp", json!(data)).await;
    // All four are closed (their sockets stopped reading).
    wait_connections(&node, 0).await;
    let grown = node.rss_kib().saturating_sub(before);
    // A frame copy per key was +958 MiB here.
    assert!(grown < 24 * MIB, "grew {grown} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_large_key_sets_are_stored_once_and_a_set_over_the_budget_gets_400() {
    let node = NodeProcess::start(&[]).await;
    let keys: Vec<String> = (0..100)
        .map(|i| format!("k{i}?{}", "p".repeat(2490)))
        .collect();
    let api = node.api.clone();
    let mut streams = Vec::new();
    for _ in 0..100 {
        streams.push(api.connect().await);
    }
    let before = node.rss_kib();
    for s in &streams {
        let (status, body) = api
            .post_subscriptions(json!({"clientId": s.client_id, "subscriptions": keys}), &[])
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }
    let grown = node.rss_kib().saturating_sub(before);
    // 100 clients × 250 KB of keys: 25 MB if each client kept its copy.
    assert!(grown < 12 * MIB, "grew {grown} KiB");

    // PocketBase's largest set (1,000 × 2,500 bytes) is over the default
    // budget of 256 KiB per client.
    let big: Vec<String> = (0..1000)
        .map(|i| format!("b{i}?{}", "p".repeat(2490)))
        .collect();
    let (status, body) = api
        .post_subscriptions(
            json!({"clientId": streams[0].client_id, "subscriptions": big}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(
        body["data"]["subscriptions"]["code"],
        "validation_length_too_long"
    );
    assert_eq!(body["data"]["subscriptions"]["params"]["max"], 256 * 1024);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_topic_is_refused_503_while_another_topic_stays_prompt_and_memory_plateaus()
{
    let node = NodeProcess::start(&[
        ("FANOUT_MAX_BACKLOG_DELIVERIES", "200000"),
        ("FANOUT_PUBLISH_WAIT", "200ms"),
        ("FANOUT_CLIENT_QUEUE", "100000"),
    ])
    .await;
    let api = node.api.clone();
    // 1,000 subscribers of the flood, each read by a task that drains it.
    let mut readers = JoinSet::new();
    for _ in 0..1000 {
        let (mut sock, id) = node.stalled_stream().await;
        api.subscribe(&id, &["flood"]).await;
        readers.spawn(async move {
            let mut buf = vec![0; 64 * 1024];
            while let Ok(n) = sock.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        });
    }
    let mut quiet = api.connect().await;
    api.subscribe(&quiet.client_id, &["quiet"]).await;

    let flood_for = Duration::from_secs(5);
    let started = Instant::now();
    let mut publishers = JoinSet::new();
    for _ in 0..2 {
        let api = api.clone();
        publishers.spawn(async move {
            let batch: Vec<Value> = (0..1000)
                .map(|i| json!({"topic": "flood", "data": {"i": i}}))
                .collect();
            let (mut ok, mut refused) = (0, 0);
            while started.elapsed() < flood_for {
                let (status, _) = api.publish_raw(json!({"messages": batch}), &[]).await;
                match status {
                    StatusCode::OK => ok += 1,
                    StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                    s => panic!("unexpected {s}"),
                }
            }
            (ok, refused)
        });
    }
    // The quiet topic: one message every 100 ms, timed from the publish
    // to its arrival.
    let mut latencies = Vec::new();
    let mut rss = Vec::new();
    let mut n = 0;
    while started.elapsed() < flood_for {
        let sent = Instant::now();
        let (status, body) = api
            .publish_raw(json!({"topic": "quiet", "data": {"n": n}}), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "quiet publish: {body}");
        let (event, data) = quiet.next_json().await;
        assert_eq!((event.as_str(), data["n"].as_u64()), ("quiet", Some(n)));
        latencies.push(sent.elapsed());
        rss.push(node.rss_kib());
        n += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut ok, mut refused) = (0, 0);
    for (o, r) in publishers.join_all().await {
        ok += o;
        refused += r;
    }
    latencies.sort();
    let p99 = latencies[latencies.len() * 99 / 100];
    let half = rss.len() / 2;
    let first_half = *rss[..half].iter().max().unwrap();
    let second_half = *rss[half..].iter().max().unwrap();
    eprintln!(
        "flood: {ok} batches accepted, {refused} refused; quiet p99 {p99:?} over {} messages; rss max {first_half} then {second_half} KiB",
        latencies.len()
    );
    assert!(refused > 0, "publishes past the backlog bound must get 503");
    assert!(ok > 0);
    assert!(p99 < Duration::from_millis(500), "quiet topic p99 {p99:?}");
    assert!(
        second_half < first_half + 64 * MIB,
        "memory kept growing: {first_half} then {second_half} KiB"
    );
    readers.abort_all();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_and_idle_connections_are_closed_after_the_head_and_body_timeouts() {
    let node =
        NodeProcess::start(&[("FANOUT_HEAD_TIMEOUT", "1s"), ("FANOUT_BODY_TIMEOUT", "1s")]).await;
    let mut socks = Vec::new();
    for i in 0..150 {
        let req: &[u8] = match i % 3 {
            // A head that never ends.
            0 => b"GET /api/hea",
            // A body that never ends.
            1 => b"POST /api/realtime HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{",
            // A whole request, then an idle keep-alive connection.
            _ => b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n",
        };
        socks.push(raw(&node, req).await);
    }
    let mut tasks = JoinSet::new();
    for mut s in socks {
        tasks.spawn(async move { closed_within(&mut s, Duration::from_secs(5)).await });
    }
    let closed = tasks.join_all().await;
    assert!(
        closed.iter().all(|c| *c),
        "{} of 150 still open",
        closed.iter().filter(|c| !**c).count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_few_file_descriptors_idle_connections_make_room_for_health_checks_and_streams() {
    let node = NodeProcess::start_with_nofile(256, &[]).await;
    // More half-sent requests than the process has descriptors.
    let mut idle = Vec::new();
    for _ in 0..400 {
        idle.push(raw(&node, b"GET /api/hea").await);
    }
    let started = Instant::now();
    let (status, _) = tokio::time::timeout(Duration::from_secs(5), node.get_json("/api/health"))
        .await
        .expect("a health check answers");
    assert_eq!(status, StatusCode::OK);
    let stream = tokio::time::timeout(Duration::from_secs(5), node.connect())
        .await
        .expect("a new stream opens");
    assert_eq!(stream.client_id.len(), 40);
    assert!(started.elapsed() < Duration::from_secs(5));
    let evicted = node.metric("fanout_connections_evicted_total").await;
    assert!(evicted >= 100.0, "evicted {evicted}");
}

#[tokio::test]
async fn at_the_http_connection_cap_the_connection_waiting_longest_is_closed_for_a_new_one() {
    let node = NodeProcess::start(&[("FANOUT_MAX_HTTP_CONNECTIONS", "20")]).await;
    let mut first = raw(&node, b"GET /api/hea").await;
    let mut rest = Vec::new();
    for _ in 0..19 {
        rest.push(raw(&node, b"GET /api/hea").await);
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (status, _) = node.get_json("/api/health").await;
    assert_eq!(status, StatusCode::OK);
    assert!(closed_within(&mut first, Duration::from_secs(3)).await);
}
