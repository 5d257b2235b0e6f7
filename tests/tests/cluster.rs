//! A real cluster: a private redis-server and three `fanout` processes per
//! test, all on loopback. Requests go to any node, as through a round-robin
//! load balancer without sticky sessions.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use fanout_testkit::*;
use serde_json::{Value, json};

const SECRET: &str = "cluster-secret";

struct Cluster {
    redis: RedisServer,
    nodes: Vec<NodeProcess>,
}

async fn cluster(n: usize, extra: &[(&str, &str)]) -> Cluster {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let mut env = vec![
        ("FANOUT_REDIS_URL", url.as_str()),
        ("FANOUT_HEARTBEAT_INTERVAL", "300ms"),
        ("FANOUT_FORWARD_TIMEOUT", "800ms"),
        ("FANOUT_JWT_SECRET", SECRET),
        ("FANOUT_TRUSTED_PROXIES", "127.0.0.1"),
    ];
    env.extend_from_slice(extra);
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(NodeProcess::start(&env).await);
    }
    Cluster { redis, nodes }
}

impl Cluster {
    fn node(&self, i: usize) -> &NodeProcess {
        &self.nodes[i % self.nodes.len()]
    }

    /// The topic channels Redis has subscribers for.
    async fn channels(&self) -> HashSet<String> {
        self.redis
            .cmd::<Vec<String>>(&["PUBSUB", "CHANNELS", "fanout:t:*"])
            .await
            .into_iter()
            .collect()
    }
}

fn channel_set(topics: &[&str]) -> HashSet<String> {
    topics.iter().map(|t| format!("fanout:t:{t}")).collect()
}

#[tokio::test]
async fn every_node_pair_delivers() {
    let c = cluster(3, &[]).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let sse = c.node(i).connect().await;
        c.node(i).subscribe(&sse.client_id, &["t"]).await;
        clients.push(sse);
    }
    for from in 0..3 {
        c.node(from).publish("t", json!({"from": from})).await;
    }
    for sse in &mut clients {
        for from in 0..3 {
            assert_eq!(sse.next_json().await, ("t".into(), json!({"from": from})));
        }
    }
}

