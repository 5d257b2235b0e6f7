//! Fanout on a real Redis Cluster: six `redis-server` processes (three
//! primaries, three replicas) started by each test, and `fanout` nodes
//! pointed at different primaries.

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::{Value, json};

/// The documented partition of a topic or node tag: FNV-1a (32 bits) of
/// its bytes, modulo the partition count. Pinned here so that a change of
/// the hash, which would split a deployment, fails a test.
fn partition_of(name: &str, partitions: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % partitions
}

fn topic_channel(topic: &str) -> String {
    format!("fanout:{{p{}}}:t:{topic}", partition_of(topic, 16))
}

fn env(url: &str) -> Vec<(&str, &str)> {
    vec![
        ("FANOUT_REDIS_URL", url),
        ("FANOUT_HEARTBEAT_INTERVAL", "300ms"),
        ("FANOUT_FORWARD_TIMEOUT", "800ms"),
        ("FANOUT_TRUSTED_PROXIES", "127.0.0.1"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_on_different_primaries_relay_everything_over_sharded_channels() {
    let redis = RedisCluster::start(None).await;
    let primaries = redis.primaries().await;
    assert_eq!(primaries.len(), 3);
    // One node names a single primary with a plain URL (detected), the
    // other the whole cluster.
    let url_a = redis.url_of(primaries[0].1);
    let url_b = redis.cluster_url();
    let a = NodeProcess::start(&env(&url_a)).await;
    let b = NodeProcess::start(&env(&url_b)).await;
    let health = a.wait_healthy().await;
    assert_eq!(health["data"]["relay"]["mode"], "cluster", "{health}");
    let shards = health["data"]["relay"]["shards"].as_array().unwrap();
    assert_eq!(shards.len(), 16);
    assert!(shards.iter().all(|s| s["healthy"] == true), "{health}");
    assert!(a.logs().contains("switching to cluster mode"));
    b.wait_healthy().await;

    // Topics spread over partitions, hence over primaries.
    let topics: Vec<String> = (0..12).map(|i| format!("topic-{i}")).collect();
    let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut on_a = a.connect().await;
    let mut on_b = b.connect().await;
    a.subscribe(&on_a.client_id, &topic_refs).await;
    // Through the other node: the owner answers (forwarded on a sharded
    // node channel).
    a.subscribe(&on_b.client_id, &topic_refs).await;
    // Half one by one, half in one batch spanning every primary.
    for (i, t) in topics.iter().enumerate().take(6) {
        let from = if i % 2 == 0 { &a } else { &b };
        from.publish(t, json!({"i": i})).await;
    }
    let batch: Vec<Value> = topics
        .iter()
        .enumerate()
        .skip(6)
        .map(|(i, t)| json!({"topic": t, "data": {"i": i}}))
        .collect();
    let (status, body) = b.publish_raw(json!({"messages": batch}), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    for sse in [&mut on_a, &mut on_b] {
        let mut got: Vec<(String, Value)> = Vec::new();
        for _ in 0..topics.len() {
            got.push(sse.next_json().await);
        }
        got.sort_by_key(|(_, v)| v["i"].as_u64());
        for (i, (event, data)) in got.iter().enumerate() {
            assert_eq!(
                (event.as_str(), data["i"].as_u64()),
                (topics[i].as_str(), Some(i as u64))
            );
        }
    }
    // Sharded channels only: no classic channel anywhere, and the owner of
    // each topic's partition has both nodes on it.
    for (_, port) in &primaries {
        let classic: Vec<String> = redis.cmd(*port, &["PUBSUB", "CHANNELS"]).await;
        assert!(classic.is_empty(), "classic channels: {classic:?}");
    }
    for t in &topics {
        let ch = topic_channel(t);
        let owner = redis.owner_of(&ch).await;
        let v: Vec<Value> = redis
            .cmd::<Vec<redis::Value>>(owner, &["PUBSUB", "SHARDNUMSUB", &ch])
            .await
            .into_iter()
            .map(|v| match v {
                redis::Value::Int(n) => json!(n),
                _ => Value::Null,
            })
            .collect();
        assert_eq!(v[1], json!(2), "{ch} on {owner}");
    }
    // Membership works across shards, and a forward to a missing client
    // gets the owner's 404.
    let (_, list) = a.get_json("/api/cluster").await;
    assert_eq!(list["nodes"].as_array().unwrap().len(), 2, "{list}");
    let missing = format!("{}{}", &on_b.client_id[..8], "x".repeat(32));
    let (status, _) = a
        .post_subscriptions(json!({"clientId": missing, "subscriptions": ["t"]}), &[])
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_protected_cluster_works_through_the_url() {
    let redis = RedisCluster::start(Some("s3cret")).await;
    let url = redis.cluster_url();
    assert!(url.contains(":s3cret@"));
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["secure"]).await;
    b.publish("secure", json!("ok")).await;
    assert_eq!(sse.next_json().await, ("secure".into(), json!("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_redis_with_a_password_works_through_the_url() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]).await;
    let url = format!("redis://:pw@127.0.0.1:{}", redis.port);
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let health = a.wait_healthy().await;
    assert_eq!(health["data"]["relay"]["mode"], "standalone");
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["secure"]).await;
    b.publish("secure", json!("ok")).await;
    assert_eq!(sse.next_json().await, ("secure".into(), json!("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_primary_fails_over_and_delivery_resumes_in_order() {
    let mut redis = RedisCluster::start(None).await;
    let url = redis.cluster_url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["busy"]).await;
    let publisher = SteadyPublisher::start(b.api.clone(), "busy", Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let owner = redis.owner_of(&topic_channel("busy")).await;
    let killed_at = Instant::now();
    redis.kill(owner).await;
    redis.wait_ok().await;
    // Both nodes follow the new primary by themselves.
    a.wait_healthy().await;
    b.wait_healthy().await;
    let recovered = killed_at.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, refused) = publisher.finish().await;
    let seen = received_numbers(&mut sse).await;
    // Asynchronous replication: the replica may not have had the last
    // writes of the killed primary. Then node a notices that the history
    // was rolled back, counts it and closes the stream (the client would
    // reconnect); otherwise the client missed nothing.
    let account = Account::of(&seen, &ok);
    let gaps = a.metric("fanout_history_gaps_total").await;
    eprintln!(
        "failover: {} answered 200, {} answered 503, {} acknowledged but missed, {gaps} gap(s) signalled by closing the stream; healthy {recovered:?} after the kill",
        ok.len(),
        refused.len(),
        account.missing.len()
    );
    assert!(account.in_order && account.duplicated.is_empty());
    assert!(
        account.missing.is_empty() || gaps >= 1.0,
        "acknowledged messages missed without a signal: {:?}",
        account.missing
    );
    assert!(recovered < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_to_another_primary_is_followed_and_delivery_continues_in_order() {
    let redis = RedisCluster::start(None).await;
    let url = redis.cluster_url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["moving"]).await;
    let channel = topic_channel("moving");
    let from = redis.owner_of(&channel).await;
    let primaries = redis.primaries().await;
    let (from_id, _) = primaries.iter().find(|(_, p)| *p == from).unwrap().clone();
    let (to_id, to) = primaries.iter().find(|(_, p)| *p != from).unwrap().clone();
    let slot: i64 = redis.cmd(from, &["CLUSTER", "KEYSLOT", &channel]).await;
    let slot = slot.to_string();

    let publisher = SteadyPublisher::start(b.api.clone(), "moving", Duration::from_millis(10));
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A live slot migration, as redis-cli does it: the slot's keys (the
    // topic's history) move with MIGRATE, then the slot.
    let _: () = redis
        .cmd(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id])
        .await;
    let _: () = redis
        .cmd(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id])
        .await;
    loop {
        let keys: Vec<String> = redis
            .cmd(from, &["CLUSTER", "GETKEYSINSLOT", &slot, "100"])
            .await;
        if keys.is_empty() {
            break;
        }
        let to_port = to.to_string();
        let mut args = vec!["MIGRATE", "127.0.0.1", &to_port, "", "0", "5000", "KEYS"];
        args.extend(keys.iter().map(String::as_str));
        let _: redis::Value = redis.cmd(from, &args).await;
    }
    for (_, p) in &primaries {
        let _: () = redis
            .cmd(*p, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id])
            .await;
    }
    wait_for("the slot has moved", || async {
        redis.owner_of(&channel).await == to
    })
    .await;
    // Node a re-subscribes on the new owner.
    wait_for("subscribed on the new owner", || async {
        let v: Vec<redis::Value> = redis.cmd(to, &["PUBSUB", "SHARDNUMSUB", &channel]).await;
        matches!(v.get(1), Some(redis::Value::Int(n)) if *n >= 1)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, refused) = publisher.finish().await;
    let seen = received_numbers(&mut sse).await;
    check_delivery("slot move", &seen, &ok, &refused, true);
    assert!(a.metric("fanout_relay_reconnects_total").await >= 1.0);
}

/// Subscribe 10 clients × 1,000 topics on `node`; the streams.
async fn ten_thousand_topics(node: &NodeProcess) -> Vec<Sse> {
    let mut streams = Vec::new();
    for c in 0..10 {
        let sse = node.connect().await;
        let topics: Vec<String> = (0..1000).map(|i| format!("many-{c}-{i}")).collect();
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        node.subscribe(&sse.client_id, &refs).await;
        streams.push(sse);
    }
    streams
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_topics_are_resubscribed_on_every_shard_after_the_connections_are_killed() {
    let redis = RedisCluster::start(None).await;
    let url = redis.cluster_url();
    let node = NodeProcess::start(&env(&url)).await;
    let mut streams = ten_thousand_topics(&node).await;
    let killed_at = Instant::now();
    for (_, port) in redis.primaries().await {
        let _: i64 = redis.cmd(port, &["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    }
    wait_for("resubscribed", || async {
        node.metric("fanout_relay_reconnects_total").await >= 16.0
            && node.get_json("/api/health").await.0 == StatusCode::OK
    })
    .await;
    let took = killed_at.elapsed();
    let mut shard_counts = Vec::new();
    for (_, port) in redis.primaries().await {
        let n: Vec<String> = redis
            .cmd(port, &["PUBSUB", "SHARDCHANNELS", "fanout:*:t:*"])
            .await;
        shard_counts.push(n.len());
    }
    eprintln!(
        "10,000 topics re-subscribed on 16 partitions in {took:?}; topics per primary {shard_counts:?}"
    );
    assert_eq!(shard_counts.iter().sum::<usize>(), 10_000);
    assert!(took < Duration::from_secs(10), "{took:?}");
    // And they deliver.
    node.publish("many-9-999", json!("last")).await;
    assert_eq!(
        streams[9].next_json().await,
        ("many-9-999".into(), json!("last"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_added_and_rebalanced_onto_is_followed_while_publishing() {
    let mut redis = RedisCluster::start(None).await;
    let url = redis.cluster_url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    // Topics on every partition, so that some move.
    let topics: Vec<String> = (0..32).map(|i| format!("r{i}")).collect();
    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &refs).await;
    let mut watch = a.connect().await;
    a.subscribe(&watch.client_id, &["busy"]).await;
    let publisher = SteadyPublisher::start(b.api.clone(), "busy", Duration::from_millis(10));
    let added = redis.add_primary().await;
    redis.rebalance().await;
    redis.wait_ok().await;
    a.wait_healthy().await;
    b.wait_healthy().await;
    let (ok, refused) = publisher.finish().await;
    let seen = received_numbers(&mut watch).await;
    check_delivery("rebalance", &seen, &ok, &refused, true);
    let health = a.get_json("/api/health").await.1;
    let on_new = health["data"]["relay"]["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["primary"] == format!("127.0.0.1:{added}"))
        .count();
    eprintln!("rebalance: {on_new} of 16 partitions now on the new primary");
    assert!(on_new > 0, "{health}");
    // Every topic still delivers, wherever its partition lives now: one
    // batch, one pipeline per primary.
    let batch: Vec<Value> = topics
        .iter()
        .map(|t| json!({"topic": t, "data": t}))
        .collect();
    let (status, body) = b.publish_raw(json!({"messages": batch}), &[]).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut got = std::collections::HashSet::new();
    for _ in 0..topics.len() {
        got.insert(sse.next_json().await.0);
    }
    assert_eq!(got.len(), topics.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_loses_writes_is_detected_and_new_messages_still_arrive() {
    let mut redis = RedisCluster::start(None).await;
    let url = redis.cluster_url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["lossy"]).await;
    for n in 0..5 {
        b.publish("lossy", json!(n)).await;
    }
    let owner = redis.owner_of(&topic_channel("lossy")).await;
    let replica = redis.replica_of(owner).await;
    // The replica has the first five (their history and epoch).
    let synced: i64 = redis.cmd(owner, &["WAIT", "1", "5000"]).await;
    assert_eq!(synced, 1);
    // The replica's replication link is cut and cannot come back; the
    // primary acknowledges more writes, then dies: the replica is promoted
    // without them.
    let _: () = redis
        .cmd(
            replica,
            &["CONFIG", "SET", "masterauth", "not-the-password"],
        )
        .await;
    let _: i64 = redis
        .cmd(replica, &["CLIENT", "KILL", "TYPE", "master"])
        .await;
    for n in 5..10 {
        b.publish("lossy", json!(n)).await;
    }
    for n in 0..10 {
        assert_eq!(sse.next_json().await.1, json!(n));
    }
    redis.kill(owner).await;
    redis.wait_ok().await;
    a.wait_healthy().await;
    b.wait_healthy().await;
    // The new primary's history stops at offset 5; new messages reuse 6..
    // Node a, which delivered up to 10, must not take them for duplicates.
    b.publish_retrying("lossy", json!("after")).await;
    assert_eq!(sse.next_json().await.1, json!("after"));
    assert!(a.metric("fanout_history_rollbacks_total").await >= 1.0);
    assert!(
        a.logs().contains("rolled back by a failover"),
        "the rollback is logged"
    );
}
