//! The subscriber side: links to Redis that carry the channels this node
//! listens on. One task owns each link: it connects, subscribes what the hub
//! needs, serves subscription changes in order, delivers what arrives, and
//! reconnects.
//!
//! * Standalone: one link, `SUBSCRIBE` on a RESP2 pub/sub connection.
//! * Cluster: one link per partition, `SSUBSCRIBE` on a RESP3 connection to
//!   the primary that owns the partition's slot. Every channel of a link
//!   shares the partition's hash tag, so one `SSUBSCRIBE` never spans two
//!   slots. Each link also listens on its partition's service channel:
//!   when the slot moves (a reshard, a failover), Redis sends an unsolicited
//!   `sunsubscribe`, and the link reconnects to the new owner and
//!   re-subscribes everything. A `MOVED` reply while subscribing does the
//!   same.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use redis::{
    AsyncConnectionConfig, ProtocolVersion, PushKind, Value,
    aio::{MultiplexedConnection, PubSubSink},
};
use tokio::{sync::mpsc, task::JoinHandle};

use super::{
    COMMAND_TIMEOUT, MAX_BACKOFF, SUBSCRIBE_BATCH, Shared, SyncRequest,
    topology::{self, Backend},
};
use crate::{metrics as m, relay::RelayError};

/// How long a lost connection's dispatcher may keep passing on what had
/// already arrived before the link reconnects.
const DRAIN: Duration = Duration::from_millis(250);

