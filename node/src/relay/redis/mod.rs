//! Cluster mode: the relay over Redis pub/sub.
//!
//! The same code serves a standalone Redis and a Redis Cluster
//! (`topology.rs` says which one `--redis-url` names).
//!
//! ## Channels (all names start with the configured prefix, `fanout:` by default)
//! * `<prefix>t:<topic>`: one channel per base topic (the part of a
//!   subscription key before its first `?`). A node subscribes while it has
//!   at least one local subscriber of that topic, and only then.
//! * `<prefix>n:<node tag>`: one channel per node, for subscription requests
//!   forwarded to the node holding a client, and their replies.
//! * On a Redis Cluster, both are sharded channels (`SPUBLISH` and
//!   `SSUBSCRIBE`) grouped into `--redis-partitions` partitions by a hash
//!   tag: `<prefix>{p<k>}:t:<topic>` and `<prefix>{p<k>}:n:<node tag>`, with
//!   `k` the partition of the topic or node tag ([`partition_of`]: FNV-1a,
//!   32 bits, of its bytes, modulo the partition count). A history key for a
//!   topic can share the tag. Each partition also has a service channel,
//!   `<prefix>{p<k>}:svc`, so a node notices when the partition's slot moves
//!   even if it has no topic there.
//! * `<prefix>{nodes}` (a hash: node tag → its `/api/cluster` entry) and
//!   `<prefix>{nodes}:alive` (a sorted set: node tag → the Unix time in ms,
//!   on Redis's clock, until which it counts as alive): the membership. Each node refreshes
//!   both every heartbeat interval, for three intervals, and removes the
//!   entries of nodes past their time. `/api/cluster` reads them directly
//!   (no keyspace scan); both keys share one hash tag, so they live in one
//!   slot on a Redis Cluster too.
//!
//! ## Envelope on a topic channel
//! The same JSON as one message of `POST /api/publish`:
//! `{"topic":"news","data":<any JSON>}`, optionally with `"clientId"` or
//! `"userId"`. `topic` may be left out, and then it is the channel's topic.
//! So any backend can `PUBLISH fanout:t:news '{"data":{"a":1}}'` without
//! going through HTTP. Each node decodes a message once; `data` is never
//! parsed into a tree, only delimited (`RawValue`).
//!
//! ## Order
//! A node does not deliver its own publishes directly. It publishes to
//! Redis and delivers what comes back on its subscriber connection, like
//! every other node. Redis orders all messages of a channel, and each node
//! dispatches them from one task in that order, so every subscriber of a
//! topic, on every node, sees the same order.
//!
//! ## Failures
//! The subscriber connection is owned by one task. When Redis closes it
//! (restart, `CLIENT KILL`, the `client-output-buffer-limit` of a slow
//! node) or a PING goes unanswered, the task reconnects with backoff and
//! re-subscribes every topic the hub needs at that moment. Redis may come
//! back empty; the hub is the source of truth. While the subscriber is
//! down the relay reports unhealthy, publishes fail (503), and subscription
//! requests that need a new channel fail (503) instead of being acknowledged
//! without a subscription behind them. Reconnecting retries every few
//! hundred milliseconds at most, so the node is back as soon as Redis is.
//!
//! Health follows the publish path (`probe.rs`): a partition is healthy
//! while its link is up and its last publish or probe publish succeeded.
//! A publish is refused (503) only when a partition it touches is down, so
//! a cluster shard lost for good refuses its own topics only.
//!
//! A PUBLISH that Redis reports as received by nobody, for a topic this node
//! has confirmed subscribed, shows the subscriber connection is gone before
//! the node noticed. The node's subscribers of that topic would miss the
//! message: their streams are closed (they reconnect and re-fetch, as after
//! any gap), the loss is counted, and the subscriber reconnects.
//!
//! ## Acknowledgements
//! A subscription request is answered only once every base topic of the
//! client's new set is confirmed subscribed on Redis, whichever request
//! started the SUBSCRIBE: the subscriber task serves requests one at a
//! time, in order, so a request that needs a topic another request is
//! subscribing is answered after that SUBSCRIBE returned.
//!
//! A request forwarded to the node holding a client carries a deadline on
//! Redis's clock (`clock.rs`); the owner drops it unapplied once the
//! deadline has passed, and the sender answers 503 when the owner does not
//! answer in time. A `SET NX` on `<prefix>fw:<sender tag>:<id>` (with the
//! sender channel's hash tag on a cluster) settles a change whose answer
//! is late (`forwarding.rs`). 404 is for a node that is not a live member
//! of the cluster.

