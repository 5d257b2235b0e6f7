//! Every answer tells the truth: 204, 200, 404 and 503 against real Redis
//! and real nodes, with faults injected by a TCP proxy, by stopping Redis,
//! and by freezing a node.

use std::time::{Duration, Instant};

use fanout_testkit::*;
use serde_json::json;
use tokio::task::JoinSet;

const SECRET: &str = "ack-secret";

fn env<'a>(url: &'a str, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![
        ("FANOUT_REDIS_URL", url),
        ("FANOUT_HEARTBEAT_INTERVAL", "300ms"),
        ("FANOUT_FORWARD_TIMEOUT", "800ms"),
        ("FANOUT_JWT_SECRET", SECRET),
    ];
    env.extend_from_slice(extra);
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_204_waits_for_the_subscribe_another_client_started() {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let slow_url = format!("redis://127.0.0.1:{}", proxy.port);
    let slow = NodeProcess::start(&env(&slow_url, &[])).await;
    let url = redis.url();
    let publisher = NodeProcess::start(&env(&url, &[])).await;
    let first = slow.connect().await;
    let mut second = slow.connect().await;
    proxy.set_delay(Duration::from_millis(400));
    // The first client's POST starts the SUBSCRIBE; the second asks for
    // the same topic while it is in flight.
    let api = slow.api.clone();
    let id = first.client_id.clone();
    let subscribes = proxy.sent_count(b"SUBSCRIBE");
    let starter = tokio::spawn(async move { api.subscribe(&id, &["t"]).await });
    wait_for("the first POST's SUBSCRIBE on its way", || async {
        proxy.sent_count(b"SUBSCRIBE") > subscribes
    })
    .await;
    let asked = Instant::now();
    slow.subscribe(&second.client_id, &["t"]).await;
    let waited = asked.elapsed();
    // Acknowledged: a publish from anywhere now reaches it.
    publisher.publish("t", json!("now")).await;
    assert_eq!(second.next_json().await, ("t".into(), json!("now")));
    assert!(waited >= Duration::from_millis(200), "204 after {waited:?}");
    starter.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_subscriber_reconnects_publishes_get_503_and_none_acknowledged_is_lost() {
    let mut redis = RedisServer::start().await;
    let url = redis.url();
    // Plain pub/sub: with history, a Redis restarted empty is a new epoch
    // and the stream would be closed on purpose (tests/tests/history.rs).
    let node = NodeProcess::start(&env(&url, &[("FANOUT_HISTORY_SIZE", "0")])).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["n"]).await;
    let api = node.api.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopping = stop.clone();
    let publisher = tokio::spawn(async move {
        let (mut acked, mut refused) = (Vec::new(), 0);
        let mut n = 0u64;
        while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
            let (status, body) = api.publish_raw(json!({"topic": "n", "data": n}), &[]).await;
            match status {
                StatusCode::OK => acked.push(n),
                StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                s => panic!("{s}: {body}"),
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, refused)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = redis.port;
    redis.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis = RedisServer::start_on(port).await;
    node.wait_healthy().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (acked, refused) = publisher.await.unwrap();
    let mut got = std::collections::HashSet::new();
    while let Some(e) = sse.next_within(Duration::from_millis(500)).await {
        got.insert(e.data.parse::<u64>().unwrap());
    }
    let lost: Vec<u64> = acked.iter().copied().filter(|n| !got.contains(n)).collect();
    eprintln!(
        "{} acknowledged, {refused} refused, lost {lost:?}",
        acked.len()
    );
    assert!(refused > 0, "the outage must be answered 503");
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    assert!(node.metric("fanout_relay_outage_seconds_count").await >= 1.0);
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_to_a_frozen_owner_gets_503_and_is_never_applied_later() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let owner = NodeProcess::start(&env(&url, &[])).await;
    let other = NodeProcess::start(&env(&url, &[])).await;
    let mut sse = owner.connect().await;
    owner.subscribe(&sse.client_id, &["early"]).await;
    owner.freeze().await;
    let started = Instant::now();
    let (status, body) = other
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["late"]}),
            &[],
        )
        .await;
    owner.signal(SIGCONT);
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Once it runs again, the owner drops the expired request.
    owner.wait_healthy().await;
    wait_for("the expired request counted", || async {
        owner.metric("fanout_forwards_expired_total").await >= 1.0
    })
    .await;
    other.publish("late", json!("must not arrive")).await;
    other.publish("early", json!("still subscribed")).await;
    assert_eq!(
        sse.next_json().await,
        ("early".into(), json!("still subscribed"))
    );
}

async fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let v: Vec<redis::Value> = redis.cmd(&["PUBSUB", "NUMSUB", channel]).await;
    match &v[1] {
        redis::Value::Int(n) => *n,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_dropped_as_slow_releases_its_redis_channel() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[("FANOUT_CLIENT_QUEUE_BYTES", "1000000")])).await;
    let (sock, id) = node.stalled_stream().await;
    node.subscribe(&id, &["leak"]).await;
    assert_eq!(numsub(&redis, "fanout:t:leak").await, 1);
    // More than the kernel's socket buffers and the queue bound together.
    let big = "x".repeat(200_000);
    for _ in 0..60 {
        node.publish("leak", json!(big)).await;
    }
    wait_for("the slow client is dropped", || async {
        node.metric("fanout_slow_client_disconnects_total").await >= 1.0
    })
    .await;
    wait_for("its channel is released", || async {
        numsub(&redis, "fanout:t:leak").await == 0
    })
    .await;
    drop(sock);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_posts_of_one_guest_with_two_users_never_both_bind() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[])).await;
    let (x, y) = (user_token(SECRET, "X"), user_token(SECRET, "Y"));
    for round in 0..20 {
        let sse = node.connect().await;
        let mut posts = JoinSet::new();
        for (token, topic) in [(x.clone(), "a"), (y.clone(), "b")] {
            let api = node.api.clone();
            let id = sse.client_id.clone();
            posts.spawn(async move {
                api.post_subscriptions(
                    json!({"clientId": id, "subscriptions": [topic]}),
                    &[("authorization", token.as_str())],
                )
                .await
                .0
            });
        }
        let statuses = posts.join_all().await;
        let bound = statuses
            .iter()
            .filter(|s| **s == StatusCode::NO_CONTENT)
            .count();
        assert_eq!(bound, 1, "round {round}: {statuses:?}");
        assert!(statuses.contains(&StatusCode::FORBIDDEN), "{statuses:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_node_leaves_the_cluster_list_at_once_and_the_list_needs_the_publish_key() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    let extra = [
        ("FANOUT_HEARTBEAT_INTERVAL", "5s"),
        ("FANOUT_PUBLISH_KEY", "pk"),
    ];
    let a = NodeProcess::start(&env(&url, &extra)).await;
    let mut b = NodeProcess::start(&env(&url, &extra)).await;
    let list = |api: Api| async move {
        let res = api
            .http
            .get(format!("{}/api/cluster", api.base))
            .bearer_auth("pk")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::OK);
        res.json::<serde_json::Value>().await.unwrap()["nodes"]
            .as_array()
            .unwrap()
            .len()
    };
    wait_for("both listed", || list(a.api.clone()).map_eq(2)).await;
    let (status, _) = a.get_json("/api/cluster").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(b.stop().await.success());
    // Not after three 5 s heartbeats: now.
    assert_eq!(list(a.api.clone()).await, 1);
}

