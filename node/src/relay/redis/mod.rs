//! Cluster mode: the relay over Redis pub/sub.
//!
//! ## Channels (all names start with the configured prefix, `fanout:` by default)
//! * `<prefix>t:<topic>`: one channel per base topic (the part of a
//!   subscription key before its first `?`). A node subscribes while it has
//!   at least one local subscriber of that topic, and only then.
//! * `<prefix>n:<node tag>`: one channel per node, for subscription requests
//!   forwarded to the node holding a client, and their replies.
//! * `<prefix>{nodes}` (a hash: node tag → its `/api/cluster` entry) and
//!   `<prefix>{nodes}:alive` (a sorted set: node tag → the Unix time in ms
//!   until which it counts as alive): the membership. Each node refreshes
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
//! A request forwarded to the node holding a client carries a deadline;
//! the owner drops it unapplied once the deadline has passed, and the
//! sender answers 503 when the owner does not answer in time. 404 is for a
//! node that is not a live member of the cluster.

mod envelope;
mod forwarding;
mod membership;
mod subscriber;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, SystemTime},
};

use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    client::CloseReason,
    error::ApiError,
    hub::Hub,
    metrics as m, protocol,
    relay::{Incoming, NodeInfo, Publication, Relay, RelayError, RelayHealth, SubscribeRequest},
};

use envelope::envelope;
use forwarding::node_channel;
use membership::run_heartbeat;
use subscriber::run_subscriber;

/// Settings of the Redis relay.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// Prefix of every channel and key.
    pub prefix: String,
    /// How long a forwarded request waits for the owner's answer.
    pub forward_timeout: Duration,
    /// How often the node refreshes its heartbeat (TTL: three times this).
    pub heartbeat_interval: Duration,
    /// The address this node serves on, as `/api/cluster` shows it.
    pub address: std::net::SocketAddr,
}

/// Bound on one Redis command; beyond it Redis counts as unreachable.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(3);
/// Channels per SUBSCRIBE command when re-subscribing everything.
const SUBSCRIBE_BATCH: usize = 1000;
/// Longest wait between reconnect attempts: a refused connection costs
/// little, and the node must be back as soon as Redis is.
const MAX_BACKOFF: Duration = Duration::from_millis(250);

struct SyncRequest {
    topics: Vec<Arc<str>>,
    done: oneshot::Sender<Result<(), RelayError>>,
}

struct Shared {
    hub: Hub,
    config: RedisConfig,
    client: redis::Client,
    commands: ConnectionManager,
    topic_prefix: String,
    node_channel: String,
    members_key: String,
    alive_key: String,
    control: mpsc::UnboundedSender<SyncRequest>,
    incoming: mpsc::Sender<Incoming>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<(), ApiError>>>>,
    next_request: AtomicU64,
    /// `Err(reason)` while the subscriber connection is down.
    subscriber: Mutex<Result<(), String>>,
    /// `Err(reason)` while commands (heartbeat, publish) fail.
    command_health: Mutex<Result<(), String>>,
    /// Base topics confirmed subscribed on the current connection.
    confirmed: Mutex<HashSet<Arc<str>>>,
    /// Cancelled to make the subscriber reconnect now.
    reconnect: Mutex<CancellationToken>,
    heartbeat: Mutex<Option<tokio::task::JoinHandle<()>>>,
    started_at: SystemTime,
    stop: CancellationToken,
}

/// The Redis relay. See the module documentation.
pub struct RedisRelay {
    shared: Arc<Shared>,
    incoming: Mutex<Option<mpsc::Receiver<Incoming>>>,
}