mod clock;
mod envelope;
mod forwarding;
mod history;
mod membership;
mod probe;
mod subscriber;
mod topology;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, OnceLock, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use futures_util::future::{BoxFuture, join_all};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    client::CloseReason,
    error::ApiError,
    hub::Hub,
    metrics as m, protocol,
    relay::{
        Forwarded, Incoming, NodeInfo, Publication, Relay, RelayError, RelayHealth, ShardHealth,
    },
};

use envelope::envelope;
use topology::{Backend, Commands, Target};

/// Settings of the Redis relay.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/0]` (another database is
    /// refused: pub/sub ignores it, see `topology.rs`) or
    /// `redis+cluster://[user:password@]h1:p1,h2:p2,...`.
    pub url: String,
    /// Prefix of every channel and key.
    pub prefix: String,
    /// Partitions of the channels on a Redis Cluster.
    pub partitions: u16,
    /// How long a forwarded request waits for the owner's answer.
    pub forward_timeout: Duration,
    /// How often the node refreshes its heartbeat (TTL: three times this).
    pub heartbeat_interval: Duration,
    /// The address this node serves on, as `/api/cluster` shows it.
    pub address: std::net::SocketAddr,
    /// Messages kept per topic for catch-up; 0: plain pub/sub, no offsets.
    pub history_size: u64,
    /// How long a topic's history lives after its last publish.
    pub history_ttl: Duration,
    /// Close a topic's local streams when a gap cannot be filled.
    pub close_on_gap: bool,
}