trait MapEq {
    fn map_eq(self, n: usize) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = usize>> MapEq for F {
    async fn map_eq(self, n: usize) -> bool {
        self.await == n
    }
}

/// Redis, a proxy in front of it, a node that reaches Redis through the
/// proxy, and a publisher node that reaches it directly.
async fn behind_a_proxy() -> (RedisServer, TcpProxy, NodeProcess, NodeProcess) {
    let redis = RedisServer::start().await;
    let proxy = TcpProxy::start(redis.port).await;
    let slow_url = format!("redis://127.0.0.1:{}", proxy.port);
    let node = NodeProcess::start(&env(&slow_url, &[])).await;
    let direct = redis.url();
    let publisher = NodeProcess::start(&env(&direct, &[])).await;
    (redis, proxy, node, publisher)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_posts_rollback_never_undoes_a_later_post_that_got_204() {
    let (_redis, proxy, node, publisher) = behind_a_proxy().await;
    let mut sse = node.connect().await;
    // The first POST's SUBSCRIBE is slow, then its connection is cut: it
    // fails and rolls back. The second POST arrives while it is in flight.
    proxy.set_delay(Duration::from_millis(400));
    let api = node.api.clone();
    let id = sse.client_id.clone();
    let subscribes = proxy.sent_count(b"SUBSCRIBE");
    let first = tokio::spawn(async move {
        api.post_subscriptions(json!({"clientId": id, "subscriptions": ["a"]}), &[])
            .await
            .0
    });
    wait_for("the first POST's SUBSCRIBE on its way", || async {
        proxy.sent_count(b"SUBSCRIBE") > subscribes
    })
    .await;
    let api = node.api.clone();
    let id = sse.client_id.clone();
    let second = tokio::spawn(async move {
        api.post_subscriptions(json!({"clientId": id, "subscriptions": ["b"]}), &[])
            .await
            .0
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.set_delay(Duration::ZERO);
    proxy.cut();
    assert_eq!(first.await.unwrap(), StatusCode::SERVICE_UNAVAILABLE);
    let second = second.await.unwrap();
    eprintln!("the second POST got {second}");
    if second == StatusCode::NO_CONTENT {
        // Acknowledged: it must hold.
        publisher.publish_retrying("b", json!("kept")).await;
        assert_eq!(sse.next_json().await, ("b".into(), json!("kept")));
    } else {
        assert_eq!(second, StatusCode::SERVICE_UNAVAILABLE);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_after_an_unanswered_ping_delivers_no_duplicate_and_keeps_order() {
    let (_redis, proxy, node, publisher) = behind_a_proxy().await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["d"]).await;
    let api = publisher.api.clone();
    let publishing = tokio::spawn(async move {
        for n in 0..600u64 {
            api.publish_retrying("d", json!(n)).await;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    // What the node sends stalls past the command timeout: its PING goes
    // unanswered while the old connection still receives messages.
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set_delay(Duration::from_secs(4));
    wait_for("the node notices", || async {
        node.get_json("/api/health").await.0 == StatusCode::SERVICE_UNAVAILABLE
    })
    .await;
    proxy.set_delay(Duration::ZERO);
    publishing.await.unwrap();
    let mut seen: Vec<u64> = Vec::new();
    while let Some(e) = sse.next_within(Duration::from_secs(2)).await {
        seen.push(e.data.parse().unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "duplicated or out of order around the reconnect"
    );
    assert_eq!(seen.last(), Some(&599), "delivery resumed");
    assert!(node.metric("fanout_relay_reconnects_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_redis_connections_go_silent_a_node_opens_new_ones_and_publishes_get_200_again() {
    // A Redis that came back at another address (a restarted pod) leaves the
    // old connections silent, not closed: the node must not wait for the
    // kernel to give up on them.
    let (_redis, proxy, node, _publisher) = behind_a_proxy().await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["s"]).await;
    proxy.silence();
    let silenced = Instant::now();
    let mut refused = 0;
    let mut n = 0u64;
    loop {
        n += 1;
        let (status, _) = node
            .api
            .publish_raw(json!({"topic": "s", "data": n}), &[])
            .await;
        if status == StatusCode::OK {
            break;
        }
        // 504 for a publish that was sent and got no answer (its outcome
        // is unknown to the node), 503 once the node knows Redis is away.
        assert!(
            [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT].contains(&status),
            "{status}"
        );
        refused += 1;
        assert!(
            silenced.elapsed() < Duration::from_secs(20),
            "still refused after {:?}",
            silenced.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "publishes accepted again {:?} after the silence ({refused} refused)",
        silenced.elapsed()
    );
    assert!(refused > 0, "the silence was noticed");
    // Delivered through the new connections.
    let (topic, data) = sse.next_json().await;
    assert_eq!((topic.as_str(), data), ("s", json!(n)));
}

/// Publish `body` until it is answered 200, whatever the answers before
/// (504: outcome unknown; 503: nothing published). The answers.
async fn publish_until_200(
    node: &Api,
    body: serde_json::Value,
) -> Vec<(StatusCode, serde_json::Value)> {
    let mut answers = Vec::new();
    loop {
        let (status, reply) = node.publish_raw(body.clone(), &[]).await;
        answers.push((status, reply));
        if status == StatusCode::OK {
            return answers;
        }
        assert!(answers.len() < 50, "never 200: {answers:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_redis_stalls_on_is_504_unknown_and_its_retry_with_the_same_ids_delivers_once() {
    // Issue 18, item 4: after CLIENT PAUSE WRITE the publish timed out and
    // was answered 503 ("nothing was published"), yet Redis ran it when
    // the pause ended; a publisher that retried delivered it twice.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[])).await;
    let mut sse = node.connect().await;
    node.subscribe(&sse.client_id, &["p"]).await;
    node.publish_raw(json!({"topic": "p", "id": "x0", "data": 0}), &[])
        .await;
    let _: () = redis.cmd(&["CLIENT", "PAUSE", "4500", "WRITE"]).await;
    let one = json!({"topic": "p", "id": "x1", "data": 1});
    let (status, reply) = node.publish_raw(one.clone(), &[]).await;
    assert_eq!(
        status,
        StatusCode::GATEWAY_TIMEOUT,
        "a timed-out publish is not 'nothing published': {reply}"
    );
    assert_eq!(reply["status"], 504, "{reply}");
    assert_eq!(reply["data"]["unknown"], json!([0]), "{reply}");
    let retries = publish_until_200(&node, one).await;
    // A batch, while Redis is paused again: both messages unknown, then
    // retried as they were.
    let _: () = redis.cmd(&["CLIENT", "PAUSE", "4500", "WRITE"]).await;
    let batch = json!({"messages": [
        {"topic": "p", "id": "x2", "data": 2},
        {"topic": "p", "id": "x3", "data": 3},
    ]});
    let (status, reply) = node.publish_raw(batch.clone(), &[]).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{reply}");
    assert_eq!(reply["data"]["unknown"], json!([0, 1]), "{reply}");
    let batch_retries = publish_until_200(&node, batch).await;
    // Whether or not Redis ran the stalled commands after all, a message
    // published again with an id the topic's history holds is answered 200
    // and not delivered again.
    for _ in 0..2 {
        let (status, reply) = node
            .publish_raw(json!({"topic": "p", "id": "x4", "data": 4}), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    let seen = received_numbers(&mut sse).await;
    let a = Account::of(&seen, &[0, 1, 2, 3, 4]);
    eprintln!(
        "retries: {:?} / {:?}; client: missing-unsignalled {}, duplicated {}",
        retries.iter().map(|(s, _)| s.as_u16()).collect::<Vec<_>>(),
        batch_retries
            .iter()
            .map(|(s, _)| s.as_u16())
            .collect::<Vec<_>>(),
        a.missing.len(),
        a.duplicated.len()
    );
    assert_eq!(seen, vec![0, 1, 2, 3, 4], "each message once, in order");
}