#[tokio::test]
async fn subscription_post_on_another_node_gets_the_owners_answer() {
    let c = cluster(3, &[]).await;
    let mut sse = c.node(0).connect().await;
    let id = sse.client_id.clone();

    // Subscribed through node 1, published through node 2.
    c.node(1).subscribe(&id, &["news"]).await;
    c.node(2).publish("news", json!(1)).await;
    assert_eq!(sse.next_json().await, ("news".into(), json!(1)));

    // The owner's checks and exact answers travel back: IP mismatch (400) …
    let (s, b) = c
        .node(1)
        .post_subscriptions(
            json!({"clientId": id, "subscriptions": ["x"]}),
            &[("x-forwarded-for", "10.9.9.9")],
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert_eq!(
        b,
        json!({"status":400,"message":"Invalid realtime client.","data":{}})
    );
    // … and auth changes (403).
    let t1 = user_token(SECRET, "u1");
    let t2 = user_token(SECRET, "u2");
    c.node(2).subscribe_as(&id, &["news"], &t1).await;
    let (s, b) = c
        .node(1)
        .post_subscriptions(
            json!({"clientId": id, "subscriptions": ["news"]}),
            &[("authorization", &t2)],
        )
        .await;
    assert_eq!(s, StatusCode::FORBIDDEN);
    assert_eq!(
        b["message"],
        "The current and the previous request authorization don't match."
    );

    // Unknown ids: of a live node (its answer), and of no node (404 at once).
    let tag0 = c.node(0).tag().await;
    let fake = format!("{tag0}{}", "x".repeat(32));
    let (s, b) = c
        .node(1)
        .post_subscriptions(json!({"clientId": fake, "subscriptions": ["a"]}), &[])
        .await;
    assert_eq!(
        (s, b["message"].as_str()),
        (StatusCode::NOT_FOUND, Some("Missing or invalid client id."))
    );
    let started = Instant::now();
    let (s, _) = c
        .node(1)
        .post_subscriptions(
            json!({"clientId": "z".repeat(40), "subscriptions": ["a"]}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(started.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn per_topic_order_is_identical_on_every_node() {
    const PER_PUBLISHER: usize = 100;
    let c = cluster(3, &[]).await;
    let mut clients = Vec::new();
    for i in 0..6 {
        let sse = c.node(i).connect().await;
        c.node(i + 1).subscribe(&sse.client_id, &["ord"]).await;
        clients.push(sse);
    }
    // Three concurrent publishers, one per node.
    let mut publishers = tokio::task::JoinSet::new();
    for p in 0..3 {
        let api = c.node(p).api.clone();
        publishers.spawn(async move {
            for n in 0..PER_PUBLISHER {
                api.publish("ord", json!({"p": p, "n": n})).await;
            }
        });
    }
    publishers.join_all().await;
    let mut sequences = Vec::new();
    for sse in &mut clients {
        let mut seq = Vec::new();
        for _ in 0..3 * PER_PUBLISHER {
            seq.push(sse.next_json().await.1);
        }
        // Each publisher's own messages arrive in its order.
        for p in 0..3 {
            let ns: Vec<u64> = seq
                .iter()
                .filter(|v| v["p"] == p)
                .map(|v| v["n"].as_u64().unwrap())
                .collect();
            assert_eq!(ns, (0..PER_PUBLISHER as u64).collect::<Vec<_>>());
        }
        sequences.push(seq);
    }
    for s in &sequences[1..] {
        assert_eq!(s, &sequences[0], "every subscriber saw the same order");
    }
}

#[tokio::test]
async fn unsubscribed_clients_get_nothing() {
    let c = cluster(3, &[]).await;
    let mut a = c.node(0).connect().await;
    let mut b = c.node(1).connect().await;
    c.node(2).subscribe(&a.client_id, &["a", "b"]).await;
    c.node(2).subscribe(&b.client_id, &["b"]).await;
    // A drops "a" through yet another node.
    c.node(1).subscribe(&a.client_id, &["b"]).await;
    c.node(2).publish("a", json!("a1")).await;
    c.node(2).publish("b", json!("b1")).await;
    // Delivery is in order, so anything for "a" would have come first.
    assert_eq!(a.next_json().await, ("b".into(), json!("b1")));
    assert_eq!(b.next_json().await, ("b".into(), json!("b1")));
}

#[tokio::test]
async fn redis_channels_follow_local_subscribers() {
    let c = cluster(3, &[]).await;
    assert!(c.channels().await.is_empty());
    let a = c.node(0).connect().await;
    let b = c.node(1).connect().await;
    c.node(2)
        .subscribe(&a.client_id, &["x", "y?options=%7B%7D"])
        .await;
    c.node(2).subscribe(&b.client_id, &["y"]).await;
    assert_eq!(c.channels().await, channel_set(&["x", "y"]));
    // Node 0 keeps "y" for `a` while node 1 still has it for `b`.
    c.node(0).subscribe(&a.client_id, &["z"]).await;
    wait_for("x released", || async {
        c.channels().await == channel_set(&["y", "z"])
    })
    .await;
    // A disconnect releases what only that client held.
    drop(b);
    wait_for("y released", || async {
        c.channels().await == channel_set(&["z"])
    })
    .await;
    let per_node: Vec<(String, i64)> = c.redis.cmd(&["PUBSUB", "NUMSUB", "fanout:t:z"]).await;
    assert_eq!(per_node[0].1, 1, "only node 0 subscribes to z");
}

#[tokio::test]
async fn subscriptions_are_live_when_acknowledged() {
    let c = cluster(3, &[]).await;
    let mut sse = c.node(0).connect().await;
    for i in 0..30 {
        let topic = format!("fresh-{i}");
        // A new channel each time: node 0 must have SUBSCRIBEd before 204.
        c.node(1).subscribe(&sse.client_id, &[&topic]).await;
        c.node(2).publish(&topic, json!(i)).await;
        assert_eq!(sse.next_json().await, (topic, json!(i)));
    }
}

#[tokio::test]
async fn directed_sends_reach_one_client_or_one_user_anywhere() {
    let c = cluster(3, &[]).await;
    let mut clients = Vec::new();
    for (i, user) in ["u1", "u1", "u2"].into_iter().enumerate() {
        let sse = c.node(i).connect().await;
        let t = user_token(SECRET, user);
        c.node(i + 1).subscribe_as(&sse.client_id, &["d"], &t).await;
        clients.push(sse);
    }
    let (s, _) = c
        .node(2)
        .publish_raw(
            json!({"messages": [
                {"topic": "d", "data": "to-c0", "clientId": clients[0].client_id},
                {"topic": "d", "data": "to-u1", "userId": "u1"},
                {"topic": "d", "data": "all"}
            ]}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let mut got: Vec<Vec<Value>> = Vec::new();
    for sse in &mut clients {
        let mut seen = Vec::new();
        loop {
            let (_, v) = sse.next_json().await;
            seen.push(v.clone());
            if v == "all" {
                break;
            }
        }
        got.push(seen);
    }
    assert_eq!(got[0], [json!("to-c0"), json!("to-u1"), json!("all")]);
    assert_eq!(got[1], [json!("to-u1"), json!("all")]);
    assert_eq!(got[2], [json!("all")]);
}

#[tokio::test]
async fn cluster_lists_live_nodes_and_forgets_dead_ones() {
    let mut c = cluster(3, &[]).await;
    let tags: HashSet<String> = {
        let mut t = HashSet::new();
        for n in &c.nodes {
            t.insert(n.tag().await);
        }
        t
    };
    let listed = |v: &Value| -> HashSet<String> {
        v["nodes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|n| n["node"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    wait_for("all three listed", || async {
        listed(&c.node(0).get_json("/api/cluster").await.1) == tags
    })
    .await;

    // A client held by node 2, which then dies without a word.
    let victim = c.node(2).connect().await;
    let mut survivor = c.node(0).connect().await;
    c.node(1).subscribe(&survivor.client_id, &["s"]).await;
    let dead_tag = c.node(2).tag().await;
    c.nodes[2].kill().await;

    // Until its membership lapses (three heartbeats) the dead node may
    // only be slow: 503, try again. Then no live node holds the id: 404.
    let started = Instant::now();
    loop {
        let (s, b) = c
            .node(0)
            .post_subscriptions(
                json!({"clientId": victim.client_id, "subscriptions": ["s"]}),
                &[],
            )
            .await;
        if s == StatusCode::NOT_FOUND {
            break;
        }
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        assert!(started.elapsed() < Duration::from_secs(5), "no 404 in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Everyone else carries on.
    c.node(1).publish("s", json!("still here")).await;
    assert_eq!(survivor.next_json().await.1, json!("still here"));
    wait_for("dead node leaves /api/cluster", || async {
        let l = listed(&c.node(1).get_json("/api/cluster").await.1);
        l.len() == 2 && !l.contains(&dead_tag)
    })
    .await;
}

#[tokio::test]
async fn redis_outage_fails_loudly_and_recovers_without_restarts() {
    let mut c = cluster(3, &[]).await;
    let mut clients = Vec::new();
    for i in 0..3 {
        let sse = c.node(i).connect().await;
        c.node(i).subscribe(&sse.client_id, &["live"]).await;
        clients.push(sse);
    }
    let port = c.redis.port;
    c.redis.stop().await;

    for n in &c.nodes {
        wait_for("health turns 503", || async {
            n.get_json("/api/health").await.0 == StatusCode::SERVICE_UNAVAILABLE
        })
        .await;
        let (_, h) = n.get_json("/api/health").await;
        assert!(h["message"].as_str().unwrap().contains("unhealthy"), "{h}");
        assert_eq!(h["data"]["relay"]["healthy"], false);
        // Streams stay open.
        assert_eq!(h["data"]["connections"], 1);
        let (s, b) = n
            .publish_raw(json!({"topic": "live", "data": 0}), &[])
            .await;
        assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE, "{b}");
        assert_eq!(b["status"], 503);
    }
    // A subscription needing a new channel fails, and is not kept.
    let (s, _) = c
        .node(1)
        .post_subscriptions(
            json!({"clientId": clients[0].client_id, "subscriptions": ["live", "new"]}),
            &[],
        )
        .await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);

    // Redis returns empty; nodes re-subscribe by themselves.
    c.redis = RedisServer::start_on(port).await;
    for n in &c.nodes {
        n.wait_healthy().await;
    }
    assert_eq!(
        c.channels().await,
        channel_set(&["live"]),
        "'new' was not kept"
    );
    c.node(2).publish_retrying("live", json!("after")).await;
    for sse in &mut clients {
        assert_eq!(sse.next_json().await, ("live".into(), json!("after")));
    }
    for n in &c.nodes {
        assert!(n.metric("fanout_relay_reconnects_total").await >= 1.0);
        assert!(n.metric("fanout_relay_recovery_seconds").await > 0.0);
        assert!(
            n.logs().contains("Redis relay recovered"),
            "recovery logged"
        );
    }
}

#[tokio::test]
async fn killed_subscriber_connections_are_restored() {
    let c = cluster(3, &[]).await;
    let mut sse = c.node(0).connect().await;
    c.node(1).subscribe(&sse.client_id, &["k"]).await;
    let killed: i64 = c.redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 3);
    // Publishes made while node 0 re-subscribes may be lost (pub/sub is
    // at-most-once); keep publishing until one arrives, then check that
    // delivery continues in order.
    let mut n = 0;
    let first = loop {
        n += 1;
        assert!(n < 500, "delivery never resumed");
        c.node(2).publish_retrying("k", json!(n)).await;
        if let Some(e) = sse.next_within(Duration::from_millis(50)).await {
            break serde_json::from_str::<i64>(&e.data).unwrap();
        }
    };
    for next in first + 1..=n {
        assert_eq!(sse.next_json().await.1, json!(next));
    }
    c.node(2).publish("k", json!(n + 1)).await;
    assert_eq!(sse.next_json().await.1, json!(n + 1));
    assert!(c.node(0).metric("fanout_relay_reconnects_total").await >= 1.0);
}

/// Redis drops a subscriber that falls behind (`client-output-buffer-limit
/// pubsub`). Here a node is frozen with SIGSTOP while messages pile up.
#[tokio::test]
async fn a_node_dropped_by_redis_for_being_slow_recovers() {
    let c = cluster(2, &[("FANOUT_CLIENT_QUEUE", "100000")]).await;
    c.redis
        .cmd::<String>(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "pubsub 256kb 128kb 1",
        ])
        .await;
    let mut sse = c.node(0).connect().await;
    c.node(1).subscribe(&sse.client_id, &["flood"]).await;
    let pubsub_clients = || async {
        let list: String = c.redis.cmd(&["CLIENT", "LIST", "TYPE", "pubsub"]).await;
        list.lines().count()
    };
    assert_eq!(pubsub_clients().await, 2);

    c.node(0).signal(SIGSTOP);
    let pad = "x".repeat(64 * 1024);
    let mut sent = 0;
    while pubsub_clients().await == 2 {
        assert!(sent < 2000, "Redis never dropped the frozen node");
        c.node(1).publish("flood", json!({"pad": pad})).await;
        sent += 1;
    }
    c.node(0).signal(SIGCONT);

    wait_for("node 0 re-subscribed", || async {
        pubsub_clients().await == 2
    })
    .await;
    c.node(0).wait_healthy().await;
    c.node(1).publish("flood", json!("marker")).await;
    loop {
        let (_, v) = sse.next_json().await;
        if v == "marker" {
            break;
        }
    }
    assert!(c.node(0).metric("fanout_relay_reconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_topics_are_resubscribed_after_the_subscriber_connection_is_killed() {
    let c = cluster(1, &[]).await;
    let node = c.node(0);
    let mut streams = Vec::new();
    for k in 0..10 {
        let sse = node.connect().await;
        let topics: Vec<String> = (0..1000).map(|i| format!("many-{k}-{i}")).collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        node.subscribe(&sse.client_id, &refs).await;
        streams.push(sse);
    }
    let killed_at = Instant::now();
    let killed: i64 = c.redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 1);
    wait_for("resubscribed", || async {
        c.channels().await.len() == 10_000 && node.get_json("/api/health").await.0 == StatusCode::OK
    })
    .await;
    let took = killed_at.elapsed();
    eprintln!("10,000 topics re-subscribed in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    node.publish("many-9-999", json!("last")).await;
    assert_eq!(
        streams[9].next_json().await,
        ("many-9-999".into(), json!("last"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_redis_over_tls_works_through_a_rediss_url() {
    let dir = TempDir::new("fanout-tls");
    let (ca, cert, key) = tls_files(&dir.0);
    let port = free_port();
    let mut redis = tokio::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
        ])
        .args([
            "--tls-cert-file",
            cert.to_str().unwrap(),
            "--tls-key-file",
            key.to_str().unwrap(),
        ])
        .args([
            "--tls-ca-cert-file",
            ca.to_str().unwrap(),
            "--tls-auth-clients",
            "no",
        ])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let url = format!("rediss://127.0.0.1:{port}");
    let env = [
        ("FANOUT_REDIS_URL", url.as_str()),
        ("SSL_CERT_FILE", ca.to_str().unwrap()),
    ];
    let a = NodeProcess::start(&env).await;
    let b = NodeProcess::start(&env).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["tls"]).await;
    b.publish("tls", json!("secret")).await;
    assert_eq!(sse.next_json().await, ("tls".into(), json!("secret")));
    // Without the CA, the certificate is refused: the node stays unhealthy.
    let untrusted = NodeProcess::start_unchecked(&[("FANOUT_REDIS_URL", url.as_str())]).await;
    // Once it has tried: its health names the failed connection.
    wait_for("the untrusted node has tried Redis", || async {
        untrusted.get_json("/api/health").await.1["data"]["relay"]["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("cannot reach Redis"))
    })
    .await;
    assert_eq!(
        untrusted.get_json("/api/health").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    let _ = redis.kill().await;
}