/// Bound on one Redis command; beyond it Redis counts as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// How long the cluster must have had no live primary for a partition
/// before the node counts it as lost by the cluster and reports itself
/// healthy with that partition degraded (see `Shared::health`): longer
/// than a failover takes with the usual `cluster-node-timeout`.
const LOST_AFTER: Duration = Duration::from_secs(10);
/// Channels per SUBSCRIBE command when re-subscribing everything.
const SUBSCRIBE_BATCH: usize = 1000;
/// Longest wait between reconnect attempts: a refused connection costs
/// little, and the node must be back as soon as Redis is.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// The partition of a topic or node tag on a Redis Cluster: FNV-1a (32
/// bits) of its bytes, modulo the partition count. Stable across versions
/// and nodes, since every node must agree on it.
pub fn partition_of(name: &str, partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in name.as_bytes() {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

struct SyncRequest {
    topics: Vec<Arc<str>>,
    done: oneshot::Sender<Result<(), RelayError>>,
}

/// The end of a resume's replay: the replay pushed its key the topic's
/// messages up to offset `after`; the link's dispatcher, between two live
/// messages, releases the key if that is where this node's position is
/// (`done` gets true), so live delivery continues exactly after it.
struct ReplayRequest {
    client: Arc<crate::client::Client>,
    key: protocol::SubKey,
    after: u64,
    /// Release even if the node's position is below `after` (it never
    /// reached the cursor: the history moved back).
    force: bool,
    done: oneshot::Sender<bool>,
}

/// One subscriber link (the only one standalone; one per partition on a
/// cluster).
struct Link {
    replays: mpsc::UnboundedSender<ReplayRequest>,
    /// Taken by each connection's dispatcher for its life.
    replay_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<ReplayRequest>>>,
    /// `Err(reason)` while it is down.
    state: Mutex<Result<(), String>>,
    /// `Err(reason)` while publishes of this partition fail: the last
    /// publish's or probe's outcome (`probe.rs`).
    publish: Mutex<Result<(), String>>,
    /// Since when the cluster itself has had no live primary for this
    /// partition (its owner is marked failed): every node sees the same.
    orphaned: Mutex<Option<std::time::Instant>>,
    /// The Redis node it is connected to (cluster).
    primary: Mutex<Option<String>>,
    /// Cancelled to make the link reconnect now.
    reconnect: Mutex<CancellationToken>,
    /// Messages received on this link (resolved once: it counts every
    /// message).
    messages_in: metrics::Counter,
    /// What this link's topic channels start with, and this node's own
    /// channel: known once Redis was reached, then fixed.
    names: OnceLock<(String, String)>,
}

struct Shared {
    hub: Hub,
    config: RedisConfig,
    target: Target,
    /// Set once Redis has been reached and its kind is known.
    backend: OnceLock<Backend>,
    controls: Vec<mpsc::UnboundedSender<SyncRequest>>,
    links: Vec<Link>,
    members_key: String,
    alive_key: String,
    incoming: mpsc::Sender<Incoming>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<(), ApiError>>>>,
    next_request: AtomicU64,
    /// `Err(reason)` while commands (heartbeat, publish) fail.
    command_health: Mutex<Result<(), String>>,
    /// `Err(reason)` while the history reads connection does not answer
    /// (`history::run_reads_check`).
    reads_health: Mutex<Result<(), String>>,
    /// A command timed out: the heartbeat replaces the connections (see
    /// `Backend::renew`).
    stalled: std::sync::atomic::AtomicBool,
    /// Base topics confirmed subscribed on the current connections.
    confirmed: Mutex<HashSet<Arc<str>>>,
    /// The history position this node last dispatched, per topic.
    positions: Mutex<HashMap<Arc<str>, history::Position>>,
    /// Replay page reads at once ([`history::REPLAY_READS`]): resumes
    /// read on the history reads connection, never on the publish or
    /// subscriber ones, and this many at a time.
    replay_reads: tokio::sync::Semaphore,
    /// Cluster nodes to ask where a partition lives: the seeds, then every
    /// node the last `CLUSTER SLOTS` named (refreshed every heartbeat,
    /// `probe.rs`; bounded by the cluster's size).
    known_nodes: Mutex<Vec<(String, u16)>>,
    /// Since when the cluster has had no live primary for the membership
    /// keys' slot (`probe.rs`).
    membership_orphaned: Mutex<Option<std::time::Instant>>,
    /// The probe topic of each partition (`probe.rs`).
    probe_topics: OnceLock<Vec<String>>,
    /// Commands Fanout needs that the Redis user may not run, with
    /// Redis's reason (`ACL DRYRUN`, checked at start).
    missing_permissions: Mutex<Vec<String>>,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Redis's clock, the one every cross-node decision uses.
    clock: clock::RedisClock,
    started_at: SystemTime,
    stop: CancellationToken,
}

/// The Redis relay. See the module documentation.
pub struct RedisRelay {
    shared: Arc<Shared>,
    incoming: Mutex<Option<mpsc::Receiver<Incoming>>>,
}

impl RedisRelay {
    /// Start connecting. Returns at once: a node whose Redis is down starts
    /// unhealthy and connects when it can. Fails only for a URL that names
    /// no usable topology.
    pub fn start(hub: Hub, config: RedisConfig) -> anyhow::Result<Arc<Self>> {
        // TLS (`rediss://`) uses rustls with ring; a provider installed
        // earlier by an embedding application is kept.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let target = Target::parse(&config.url)?;
        let links = config.partitions.max(1) as usize;
        let (controls, control_rxs): (Vec<_>, Vec<_>) =
            (0..links).map(|_| mpsc::unbounded_channel()).unzip();
        let (incoming_tx, incoming_rx) = mpsc::channel(1024);
        let shared = Arc::new(Shared {
            members_key: format!("{}{{nodes}}", config.prefix),
            alive_key: format!("{}{{nodes}}:alive", config.prefix),
            hub,
            config,
            target: target.clone(),
            backend: OnceLock::new(),
            controls,
            links: (0..links)
                .map(|k| {
                    let (replays, rx) = mpsc::unbounded_channel();
                    Link {
                        replays,
                        replay_rx: Arc::new(tokio::sync::Mutex::new(rx)),
                        state: Mutex::new(Err("connecting to Redis".into())),
                        publish: Mutex::new(Ok(())),
                        orphaned: Mutex::new(None),
                        primary: Mutex::new(None),
                        reconnect: Mutex::new(CancellationToken::new()),
                        messages_in: metrics::counter!(
                            m::RELAY_MESSAGES_IN,
                            "partition" => k.to_string()
                        ),
                        names: OnceLock::new(),
                    }
                })
                .collect(),
            incoming: incoming_tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            command_health: Mutex::new(Ok(())),
            reads_health: Mutex::new(Ok(())),
            stalled: Default::default(),
            confirmed: Mutex::new(HashSet::new()),
            positions: Mutex::new(HashMap::new()),
            replay_reads: tokio::sync::Semaphore::new(history::REPLAY_READS),
            known_nodes: Mutex::new(target.addresses()),
            probe_topics: OnceLock::new(),
            membership_orphaned: Mutex::new(None),
            missing_permissions: Mutex::new(Vec::new()),
            heartbeat: Mutex::new(None),
            clock: clock::RedisClock::new(),
            started_at: SystemTime::now(),
            stop: CancellationToken::new(),
        });
        shared.report_health();
        tokio::spawn(subscriber::run(shared.clone(), control_rxs));
        Ok(Arc::new(Self {
            shared,
            incoming: Mutex::new(Some(incoming_rx)),
        }))
    }
}

impl Drop for RedisRelay {
    fn drop(&mut self) {
        self.shared.stop.cancel();
    }
}

impl Shared {
    /// The command connection, once Redis has been reached.
    fn commands(&self) -> Result<Commands, RelayError> {
        self.backend
            .get()
            .map(Backend::commands)
            .ok_or_else(|| RelayError::Unavailable("connecting to Redis".into()))
    }

    /// The connection for bulk history reads (catch-up, replay), apart
    /// from the one publishes use.
    fn reads(&self) -> Result<Commands, RelayError> {
        self.backend
            .get()
            .map(Backend::reads)
            .ok_or_else(|| RelayError::Unavailable("connecting to Redis".into()))
    }

    fn partitions(&self) -> Option<u16> {
        self.backend.get().and_then(Backend::partitions)
    }

    /// The link that carries the channel of `name` (a topic or node tag).
    fn link_of(&self, name: &str) -> usize {
        self.partitions()
            .map_or(0, |n| partition_of(name, n) as usize)
    }

    /// A key with partition `k`'s hash tag.
    fn partition_tag(&self, k: usize) -> String {
        format!("{}{{p{k}}}", self.config.prefix)
    }

    /// What every topic channel of link `k` starts with.
    fn topic_prefix(&self, k: usize) -> String {
        match self.partitions() {
            Some(_) => format!("{}:t:", self.partition_tag(k)),
            None => format!("{}t:", self.config.prefix),
        }
    }

    fn topic_channel(&self, base: &str) -> String {
        format!("{}{base}", self.topic_prefix(self.link_of(base)))
    }

    fn node_channel_of(&self, tag: &str) -> String {
        match self.partitions() {
            Some(_) => format!("{}:n:{tag}", self.partition_tag(self.link_of(tag))),
            None => format!("{}n:{tag}", self.config.prefix),
        }
    }

    /// The channels link `k` always listens on: this node's own channel
    /// (on its link), and the partition's service channel (cluster).
    fn fixed_channels(&self, k: usize) -> Vec<String> {
        let tag = self.hub.node_tag();
        let mut v = Vec::new();
        if self.link_of(tag) == k {
            v.push(self.node_channel_of(tag));
        }
        if self.partitions().is_some() {
            v.push(format!("{}:svc", self.partition_tag(k)));
        }
        v
    }

    /// `PUBLISH`, or `SPUBLISH` on a cluster.
    fn publish_cmd(&self, channel: String, payload: Vec<u8>) -> redis::Cmd {
        let verb = if self.partitions().is_some() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let mut c = redis::cmd(verb);
        c.arg(channel).arg(payload);
        c
    }

    /// What arrived on link `k`.
    async fn on_message(self: &Arc<Self>, k: usize, channel: &str, payload: &[u8]) {
        let link = &self.links[k];
        link.messages_in.increment(1);
        let (topic_prefix, own_channel) = link.names.get_or_init(|| {
            (
                self.topic_prefix(k),
                self.node_channel_of(self.hub.node_tag()),
            )
        });
        if let Some(base) = channel.strip_prefix(topic_prefix.as_str()) {
            self.deliver(base, payload).await;
        } else if channel == own_channel {
            self.on_node_message(payload);
        }
    }

    /// Forget what link `k` had confirmed (it lost its connection).
    fn unconfirm(&self, k: usize) {
        self.confirmed.lock().retain(|t| self.link_of(t) != k);
    }

    fn set_link(&self, k: usize, state: Result<(), String>) {
        *self.links[k].state.lock() = state;
        self.report_health();
    }

    /// The links in use (all until Redis has been reached).
    fn active_links(&self) -> &[Link] {
        match self.partitions() {
            Some(n) => &self.links[..n as usize],
            None => &self.links[..1],
        }
    }

    /// `Err(reason)` while any link is down.
    fn subscriber_health(&self) -> Result<(), String> {
        for (k, link) in self.active_links().iter().enumerate() {
            if let Err(e) = &*link.state.lock() {
                return Err(self.in_partition(k, e));
            }
        }
        Ok(())
    }

    /// `reason`, prefixed with the partition on a cluster.
    fn in_partition(&self, k: usize, reason: &str) -> String {
        match self.partitions() {
            Some(_) => format!("partition {k}: {reason}"),
            None => reason.to_owned(),
        }
    }

    /// `Err(reason)` while partition `k` cannot carry a publish: its
    /// subscriber link is down, or its last publish or probe failed.
    fn partition_health(&self, k: usize) -> Result<(), String> {
        let link = &self.links[k];
        link.state.lock().clone()?;
        link.publish.lock().clone()
    }

    /// Record the outcome of a publish (or probe) of partition `k`.
    fn set_publish(&self, k: usize, state: Result<(), String>) {
        let changed = {
            let mut p = self.links[k].publish.lock();
            let changed = p.is_ok() != state.is_ok();
            *p = state;
            changed
        };
        if changed {
            self.report_health();
        }
    }

    fn set_commands(&self, state: Result<(), String>) {
        self.set_health(&self.command_health, state);
    }

    fn set_reads(&self, state: Result<(), String>) {
        self.set_health(&self.reads_health, state);
    }

    fn set_health(&self, slot: &Mutex<Result<(), String>>, state: Result<(), String>) {
        let changed = {
            let mut h = slot.lock();
            let changed = h.is_ok() != state.is_ok();
            *h = state;
            changed
        };
        if changed {
            self.report_health();
        }
    }

    /// The relay's health. Each partition is healthy while it can carry a
    /// publish ([`Shared::partition_health`]). The node is unhealthy when
    /// any partition is down for a reason of its own (its connection, its
    /// publishes, its permissions), or when every partition is down; it
    /// stays healthy, listing the partitions in `degraded`, when the only
    /// partitions down are ones the cluster itself lost (their primary is
    /// marked failed and no replica took over for [`LOST_AFTER`]): every
    /// node is in the same state then, and a load balancer that took them
    /// all out would turn a partial outage into a total one. Publishes and
    /// subscriptions of those partitions answer 503, the others work. The
    /// same for the slot of the membership keys: lost by the cluster for
    /// `LOST_AFTER`, the heartbeat's failures no longer make the node
    /// unhealthy, and `membership_lost` says why.
    /// During an ordinary failover (shorter than `LOST_AFTER`) the node is
    /// unhealthy, as for any other outage.
    fn health(&self) -> RelayHealth {
        let links = self.active_links();
        let down: Vec<(usize, String)> = (0..links.len())
            .filter_map(|k| self.partition_health(k).err().map(|e| (k, e)))
            .collect();
        let partitions_reason = if !down.is_empty() && down.len() == links.len() {
            Some(self.in_partition(down[0].0, &down[0].1))
        } else {
            down.iter()
                .find(|(k, _)| {
                    !self.links[*k]
                        .orphaned
                        .lock()
                        .is_some_and(|since| since.elapsed() >= LOST_AFTER)
                })
                .map(|(k, e)| self.in_partition(*k, e))
        };
        // The membership keys' shard lost by the cluster: the heartbeat's
        // failures are every node's, like a lost partition's.
        let membership_lost = self
            .membership_orphaned
            .lock()
            .is_some_and(|since| since.elapsed() >= LOST_AFTER)
            .then(|| {
                "the cluster has no live primary for the membership keys: forwarded subscription requests and /api/cluster answer 503".to_owned()
            });
        let cmd = match &membership_lost {
            Some(_) => Ok(()),
            // Forwarding and request order need Redis's clock.
            None => self
                .command_health
                .lock()
                .clone()
                .and_then(|()| match self.clock.now() {
                    Some(_) => Ok(()),
                    None => Err("Redis's clock has not been read yet".to_owned()),
                }),
        };
        let reads = self.reads_health.lock().clone();
        let missing = self.missing_permissions.lock().clone();
        let reason = partitions_reason.or(cmd.err()).or(reads.err()).or_else(|| {
            (!missing.is_empty())
                .then(|| format!("the Redis user may not run: {}", missing.join("; ")))
        });
        let shards = match self.partitions() {
            Some(_) => links
                .iter()
                .enumerate()
                .map(|(k, l)| {
                    let state = self.partition_health(k);
                    ShardHealth {
                        partition: k as u16,
                        primary: l.primary.lock().clone(),
                        healthy: state.is_ok(),
                        reason: state.err(),
                    }
                })
                .collect(),
            None => Vec::new(),
        };
        RelayHealth {
            kind: "redis",
            mode: match self.backend.get() {
                None => Some("connecting"),
                Some(Backend::Standalone { .. }) => Some("standalone"),
                Some(Backend::Cluster { .. }) => Some("cluster"),
            },
            healthy: reason.is_none(),
            reason,
            membership_lost,
            degraded: match self.partitions() {
                Some(_) => down.iter().map(|(k, _)| *k as u16).collect(),
                None => Vec::new(),
            },
            shards,
        }
    }

    fn report_health(&self) {
        let up = self.health().healthy;
        metrics::gauge!(m::RELAY_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// A command on the shared connection, bounded in time; failures mark
    /// the relay unhealthy until the next success.
    async fn command<T, F>(&self, what: &str, f: F) -> Result<T, RelayError>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let result = self.bounded(what, f).await;
        self.set_commands(result.as_ref().map(|_| ()).map_err(Clone::clone));
        result.map_err(RelayError::Unavailable)
    }

    /// A Redis call bounded by `COMMAND_TIMEOUT`; `Err` names what failed.
    /// A timeout marks the connections stalled, for the heartbeat to renew.
    async fn bounded<T, F>(&self, what: &str, f: F) -> Result<T, String>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let stalled = || {
            self.stalled
                .store(true, std::sync::atomic::Ordering::Relaxed)
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if e.is_timeout() {
                    stalled();
                }
                Err(format!("Redis {what} failed: {e}"))
            }
            Err(_) => {
                stalled();
                Err(format!("Redis {what} timed out"))
            }
        }
    }

    /// After a PUBLISH: a topic this node has confirmed subscribed that
    /// reached nobody shows the subscriber connection is gone. Reconnect
    /// the subscriber and count it; with history, the reconnect catches
    /// up; without, the local subscribers missed the message, so their
    /// streams are closed (they reconnect and re-fetch).
    fn check_receivers(&self, batch: &[Publication], receivers: &[i64]) {
        let lost: HashSet<&str> = {
            let confirmed = self.confirmed.lock();
            batch
                .iter()
                .zip(receivers)
                .filter(|(_, n)| **n == 0)
                .map(|(p, _)| protocol::base_topic(&p.topic))
                .filter(|t| confirmed.contains(*t))
                .collect()
        };
        if lost.is_empty() {
            return;
        }
        for topic in &lost {
            self.links[self.link_of(topic)].reconnect.lock().cancel();
            metrics::counter!(m::RELAY_LOST_PUBLISHES).increment(1);
            if self.history_on() {
                // The message is in the topic's history: the reconnect
                // catches the node up, nobody misses it.
                tracing::info!(
                    topic,
                    "a publish reached no subscriber of this node; reconnecting to catch up"
                );
                continue;
            }
            let closed = self.hub.close_topic(topic, CloseReason::Gap);
            tracing::warn!(
                topic,
                closed,
                "a publish reached no subscriber of this node; its local subscribers were disconnected"
            );
        }
    }

    /// A publish command, bounded by `COMMAND_TIMEOUT`, like
    /// [`Self::command`], but a timeout is told apart: a command that was
    /// sent and not answered in time may still run (Redis stalled, not
    /// gone), so its outcome is unknown.
    async fn publish_command<T, F>(&self, f: F) -> Result<T, Sent>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let (reason, unknown) = match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(Ok(v)) => {
                self.set_commands(Ok(()));
                return Ok(v);
            }
            Ok(Err(e)) => (format!("Redis PUBLISH failed: {e}"), e.is_timeout()),
            Err(_) => ("Redis PUBLISH timed out".to_owned(), true),
        };
        if unknown {
            // For the heartbeat to renew the connections.
            self.stalled
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        self.set_commands(Err(reason.clone()));
        Err(if unknown {
            Sent::Unknown(reason)
        } else {
            Sent::Not(reason)
        })
    }

    /// Publish a batch and return each message's outcome: one pipeline on
    /// a standalone Redis. On a cluster, one pipeline per primary involved
    /// (the primary each partition's link is connected to), all sent
    /// concurrently; a message that primary refuses (its slot just moved)
    /// is sent again through the cluster connection, which follows
    /// `MOVED`.
    async fn publish_batch(&self, batch: &[Publication]) -> Result<Vec<Outcome>, RelayError> {
        let conn = self.commands()?;
        let cluster = self.partitions().is_some();
        let mut groups: HashMap<Option<String>, Vec<usize>> = HashMap::new();
        for (i, p) in batch.iter().enumerate() {
            let primary = if cluster {
                let k = self.link_of(protocol::base_topic(&p.topic));
                self.links[k].primary.lock().clone()
            } else {
                None
            };
            groups.entry(primary).or_default().push(i);
        }
        let command = |i: usize| {
            let p = &batch[i];
            let base = protocol::base_topic(&p.topic);
            if self.history_on() {
                self.history_cmd(base, envelope(p), p.id.as_deref())
            } else {
                self.publish_cmd(self.topic_channel(base), envelope(p))
            }
        };
        let runs = groups.into_iter().map(|(primary, idx)| {
            let mut conn = conn.clone();
            async move {
                let parts: HashSet<usize> = idx
                    .iter()
                    .map(|&i| self.link_of(protocol::base_topic(&batch[i].topic)))
                    .collect();
                let mut pipe = redis::pipe();
                for &i in &idx {
                    pipe.add_command(command(i));
                }
                let values: Result<Vec<redis::Value>, Sent> =
                    match (&mut conn, primary.as_deref().and_then(topology::route_to)) {
                        (Commands::Cluster(c), Some(route)) => {
                            self.publish_command(c.route_pipeline(pipe, 0, idx.len(), route))
                                .await
                        }
                        _ => self.publish_command(pipe.query_async(&mut conn)).await,
                    };
                let values = match values {
                    Ok(v) => v,
                    Err(sent) => {
                        // Each partition's health follows its publishes.
                        let (Sent::Not(r) | Sent::Unknown(r)) = &sent;
                        for &k in &parts {
                            self.set_publish(k, Err(r.clone()));
                        }
                        return idx
                            .into_iter()
                            .map(|i| (i, Outcome::Failed(sent.clone())))
                            .collect::<Vec<_>>();
                    }
                };
                let mut outcomes = Vec::with_capacity(idx.len());
                for (&i, v) in idx.iter().zip(values) {
                    outcomes.push(match history::script_receivers(&v) {
                        Some(n) => (i, Outcome::Published(n)),
                        // Refused by that node (moved): through the
                        // cluster connection's own routing.
                        None => match self
                            .publish_command(command(i).query_async::<redis::Value>(&mut conn))
                            .await
                        {
                            Ok(v) => (
                                i,
                                Outcome::Published(history::script_receivers(&v).unwrap_or(0)),
                            ),
                            Err(sent) => (i, Outcome::Failed(sent)),
                        },
                    });
                }
                for &k in &parts {
                    let failed = outcomes.iter().find_map(|(i, o)| match o {
                        Outcome::Failed(Sent::Not(r) | Sent::Unknown(r))
                            if self.link_of(protocol::base_topic(&batch[*i].topic)) == k =>
                        {
                            Some(r.clone())
                        }
                        _ => None,
                    });
                    self.set_publish(k, failed.map_or(Ok(()), Err));
                }
                outcomes
            }
        });
        let mut outcomes = vec![Outcome::Published(0); batch.len()];
        for run in join_all(runs).await {
            for (i, o) in run {
                outcomes[i] = o;
            }
        }
        Ok(outcomes)
    }
}