/// Reach Redis, find out what it is, then run its links.
pub(super) async fn run(
    shared: Arc<Shared>,
    mut controls: Vec<mpsc::UnboundedReceiver<SyncRequest>>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut unreachable = FirstConnectWarning::default();
    let backend = loop {
        if shared.stop.is_cancelled() {
            return;
        }
        match topology::connect(&shared.target, shared.config.partitions).await {
            Ok(b) => break b,
            Err(e) => {
                shared.set_link(0, Err(format!("cannot reach Redis: {e}")));
                unreachable.failed(None, &e);
                if !wait_answering(&shared, &mut controls[0], backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    let links = backend.partitions().unwrap_or(1) as usize;
    if backend.partitions().is_some() {
        shared.remember_nodes(backend.cluster_seeds());
    }
    let _ = shared.backend.set(backend);
    shared.report_health();
    *shared.heartbeat.lock() = Some(tokio::spawn(super::membership::run_heartbeat(
        shared.clone(),
    )));
    tokio::spawn(super::history::run_reads_check(shared.clone()));
    tokio::spawn(super::probe::run_probe(shared.clone()));
    for (k, control) in controls.into_iter().enumerate().take(links) {
        tokio::spawn(run_link(shared.clone(), k, control));
    }
}

/// Warns that Redis cannot be reached until the first connection succeeds:
/// at the first failure, then with back-off (every 2 s, doubling up to a
/// minute), so that a mistyped or unreachable `--redis-url` is never
/// silent. Later reconnects are logged where the connection is lost.
struct FirstConnectWarning {
    next: Instant,
    every: Duration,
    failures: u32,
}

impl Default for FirstConnectWarning {
    fn default() -> Self {
        Self {
            next: Instant::now(),
            every: Duration::from_secs(2),
            failures: 0,
        }
    }
}

impl FirstConnectWarning {
    const MAX_EVERY: Duration = Duration::from_secs(60);

    fn failed(&mut self, link: Option<usize>, error: &str) {
        self.failures += 1;
        let now = Instant::now();
        if now < self.next {
            tracing::debug!(?link, error, "Redis connect failed");
            return;
        }
        tracing::warn!(
            ?link,
            error,
            attempts = self.failures,
            "cannot reach Redis (--redis-url / FANOUT_REDIS_URL); retrying. \
             Until it connects, /api/health answers 503 and publishes fail"
        );
        self.next = now + self.every;
        self.every = (self.every * 2).min(Self::MAX_EVERY);
    }
}

/// Wait `d`, answering subscription requests as a link that is down must.
/// False when the relay stopped.
async fn wait_answering(
    shared: &Shared,
    control: &mut mpsc::UnboundedReceiver<SyncRequest>,
    d: Duration,
) -> bool {
    let wait = tokio::time::sleep(d);
    tokio::pin!(wait);
    loop {
        tokio::select! {
            _ = &mut wait => return true,
            _ = shared.stop.cancelled() => return false,
            req = control.recv() => match req {
                Some(req) => answer_while_down(shared, req),
                None => return false,
            },
        }
    }
}

/// Owns link `k`: connects, re-subscribes, serves subscription changes,
/// and starts over when the connection is lost or its slot moves.
async fn run_link(
    shared: Arc<Shared>,
    k: usize,
    mut control: mpsc::UnboundedReceiver<SyncRequest>,
) {
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = Some(Instant::now());
    let mut first = true;
    let partition = k.to_string();
    // Exported at zero from the start (see `metrics::register`).
    metrics::counter!(m::RELAY_LINK_RECONNECTS, "partition" => partition.clone()).increment(0);
    drop(metrics::gauge!(m::RELAY_RESUBSCRIBE_SECONDS, "partition" => partition.clone()));
    let mut unreachable = FirstConnectWarning::default();
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        match connect(&shared, k).await {
            Ok(conn) => {
                backoff = Duration::from_millis(100);
                shared.set_link(k, Ok(()));
                if let Some(since) = down_since.take() {
                    let took = since.elapsed();
                    metrics::gauge!(m::RELAY_RESUBSCRIBE_SECONDS, "partition" => partition.clone())
                        .set(took.as_secs_f64());
                    if first {
                        tracing::info!(
                            node = shared.hub.node_tag(),
                            link = k,
                            "connected to Redis"
                        );
                    } else {
                        metrics::gauge!(m::RELAY_RECOVERY_SECONDS).set(took.as_secs_f64());
                        metrics::histogram!(m::RELAY_OUTAGE_SECONDS).record(took.as_secs_f64());
                        tracing::info!(
                            link = k,
                            primary = conn.primary.as_deref().unwrap_or("-"),
                            recovery_ms = took.as_millis() as u64,
                            topics = conn.subscribed.len(),
                            "Redis relay recovered: every topic re-subscribed"
                        );
                    }
                }
                first = false;
                let Connected {
                    sink,
                    mut dispatcher,
                    moved,
                    subscribed,
                    ..
                } = conn;
                let reason = serve(
                    &shared,
                    k,
                    sink,
                    subscribed,
                    moved,
                    &mut control,
                    &mut dispatcher,
                )
                .await;
                shared.unconfirm(k);
                // The old connection's dispatcher must stop before a new
                // one subscribes, or messages would arrive twice or out of
                // order. First it passes on what already arrived: a closed
                // connection's stream ends once drained (a failed PING can
                // notice the close first, and aborting then dropped
                // messages Redis had acknowledged to their publishers); one
                // still open gets `DRAIN`, then is stopped.
                if !dispatcher.is_finished()
                    && tokio::time::timeout(DRAIN, &mut dispatcher).await.is_err()
                {
                    dispatcher.abort();
                    let _ = dispatcher.await;
                }
                if shared.stop.is_cancelled() {
                    return;
                }
                metrics::counter!(m::RELAY_RECONNECTS).increment(1);
                metrics::counter!(m::RELAY_LINK_RECONNECTS, "partition" => partition.clone())
                    .increment(1);
                tracing::warn!(link = k, %reason, "Redis subscriber connection lost; reconnecting");
                shared.set_link(k, Err(format!("Redis subscriber down: {reason}")));
                down_since = Some(Instant::now());
            }
            Err(e) => {
                shared.set_link(k, Err(format!("cannot reach Redis: {e}")));
                if first {
                    unreachable.failed(Some(k), &e);
                } else {
                    tracing::debug!(link = k, error = %e, ?backoff, "Redis connect failed");
                }
                if !wait_answering(&shared, &mut control, backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Without a subscriber connection nothing can be subscribed: a request
/// that needs a channel fails; one that only releases channels succeeds
/// (the next connection subscribes only what the hub needs).
fn answer_while_down(shared: &Shared, req: SyncRequest) {
    let needs = req.topics.iter().any(|t| shared.hub.has_topic(t));
    let _ = req.done.send(if needs {
        Err(RelayError::Unavailable(
            shared
                .subscriber_health()
                .err()
                .unwrap_or_else(|| "Redis unavailable".into()),
        ))
    } else {
        Ok(())
    });
}

/// Where a link's subscriptions are sent.
enum Sink {
    Plain(PubSubSink),
    Sharded(MultiplexedConnection),
}

impl Sink {
    async fn run(&mut self, verb: Verb, channels: Vec<String>) -> Result<(), String> {
        let what = match (&*self, verb) {
            (Self::Plain(_), Verb::Subscribe) => "SUBSCRIBE",
            (Self::Plain(_), Verb::Unsubscribe) => "UNSUBSCRIBE",
            (Self::Sharded(_), Verb::Subscribe) => "SSUBSCRIBE",
            (Self::Sharded(_), Verb::Unsubscribe) => "SUNSUBSCRIBE",
        };
        let done = match self {
            Self::Plain(sink) => match verb {
                Verb::Subscribe => {
                    tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(channels)).await
                }
                Verb::Unsubscribe => {
                    tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(channels)).await
                }
            },
            Self::Sharded(conn) => {
                tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd(what).arg(channels).query_async::<()>(conn),
                )
                .await
            }
        };
        done.map_err(|_| format!("{what} timed out"))?
            .map_err(|e| format!("{what} failed: {e}"))
    }

    async fn ping(&mut self) -> bool {
        let pong = match self {
            Self::Plain(sink) => tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<Value>()).await,
            Self::Sharded(conn) => {
                tokio::time::timeout(
                    COMMAND_TIMEOUT,
                    redis::cmd("PING").query_async::<Value>(conn),
                )
                .await
            }
        };
        matches!(pong, Ok(Ok(_)))
    }
}

#[derive(Clone, Copy)]
enum Verb {
    Subscribe,
    Unsubscribe,
}

/// A live link.
struct Connected {
    sink: Sink,
    dispatcher: JoinHandle<()>,
    /// Channels Redis unsubscribed this link from on its own.
    moved: mpsc::UnboundedReceiver<String>,
    subscribed: HashSet<Arc<str>>,
    primary: Option<String>,
}

/// A new connection for link `k`, subscribed to its fixed channels and to
/// every topic of the hub that belongs to it.
async fn connect(shared: &Arc<Shared>, k: usize) -> Result<Connected, String> {
    let backend = shared.backend.get().ok_or("not connected")?;
    let (moved_tx, moved) = mpsc::unbounded_channel();
    // The dispatcher starts once every channel is subscribed: it first
    // catches the link's topics up from history, then delivers live
    // messages (those that arrived meanwhile wait in the connection's
    // buffer, and the offsets drop what history already delivered).
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
    let (mut sink, dispatcher, primary) = match backend {
        Backend::Standalone { .. } => {
            // With Sentinels, every reconnect asks where the primary is.
            backend.follow_sentinels().await?;
            let single = backend.single().ok_or("not standalone")?;
            if backend.is_sentinel() && !topology::is_primary(&single.client).await? {
                return Err(format!("{} is not a primary", single.address));
            }
            let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, single.client.get_async_pubsub())
                .await
                .map_err(|_| "connect timed out".to_owned())?
                .map_err(|e| e.to_string())?;
            let (sink, mut stream) = pubsub.split();
            let s = shared.clone();
            let ready = ready_rx;
            let dispatcher = tokio::spawn(async move {
                if ready.await.is_err() {
                    return;
                }
                s.catch_up_link(0).await;
                let replay_rx = s.links[0].replay_rx.clone();
                let mut replays = replay_rx.lock().await;
                loop {
                    tokio::select! {
                        msg = stream.next() => match msg {
                            Some(msg) => {
                                s.on_message(0, msg.get_channel_name(), msg.get_payload_bytes())
                                    .await
                            }
                            None => return,
                        },
                        Some(req) = replays.recv() => s.finish_replay(req),
                    }
                }
            });
            (Sink::Plain(sink), dispatcher, Some(single.address.clone()))
        }
        Backend::Cluster { template, .. } => {
            let (host, port) = owner(shared, k, template).await?;
            let info = topology::at(template, &host, port).set_redis_settings(
                template
                    .redis_settings()
                    .clone()
                    .set_protocol(ProtocolVersion::RESP3),
            );
            let client = redis::Client::open(info).map_err(|e| e.to_string())?;
            let (tx, mut rx) = mpsc::unbounded_channel();
            let conn = tokio::time::timeout(
                COMMAND_TIMEOUT,
                client.get_multiplexed_async_connection_with_config(
                    &AsyncConnectionConfig::new()
                        .set_response_timeout(Some(COMMAND_TIMEOUT))
                        .set_push_sender(tx),
                ),
            )
            .await
            .map_err(|_| format!("{host}:{port}: connect timed out"))?
            .map_err(|e| format!("{host}:{port}: {e}"))?;
            let s = shared.clone();
            let ready = ready_rx;
            let dispatcher = tokio::spawn(async move {
                if ready.await.is_err() {
                    return;
                }
                s.catch_up_link(k).await;
                let replay_rx = s.links[k].replay_rx.clone();
                let mut replays = replay_rx.lock().await;
                loop {
                    let push = tokio::select! {
                        push = rx.recv() => match push {
                            Some(push) => push,
                            None => return,
                        },
                        Some(req) = replays.recv() => {
                            s.finish_replay(req);
                            continue;
                        }
                    };
                    match push.kind {
                        PushKind::SMessage | PushKind::Message => {
                            if let [Value::BulkString(ch), Value::BulkString(payload), ..] =
                                &push.data[..]
                            {
                                s.on_message(k, &String::from_utf8_lossy(ch), payload).await;
                            }
                        }
                        PushKind::SUnsubscribe => {
                            if let Some(Value::BulkString(ch)) = push.data.first() {
                                let _ = moved_tx.send(String::from_utf8_lossy(ch).into_owned());
                            }
                        }
                        PushKind::Disconnection => return,
                        _ => {}
                    }
                }
            });
            (
                Sink::Sharded(conn),
                dispatcher,
                Some(format!("{host}:{port}")),
            )
        }
    };
    *shared.links[k].primary.lock() = primary.clone();
    sink.run(Verb::Subscribe, shared.fixed_channels(k)).await?;
    let topics: Vec<Arc<str>> = shared
        .hub
        .topics()
        .into_iter()
        .filter(|t| shared.link_of(t) == k)
        .collect();
    if shared.history_on() {
        shared.snapshot_positions(&topics).await?;
    }
    for chunk in topics.chunks(SUBSCRIBE_BATCH) {
        let names = chunk.iter().map(|t| shared.topic_channel(t)).collect();
        sink.run(Verb::Subscribe, names).await?;
    }
    let subscribed: HashSet<Arc<str>> = topics.into_iter().collect();
    shared.confirmed.lock().extend(subscribed.iter().cloned());
    *shared.links[k].reconnect.lock() = tokio_util::sync::CancellationToken::new();
    let _ = ready_tx.send(());
    Ok(Connected {
        sink,
        dispatcher,
        moved,
        subscribed,
        primary,
    })
}

/// The primary that owns partition `k`'s slot, from `CLUSTER SLOTS`.
///
/// Asked of the cluster's nodes one at a time, on short-lived connections,
/// starting from a different one on each attempt: after a failover the
/// cluster connection may still route a keyless command to the dead node,
/// and a node may briefly hold a stale view (then `SSUBSCRIBE` answers
/// `MOVED`, and the next attempt asks another node).
async fn owner(
    shared: &Shared,
    k: usize,
    template: &redis::ConnectionInfo,
) -> Result<(String, u16), String> {
    let tag = shared.partition_tag(k);
    let candidates = shared.known_nodes.lock().clone();
    let start = shared
        .next_request
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed) as usize;
    let mut last = String::from("no cluster node known");
    for i in 0..candidates.len() {
        let (host, port) = &candidates[(start + i) % candidates.len()];
        match slots_from(template, host, *port, &tag).await {
            Ok((owner, nodes, failed)) => {
                {
                    let mut known = shared.known_nodes.lock();
                    for n in nodes {
                        if !known.contains(&n) {
                            known.push(n);
                        }
                    }
                }
                // A slot without a live primary is lost for every node,
                // not only this one (see `Shared::health`).
                let mut orphaned = shared.links[k].orphaned.lock();
                let lost = |o: &mut Option<Instant>| {
                    o.get_or_insert_with(Instant::now);
                };
                return match owner {
                    None => {
                        lost(&mut orphaned);
                        Err("no primary owns the partition's slot".into())
                    }
                    Some((h, p)) if failed.contains(&(h.clone(), p)) => {
                        lost(&mut orphaned);
                        Err(format!(
                            "the partition's primary {h}:{p} is marked failed by the cluster"
                        ))
                    }
                    Some(owner) => {
                        *orphaned = None;
                        Ok(owner)
                    }
                };
            }
            Err(e) => last = format!("{host}:{port}: {e}"),
        }
    }
    Err(last)
}

/// Ask the node at `host:port` which primary owns the slot of `tag`,
/// which nodes it knows, and which of them it marks failed (`CLUSTER
/// NODES` flag `fail`).
#[allow(clippy::type_complexity)]
pub(super) async fn slots_from(
    template: &redis::ConnectionInfo,
    host: &str,
    port: u16,
    tag: &str,
) -> Result<
    (
        Option<(String, u16)>,
        Vec<(String, u16)>,
        Vec<(String, u16)>,
    ),
    String,
> {
    let info = topology::at(template, host, port);
    let client = redis::Client::open(info).map_err(|e| e.to_string())?;
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(tag)
            .query_async(&mut conn)
            .await?;
        let ranges: Vec<Value> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await?;
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await?;
        Ok::<_, redis::RedisError>((slot, ranges, nodes))
    };
    let (slot, ranges, listing) = tokio::time::timeout(Duration::from_secs(1), query)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let addr = topology::node_address;
    let failed = failed_nodes(&listing);
    let mut owner = None;
    let mut nodes = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else { continue };
        nodes.extend(items.iter().skip(2).filter_map(addr));
        if let (Some(Value::Int(start)), Some(Value::Int(end))) = (items.first(), items.get(1))
            && (*start..=*end).contains(&slot)
        {
            owner = items.get(2).and_then(addr);
        }
    }
    Ok((owner, nodes, failed))
}

