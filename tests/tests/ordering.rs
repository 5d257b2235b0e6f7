//! Cross-node decisions without agreeing wall clocks, and one client's
//! subscription requests taking effect in the order the cluster received
//! them: real nodes, real Redis, a node's wall clock shifted by libfaketime
//! (its monotonic clock left alone), a slow Redis link through `TcpProxy`.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fanout_testkit::*;
use serde_json::{Value, json};

/// The heartbeat interval, unless a forward timeout needs a longer one
/// (three intervals must exceed it, or a node refuses to start).
const HEARTBEAT: Duration = Duration::from_millis(700);

/// The heartbeat interval for a forward timeout given as `<n>s` or
/// `<n>ms`: [`HEARTBEAT`], or half the timeout when that is longer.
fn heartbeat_for(forward_timeout: &str) -> Duration {
    let ms = match forward_timeout.strip_suffix("ms") {
        Some(n) => n.parse::<u64>().unwrap(),
        None => {
            forward_timeout
                .strip_suffix('s')
                .unwrap()
                .parse::<u64>()
                .unwrap()
                * 1000
        }
    };
    HEARTBEAT.max(Duration::from_millis(ms / 2))
}

fn env(
    url: &str,
    forward_timeout: &str,
    extra: &[(&'static str, String)],
) -> Vec<(String, String)> {
    let mut env = vec![
        ("FANOUT_REDIS_URL".to_owned(), url.to_owned()),
        (
            "FANOUT_HEARTBEAT_INTERVAL".to_owned(),
            format!("{}ms", heartbeat_for(forward_timeout).as_millis()),
        ),
        (
            "FANOUT_FORWARD_TIMEOUT".to_owned(),
            forward_timeout.to_owned(),
        ),
    ];
    env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    env
}

async fn numsub(redis: &RedisServer, channel: &str) -> i64 {
    let v: Vec<redis::Value> = redis.cmd(&["PUBSUB", "NUMSUB", channel]).await;
    match &v[1] {
        redis::Value::Int(n) => *n,
        other => panic!("{other:?}"),
    }
}

async fn start(env: &[(String, String)]) -> NodeProcess {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    NodeProcess::start(&env).await
}

/// The tags `/api/cluster` on `node` lists.
async fn listed(node: &NodeProcess) -> Vec<String> {
    let (status, body) = node.get_json("/api/cluster").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap().to_owned())
        .collect()
}

/// The wall-clock offset (s) of the node with `tag`, from the start time it
/// reports (rounded to seconds).
async fn reported_skew(node: &NodeProcess, tag: &str) -> i64 {
    let (_, body) = node.get_json("/api/cluster").await;
    let entry: &Value = body["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == tag)
        .expect("listed");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    entry["startedAt"].as_i64().unwrap() - now
}

/// For `every` node: both nodes listed, continuously for `hold` (longer
/// than a membership's lifetime, three heartbeats).
async fn both_listed_for(nodes: [&NodeProcess; 2], tags: [&str; 2], hold: Duration) {
    let mut expected: Vec<String> = tags.iter().map(|t| (*t).to_owned()).collect();
    expected.sort();
    let since = Instant::now();
    while since.elapsed() < hold {
        for n in nodes {
            assert_eq!(listed(n).await, expected, "after {:?}", since.elapsed());
        }
        tokio::time::sleep(HEARTBEAT / 3).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_and_membership_work_with_either_node_s_wall_clock_30s_ahead_or_behind() {
    for (skewed_is_owner, offset) in [
        (true, "+30s"),
        (true, "-30s"),
        (false, "+30s"),
        (false, "-30s"),
    ] {
        let what = format!(
            "{} clock {offset}",
            if skewed_is_owner {
                "owner's"
            } else {
                "forwarder's"
            }
        );
        let redis = RedisServer::start().await;
        let url = redis.url();
        let skew = skewed_wall_clock(offset);
        let skewed = start(&env(&url, "2s", &skew)).await;
        let plain = start(&env(&url, "2s", &[])).await;
        let (owner, forwarder) = if skewed_is_owner {
            (&skewed, &plain)
        } else {
            (&plain, &skewed)
        };
        let tags = [skewed.tag().await, plain.tag().await];
        // A subscription through the other node is applied and answered
        // at once, and a publish reaches it.
        let mut sse = owner.connect().await;
        let asked = Instant::now();
        let (status, body) = forwarder
            .post_subscriptions(
                json!({"clientId": sse.client_id, "subscriptions": ["x"]}),
                &[],
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{what}: {body}");
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{what}: answered after {:?}",
            asked.elapsed()
        );
        forwarder.publish("x", json!(1)).await;
        assert_eq!(sse.next_json().await, ("x".into(), json!(1)), "{what}");

        // Both listed on both nodes once, then for longer than three
        // heartbeats: a deadline written on one node's clock and read on
        // the other's would drop one of them.
        wait_for(&format!("{what}: both nodes listed"), || async {
            listed(&plain).await.len() == 2 && listed(&skewed).await.len() == 2
        })
        .await;
        let shift = reported_skew(&plain, &tags[0]).await;
        let want: i64 = offset.trim_end_matches('s').parse().unwrap();
        assert!(
            (shift - want).abs() <= 2,
            "{what}: libfaketime works ({shift} s)"
        );
        both_listed_for([&plain, &skewed], [&tags[0], &tags[1]], HEARTBEAT * 5).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_owner_whose_wall_clock_runs_30s_behind_never_applies_a_request_answered_503() {
    // The owner behind the forwarder: its own clock behind, or the
    // forwarder's ahead.
    for (owner_offset, forwarder_offset) in [(Some("-30s"), None), (None, Some("+30s"))] {
        let what = format!("owner {owner_offset:?}, forwarder {forwarder_offset:?}");
        let redis = RedisServer::start().await;
        let url = redis.url();
        let skew = |o: Option<&str>| o.map(skewed_wall_clock).unwrap_or_default();
        let owner = start(&env(&url, "1s", &skew(owner_offset))).await;
        let forwarder = start(&env(&url, "1s", &skew(forwarder_offset))).await;
        let mut sse = owner.connect().await;
        owner.subscribe(&sse.client_id, &["early"]).await;
        owner.freeze().await;
        let (status, body) = forwarder
            .post_subscriptions(
                json!({"clientId": sse.client_id, "subscriptions": ["late"]}),
                &[],
            )
            .await;
        owner.signal(SIGCONT);
        assert_eq!(
            status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{what}: {body} (logs: {} {})",
            owner.log_path.display(),
            forwarder.log_path.display()
        );
        // Once it runs again, the owner drops the expired request.
        owner.wait_healthy().await;
        // Wait until the owner has dealt with the request: dropped it as
        // expired, or (the defect) applied it and subscribed `late`.
        wait_for(&format!("{what}: the request ({body}) handled"), || async {
            owner.metric("fanout_forwards_expired_total").await >= 1.0
                || numsub(&redis, "fanout:t:late").await > 0
        })
        .await;
        forwarder.publish("late", json!("must not arrive")).await;
        forwarder.publish("early", json!("still subscribed")).await;
        assert_eq!(
            sse.next_json().await,
            ("early".into(), json!("still subscribed")),
            "{what}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slowly_forwarded_subscription_does_not_undo_a_newer_one_sent_to_the_owner() {
    older_forwarded_slowly_then_newer_sent_to_the_owner(None, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_s_requests_keep_their_order_with_the_forwarder_30s_ahead_or_the_owner_30s_behind()
 {
    // Stamps on either node's wall clock would make the older request look
    // 30 s newer.
    older_forwarded_slowly_then_newer_sent_to_the_owner(None, Some("+30s")).await;
    older_forwarded_slowly_then_newer_sent_to_the_owner(Some("-30s"), None).await;
}

/// A client on the owner asks for {x} through the forwarder, whose link
/// to Redis is slow, and then for {x, y} on the owner directly: the final
/// set is {x, y}, and the older request answers 204 (superseded).
async fn older_forwarded_slowly_then_newer_sent_to_the_owner(
    owner_offset: Option<&str>,
    forwarder_offset: Option<&str>,
) {
    let skew = |o: Option<&str>| o.map(skewed_wall_clock).unwrap_or_default();
    let redis = RedisServer::start().await;
    let url = redis.url();
    // The forwarding node reaches Redis through a proxy that will delay
    // what it sends, so its forwarded request arrives late.
    let proxy = TcpProxy::start(redis.port).await;
    let slow_url = format!("redis://127.0.0.1:{}", proxy.port);
    let owner = start(&env(&url, "5s", &skew(owner_offset))).await;
    let forwarder = start(&env(&slow_url, "5s", &skew(forwarder_offset))).await;
    let owner_channel = format!("fanout:n:{}", owner.tag().await);
    let mut sse = owner.connect().await;
    let id = sse.client_id.clone();
    proxy.set_delay(Duration::from_millis(500));
    let published = proxy.sent_count(owner_channel.as_bytes());
    let older = {
        let api = forwarder.api.clone();
        let id = id.clone();
        tokio::spawn(async move {
            api.post_subscriptions(json!({"clientId": id, "subscriptions": ["x"]}), &[])
                .await
        })
    };
    // The first request has been received and sent on (it sits in the
    // proxy) before the second is sent.
    wait_for("the older request on its way to the owner", || async {
        proxy.sent_count(owner_channel.as_bytes()) > published
    })
    .await;
    owner.subscribe(&id, &["x", "y"]).await;
    let (status, body) = older.await.unwrap();
    proxy.set_delay(Duration::ZERO);
    let what = format!("owner {owner_offset:?}, forwarder {forwarder_offset:?}");
    // The older request was superseded, and says so truthfully: the
    // client's set is a newer one of its own.
    assert_eq!(status, StatusCode::NO_CONTENT, "{what}: {body}");
    // The set is the newer {x, y}: y arrives, before the x marker.
    owner.publish("y", json!("newer set")).await;
    owner.publish("x", json!("marker")).await;
    assert_eq!(
        sse.next_json().await,
        ("y".into(), json!("newer set")),
        "{what}"
    );
    assert_eq!(
        sse.next_json().await,
        ("x".into(), json!("marker")),
        "{what}"
    );
    assert!(owner.metric("fanout_subscriptions_superseded_total").await >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_answer_held_up_past_the_forward_timeout_leaves_nothing_changed_with_the_503() {
    let redis = RedisServer::start().await;
    let url = redis.url();
    // The owner reaches Redis through a proxy that will delay each of its
    // sends by 700 ms: its SUBSCRIBE confirms the change in time (700 ms
    // of the 1 s), but its answer reaches Redis after the sender gave up.
    // A long heartbeat keeps PINGs from queueing up in the proxy.
    let proxy = TcpProxy::start(redis.port).await;
    let slow_url = format!("redis://127.0.0.1:{}", proxy.port);
    let owner = start(&env(
        &slow_url,
        "1s",
        &[
            ("FANOUT_HEARTBEAT_INTERVAL", "10s".to_owned()),
            // One round trip to confirm a topic: no history position to read.
            ("FANOUT_HISTORY_SIZE", "0".to_owned()),
        ],
    ))
    .await;
    let forwarder = start(&env(&url, "1s", &[])).await;
    let mut sse = owner.connect().await;
    owner.subscribe(&sse.client_id, &["early"]).await;
    proxy.set_delay(Duration::from_millis(700));
    let asked = Instant::now();
    let (status, body) = forwarder
        .post_subscriptions(
            json!({"clientId": sse.client_id, "subscriptions": ["early", "late"]}),
            &[],
        )
        .await;
    assert_eq!(
        status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{body} after {:?}, subs {} late {} owner log {}",
        asked.elapsed(),
        proxy.sent_count(b"SUBSCRIBE"),
        proxy.sent_count(b"late"),
        owner.log_path.display()
    );
    // The owner had subscribed `late` before its answer was due; 503 means
    // it gives that up again.
    wait_for("the owner withdraws the late subscription", || async {
        numsub(&redis, "fanout:t:late").await == 0
            && owner.logs().contains("subscription failed; reverting")
    })
    .await;
    proxy.set_delay(Duration::ZERO);
    forwarder.publish("late", json!("must not arrive")).await;
    forwarder.publish("early", json!("still subscribed")).await;
    assert_eq!(
        sse.next_json().await,
        ("early".into(), json!("still subscribed"))
    );
}
