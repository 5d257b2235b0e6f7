//! Stream lifetimes and load behaviour: slow clients, idle and maximum
//! lifetime, the connection limit, graceful shutdown, and the real binary.

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use common::*;
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A client that stops reading is disconnected, while 1,000 others receive
/// every message, in order, and the publisher is never held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_client_is_dropped_while_a_thousand_others_keep_up() {
    const CLIENTS: usize = 1000;
    const MESSAGES: u64 = 200;
    let node = start_with(|c| {
        c.client_queue = 32;
        c.write_timeout = Duration::from_secs(1);
    })
    .await;

    // The slow client: a raw socket with a tiny receive buffer that reads
    // PB_CONNECT and then never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(node.server.local_addr()).await.unwrap();
    slow.write_all(b"GET /api/realtime HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let mut head = String::new();
    while !head.contains("PB_CONNECT") {
        let n = slow.read(&mut buf).await.unwrap();
        head.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let slow_id = head
        .split("id:")
        .nth(1)
        .and_then(|s| s.split('\n').next())
        .unwrap()
        .to_owned();

    // The others, each checking order as it goes.
    let received = Arc::new(AtomicUsize::new(0));
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..CLIENTS {
        let mut sse = node.connect().await;
        node.subscribe(&sse.client_id, &["load"]).await;
        let received = received.clone();
        readers.spawn(async move {
            for expected in 0..MESSAGES {
                let (_, data) = sse.next_json().await;
                assert_eq!(data["seq"], expected, "in order, nothing missing");
                received.fetch_add(1, Ordering::Relaxed);
            }
        });
    }

    // Only the slow client subscribes to "flood": 64 KiB messages there
    // fill its socket and hyper's buffers, then its queue, however large
    // the kernel's buffers are, while everyone gets the small "load" ones.
    node.subscribe(&slow_id, &["load", "flood"]).await;
    let pad = "x".repeat(64 * 1024);
    let hub = node.server.broker().hub().clone();
    let mut floods = 0;
    for seq in 0..MESSAGES {
        node.publish("load", json!({"seq": seq})).await;
        if hub.client_by_id(&slow_id).is_some() && floods < 4000 {
            for _ in 0..20 {
                node.publish("flood", json!({"pad": pad})).await;
                floods += 1;
            }
        }
    }
    while let Some(r) = readers.join_next().await {
        r.expect("reader saw every message in order");
    }
    assert_eq!(
        received.load(Ordering::Relaxed),
        CLIENTS * MESSAGES as usize
    );
    wait_until("slow client unregistered", || {
        hub.client_by_id(&slow_id).is_none()
    })
    .await;

    // The server also closes the socket (write timeout): reading drains
    // what was buffered and then hits the end.
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            match slow.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "slow client's socket closed");
    // Counted (the recorder is shared by the tests of this process, so at
    // least this one).
    assert!(node.metric("fanout_slow_client_disconnects_total").await >= 1.0);
}