/// Whether a failed publish command may have run.
#[derive(Debug, Clone)]
enum Sent {
    /// Refused, or never sent: it did not run.
    Not(String),
    /// Sent and not answered in time: it may run yet.
    Unknown(String),
}

/// What became of one message of a batch.
#[derive(Debug, Clone)]
enum Outcome {
    /// Published: the receiver count Redis reported (-1: a retry of a
    /// message the history already holds, not published again).
    Published(i64),
    Failed(Sent),
}

impl Relay for RedisRelay {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>> {
        Box::pin(async move {
            let s = &self.shared;
            // Only a node that would itself receive what it publishes may
            // acknowledge it: with the subscriber link of a message's
            // partition down, its own clients would miss the message. The
            // whole batch is refused before anything is sent; partitions
            // not in the batch do not matter.
            let involved: HashSet<usize> = batch
                .iter()
                .map(|p| s.link_of(protocol::base_topic(&p.topic)))
                .collect();
            for k in involved {
                if let Err(reason) = &*s.links[k].state.lock() {
                    return Err(RelayError::Unavailable(s.in_partition(k, reason)));
                }
            }
            let outcomes = s.publish_batch(&batch).await?;
            let (mut published, mut unknown, mut not_published) = (vec![], vec![], vec![]);
            let mut receivers = Vec::with_capacity(batch.len());
            let mut reason = None;
            for (i, o) in outcomes.into_iter().enumerate() {
                match o {
                    Outcome::Published(n) => {
                        published.push(i);
                        receivers.push(n);
                    }
                    Outcome::Failed(sent) => {
                        receivers.push(-1);
                        let (Sent::Not(r) | Sent::Unknown(r)) = &sent;
                        reason.get_or_insert_with(|| r.clone());
                        match sent {
                            Sent::Not(_) => not_published.push(i),
                            Sent::Unknown(_) => unknown.push(i),
                        }
                    }
                }
            }
            s.check_receivers(&batch, &receivers);
            match reason {
                None => Ok(()),
                // Nothing went out: try again, nothing changed.
                Some(r) if published.is_empty() && unknown.is_empty() => {
                    Err(RelayError::Unavailable(r))
                }
                Some(reason) => Err(RelayError::Incomplete {
                    reason,
                    published,
                    unknown,
                    not_published,
                }),
            }
        })
    }

