//! The relay: how a published message reaches the hub of every node.
//!
//! Every publish goes through the relay, and every delivery comes out of it,
//! even on a single node. That gives one path and one ordering rule for both
//! deployments: a node's hub receives messages from exactly one relay loop,
//! in the relay's order, and dispatches them one at a time.
//!
//! * [`LocalRelay`] (`local.rs`): the embedded default; the node is the
//!   whole broker.
//! * [`RedisRelay`] (`redis/`): cluster mode. One Redis channel per topic,
//!   subscribed on demand, plus a channel per node for requests addressed
//!   to a client id held elsewhere.
//!
//! The types both the relays and the broker above them use live here, so
//! imports flow one way: `broker` → `relay` → `hub`.
//!
//! Nothing outside the relays and [`crate::server`] knows which one runs.

mod local;
pub mod redis;

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use crate::{
    error::ApiError,
    hub::{Audience, Hub},
};

pub use local::LocalRelay;
pub use redis::{RedisConfig, RedisRelay};

/// A realtime subscription request, as the node owning the client applies it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SubscribeRequest {
    pub client_id: String,
    pub subscriptions: Vec<String>,
    /// The real IP of the request.
    pub ip: IpAddr,
    /// The raw `Authorization` header, if any.
    pub authorization: Option<String>,
    /// When the first node received it, in µs on the cluster's reference
    /// clock ([`Relay::stamp`]); `None` to stamp it on arrival at the
    /// broker. The owner never applies a request older than one of the
    /// same client it already applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stamp: Option<u64>,
}

/// The OAuth2 all-in-one flow's redirect, for the node holding the client
/// whose id is `state` (PocketBase
/// `apis/record_auth_with_oauth2_redirect.go`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct OAuth2Redirect {
    /// The client id the SDK put in the provider URL.
    pub state: String,
    pub code: String,
    pub error: String,
    /// The real IP of the redirect request; it must be the stream's.
    pub ip: IpAddr,
}

/// A request for a client held by another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forwarded {
    /// Replace its subscriptions ([`crate::Broker::subscribe`]).
    Subscribe(SubscribeRequest),
    /// Hand it an OAuth2 redirect: `Ok` when the client took it and the
    /// provider gave a code, `Err` otherwise.
    OAuth2(OAuth2Redirect),
}

/// PocketBase's answer for an unknown client id.
pub fn missing_client() -> ApiError {
    ApiError::not_found("Missing or invalid client id.")
}

/// One message on its way to the hubs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The topic; subscribers of `topic` and `topic?…` receive it.
    pub topic: String,
    /// One line of JSON.
    pub data: bytes::Bytes,
    /// All subscribers, or only one client's or one user's.
    pub audience: Audience,
    /// The publisher's own id for the message (unique per topic), kept in
    /// the history: a subscription with `since=<id>` resumes after it.
    pub id: Option<String>,
}

/// A replay prepared by [`Relay::replay`]: nothing of it is delivered
/// until [`PendingReplay::start`].
#[must_use = "a replay delivers nothing until started"]
pub struct PendingReplay(Option<Box<dyn FnOnce() + Send>>);

impl PendingReplay {
    /// A replay that runs `start` (which spawns its task) when started.
    pub fn new(start: impl FnOnce() + Send + 'static) -> Self {
        Self(Some(Box::new(start)))
    }

    /// Deliver it: spawns the replay's own task, off the live path.
    pub fn start(mut self) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

/// How long a replay waits for a client's stream to take anything before
/// it closes the client as slow: the client is not reading.
pub(crate) const REPLAY_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether a replayed message with `data_len` bytes of data, as an event
/// of `key`, exceeds what `client`'s queue holds (`--client-queue-bytes`).
pub(crate) fn too_large_for(client: &crate::client::Client, key: &str, data_len: usize) -> bool {
    let event = "id:\n".len() + crate::protocol::CLIENT_ID_LEN + "event:\ndata:\n\n".len();
    event + key.len() + data_len > client.max_bytes()
}

/// The answer to a resume with a message the client's queue can never
/// take: 400, PocketBase's error JSON, nothing changed.
pub(crate) fn undeliverable_replay(client: &crate::client::Client) -> ApiError {
    ApiError::bad_request(format!(
        "The history after the cursor holds a message larger than the client's queue ({} bytes); it cannot be replayed. Subscribe without the cursor.",
        client.max_bytes()
    ))
}

/// Why the relay could not do what was asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    /// The backend (Redis) cannot be reached; nothing was done.
    #[error("relay unavailable: {0}")]
    Unavailable(String),
    /// A publish that did not complete: some messages may have been
    /// published (a command timed out, so Redis may still run it) or were
    /// published while others were not. Indices into the batch. Retrying
    /// the batch with the same message `id`s publishes each at most once.
    #[error("publish incomplete: {reason}")]
    Incomplete {
        reason: String,
        /// Published for sure.
        published: Vec<usize>,
        /// Sent, but the answer did not come in time: unknown.
        unknown: Vec<usize>,
        /// Not published.
        not_published: Vec<usize>,
    },
}

