//! Fanout behind Sentinel: a primary, a replica and three Sentinels started
//! by the test; the nodes find the primary through the Sentinels and follow
//! it through a commanded failover and a killed primary.

use std::time::Duration;

use fanout_testkit::*;
use serde_json::json;

fn env(url: &str) -> Vec<(&str, &str)> {
    vec![
        ("FANOUT_REDIS_URL", url),
        ("FANOUT_HEARTBEAT_INTERVAL", "300ms"),
        ("FANOUT_FORWARD_TIMEOUT", "2s"),
    ]
}

/// Publish `n, n+1, …` every 10 ms until `stop`; the numbers answered 200.
fn steady_publisher(
    api: Api,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(Vec<u64>, usize)> {
    tokio::spawn(async move {
        let (mut ok, mut refused) = (Vec::new(), 0);
        let mut n = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let (status, body) = api.publish_raw(json!({"topic": "s", "data": n}), &[]).await;
            match status {
                StatusCode::OK => ok.push(n),
                StatusCode::SERVICE_UNAVAILABLE => refused += 1,
                s => panic!("{s}: {body}"),
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, refused)
    })
}

async fn healthy(node: &NodeProcess) {
    wait_for("node healthy", || async {
        node.get_json("/api/health").await.0 == StatusCode::OK
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_follow_the_primary_through_a_commanded_failover_and_a_killed_primary() {
    let mut group = RedisSentinels::start().await;
    let url = group.url();
    let a = NodeProcess::start(&env(&url)).await;
    let b = NodeProcess::start(&env(&url)).await;
    let mut sse = a.connect().await;
    a.subscribe(&sse.client_id, &["s"]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = steady_publisher(b.api.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await;

    // 1. A commanded failover: the old primary lives on as a replica.
    let first = group.primary().await;
    group.failover().await;
    let second = group.wait_new_primary(first).await;
    wait_for("node a subscribed on the new primary", || async {
        let v: Vec<redis::Value> = group
            .try_cmd(second, &["PUBSUB", "NUMSUB", "fanout:t:s"])
            .await
            .unwrap_or_default();
        matches!(v.get(1), Some(redis::Value::Int(n)) if *n >= 1)
    })
    .await;
    healthy(&a).await;
    healthy(&b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // 2. The new primary is killed: the old one takes over again.
    group.kill(second).await;
    let third = group.wait_new_primary(second).await;
    assert_eq!(third, first);
    healthy(&a).await;
    healthy(&b).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, refused) = publisher.await.unwrap();

    let mut seen: Vec<u64> = Vec::new();
    while let Some(e) = sse.next_within(Duration::from_secs(1)).await {
        seen.push(e.data.parse().unwrap());
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "order kept, no duplicate"
    );
    let got: std::collections::HashSet<u64> = seen.iter().copied().collect();
    let lost: Vec<u64> = ok.iter().copied().filter(|n| !got.contains(n)).collect();
    eprintln!(
        "sentinel: {} answered 200, {refused} answered 503, {} acknowledged but missed ({lost:?})",
        ok.len(),
        lost.len()
    );
    assert_eq!(
        seen.last(),
        ok.last(),
        "the last acknowledged message arrived"
    );
    let health = a.get_json("/api/health").await.1;
    assert_eq!(health["data"]["relay"]["mode"], "standalone", "{health}");
}
