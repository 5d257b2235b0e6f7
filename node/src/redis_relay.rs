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

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures_util::{StreamExt, future::BoxFuture};
use parking_lot::Mutex;
use redis::{
    AsyncCommands,
    aio::{ConnectionManager, ConnectionManagerConfig, PubSubSink, PubSubStream},
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::{SubscribeRequest, missing_client},
    client::CloseReason,
    error::ApiError,
    hub::{Audience, Hub},
    metrics as m, protocol,
    relay::{Incoming, NodeInfo, Publication, Relay, RelayError, RelayHealth},
};

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

/// Messages on a node channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum NodeMessage {
    Subscribe {
        id: u64,
        from: String,
        /// Unix time (ms) after which the sender has given up: the owner
        /// must not apply the request any more.
        deadline: u64,
        request: SubscribeRequest,
    },
    Reply {
        id: u64,
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorBody>,
    },
}

/// An [`ApiError`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    message: String,
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
}

/// A topic-channel envelope, as decoded.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(default, borrow)]
    topic: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, rename = "clientId")]
    client_id: Option<String>,
    #[serde(default, rename = "userId")]
    user_id: Option<String>,
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

    /// Whether the node with tag `tag` is a live member of the cluster.
    async fn is_alive(&self, tag: &str) -> Result<bool, RelayError> {
        let mut conn = self.commands.clone();
        let until: Option<f64> = self
            .command("ZSCORE", conn.zscore(&self.alive_key, tag))
            .await?;
        Ok(until.is_some_and(|t| t as u64 > unix_ms()))
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

    /// A message from a topic channel.
    fn deliver(&self, base: &str, payload: &[u8]) {
        let Ok(env) = serde_json::from_slice::<Envelope>(payload) else {
            metrics::counter!(m::RELAY_BAD_MESSAGES).increment(1);
            tracing::warn!(topic = base, "undecodable message on topic channel");
            return;
        };
        let topic = env.topic.as_deref().unwrap_or(base);
        let audience = match (env.client_id, env.user_id) {
            (Some(c), _) => Audience::Client(c),
            (None, Some(u)) => Audience::User(u),
            (None, None) => Audience::All,
        };
        let data = protocol::one_line_json(env.data.get());
        self.hub.dispatch(topic, &data, &audience);
    }

    /// A message on this node's own channel.
    fn on_node_message(self: &Arc<Self>, payload: &[u8]) {
        match serde_json::from_slice::<NodeMessage>(payload) {
            Ok(NodeMessage::Reply { id, status, error }) => {
                let answer = match error {
                    None => Ok(()),
                    Some(e) => Err(ApiError {
                        status: axum::http::StatusCode::from_u16(status)
                            .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                        message: e.message,
                        data: e.data,
                    }),
                };
                if let Some(waiter) = self.pending.lock().remove(&id) {
                    let _ = waiter.send(answer);
                }
            }
            Ok(NodeMessage::Subscribe {
                id,
                from,
                deadline,
                request,
            }) => {
                if unix_ms() > deadline {
                    // The sender has answered 503 already.
                    metrics::counter!(m::FORWARDS_EXPIRED).increment(1);
                    return;
                }
                // Queued here, in the order the channel delivered them, so
                // one client's requests are applied in order.
                let (reply, answer) = oneshot::channel();
                let queued = self.incoming.try_send(Incoming {
                    request,
                    deadline,
                    reply,
                });
                let shared = self.clone();
                tokio::spawn(async move {
                    let result = match queued {
                        Ok(()) => match answer.await {
                            Ok(r) => r,
                            // Dropped past its deadline: nobody waits.
                            Err(_) => return,
                        },
                        Err(_) => Err(ApiError::unavailable("The node is overloaded.")),
                    };
                    let msg = match result {
                        Ok(()) => NodeMessage::Reply {
                            id,
                            status: 204,
                            error: None,
                        },
                        Err(e) => NodeMessage::Reply {
                            id,
                            status: e.status.as_u16(),
                            error: Some(ErrorBody {
                                message: e.message,
                                data: e.data,
                            }),
                        },
                    };
                    let body = serde_json::to_vec(&msg).expect("node message serialises");
                    let channel = shared.node_channel_of(&from);
                    let mut conn = shared.commands.clone();
                    if let Err(e) = shared
                        .command("PUBLISH", conn.publish::<_, _, i64>(channel, body))
                        .await
                    {
                        tracing::warn!(error = %e, "could not answer a forwarded request");
                    }
                });
            }
            Err(e) => {
                metrics::counter!(m::RELAY_BAD_MESSAGES).increment(1);
                tracing::warn!(error = %e, "undecodable message on node channel");
            }
        }
    }
}

