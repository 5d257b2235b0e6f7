//! Nothing lost that a publish acknowledged: numbered messages at a steady
//! rate to clients on every node, through real faults, and for each client
//! exactly which numbers it missed or got twice.

use std::time::Duration;

use fanout_testkit::*;
use serde_json::json;

fn env<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("FANOUT_REDIS_URL", url),
        ("FANOUT_HEARTBEAT_INTERVAL", "300ms"),
        // Three heartbeats must exceed it, or the node refuses to start.
        ("FANOUT_FORWARD_TIMEOUT", "800ms"),
    ];
    env.extend_from_slice(extra);
    env
}

/// Three nodes and a client on each, subscribed to `n`.
async fn three_nodes(url: &str, extra: &[(&str, &str)]) -> (Vec<NodeProcess>, Vec<Sse>) {
    let mut nodes = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let node = NodeProcess::start(&env(url, extra)).await;
        let sse = node.connect().await;
        node.subscribe(&sse.client_id, &["n"]).await;
        clients.push(sse);
        nodes.push(node);
    }
    (nodes, clients)
}

async fn assert_nothing_lost(clients: &mut [Sse], acked: &[u64], what: &str) {
    for (i, sse) in clients.iter_mut().enumerate() {
        let seen = received_numbers(sse).await;
        check_delivery(
            &format!("{what}, client on node {i}"),
            &seen,
            acked,
            &[],
            true,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_of_the_subscribers_loses_and_duplicates_nothing() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let (nodes, mut clients) = three_nodes(&url, &[]).await;
    let publisher = SteadyPublisher::start(nodes[0].api.clone(), "n", Duration::from_millis(5));
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
        assert_eq!(killed, 3);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, _) = publisher.finish().await;
    assert_nothing_lost(&mut clients, &acked, "CLIENT KILL").await;
    let catch_ups: f64 = {
        let mut t = 0.0;
        for n in &nodes {
            t += n.metric("fanout_history_catch_up_seconds_count").await;
        }
        t
    };
    assert!(catch_ups >= 3.0, "every node caught up after each kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_aof_loses_and_duplicates_nothing() {
    let dir = TempDir::new("fanout-aof");
    let dir_arg = dir.0.to_str().unwrap().to_owned();
    let aof = [
        "--appendonly",
        "yes",
        "--appendfsync",
        "always",
        "--dir",
        dir_arg.as_str(),
    ];
    let mut redis = RedisServer::start_with(&aof).await;
    let url = redis.url();
    let (nodes, mut clients) = three_nodes(&url, &[]).await;
    let publisher = SteadyPublisher::start(nodes[1].api.clone(), "n", Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = redis.port;
    redis.stop().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis = RedisServer::start_on_with(port, &aof).await;
    for n in &nodes {
        n.wait_healthy().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (acked, _) = publisher.finish().await;
    assert_nothing_lost(&mut clients, &acked, "restart with AOF").await;
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_a_new_epoch_and_the_streams_are_closed() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    let (nodes, mut clients) = three_nodes(&url, &[]).await;
    nodes[0].publish("n", json!(0)).await;
    for sse in &mut clients {
        assert_eq!(sse.next_json().await.1, json!(0));
    }
    let port = redis.port;
    redis.stop().await;
    redis = RedisServer::start_on(port).await;
    for n in &nodes {
        n.wait_healthy().await;
    }
    // The first message after the restart carries a new epoch: whatever
    // was published in between is unknowable, so every stream of the topic
    // is closed (the SDK reconnects and the app re-fetches).
    nodes[0].publish_retrying("n", json!(1)).await;
    for (i, sse) in clients.iter_mut().enumerate() {
        assert!(
            sse.closed_within(Duration::from_secs(5)).await,
            "node {i} closed its stream"
        );
    }
    for n in &nodes {
        assert!(n.metric("fanout_history_gaps_total").await >= 1.0);
    }
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_dropped_for_its_output_buffer_is_caught_up() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let (nodes, mut clients) = three_nodes(&url, &[("FANOUT_CLIENT_QUEUE", "100000")]).await;
    let padded = nodes[2].connect().await;
    nodes[2].subscribe(&padded.client_id, &["pad"]).await;
    let _: () = redis
        .cmd(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 64kb 32kb 1",
        ])
        .await;
    // Node 2 stops reading for a while; Redis drops its subscriber when
    // the output buffer passes 64 KiB.
    nodes[2].signal(SIGSTOP);
    // Past the kernel's socket buffers too: megabytes.
    let big = "x".repeat(50_000);
    let mut acked = Vec::new();
    for n in 0..150u64 {
        let (status, _) = nodes[0]
            .publish_raw(json!({"topic": "n", "data": n}), &[])
            .await;
        if status == StatusCode::OK {
            acked.push(n);
        }
        let _ = nodes[0]
            .publish_raw(json!({"topic": "pad", "data": big}), &[])
            .await;
    }
    // Redis dropped node 2's subscriber connection.
    wait_for("node 2 dropped by Redis", || async {
        let v: Vec<redis::Value> = redis.cmd(&["PUBSUB", "NUMSUB", "fanout:t:pad"]).await;
        matches!(v.get(1), Some(redis::Value::Int(0)))
    })
    .await;
    nodes[2].signal(SIGCONT);
    wait_for("node 2 re-subscribed", || async {
        nodes[2].metric("fanout_relay_reconnects_total").await >= 1.0
            && nodes[2].get_json("/api/health").await.0 == StatusCode::OK
    })
    .await;
    assert_nothing_lost(&mut clients, &acked, "output buffer overflow").await;
}

/// 10 clients on `node`, subscribed to 1,000 topics each
/// (`<prefix>-<client>-<i>`), and one message published to each topic, so
/// the node knows every topic's position. The streams.
async fn ten_thousand_known_topics(
    node: &NodeProcess,
    publisher: &NodeProcess,
    prefix: &str,
) -> Vec<Sse> {
    let mut streams = Vec::new();
    for c in 0..10 {
        let sse = node.connect().await;
        let topics: Vec<String> = (0..1000).map(|i| format!("{prefix}-{c}-{i}")).collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        node.subscribe(&sse.client_id, &refs).await;
        let batch: Vec<serde_json::Value> = topics
            .iter()
            .map(|t| json!({"topic": t, "data": 0}))
            .collect();
        let (status, body) = publisher.publish_raw(json!({"messages": batch}), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        streams.push(sse);
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_topics_are_caught_up_after_the_subscriber_connection_is_killed() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[])).await;
    let publisher = NodeProcess::start(&env(&url, &[])).await;
    let mut streams = ten_thousand_known_topics(&node, &publisher, "t").await;
    for sse in &mut streams {
        for _ in 0..1000 {
            sse.next().await;
        }
    }
    let killed: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 2);
    wait_for("caught up", || async {
        node.metric("fanout_history_catch_up_seconds_count").await >= 1.0
    })
    .await;
    let secs = node.metric("fanout_history_catch_up_seconds_sum").await;
    eprintln!("10,000 topics caught up from history in {secs:.3} s");
    assert_eq!(node.metric("fanout_history_gaps_total").await, 0.0);
    publisher.publish("t-9-999", json!(1)).await;
    assert_eq!(streams[9].next_json().await, ("t-9-999".into(), json!(1)));
}

/// The subscription key the JS SDK makes for `subscribe(topic, cb, {since})`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_with_since_resumes_on_another_node_with_no_gap_and_no_duplicate() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = NodeProcess::start(&env(&url, &[])).await;
    let b = NodeProcess::start(&env(&url, &[])).await;
    // A first client on node a reads a while, as an app would, and keeps
    // the id of the last message it saw.
    let mut first = a.connect().await;
    a.subscribe(&first.client_id, &["chat"]).await;
    let api = b.api.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let publisher = tokio::spawn(async move {
        let mut n = 0u64;
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            api.publish_retrying_with_id("chat", &format!("m{n}"), json!(n))
                .await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    });
    let mut last = 0;
    for _ in 0..50 {
        last = first.next_json().await.1.as_u64().unwrap();
    }
    drop(first);
    // The app reconnects, here to node b, and resumes after `last` while
    // messages keep coming.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut resumed = b.connect().await;
    let key = since_key("chat", &format!("m{last}"));
    b.subscribe(&resumed.client_id, &[&key]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publisher.await.unwrap();
    let mut seen = Vec::new();
    while let Some(e) = resumed.next_within(Duration::from_secs(1)).await {
        assert_eq!(e.event, key);
        seen.push(e.data.parse::<u64>().unwrap());
    }
    let expected: Vec<u64> = (last + 1..published).collect();
    assert_eq!(
        seen, expected,
        "replay then live: every message after the cursor, once, in order"
    );
}

/// p99 of a list of durations.
fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[(v.len() * 99 / 100).min(v.len() - 1)]
}

/// Publish to `topic` one after another until `n` are answered 200; the
/// latency of each of those (503s, while the node reconnects, are retried
/// and not counted).
async fn timed_publishes(api: &Api, topic: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let started = std::time::Instant::now();
        let (status, _) = api
            .publish_raw(json!({"topic": topic, "data": 1}), &[])
            .await;
        if status == StatusCode::OK {
            out.push(started.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_do_not_queue_behind_a_bulk_catch_up() {
    // Bulk history reads on the connection publishes use made the publish
    // p99 131 ms here (2.5 ms quiet); on a connection of their own, 7-13 ms.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[("FANOUT_CLIENT_QUEUE", "100000")])).await;
    let publisher = NodeProcess::start(&env(&url, &[])).await;
    let streams = ten_thousand_known_topics(&node, &publisher, "b").await;
    let baseline = p99(timed_publishes(&node.api, "quiet", 200).await);
    // 10 messages for each of the 10,000 topics while the node's
    // subscriber is away: the catch-up reads 100,000 messages.
    node.signal(SIGSTOP);
    for c in 0..10 {
        for round in 0..10 {
            let batch: Vec<serde_json::Value> = (0..1000)
                .map(|i| json!({"topic": format!("b-{c}-{i}"), "data": round + 1}))
                .collect();
            publisher.publish_raw(json!({"messages": batch}), &[]).await;
        }
    }
    let _: i64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    node.signal(SIGCONT);
    let during_task = {
        let api = node.api.clone();
        tokio::spawn(async move { timed_publishes(&api, "quiet", 200).await })
    };
    wait_for("caught up", || async {
        node.metric("fanout_history_catch_up_seconds_count").await >= 1.0
    })
    .await;
    let during = p99(during_task.await.unwrap());
    let catch_up = node.metric("fanout_history_catch_up_seconds_sum").await;
    eprintln!(
        "publish p99 on the node: {baseline:?} quiet, {during:?} while catching up 100,000 messages of 10,000 topics ({catch_up:.2} s)"
    );
    assert_eq!(node.metric("fanout_history_gaps_total").await, 0.0);
    assert!(
        during < Duration::from_millis(60),
        "publishes queued behind the catch-up: p99 {during:?}"
    );
    drop(streams);
}