    fn sync_topics(&self, topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>> {
        let s = &self.shared;
        let mut by_link: HashMap<usize, Vec<Arc<str>>> = HashMap::new();
        for t in topics {
            by_link.entry(s.link_of(&t)).or_default().push(t);
        }
        let waits: Vec<_> = by_link
            .into_iter()
            .map(|(k, topics)| {
                let (done, rx) = oneshot::channel();
                let sent = s.controls[k].send(SyncRequest { topics, done });
                (sent, rx)
            })
            .collect();
        Box::pin(async move {
            for (sent, rx) in waits {
                sent.map_err(|_| RelayError::Unavailable("relay stopped".into()))?;
                rx.await
                    .unwrap_or_else(|_| Err(RelayError::Unavailable("relay stopped".into())))?;
            }
            Ok(())
        })
    }

    fn forward(
        &self,
        node: &str,
        request: Forwarded,
    ) -> BoxFuture<'_, Result<Result<(), ApiError>, RelayError>> {
        Box::pin(self.shared.forward(node.to_owned(), request))
    }

    fn replay(
        &self,
        client: Arc<crate::client::Client>,
        key: protocol::SubKey,
        since: String,
    ) -> BoxFuture<
        '_,
        Result<Result<crate::relay::PendingReplay, crate::error::ApiError>, RelayError>,
    > {
        Box::pin(Shared::prepare_replay(
            self.shared.clone(),
            client,
            key,
            since,
        ))
    }

    fn stamp(&self) -> Option<u64> {
        self.shared.clock.stamp()
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        self.incoming.lock().take()
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RelayError>> {
        Box::pin(self.shared.nodes())
    }

    fn health(&self) -> RelayHealth {
        self.shared.health()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.shared.leave())
    }
}
