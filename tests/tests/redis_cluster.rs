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
async fn a_failover_that_loses_writes_is_signalled_and_new_messages_still_arrive() {
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
    // The new primary's history stops at offset 5. Node a delivered up to
    // 10, but cannot know whether the killed primary acknowledged more
    // that never reached it: it signals (closes the stream).
    assert!(
        sse.closed_within(Duration::from_secs(15)).await,
        "the rolled-back history is signalled"
    );
    // New messages reuse offsets 6..: node a must not take them for
    // duplicates.
    let mut again = a.connect().await;
    a.subscribe(&again.client_id, &["lossy"]).await;
    b.publish_retrying("lossy", json!("after")).await;
    assert_eq!(again.next_json().await.1, json!("after"));
    assert!(a.metric("fanout_history_gaps_total").await >= 1.0);
    assert!(a.metric("fanout_history_rollbacks_total").await >= 1.0);
    assert!(
        a.logs().contains("rolled back by a failover"),
        "the rollback is logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_over_a_stalled_and_a_healthy_primary_answers_504_with_each_outcome_and_its_retry_delivers_once()
 {
    // Issue 18, item 4 (cluster): the healthy primary's message was
    // delivered while the batch was answered 503 "nothing was published".
    let redis = RedisCluster::start(None).await;
    let node = NodeProcess::start(&env(&redis.cluster_url())).await;
    // Two topics on two different primaries.
    let first = "b-0".to_owned();
    let first_owner = redis.owner_of(&topic_channel(&first)).await;
    let mut second = String::new();
    for i in 1.. {
        second = format!("b-{i}");
        if redis.owner_of(&topic_channel(&second)).await != first_owner {
            break;
        }
    }
    let stalled = redis.owner_of(&topic_channel(&second)).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &[&first, &second]).await;
    let batch = json!({"messages": [
        {"topic": first, "id": "y1", "data": 1},
        {"topic": second, "id": "y2", "data": 2},
    ]});
    let _: () = redis
        .cmd(stalled, &["CLIENT", "PAUSE", "4500", "WRITE"])
        .await;
    let (status, reply) = node.publish_raw(batch.clone(), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{reply}");
    assert_eq!(reply["data"]["published"], json!([0]), "{reply}");
    assert_eq!(reply["data"]["unknown"], json!([1]), "{reply}");
    // The publisher retries the whole batch until it is answered 200.
    let mut answers = vec![status.as_u16()];
    loop {
        let (status, reply) = node.publish_raw(batch.clone(), &[]).await;
        answers.push(status.as_u16());
        if status == StatusCode::OK {
            break;
        }
        assert!(
            [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT].contains(&status),
            "{reply}"
        );
        assert!(answers.len() < 50, "never 200: {answers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut got = Vec::new();
    while let Some(e) = sse.next_within(Duration::from_secs(1)).await {
        got.push((e.event, e.data));
    }
    got.sort();
    eprintln!("answers {answers:?}; received {got:?}");
    assert_eq!(
        got,
        vec![
            (first.clone(), "1".to_owned()),
            (second.clone(), "2".to_owned())
        ],
        "each message once: 0 missing, 0 duplicated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_primary_replaced_while_publishing_loses_nothing_silently_and_duplicates_nothing()
{
    // Issue 18, item 3: the primary owning a topic stalls (SIGSTOP) while
    // messages are published; its replica is promoted, then the former
    // primary wakes up. What the replica lacked got new messages at the
    // same offsets, and nodes dropped those as duplicates.
    let redis = RedisCluster::start(None).await;
    let url = redis.cluster_url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["stall"]).await;
    let publisher = SteadyPublisher::start(b.api.clone(), "stall", Duration::from_millis(5));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let owner = redis.owner_of(&topic_channel("stall")).await;
    let replica = redis.replica_of(owner).await;
    redis.signal(owner, SIGSTOP);
    // Asked of the replica itself: the stalled node answers nobody.
    wait_for(
        "the replica took over the stalled primary's slots",
        || async {
            redis
                .try_cmd::<Vec<redis::Value>>(replica, &["ROLE"])
                .await
                .is_ok_and(
                    |r| matches!(r.first(), Some(redis::Value::BulkString(b)) if b == b"master"),
                )
        },
    )
    .await;
    redis.signal(owner, SIGCONT);
    a.wait_healthy().await;
    b.wait_healthy().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let (ok, refused) = publisher.finish().await;
    // Until the stream ends or is quiet: what is missing before the last
    // message received was skipped silently; what is missing after it was
    // signalled, if the stream was closed.
    let mut seen: Vec<u64> = Vec::new();
    let closed = loop {
        match tokio::time::timeout(
            Duration::from_secs(2),
            futures_util::StreamExt::next(&mut sse.events),
        )
        .await
        {
            Ok(Some(Ok(e))) => seen.push(e.data.parse().expect("a number")),
            Ok(None | Some(Err(_))) => break true,
            Err(_) => break false,
        }
    };
    let account = Account::of(&seen, &ok);
    let last = seen.last().copied().unwrap_or(0);
    let (unsignalled, signalled): (Vec<u64>, Vec<u64>) =
        account.missing.iter().partition(|n| !closed || **n < last);
    eprintln!(
        "stalled primary: {} answered 200, {} answered 503/504; client on a: missing-unsignalled {} {unsignalled:?}, missing-signalled {}, duplicated {}; stream closed: {closed}; gaps {}",
        ok.len(),
        refused.len(),
        unsignalled.len(),
        signalled.len(),
        account.duplicated.len(),
        a.metric("fanout_history_gaps_total").await,
    );
    assert!(
        unsignalled.is_empty(),
        "acknowledged, skipped without a signal: {unsignalled:?}"
    );
    assert!(
        account.duplicated.is_empty() && account.in_order,
        "{account:?}"
    );
}

/// Publish one message on `node` until it answers 200 and its health is
/// 200 too; how long that took.
async fn wait_publishing(node: &NodeProcess, topic: &str) -> Duration {
    let from = Instant::now();
    wait_for(
        "the node publishes again and says it is healthy",
        || async {
            let (status, _) = node
                .publish_raw(json!({"topic": topic, "data": "probe"}), &[])
                .await;
            status == StatusCode::OK && node.get_json("/api/health").await.0 == StatusCode::OK
        },
    )
    .await;
    from.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_given_one_seed_each_keep_publishing_when_their_seed_dies() {
    // The README's auto-detected form: each node is given a plain
    // `redis://` URL of a different primary, and nothing else.
    let mut redis = RedisCluster::start(None).await;
    let primaries = redis.primaries().await;
    let mut nodes = Vec::new();
    for (_, port) in &primaries {
        nodes.push(NodeProcess::start(&env(&redis.url_of(*port))).await);
    }
    for n in &nodes {
        n.wait_healthy().await;
    }
    // Kill each node's seed in turn (its replica takes over), with a
    // steady numbered stream published on that node and watched on the
    // next one.
    for (i, (_, seed)) in primaries.iter().enumerate() {
        let (publishing, watching) = (&nodes[i], &nodes[(i + 1) % nodes.len()]);
        let topic = format!("seeded-{i}");
        let mut sse = watching.connect().await;
        watching.subscribe(&sse.client_id, &[&topic]).await;
        let publisher =
            SteadyPublisher::start(publishing.api.clone(), &topic, Duration::from_millis(10));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cpu_before = publishing.cpu_seconds();
        let killed_at = Instant::now();
        redis.kill(*seed).await;
        redis.wait_ok().await;
        let back = wait_publishing(publishing, &format!("after-{i}")).await;
        let window = killed_at.elapsed();
        let cpu = publishing.cpu_seconds() - cpu_before;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, refused) = publisher.finish().await;
        let seen = received_numbers(&mut sse).await;
        let account = Account::of(&seen, &ok);
        let gaps = watching.metric("fanout_history_gaps_total").await;
        eprintln!(
            "seed {i} killed: {} answered 200, {} answered 503, {} acknowledged but missed, {gaps} gap(s) signalled; publishing again {:?} after the cluster was ok, {window:?} after the kill; the node used {cpu:.2} s of CPU in that window ({:.0}% of one core)",
            ok.len(),
            refused.len(),
            account.missing.len(),
            back,
            100.0 * cpu / window.as_secs_f64()
        );
        assert!(
            account.in_order && account.duplicated.is_empty(),
            "{account:?}"
        );
        assert!(
            account.missing.is_empty() || gaps >= 1.0,
            "acknowledged messages missed without a signal: {:?}",
            account.missing
        );
        // The stream goes on after the failover: the last ones published
        // were acknowledged and arrived.
        assert_eq!(
            seen.last(),
            ok.last(),
            "the last acknowledged message arrived"
        );
        assert!(
            ok.last() > refused.last(),
            "the publishing node answers 200 again: ok up to {:?}, refused up to {:?}",
            ok.last(),
            refused.last()
        );
    }
}

/// `/api/health` sampled `n` times, `every` apart: how many answered 200.
async fn healthy_samples(node: &NodeProcess, n: usize, every: Duration) -> usize {
    let mut ok = 0;
    for _ in 0..n {
        if node.get_json("/api/health").await.0 == StatusCode::OK {
            ok += 1;
        }
        tokio::time::sleep(every).await;
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_user_without_scripting_makes_health_503_naming_eval_until_it_may() {
    let redis = RedisServer::start().await;
    let _: () = redis
        .cmd(&[
            "ACL",
            "SETUSER",
            "fanout",
            "on",
            ">pw",
            "~*",
            "&*",
            "+@all",
            "-@scripting",
        ])
        .await;
    let url = format!("redis://fanout:pw@127.0.0.1:{}", redis.port);
    let a = NodeProcess::start_unchecked(&env(&url)).await;
    let (status, body) = a.publish_raw(json!({"topic": "t", "data": 1}), &[]).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Not 200 between failed publishes: the probe runs the publish script.
    let healthy = healthy_samples(&a, 12, Duration::from_millis(250)).await;
    assert_eq!(healthy, 0, "health answered 200 while every publish fails");
    let (status, health) = a.get_json("/api/health").await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let reason = health["data"]["relay"]["reason"]
        .as_str()
        .unwrap_or_default();
    assert!(reason.to_lowercase().contains("eval"), "{health}");
    // The start-up check named the missing commands.
    wait_until("the missing permission is logged", || {
        a.logs().contains("may not run commands Fanout needs") && a.logs().contains("EVAL")
    })
    .await;
    // Granted: healthy, publishing, within a few heartbeats.
    let _: () = redis
        .cmd(&["ACL", "SETUSER", "fanout", "+@scripting"])
        .await;
    a.wait_healthy().await;
    a.publish("t", json!(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_refused_inside_the_script_takes_no_offset() {
    let redis = RedisServer::start().await;
    // May run the script, but not the PUBLISH inside it.
    let _: () = redis
        .cmd(&[
            "ACL", "SETUSER", "fanout", "on", ">pw", "~*", "&*", "+@all", "-publish",
        ])
        .await;
    let url = format!("redis://fanout:pw@127.0.0.1:{}", redis.port);
    let a = NodeProcess::start_unchecked(&env(&url)).await;
    for n in 0..3 {
        let (status, body) = a
            .publish_raw(json!({"topic": "gapless", "data": n}), &[])
            .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
    let taken: Option<String> = redis.cmd(&["HGET", "fanout:m:gapless", "s"]).await;
    let kept: i64 = redis.cmd(&["XLEN", "fanout:h:gapless"]).await;
    assert_eq!((taken, kept), (None, 0), "a refused publish took an offset");
    let _: () = redis.cmd(&["ACL", "SETUSER", "fanout", "+publish"]).await;
    a.wait_healthy().await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["gapless"]).await;
    a.publish("gapless", json!("first")).await;
    assert_eq!(sse.next_json().await.1, json!("first"));
    let taken: String = redis.cmd(&["HGET", "fanout:m:gapless", "s"]).await;
    assert_eq!(taken, "1", "the first acknowledged publish has offset 1");
}

/// The first topic `c<i>` whose channel's slot the primary at `port` owns
/// (`on`) or does not own (`!on`).
async fn topic_owned(redis: &RedisCluster, port: u16, on: bool) -> String {
    for i in 0.. {
        let t = format!("c{i}");
        if (redis.owner_of(&topic_channel(&t)).await == port) == on {
            return t;
        }
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_shard_refuses_only_its_own_topics_and_health_lists_it() {
    lost_shard(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_shard_holding_the_membership_keys_leaves_the_other_topics_served() {
    lost_shard(true).await;
}

/// No replicas, `cluster-require-full-coverage no`: one primary dies for
/// good (the one holding the membership keys, or another), the others
/// keep serving their slots.
async fn lost_shard(membership_too: bool) {
    let mut redis = RedisCluster::start_without_replicas().await;
    let url = redis.cluster_url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let membership = redis.owner_of("fanout:{nodes}").await;
    let victim = redis
        .primaries()
        .await
        .into_iter()
        .map(|(_, p)| p)
        .find(|p| (*p == membership) == membership_too)
        .unwrap();
    let lost = topic_owned(&redis, victim, true).await;
    let live = topic_owned(&redis, victim, false).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &[&live]).await;
    redis.kill(victim).await;
    redis.wait_marked_failed(victim).await;
    // Topics on the live shards publish; the lost shard's answer 503.
    wait_for("a publish on a live shard answers 200", || async {
        let (status, _) = b
            .publish_raw(json!({"topic": live, "data": "live"}), &[])
            .await;
        status == StatusCode::OK
    })
    .await;
    assert_eq!(sse.next_json().await, (live.clone(), json!("live")));
    let (status, body) = b
        .publish_raw(json!({"topic": lost, "data": "lost"}), &[])
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // A batch with one message on the lost shard is refused whole.
    let (status, body) = b
        .publish_raw(
            json!({"messages": [{"topic": live, "data": 1}, {"topic": lost, "data": 2}]}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    // Subscribing: 204 means live, so the lost shard's topics get 503.
    let other = b.connect().await;
    let (status, body) = b
        .post_subscriptions(
            json!({"clientId": other.client_id, "subscriptions": [lost]}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let (status, body) = b
        .post_subscriptions(
            json!({"clientId": other.client_id, "subscriptions": [live]}),
            &[],
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    // Health: once the cluster has had no primary for the partition for
    // a while, 200 with the lost partitions listed.
    let lost_partition = partition_of(&lost, 16);
    let live_partition = partition_of(&live, 16);
    let deadline = Instant::now() + Duration::from_secs(40);
    let health = loop {
        let (status, health) = b.get_json("/api/health").await;
        if status == StatusCode::OK {
            break health;
        }
        assert!(Instant::now() < deadline, "still 503: {health}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let degraded: Vec<u64> = health["data"]["relay"]["degraded"]
        .as_array()
        .unwrap_or_else(|| panic!("{health}"))
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(degraded.contains(&u64::from(lost_partition)), "{health}");
    assert!(!degraded.contains(&u64::from(live_partition)), "{health}");
    eprintln!("lost shard: partitions {degraded:?} degraded, the others serve");
    // And still: the live topic publishes, the lost one does not.
    b.publish(&live, json!("still")).await;
    assert_eq!(sse.next_json().await, (live.clone(), json!("still")));
    let (status, _) = a
        .publish_raw(json!({"topic": lost, "data": "lost"}), &[])
        .await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Without the membership keys: healthy, saying so, and what needs
    // them answers 503.
    let membership_lost = &health["data"]["relay"]["membership_lost"];
    assert_eq!(membership_lost.is_string(), membership_too, "{health}");
    if membership_too {
        let (status, body) = b.get_json("/api/cluster").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    }
}