impl RedisRelay {
    /// Start the subscriber and heartbeat tasks. Returns at once: a node
    /// whose Redis is down starts unhealthy and connects when it can.
    pub fn start(hub: Hub, config: RedisConfig) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(config.url.as_str())?;
        let commands = ConnectionManager::new_lazy_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(1)))
                .set_response_timeout(Some(COMMAND_TIMEOUT))
                .set_number_of_retries(2)
                .set_max_delay(Duration::from_millis(500)),
        )?;
        let (control, control_rx) = mpsc::unbounded_channel();
        let (incoming_tx, incoming_rx) = mpsc::channel(1024);
        let tag = hub.node_tag().to_owned();
        let shared = Arc::new(Shared {
            topic_prefix: format!("{}t:", config.prefix),
            node_channel: node_channel(&config.prefix, &tag),
            members_key: format!("{}{{nodes}}", config.prefix),
            alive_key: format!("{}{{nodes}}:alive", config.prefix),
            hub,
            config,
            client,
            commands,
            control,
            incoming: incoming_tx,
            pending: Mutex::new(HashMap::new()),
            next_request: AtomicU64::new(1),
            subscriber: Mutex::new(Err("connecting to Redis".into())),
            command_health: Mutex::new(Ok(())),
            confirmed: Mutex::new(HashSet::new()),
            reconnect: Mutex::new(CancellationToken::new()),
            heartbeat: Mutex::new(None),
            started_at: SystemTime::now(),
            stop: CancellationToken::new(),
        });
        shared.report_health();
        tokio::spawn(run_subscriber(shared.clone(), control_rx));
        *shared.heartbeat.lock() = Some(tokio::spawn(run_heartbeat(shared.clone())));
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
    fn topic_channel(&self, base: &str) -> String {
        format!("{}{base}", self.topic_prefix)
    }

    fn node_channel_of(&self, tag: &str) -> String {
        node_channel(&self.config.prefix, tag)
    }

    fn set_subscriber(&self, state: Result<(), String>) {
        *self.subscriber.lock() = state;
        self.report_health();
    }

    fn set_commands(&self, state: Result<(), String>) {
        let changed = {
            let mut h = self.command_health.lock();
            let changed = h.is_ok() != state.is_ok();
            *h = state;
            changed
        };
        if changed {
            self.report_health();
        }
    }

    fn health(&self) -> RelayHealth {
        let sub = self.subscriber.lock().clone();
        let cmd = self.command_health.lock().clone();
        let reason = match (sub, cmd) {
            (Ok(()), Ok(())) => None,
            (Err(e), _) | (_, Err(e)) => Some(e),
        };
        RelayHealth {
            kind: "redis",
            healthy: reason.is_none(),
            reason,
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
        match tokio::time::timeout(COMMAND_TIMEOUT, f).await {
            Ok(Ok(v)) => {
                self.set_commands(Ok(()));
                Ok(v)
            }
            Ok(Err(e)) => {
                let reason = format!("Redis {what} failed: {e}");
                self.set_commands(Err(reason.clone()));
                Err(RelayError::Unavailable(reason))
            }
            Err(_) => {
                let reason = format!("Redis {what} timed out");
                self.set_commands(Err(reason.clone()));
                Err(RelayError::Unavailable(reason))
            }
        }
    }

    /// After a PUBLISH: a topic this node has confirmed subscribed that
    /// reached nobody shows the subscriber connection is gone. Its local
    /// subscribers missed the message: close their streams (they
    /// reconnect), count it, and reconnect the subscriber.
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
            let closed = self.hub.close_topic(topic, CloseReason::Gap);
            metrics::counter!(m::RELAY_LOST_PUBLISHES).increment(1);
            tracing::warn!(
                topic,
                closed,
                "a publish reached no subscriber of this node; its local subscribers were disconnected"
            );
        }
        self.reconnect.lock().cancel();
    }
}

impl Relay for RedisRelay {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>> {
        Box::pin(async move {
            let s = &self.shared;
            // Only a node that would itself receive what it publishes may
            // acknowledge it: with the subscriber down, its own clients
            // would miss the message.
            if let Some(reason) = s.subscriber.lock().clone().err() {
                return Err(RelayError::Unavailable(reason));
            }
            let mut conn = s.commands.clone();
            // One round trip; Redis runs the pipeline in order.
            let mut pipe = redis::pipe();
            for p in &batch {
                pipe.publish(s.topic_channel(protocol::base_topic(&p.topic)), envelope(p));
            }
            let receivers: Vec<i64> = s.command("PUBLISH", pipe.query_async(&mut conn)).await?;
            s.check_receivers(&batch, &receivers);
            Ok(())
        })
    }

    fn sync_topics(&self, topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>> {
        let (done, rx) = oneshot::channel();
        let sent = self.shared.control.send(SyncRequest { topics, done });
        Box::pin(async move {
            sent.map_err(|_| RelayError::Unavailable("relay stopped".into()))?;
            rx.await
                .unwrap_or_else(|_| Err(RelayError::Unavailable("relay stopped".into())))
        })
    }

    fn forward(
        &self,
        node: &str,
        request: SubscribeRequest,
    ) -> BoxFuture<'_, Result<Result<(), ApiError>, RelayError>> {
        Box::pin(self.shared.forward(node.to_owned(), request))
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