/// The channel of the node with tag `tag`.
fn node_channel(prefix: &str, tag: &str) -> String {
    format!("{prefix}n:{tag}")
}

/// The envelope of a publication: the HTTP publish JSON.
fn envelope(p: &Publication) -> Vec<u8> {
    let mut v = Vec::with_capacity(p.data.len() + p.topic.len() + 64);
    v.extend_from_slice(b"{\"topic\":");
    serde_json::to_writer(&mut v, &p.topic).expect("string serialises");
    v.extend_from_slice(b",\"data\":");
    v.extend_from_slice(&p.data);
    match &p.audience {
        Audience::All => {}
        Audience::Client(c) => {
            v.extend_from_slice(b",\"clientId\":");
            serde_json::to_writer(&mut v, c).expect("string serialises");
        }
        Audience::User(u) => {
            v.extend_from_slice(b",\"userId\":");
            serde_json::to_writer(&mut v, u).expect("string serialises");
        }
    }
    v.push(b'}');
    v
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
        let node = node.to_owned();
        Box::pin(async move {
            let s = &self.shared;
            let id = s.next_request.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            s.pending.lock().insert(id, tx);
            // Removes the waiter however this ends, the HTTP request being
            // dropped mid-forward included.
            let _waiter = Waiter { shared: s, id };
            let msg = NodeMessage::Subscribe {
                id,
                from: s.hub.node_tag().to_owned(),
                deadline: unix_ms() + s.config.forward_timeout.as_millis() as u64,
                request,
            };
            let body = serde_json::to_vec(&msg).expect("node message serialises");
            let mut conn = s.commands.clone();
            let receivers = s
                .command(
                    "PUBLISH",
                    conn.publish::<_, _, i64>(s.node_channel_of(&node), body),
                )
                .await;
            let listened = match receivers {
                Err(e) => return Err(e),
                Ok(n) => n > 0,
            };
            if listened
                && let Ok(Ok(answer)) = tokio::time::timeout(s.config.forward_timeout, rx).await
            {
                return Ok(answer);
            }
            // No answer. A node whose channel has a listener is connected
            // (frozen or overloaded), and one still in the membership may
            // be reconnecting: 503, try again. Otherwise no live node holds
            // the client: 404.
            if listened || s.is_alive(&node).await? {
                tracing::warn!(node, "forwarded request got no answer in time");
                Err(RelayError::Unavailable(format!(
                    "node {node} did not answer in time"
                )))
            } else {
                Ok(Err(missing_client()))
            }
        })
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        self.incoming.lock().take()
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RelayError>> {
        Box::pin(async move {
            let s = &self.shared;
            let mut conn = s.commands.clone();
            let tags: Vec<String> = s
                .command(
                    "ZRANGEBYSCORE",
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(&s.alive_key)
                        .arg(unix_ms())
                        .arg("+inf")
                        .query_async(&mut conn),
                )
                .await?;
            if tags.is_empty() {
                return Ok(Vec::new());
            }
            let values: Vec<Option<String>> = s
                .command(
                    "HMGET",
                    redis::cmd("HMGET")
                        .arg(&s.members_key)
                        .arg(&tags)
                        .query_async(&mut conn),
                )
                .await?;
            let mut nodes: Vec<NodeInfo> = values
                .into_iter()
                .flatten()
                .filter_map(|v| serde_json::from_str(&v).ok())
                .collect();
            nodes.sort_by(|a, b| a.node.cmp(&b.node));
            Ok(nodes)
        })
    }

    fn health(&self) -> RelayHealth {
        self.shared.health()
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let s = &self.shared;
            s.stop.cancel();
            // A heartbeat in flight must land before the entry is removed,
            // or it would list this node again.
            let heartbeat = s.heartbeat.lock().take();
            if let Some(h) = heartbeat {
                let _ = h.await;
            }
            let tag = s.hub.node_tag();
            let mut conn = s.commands.clone();
            let mut pipe = redis::pipe();
            pipe.zrem(&s.alive_key, tag).ignore();
            pipe.hdel(&s.members_key, tag).ignore();
            let _ = s.command("ZREM", pipe.query_async::<()>(&mut conn)).await;
        })
    }
}

