//! Resuming with a `since` cursor: replays that are larger than a client's
//! queue, replays that must not slow the live path, and where a node's
//! position for a topic starts after its last subscriber left. Each client
//! is accounted for: which numbers it missed, which it got twice.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use fanout_testkit::*;
use futures_util::StreamExt;
use reqwest::StatusCode;
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

/// The numbers a client receives for `within` (or until its stream
/// ends), and whether the stream ended.
async fn numbers_for(sse: &mut Sse, within: Duration) -> (Vec<u64>, bool) {
    let deadline = tokio::time::Instant::now() + within;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, sse.events.next()).await {
            Err(_) => return (seen, false),
            Ok(None | Some(Err(_))) => return (seen, true),
            Ok(Some(Ok(e))) => seen.push(
                serde_json::from_str::<serde_json::Value>(&e.data).unwrap()["n"]
                    .as_u64()
                    .expect("a numbered message"),
            ),
        }
    }
}

/// Publishes `{"n": 0}, {"n": 1}, …` with ids `m0, m1, …` to `topic` from
/// `tasks` concurrent publishers until stopped; remembers which numbers
/// were answered 200.
struct Publishers {
    stop: Arc<AtomicBool>,
    acked: Arc<std::sync::Mutex<HashSet<u64>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Publishers {
    fn start(api: Api, topic: &str, tasks: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(std::sync::Mutex::new(HashSet::new()));
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..tasks)
            .map(|_| {
                let (api, stop, acked, next) =
                    (api.clone(), stop.clone(), acked.clone(), next.clone());
                let topic = topic.to_owned();
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let n = next.fetch_add(1, Ordering::Relaxed);
                        let (status, _) = api
                            .publish_raw(
                                json!({"topic": topic, "id": format!("m{n}"), "data": {"n": n}}),
                                &[],
                            )
                            .await;
                        if status == StatusCode::OK {
                            acked.lock().unwrap().insert(n);
                        }
                    }
                })
            })
            .collect();
        Self { stop, acked, tasks }
    }

    fn acked(&self) -> HashSet<u64> {
        self.acked.lock().unwrap().clone()
    }

    async fn finish(self) -> HashSet<u64> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.acked.lock().unwrap().clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_after_the_last_one_left_starts_at_its_subscription_not_at_a_stale_position() {
    // Issue 18, item 8: a message in flight after the last subscriber of a
    // node left re-created the node's position for the topic; the next
    // subscriber there was caught up from that stale offset, getting the
    // messages published before it subscribed (or a gap closed it at once).
    let redis = RedisServer::start().await;
    let url = redis.url();
    let a = NodeProcess::start(&env(&url, &[("FANOUT_HISTORY_SIZE", "100000")])).await;
    let b = NodeProcess::start(&env(&url, &[])).await;
    let publishers = Publishers::start(b.api.clone(), "busy", 4);
    let rounds = 8;
    let mut failures = Vec::new();
    for round in 0..rounds {
        let mut old = a.connect().await;
        a.subscribe(&old.client_id, &["busy"]).await;
        for _ in 0..50 {
            old.next().await;
        }
        // The last subscriber of the topic on node a leaves.
        a.subscribe(&old.client_id, &[]).await;
        drop(old);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut new = a.connect().await;
        let before = publishers.acked();
        a.subscribe(&new.client_id, &["busy"]).await;
        let (seen, closed) = numbers_for(&mut new, Duration::from_millis(700)).await;
        let early = seen.iter().filter(|n| before.contains(n)).count();
        let a_dup = Account::of(&seen, &[]);
        eprintln!(
            "round {round}: received {}, of which {early} published before it subscribed, duplicated {}, stream closed: {closed}",
            seen.len(),
            a_dup.duplicated.len()
        );
        if early > 0 || closed || seen.is_empty() || !a_dup.duplicated.is_empty() {
            failures.push(round);
        }
    }
    publishers.finish().await;
    assert!(
        failures.is_empty(),
        "rounds {failures:?} of {rounds}: the newcomer must start at its subscription, stream open"
    );
}