#[tokio::test]
async fn idle_streams_close_and_deliveries_keep_them_open() {
    let node = start_with(|c| c.idle_timeout = Duration::from_millis(600)).await;
    let mut busy = node.connect().await;
    let mut idle = node.connect().await;
    node.subscribe(&busy.client_id, &["tick"]).await;
    let started = tokio::time::Instant::now();
    // Deliveries every 150 ms keep `busy` alive past the idle timeout.
    for i in 0..8 {
        node.publish("tick", json!(i)).await;
        assert_eq!(busy.next_json().await.1, json!(i));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert!(started.elapsed() > Duration::from_millis(1000));
    assert!(idle.closed_within(WAIT).await, "idle stream closed");
    let hub = node.server.broker().hub().clone();
    let id = idle.client_id.clone();
    wait_until("idle client unregistered", || {
        hub.client_by_id(&id).is_none()
    })
    .await;
    assert!(hub.client_by_id(&busy.client_id).is_some());
    // After that the busy one goes idle too.
    assert!(busy.closed_within(WAIT).await);
}

#[tokio::test]
async fn streams_end_at_their_maximum_lifetime_even_when_busy() {
    let node = start_with(|c| c.max_lifetime = Duration::from_millis(500)).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["t"]).await;
    let node = Arc::new(node);
    let publisher = {
        let node = node.clone();
        tokio::spawn(async move {
            for i in 0.. {
                node.publish("t", json!(i)).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let started = tokio::time::Instant::now();
    assert!(sse.closed_within(WAIT).await);
    assert!(started.elapsed() >= Duration::from_millis(300));
    publisher.abort();
}

#[tokio::test]
async fn connections_beyond_the_limit_get_503() {
    let node = start_with(|c| c.max_connections = 2).await;
    let _a = node.connect().await;
    let _b = node.connect().await;
    let res = node
        .http
        .get(format!("{}/api/realtime", node.base))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = res.json().await.unwrap();
    assert_eq!(body["status"], 503);
    drop(_a);
    let hub = node.server.broker().hub().clone();
    wait_until("slot freed", || hub.total_clients() < 2).await;
    let _c = node.connect().await;
}

#[tokio::test]
async fn health_is_503_with_the_reason_while_the_node_is_at_its_stream_cap() {
    let node = start_with(|c| c.max_connections = 2).await;
    let _a = node.connect().await;
    let (status, _) = node.get_json("/api/health").await;
    assert_eq!(status, StatusCode::OK);
    let b = node.connect().await;
    let (status, body) = node.get_json("/api/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["status"], 503);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("realtime connection cap"),
        "{body}"
    );
    assert_eq!(body["data"]["connections"], 2);
    // Room again: healthy again.
    drop(b);
    let hub = node.server.broker().hub().clone();
    wait_until("slot freed", || hub.total_clients() < 2).await;
    let (status, body) = node.get_json("/api/health").await;
    assert_eq!(status, StatusCode::OK, "{body}");
}

#[tokio::test]
async fn shutdown_ends_open_streams_promptly() {
    let node = start_with(|c| c.drain_timeout = Duration::from_secs(30)).await;
    let mut a = node.connect().await;
    let mut b = node.connect().await;
    // A connection that never sends a request, and one idle after a request.
    let _silent = raw(&node, b"").await;
    let mut kept = raw(&node, b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\n").await;
    read_until(&mut kept, "API is healthy.").await;
    let started = tokio::time::Instant::now();
    node.server.shutdown().await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "shutdown did not wait for the drain timeout"
    );
    assert!(a.closed_within(WAIT).await && b.closed_within(WAIT).await);
}

/// `fanout` as users run it: configured by environment, serving the
/// protocol, logging JSON, and exiting cleanly on SIGTERM with its streams
/// ended rather than hanging.
#[tokio::test]
async fn binary_serves_and_stops_on_sigterm() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fanout"));
    let mut node = fanout_testkit::NodeProcess::start_bin(
        bin,
        fanout_testkit::free_port(),
        &[("FANOUT_PUBLISH_KEY", "k")],
    )
    .await;
    let (_, health) = node.get_json("/api/health").await;
    assert_eq!(health["message"], "API is healthy.");
    assert_eq!(health["data"]["relay"]["kind"], "local");
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["t"]).await;
    let (s, _) = node
        .publish_raw(
            json!({"topic": "t", "data": {"ok": true}}),
            &[("authorization", "Bearer k")],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let e = sse.next().await;
    assert_eq!((e.event.as_str(), e.data.as_str()), ("t", r#"{"ok":true}"#));

    assert!(node.stop().await.success());
    assert!(sse.closed_within(WAIT).await, "stream ended on shutdown");
    let logs = node.logs();
    assert!(
        logs.lines()
            .all(|l| serde_json::from_str::<Value>(l).is_ok()),
        "JSON logs"
    );
    assert!(logs.contains("fanout listening") && logs.contains("stopped"));
}

/// An HTTP/1.0 client (no chunked encoding) is served by the router's
/// realtime handler, with the same first event.
#[tokio::test]
async fn http10_clients_get_a_stream_too() {
    let node = start().await;
    let mut sock = raw(&node, b"GET /api/realtime HTTP/1.0\r\n\r\n").await;
    let got = read_until(&mut sock, "\n\n").await;
    assert!(got.starts_with("HTTP/1.0 200"), "{got}");
    assert!(got.contains("content-type: text/event-stream"));
    assert!(got.contains("event:PB_CONNECT\ndata:{\"clientId\":\""));
}

/// When a stream ends (here: idle), the connection stays usable for the
/// next request, as with any HTTP/1.1 keep-alive connection.
#[tokio::test]
async fn a_connection_outlives_its_stream() {
    let node = start_with(|c| c.idle_timeout = Duration::from_millis(300)).await;
    let mut sock = raw(&node, b"GET /api/realtime HTTP/1.1\r\nHost: t\r\n\r\n").await;
    // PB_CONNECT, then the terminating chunk when the stream goes idle.
    let got = read_until(&mut sock, "\r\n0\r\n\r\n").await;
    assert!(got.contains("event:PB_CONNECT"));
    sock.write_all(b"GET /api/health HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let got = read_until(&mut sock, "API is healthy.").await;
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// Redis restarted without persistence: a new epoch, so every stream of the
/// topic is closed. The closes are spread over `--close-spread` (not all in
/// one instant, all within the window), and no stream gets a message from
/// past the gap before its close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_epoch_closes_the_topics_streams_spread_over_the_window_and_delivers_nothing_past_it()
{
    use futures_util::StreamExt;
    const CLIENTS: usize = 30;
    const SPREAD: Duration = Duration::from_secs(2);
    let mut redis = fanout_testkit::RedisServer::start().await;
    let url = redis.url();
    let node = start_with(|c| {
        c.redis_url = Some(url);
        c.close_spread = SPREAD;
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let sse = node.connect().await;
        node.subscribe(&sse.client_id, &["n"]).await;
        clients.push(sse);
    }
    node.publish("n", json!(0)).await;
    for sse in &mut clients {
        assert_eq!(sse.next_json().await.1, json!(0));
    }
    let port = redis.port;
    redis.stop().await;
    redis = fanout_testkit::RedisServer::start_on(port).await;
    node.wait_healthy().await;
    let gap = tokio::time::Instant::now();
    // The first message after the restart carries a new epoch; the second
    // follows while the streams wait for their close.
    node.publish_retrying("n", json!(1)).await;
    node.publish("n", json!(2)).await;
    let mut tasks = tokio::task::JoinSet::new();
    for mut sse in clients {
        tasks.spawn(async move {
            let mut got = Vec::new();
            let closed = tokio::time::timeout(SPREAD + Duration::from_secs(10), async {
                loop {
                    match sse.events.next().await {
                        None | Some(Err(_)) => return,
                        Some(Ok(e)) => got.push(e.data),
                    }
                }
            })
            .await;
            assert!(closed.is_ok(), "a stream was not closed");
            (tokio::time::Instant::now(), got)
        });
    }
    let results = tasks.join_all().await;
    for (_, got) in &results {
        assert!(got.is_empty(), "delivered past the gap: {got:?}");
    }
    let first = results.iter().map(|r| r.0).min().unwrap();
    let last = results.iter().map(|r| r.0).max().unwrap();
    // Uniform over 2 s, 30 closes span well over 0.5 s (all within a few
    // ms before the spread).
    assert!(
        last - first > Duration::from_millis(500),
        "closes within {:?}",
        last - first
    );
    // The publish that revealed the gap returned after the node saw it, so
    // measured from before it: the window, plus slack for a loaded machine.
    assert!(
        last - gap < SPREAD + Duration::from_secs(2),
        "last close {:?} after the gap",
        last - gap
    );
    drop(redis);
}