/// Owns the subscriber connection: connects, re-subscribes, serves
/// subscription changes, and starts over when the connection is lost.
async fn run_subscriber(shared: Arc<Shared>, mut control: mpsc::UnboundedReceiver<SyncRequest>) {
    let mut backoff = Duration::from_millis(100);
    let mut down_since: Option<Instant> = Some(Instant::now());
    let mut first = true;
    loop {
        if shared.stop.is_cancelled() {
            return;
        }
        match connect(&shared).await {
            Ok((sink, stream, subscribed)) => {
                backoff = Duration::from_millis(100);
                shared.set_subscriber(Ok(()));
                if let Some(since) = down_since.take() {
                    let took = since.elapsed();
                    if first {
                        tracing::info!(node = shared.hub.node_tag(), "connected to Redis");
                    } else {
                        metrics::gauge!(m::RELAY_RECOVERY_SECONDS).set(took.as_secs_f64());
                        metrics::histogram!(m::RELAY_OUTAGE_SECONDS).record(took.as_secs_f64());
                        tracing::info!(
                            recovery_ms = took.as_millis() as u64,
                            topics = subscribed.len(),
                            "Redis relay recovered: every topic re-subscribed"
                        );
                    }
                }
                first = false;
                let mut dispatcher = tokio::spawn(dispatch(shared.clone(), stream));
                let reason = serve(&shared, sink, subscribed, &mut control, &mut dispatcher).await;
                shared.confirmed.lock().clear();
                // Make sure the old connection's dispatcher has stopped
                // before a new one subscribes, or messages would arrive
                // twice or out of order.
                dispatcher.abort();
                if !dispatcher.is_finished() {
                    let _ = dispatcher.await;
                }
                if shared.stop.is_cancelled() {
                    return;
                }
                metrics::counter!(m::RELAY_RECONNECTS).increment(1);
                tracing::warn!(%reason, "Redis subscriber connection lost; reconnecting");
                shared.set_subscriber(Err(format!("Redis subscriber down: {reason}")));
                down_since = Some(Instant::now());
            }
            Err(e) => {
                shared.set_subscriber(Err(format!("cannot reach Redis: {e}")));
                tracing::debug!(error = %e, ?backoff, "Redis connect failed");
                let wait = tokio::time::sleep(backoff);
                tokio::pin!(wait);
                loop {
                    tokio::select! {
                        _ = &mut wait => break,
                        _ = shared.stop.cancelled() => return,
                        req = control.recv() => match req {
                            Some(req) => answer_while_down(&shared, req),
                            None => return,
                        },
                    }
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
                .subscriber
                .lock()
                .clone()
                .err()
                .unwrap_or_else(|| "Redis unavailable".into()),
        ))
    } else {
        Ok(())
    });
}

/// A new subscriber connection, subscribed to this node's channel and to
/// every topic the hub has now.
async fn connect(shared: &Shared) -> Result<(PubSubSink, PubSubStream, HashSet<Arc<str>>), String> {
    let pubsub = tokio::time::timeout(COMMAND_TIMEOUT, shared.client.get_async_pubsub())
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let (mut sink, stream) = pubsub.split();
    subscribe(&mut sink, vec![shared.node_channel.clone()]).await?;
    let topics = shared.hub.topics();
    for chunk in topics.chunks(SUBSCRIBE_BATCH) {
        let names = chunk.iter().map(|t| shared.topic_channel(t)).collect();
        subscribe(&mut sink, names).await?;
    }
    let subscribed: HashSet<Arc<str>> = topics.into_iter().collect();
    *shared.confirmed.lock() = subscribed.clone();
    *shared.reconnect.lock() = CancellationToken::new();
    Ok((sink, stream, subscribed))
}

async fn subscribe(sink: &mut PubSubSink, channels: Vec<String>) -> Result<(), String> {
    tokio::time::timeout(COMMAND_TIMEOUT, sink.subscribe(channels))
        .await
        .map_err(|_| "SUBSCRIBE timed out".to_owned())?
        .map_err(|e| e.to_string())
}

async fn unsubscribe(sink: &mut PubSubSink, channels: Vec<String>) -> Result<(), String> {
    tokio::time::timeout(COMMAND_TIMEOUT, sink.unsubscribe(channels))
        .await
        .map_err(|_| "UNSUBSCRIBE timed out".to_owned())?
        .map_err(|e| e.to_string())
}