/// Publish `{"n": i}` padded to about `size` bytes, with ids `m<i>`, for
/// `i` in `range`, in batches of up to 50 (2 MB at most); insist on 200.
async fn publish_padded(api: &Api, topic: &str, range: std::ops::Range<u64>, size: usize) {
    let pad = "x".repeat(size);
    let ids: Vec<u64> = range.collect();
    for chunk in ids.chunks((2_000_000 / (size + 100)).clamp(1, 50)) {
        let messages: Vec<serde_json::Value> = chunk
            .iter()
            .map(|i| json!({"topic": topic, "id": format!("m{i}"), "data": {"n": i, "pad": pad}}))
            .collect();
        let (status, body) = api.publish_raw(json!({"messages": messages}), &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

/// A resume after `m1` of 1,000 messages of 5 KB (5 MB: more than a
/// client queue's default 4 MiB), then live messages: every message after
/// the cursor once, in order, with the stream open.
async fn check_a_resume_larger_than_the_queue(node: &NodeProcess) {
    publish_padded(node, "big", 1..1001, 5 * 1024).await;
    let mut sse = node.connect().await;
    let key = since_key("big", "m1");
    node.subscribe(&sse.client_id, &[&key]).await;
    // Live messages while the replay goes on; after its first 20, as the
    // history holds 1,000 (each live message trims the oldest: those
    // must have been replayed by then, or the replay rightly ends as a gap).
    let mut seen = Vec::new();
    for _ in 0..20 {
        seen.push(sse.next_json().await.1["n"].as_u64().unwrap());
    }
    let live = {
        let api = node.api.clone();
        tokio::spawn(async move { publish_padded(&api, "big", 1001..1011, 16).await })
    };
    let mut closed = false;
    while seen.len() < 1009 {
        let (got, ended) = numbers_for(&mut sse, Duration::from_secs(5)).await;
        let quiet = got.is_empty();
        seen.extend(got);
        if ended {
            closed = true;
            break;
        }
        if quiet {
            break;
        }
    }
    live.await.unwrap();
    let (rest, ended) = numbers_for(&mut sse, Duration::from_millis(500)).await;
    seen.extend(rest);
    let expected: Vec<u64> = (2..1011).collect();
    let a = Account::of(&seen, &expected);
    eprintln!(
        "resume after m1: received {}, missing {}, duplicated {}, in order {}, stream closed {}",
        seen.len(),
        a.missing.len(),
        a.duplicated.len(),
        a.in_order,
        closed || ended
    );
    if closed || ended {
        let logs = node.logs();
        let tail: Vec<&str> = logs.lines().rev().take(15).collect();
        eprintln!("node logs (last lines, newest first): {tail:#?}");
    }
    assert!(!closed && !ended, "the stream stays open");
    assert_eq!(
        seen, expected,
        "replay then live: every message after the cursor, once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_larger_than_the_client_queue_is_delivered_as_the_client_reads_it() {
    // Issue 18, item 5: the whole replay was pushed at once, the client
    // was closed as slow with 0 events, and the SDK re-posted the same
    // cursor on every reconnect, forever.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[])).await;
    check_a_resume_larger_than_the_queue(&node).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_larger_than_the_client_queue_is_delivered_as_the_client_reads_it_without_redis() {
    let node = NodeProcess::start(&[]).await;
    check_a_resume_larger_than_the_queue(&node).await;
}

/// Redis's `total_net_output_bytes`.
async fn redis_output_bytes(redis: &RedisServer) -> u64 {
    let info: String = redis.cmd(&["INFO", "stats"]).await;
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("total_net_output_bytes")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_that_need_nothing_read_nothing_of_the_history_and_other_topics_flow() {
    // Issue 18, item 6: every resume read the whole history (here 150
    // messages of 200 KB), on the subscriber connection's dispatcher:
    // other topics' messages waited behind it and the node's memory grew
    // by the history's size per resume.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[])).await;
    publish_padded(&node, "big", 1..151, 200 * 1024).await;
    let mut other = node.connect().await;
    node.subscribe(&other.client_id, &["other"]).await;
    let steady = Publishers::start(node.api.clone(), "other", 1);
    let mut resumed = Vec::new();
    for _ in 0..25 {
        resumed.push(node.connect().await);
    }
    let key = since_key("big", "m150");
    let (bytes_before, rss_before) = (redis_output_bytes(&redis).await, node.rss_kib());
    let posts = resumed.iter().map(|sse| {
        let (api, id, key) = (node.api.clone(), sse.client_id.clone(), key.clone());
        async move {
            api.post_subscriptions(json!({"clientId": id, "subscriptions": [key]}), &[])
                .await
                .0
        }
    });
    let statuses = futures_util::future::join_all(posts).await;
    let (bytes_after, rss_after) = (redis_output_bytes(&redis).await, node.rss_kib());
    let read = bytes_after - bytes_before;
    let grown = rss_after.saturating_sub(rss_before) / 1024;
    eprintln!(
        "25 resumes needing nothing: answers {statuses:?}; Redis sent {} KB; the node's RSS grew {grown} MB",
        read / 1024
    );
    assert!(statuses.iter().all(|s| *s == StatusCode::NO_CONTENT));
    // The steady publisher's messages and the resumes' few lookups; not
    // the 30 MB history, let alone 25 times.
    assert!(
        read < 2 * 1024 * 1024,
        "resumes that need nothing read {read} bytes from Redis"
    );
    assert!(grown < 20, "the node's memory grew {grown} MB");
    // Live from the cursor on: the next message reaches each one once.
    publish_padded(&node, "big", 151..152, 16).await;
    for (i, sse) in resumed.iter_mut().enumerate() {
        let (_, first) = sse.next_json().await;
        let (rest, closed) = numbers_for(sse, Duration::from_millis(200)).await;
        assert_eq!(
            (first["n"].as_u64(), rest.len()),
            (Some(151), 0),
            "resumed client {i}: the next message, once"
        );
        assert!(!closed);
    }
    let acked = steady.finish().await;
    let (seen, closed) = numbers_for(&mut other, Duration::from_secs(1)).await;
    let mut acked: Vec<u64> = acked.into_iter().collect();
    acked.sort();
    let a = Account::of(&seen, &acked);
    eprintln!(
        "the other topic's client: {} acknowledged, missing {}, duplicated {}",
        acked.len(),
        a.missing.len(),
        a.duplicated.len()
    );
    assert!(!closed && a.missing.is_empty() && a.duplicated.is_empty() && a.in_order);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_answered_503_delivers_nothing_and_one_answered_204_delivers_its_replay_once() {
    // Issue 18, item 6: with 100 resumes of a large history, 43 POSTs were
    // answered 503 ("nothing changed") and those clients received the
    // replay anyway.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let node = NodeProcess::start(&env(&url, &[])).await;
    publish_padded(&node, "big", 1..301, 200 * 1024).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(node.connect().await);
    }
    let key = since_key("big", "m299");
    let posts = clients.iter().map(|sse| {
        let (api, id, key) = (node.api.clone(), sse.client_id.clone(), key.clone());
        async move {
            api.post_subscriptions(json!({"clientId": id, "subscriptions": [key]}), &[])
                .await
                .0
        }
    });
    let statuses = futures_util::future::join_all(posts).await;
    let mut wrong = Vec::new();
    let mut count = std::collections::BTreeMap::new();
    for (i, (sse, status)) in clients.iter_mut().zip(&statuses).enumerate() {
        *count.entry(status.as_u16()).or_insert(0) += 1;
        let (seen, _) = numbers_for(sse, Duration::from_millis(300)).await;
        let expected: Vec<u64> = match *status {
            StatusCode::NO_CONTENT => vec![300],
            _ => vec![],
        };
        if seen != expected {
            wrong.push((i, status.as_u16(), seen));
        }
    }
    eprintln!("answers {count:?}; clients that got other than their answer promised: {wrong:?}");
    assert!(
        wrong.is_empty(),
        "204: the replay once; anything else: nothing of it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_with_a_message_larger_than_the_client_queue_is_refused_with_400_and_changes_nothing()
 {
    // A node whose clients' queues hold 128 KiB, and a message of 200 KB
    // another node (with the default limits) published: that replay can
    // never fit the queue, so the POST says so instead of a 204 whose
    // stream is then closed on every reconnect.
    let redis = RedisServer::start().await;
    let url = redis.url();
    let publisher = NodeProcess::start(&env(&url, &[])).await;
    let small = NodeProcess::start(&env(
        &url,
        &[
            ("FANOUT_CLIENT_QUEUE_BYTES", "131072"),
            ("FANOUT_MAX_PAYLOAD_BYTES", "65536"),
        ],
    ))
    .await;
    publish_padded(&publisher, "t", 1..2, 16).await;
    publish_padded(&publisher, "t", 2..3, 200 * 1024).await;
    let mut sse = small.connect().await;
    let key = since_key("t", "m1");
    let (status, body) = small
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["other", key]}),
            &[],
        )
        .await;
    eprintln!("{status}: {body}");
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["status"], 400);
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert!(body["data"].is_object());
    // Nothing changed: no subscription, nothing delivered.
    publish_padded(&publisher, "other", 3..4, 16).await;
    let (seen, closed) = numbers_for(&mut sse, Duration::from_millis(500)).await;
    assert_eq!((seen, closed), (vec![], false));
    // Without the cursor the same client subscribes.
    small.subscribe(&sse.client_id, &["t"]).await;
    publish_padded(&publisher, "t", 4..5, 16).await;
    assert_eq!(sse.next_json().await.1["n"], 4);
}