/// The nodes a `CLUSTER NODES` listing marks failed. Each line is
/// `<id> <ip:port@cport[,hostname]> <flags> …`; `fail?` is one node's
/// suspicion only, `fail` the cluster's verdict.
fn failed_nodes(listing: &str) -> Vec<(String, u16)> {
    listing
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let address = f.nth(1)?;
            let flags = f.next()?;
            flags.split(',').any(|x| x == "fail").then_some(())?;
            let address = address.split(['@', ',']).next()?;
            let (host, port) = address.rsplit_once(':')?;
            Some((host.to_owned(), port.parse().ok()?))
        })
        .collect()
}

/// Serve subscription changes on a live link until it is lost. Returns
/// why it ended.
async fn serve(
    shared: &Shared,
    k: usize,
    mut sink: Sink,
    mut subscribed: HashSet<Arc<str>>,
    mut moved: mpsc::UnboundedReceiver<String>,
    control: &mut mpsc::UnboundedReceiver<SyncRequest>,
    dispatcher: &mut JoinHandle<()>,
) -> String {
    let mut ping = tokio::time::interval(
        shared
            .config
            .heartbeat_interval
            .max(Duration::from_millis(100)),
    );
    ping.tick().await;
    let kicked = shared.links[k].reconnect.lock().clone();
    let fixed: HashSet<String> = shared.fixed_channels(k).into_iter().collect();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return "stopped".into(),
            _ = kicked.cancelled() => return "a publish reached no subscriber of this node".into(),
            _ = &mut *dispatcher => return "connection closed by Redis".into(),
            Some(channel) = moved.recv() => {
                // Redis dropped a channel this link still wants: its slot
                // moved. Reconnect to the new owner.
                let wanted = fixed.contains(&channel)
                    || subscribed.iter().any(|t| shared.topic_channel(t) == channel);
                if wanted {
                    return format!("Redis unsubscribed {channel} (slot moved)");
                }
            }
            _ = ping.tick() => {
                if !sink.ping().await {
                    return "PING unanswered".into();
                }
            }
            req = control.recv() => {
                let Some(req) = req else { return "stopped".into() };
                // Take every request already waiting: one SUBSCRIBE for all.
                let mut reqs = vec![req];
                while reqs.len() < 512 {
                    match control.try_recv() {
                        Ok(r) => reqs.push(r),
                        Err(_) => break,
                    }
                }
                let topics: HashSet<Arc<str>> =
                    reqs.iter().flat_map(|r| r.topics.iter().cloned()).collect();
                let (add, remove): (Vec<Arc<str>>, Vec<Arc<str>>) = topics
                    .into_iter()
                    .filter(|t| shared.hub.has_topic(t) != subscribed.contains(t))
                    .partition(|t| shared.hub.has_topic(t));
                let mut result = Ok(());
                if !add.is_empty() && shared.history_on() {
                    result = shared.snapshot_positions(&add).await;
                }
                if result.is_ok() && !add.is_empty() {
                    result = sink.run(Verb::Subscribe, add.iter().map(|t| shared.topic_channel(t)).collect()).await;
                    if result.is_ok() {
                        shared.confirmed.lock().extend(add.iter().cloned());
                        subscribed.extend(add);
                    }
                }
                if result.is_ok() && !remove.is_empty() {
                    // Not wanted any more, before Redis confirms: its
                    // confirmation must not look like a moved slot.
                    {
                        let mut confirmed = shared.confirmed.lock();
                        for t in &remove {
                            subscribed.remove(t);
                            confirmed.remove(t);
                            shared.forget_position(t);
                        }
                    }
                    result = sink.run(Verb::Unsubscribe, remove.iter().map(|t| shared.topic_channel(t)).collect()).await;
                }
                for r in reqs {
                    let _ = r.done.send(
                        result.clone().map_err(RelayError::Unavailable),
                    );
                }
                if let Err(e) = result {
                    return e;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_nodes_the_cluster_marks_failed_are_failed() {
        let listing = "\
a1 127.0.0.1:7000@17000 myself,master - 0 0 1 connected 0-5460
b2 127.0.0.1:7001@17001,redis-b master,fail - 1 2 2 connected 5461-10922
c3 127.0.0.1:7002@17002 master,fail? - 1 2 3 connected 10923-16383
d4 10.0.0.4:7003@17003 slave,fail b2 1 2 2 connected
";
        assert_eq!(
            failed_nodes(listing),
            vec![
                ("127.0.0.1".to_owned(), 7001),
                ("10.0.0.4".to_owned(), 7003)
            ]
        );
    }
}