/// Serve subscription changes on a live connection until it is lost.
/// Returns why it ended.
async fn serve(
    shared: &Shared,
    mut sink: PubSubSink,
    mut subscribed: HashSet<Arc<str>>,
    control: &mut mpsc::UnboundedReceiver<SyncRequest>,
    dispatcher: &mut tokio::task::JoinHandle<()>,
) -> String {
    let mut ping = tokio::time::interval(
        shared
            .config
            .heartbeat_interval
            .max(Duration::from_millis(100)),
    );
    ping.tick().await;
    let kicked = shared.reconnect.lock().clone();
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return "stopped".into(),
            _ = kicked.cancelled() => return "a publish reached no subscriber of this node".into(),
            _ = &mut *dispatcher => return "connection closed by Redis".into(),
            _ = ping.tick() => {
                let pong = tokio::time::timeout(COMMAND_TIMEOUT, sink.ping::<redis::Value>()).await;
                if !matches!(pong, Ok(Ok(_))) {
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
                if !add.is_empty() {
                    result = subscribe(&mut sink, add.iter().map(|t| shared.topic_channel(t)).collect()).await;
                    if result.is_ok() {
                        shared.confirmed.lock().extend(add.iter().cloned());
                        subscribed.extend(add);
                    }
                }
                if result.is_ok() && !remove.is_empty() {
                    result = unsubscribe(&mut sink, remove.iter().map(|t| shared.topic_channel(t)).collect()).await;
                    if result.is_ok() {
                        let mut confirmed = shared.confirmed.lock();
                        for t in &remove {
                            subscribed.remove(t);
                            confirmed.remove(t);
                        }
                    }
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

/// Delivers what arrives on one subscriber connection, in order. Ends when
/// the connection does.
async fn dispatch(shared: Arc<Shared>, mut stream: PubSubStream) {
    while let Some(msg) = stream.next().await {
        let channel = msg.get_channel_name();
        if let Some(base) = channel.strip_prefix(shared.topic_prefix.as_str()) {
            shared.deliver(base, msg.get_payload_bytes());
        } else if channel == shared.node_channel {
            shared.on_node_message(msg.get_payload_bytes());
        }
    }
}

/// Refreshes this node's heartbeat key; its success or failure is also the
/// health of the command connection.
async fn run_heartbeat(shared: Arc<Shared>) {
    let every = shared
        .config
        .heartbeat_interval
        .max(Duration::from_millis(100));
    let ttl = (every * 3).as_millis() as u64;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        let info = NodeInfo::of(&shared.hub, shared.config.address, shared.started_at);
        let body = serde_json::to_string(&info).expect("node info serialises");
        let tag = shared.hub.node_tag();
        let now = unix_ms();
        let mut conn = shared.commands.clone();
        let mut pipe = redis::pipe();
        pipe.hset(&shared.members_key, tag, body).ignore();
        pipe.zadd(&shared.alive_key, tag, now + ttl).ignore();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&shared.alive_key)
            .arg("-inf")
            .arg(format!("({now}"));
        let Ok((dead,)) = shared
            .command("HSET", pipe.query_async::<(Vec<String>,)>(&mut conn))
            .await
        else {
            continue;
        };
        if !dead.is_empty() {
            // Forget members past their time.
            let mut pipe = redis::pipe();
            pipe.zrem(&shared.alive_key, &dead).ignore();
            pipe.hdel(&shared.members_key, &dead).ignore();
            let _ = shared
                .command("ZREM", pipe.query_async::<()>(&mut conn))
                .await;
        }
    }
}

/// Removes a forwarded request's waiter when the forward ends, however.
struct Waiter<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_is_the_publish_json() {
        let p = Publication {
            topic: "a\"b".into(),
            data: bytes::Bytes::from_static(br#"{"x":[1,2]}"#),
            audience: Audience::User("u1".into()),
        };
        let v: serde_json::Value = serde_json::from_slice(&envelope(&p)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"topic":"a\"b","data":{"x":[1,2]},"userId":"u1"})
        );
        let env: Envelope = serde_json::from_slice(br#"{"data":  [1, 2]}"#).unwrap();
        assert!(env.topic.is_none());
        assert_eq!(env.data.get(), "[1, 2]");
    }

    #[test]
    fn node_messages_round_trip() {
        let m = NodeMessage::Subscribe {
            id: 7,
            from: "AbCdEfGh".into(),
            deadline: 1,
            request: SubscribeRequest {
                client_id: "c".into(),
                subscriptions: vec!["t".into()],
                ip: "127.0.0.1".parse().unwrap(),
                authorization: None,
            },
        };
        let back: NodeMessage = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(back, NodeMessage::Subscribe { id: 7, .. }));
    }
}