/// What `/api/health` reports about the relay.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RelayHealth {
    /// `local` or `redis`.
    pub kind: &'static str,
    /// For Redis: `connecting`, `standalone` or `cluster`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<&'static str>,
    pub healthy: bool,
    /// Why it is unhealthy, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// On a Redis Cluster: the partitions that cannot carry a publish now
    /// (their publishes and new subscriptions answer 503). Listed also
    /// while `healthy` is true: see the Redis relay's health rule.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<u16>,
    /// On a Redis Cluster whose shard holding the membership keys is lost
    /// (no live primary for 10 s): why. Forwarded subscription requests
    /// and `/api/cluster` answer 503 meanwhile; the node's own clients are
    /// served.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub membership_lost: Option<String>,
    /// On a Redis Cluster: each partition's subscriber link and publishes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardHealth>,
}

/// One partition's subscriber link on a Redis Cluster.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ShardHealth {
    pub partition: u16,
    /// The primary it is connected to.
    pub primary: Option<String>,
    pub healthy: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One node as `/api/cluster` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    /// The node tag (the first characters of its client ids).
    pub node: String,
    pub address: String,
    pub version: String,
    pub connections: usize,
    pub topics: usize,
    pub subscriptions: usize,
    /// Unix seconds.
    pub started_at: u64,
}

impl NodeInfo {
    /// This node's current figures.
    pub fn of(hub: &Hub, address: SocketAddr, started_at: SystemTime) -> Self {
        Self {
            node: hub.node_tag().to_owned(),
            address: address.to_string(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            connections: hub.total_clients(),
            topics: hub.total_topics(),
            subscriptions: hub.total_subscriptions(),
            started_at: started_at
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// A subscription request that another node forwarded to this one, the
/// owner of its client. The broker applies it and answers on `reply`.
pub struct Incoming {
    pub request: Forwarded,
    /// The instant (this node's monotonic clock) from which the sender may
    /// have given up: past it, the request must be dropped unapplied (and
    /// `reply` dropped unanswered).
    pub deadline: tokio::time::Instant,
    /// Claims the request as applied, against the sender claiming it as
    /// given up (one `SET NX` in Redis decides): `true` if the change may
    /// stand; `false`, and it is rolled back.
    pub commit: Option<BoxFuture<'static, bool>>,
    pub reply: oneshot::Sender<Result<(), ApiError>>,
}

/// Carries publications to every node's hub.
pub trait Relay: Send + Sync + 'static {
    /// Hand messages to the relay. Resolves when the relay has accepted them
    /// (for Redis: when PUBLISH returned); they are then delivered, in this
    /// order, to every node with subscribers, this one included.
    /// [`RelayError::Unavailable`]: none was published;
    /// [`RelayError::Incomplete`]: some may have been.
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>>;

    /// Make the relay's interest in these base topics match the hub
    /// (subscribe where the hub has local subscribers, unsubscribe where it
    /// has none). Resolves once every one of them that the hub needs is
    /// confirmed subscribed by the backend, whichever call started the
    /// subscription, so a publish that starts afterwards reaches this node.
    fn sync_topics(&self, topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>>;

    /// Apply a subscription request on the node with tag `node`, which holds
    /// the client. The inner result is the owner's answer, or 404 when no
    /// live node has that tag; `Err` when the owner is alive but cannot be
    /// reached or does not answer within the forward timeout (then it will
    /// not apply the request later either).
    fn forward(
        &self,
        node: &str,
        request: Forwarded,
    ) -> BoxFuture<'_, Result<Result<(), ApiError>, RelayError>>;

    /// Prepare to replay to `client`, for its held key `key`, the history
    /// of the key's topic after the message whose id is `since`: find the
    /// cursor and read the first page, without delivering anything. The
    /// caller starts the returned [`PendingReplay`] once the subscription
    /// request is answered 204; dropped unstarted (the request failed),
    /// nothing of it was delivered. Started, it pushes the history in
    /// pages paced by the client's stream, then lets live messages through
    /// ([`Hub::release`]), with no gap and no duplicate between the two.
    /// A cursor no longer in the history replays nothing (counted in
    /// `fanout_resume_unknown_cursor_total`). `Ok(Err(_))`: the replay can
    /// never be delivered (a message larger than the client's queue
    /// bytes), refused with that answer.
    fn replay(
        &self,
        client: Arc<crate::client::Client>,
        key: crate::protocol::SubKey,
        since: String,
    ) -> BoxFuture<'_, Result<Result<PendingReplay, ApiError>, RelayError>>;

    /// A stamp for a subscription request received now: µs on the clock
    /// every node of the cluster reads (Redis's `TIME`, through an offset
    /// this node measures on its monotonic clock; see
    /// `relay/redis/clock.rs`), strictly increasing on this node. `None`
    /// while that clock is unknown (Redis never reached): such a request
    /// is not ordered against others.
    fn stamp(&self) -> Option<u64>;

    /// Requests other nodes forwarded to this one (taken once, at startup).
    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>>;

    /// The live nodes of the cluster.
    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RelayError>>;

    fn health(&self) -> RelayHealth;

    /// Leave the cluster (shutdown).
    fn close(&self) -> BoxFuture<'_, ()>;
}
