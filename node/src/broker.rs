//! The broker: this node's [`Hub`] joined to a [`Relay`].
//!
//! This is the library's entry point, the counterpart of PocketBase's
//! `app.SubscriptionsBroker()` plus publishing. The HTTP layer is a thin
//! translation onto these methods, and so is anything embedding Fanout.
//!
//! ```no_run
//! # async fn example(broker: fanout::Broker) {
//! // PocketBase's "notify every client subscribed to `example`, in chunks of
//! // 300 across tasks", in Rust:
//! let message = fanout::Message::json("example", &serde_json::json!({"hi": 1})).unwrap();
//! let mut tasks = tokio::task::JoinSet::new();
//! for chunk in broker.hub().chunked_clients(300) {
//!     let message = message.clone();
//!     tasks.spawn(async move {
//!         for client in chunk {
//!             if client.has_subscription("example") {
//!                 let _ = client.send(&message);
//!             }
//!         }
//!     });
//! }
//! tasks.join_all().await;
//! # }
//! ```

use std::{
    net::IpAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use axum::http::StatusCode;
use serde_json::json;

use crate::{
    auth::Authenticator,
    client::Client,
    error::{ApiError, field_error},
    hub::{Audience, Hub, SubscribeError},
    metrics as m,
    pocketbase::Companion,
    protocol,
    relay::{Forwarded, NodeInfo, OAuth2Redirect, Publication, Relay, RelayError, RelayHealth},
};

pub use crate::relay::{SubscribeRequest, missing_client};

/// Why a publish was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublishError {
    /// This node's fan-out backlog stayed full for the whole publish wait;
    /// nothing was published. Retry later (HTTP 503).
    #[error("the node is overloaded (fan-out backlog full); retry later")]
    Overloaded,
    /// The relay could not take the messages; nothing was published.
    #[error(transparent)]
    Relay(#[from] RelayError),
    /// A message's topic or data contains CR or LF; nothing was published.
    #[error("message {index}: the topic and data must not contain CR or LF")]
    NotLineSafe { index: usize },
}

/// The hub, the relay and the token verifier of one node. Cheap to clone.
#[derive(Clone)]
pub struct Broker {
    hub: Hub,
    relay: Arc<dyn Relay>,
    auth: Authenticator,
    /// Companion mode: identities verified by PocketBase instead of `auth`.
    companion: Option<Arc<Companion>>,
    publish_wait: Duration,
}

/// How long a publish waits for a full fan-out backlog by default.
pub const DEFAULT_PUBLISH_WAIT: Duration = Duration::from_secs(2);

impl Broker {
    /// Join a hub and a relay. Topics whose local interest changes outside
    /// a subscription request (a client leaves or is dropped, a library
    /// call) are synced to the relay from here on.
    pub fn new(hub: Hub, relay: Arc<dyn Relay>, auth: Authenticator) -> Self {
        let weak = Arc::downgrade(&relay);
        hub.on_topics_changed(Box::new(move |topics| {
            let Some(relay) = weak.upgrade() else { return };
            let sync = relay.sync_topics(topics);
            // Outside a runtime (process exit) there is nothing to release.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    if let Err(e) = sync.await {
                        tracing::warn!(error = %e, "could not sync relay topics");
                    }
                });
            }
        }));
        Self {
            hub,
            relay,
            auth,
            companion: None,
            publish_wait: DEFAULT_PUBLISH_WAIT,
        }
    }

    /// Verify realtime tokens through PocketBase (companion mode) instead
    /// of the [`Authenticator`].
    pub fn with_companion(mut self, companion: Arc<Companion>) -> Self {
        self.companion = Some(companion);
        self
    }

    /// The companion, in companion mode.
    pub fn companion(&self) -> Option<&Arc<Companion>> {
        self.companion.as_ref()
    }

    /// How long a publish waits for a full fan-out backlog before it is
    /// refused with [`PublishError::Overloaded`].
    pub fn with_publish_wait(mut self, wait: Duration) -> Self {
        self.publish_wait = wait;
        self
    }

    /// The local clients and topics (PocketBase's `SubscriptionsBroker()`).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn relay_health(&self) -> RelayHealth {
        self.relay.health()
    }

    /// Register a new client for a stream from `ip`.
    pub fn connect(&self, ip: IpAddr) -> Arc<Client> {
        metrics::counter!(m::CONNECTIONS_OPENED).increment(1);
        self.hub.register(ip)
    }

    /// Unregister a client and release the relay topics it alone held.
    pub fn disconnect(&self, client_id: &str) {
        self.hub.unregister(client_id);
        if let Some(c) = &self.companion {
            c.left(client_id);
        }
    }

    /// Publish messages to every subscriber on every node.
    ///
    /// Waits up to the publish wait while this node's fan-out backlog is
    /// full, then gives up with [`PublishError::Overloaded`].
    pub async fn publish(&self, batch: Vec<Publication>) -> Result<(), PublishError> {
        if let Some(index) = batch.iter().position(|p| {
            !protocol::is_line_safe(p.topic.as_bytes()) || !protocol::is_line_safe(&p.data)
        }) {
            return Err(PublishError::NotLineSafe { index });
        }
        let topics: Vec<&str> = batch.iter().map(|p| p.topic.as_str()).collect();
        if !self.hub.admit(&topics, self.publish_wait).await {
            return Err(PublishError::Overloaded);
        }
        let n = batch.len() as u64;
        self.relay.publish(batch).await?;
        metrics::counter!(m::PUBLISHED).increment(n);
        Ok(())
    }

    /// Publish one message for `topic` to every subscriber.
    pub async fn publish_json(
        &self,
        topic: &str,
        data: &serde_json::Value,
        audience: Audience,
    ) -> Result<(), PublishError> {
        let data = serde_json::to_vec(data).expect("a JSON value serialises");
        self.publish(vec![Publication {
            topic: topic.to_owned(),
            data: data.into(),
            audience,
            id: None,
        }])
        .await
    }

    /// The live nodes of the cluster (this one alone without Redis).
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, RelayError> {
        self.relay.nodes().await
    }

    /// Leave the cluster: stop heartbeats and announce nothing more.
    pub async fn close(&self) {
        self.relay.close().await;
    }

    /// Apply a validated subscription request on the node that holds the
    /// client: here, or, when the client id carries another node's tag,
    /// forwarded there through the relay. Either way the answer is the
    /// owner's, status and body. A request without a stamp is stamped here,
    /// on arrival ([`Relay::stamp`]).
    pub async fn subscribe(&self, mut req: SubscribeRequest) -> Result<(), ApiError> {
        if req.stamp.is_none() {
            req.stamp = self.relay.stamp();
        }
        match protocol::node_tag_of(&req.client_id) {
            Some(tag) if tag != self.hub.node_tag() => {
                metrics::counter!(m::FORWARDED).increment(1);
                let tag = tag.to_owned();
                self.relay
                    .forward(&tag, Forwarded::Subscribe(req))
                    .await
                    .unwrap_or_else(|e| {
                        Err(ApiError::unavailable(format!(
                            "Cannot reach the node of this client: {e}"
                        )))
                    })
            }
            _ => self.subscribe_local(req).await,
        }
    }

    /// Apply a validated subscription request to a local client, with
    /// PocketBase's checks in PocketBase's order: client (404), IP (400),
    /// auth change (403). Answers only after the relay acknowledged every
    /// topic the node newly needs; if it cannot, the previous set is put
    /// back and the answer is 503, so no client keeps a subscription it was
    /// told failed.
    pub async fn subscribe_local(&self, req: SubscribeRequest) -> Result<(), ApiError> {
        self.subscribe_local_until(req, None).await
    }

    /// [`Broker::subscribe_local`] for a request whose sender gives up at
    /// `deadline`: past it the request has no effect (a change already
    /// made is rolled back, as after a relay failure), so that a request
    /// the sender answered 503 is never applied later.
    ///
    /// A request whose stamp is older than that of a request of the same
    /// client already applied is superseded: it changes nothing and
    /// answers `Ok` (204), since the client's newer set stands. It is
    /// still refused if it comes from another IP than the stream, or with
    /// an auth other than the one bound now (403).
    pub async fn subscribe_local_until(
        &self,
        req: SubscribeRequest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<(), ApiError> {
        self.subscribe_local_committed(req, deadline, None).await
    }

    /// [`Broker::subscribe_local_until`] for a forwarded request: `commit`
    /// runs once a change is confirmed by the relay, before it is
    /// acknowledged, and `false` (the sender gave up first) rolls the
    /// change back (503), so the sender's answer and the client's set
    /// always agree.
    pub async fn subscribe_local_committed(
        &self,
        req: SubscribeRequest,
        deadline: Option<tokio::time::Instant>,
        commit: Option<futures_util::future::BoxFuture<'static, bool>>,
    ) -> Result<(), ApiError> {
        let late = || ApiError::unavailable("The request expired before it could be applied.");
        let until = |d: Option<tokio::time::Instant>| async move {
            match d {
                Some(d) => tokio::time::sleep_until(d).await,
                None => std::future::pending().await,
            }
        };
        let client = self
            .hub
            .client_by_id(&req.client_id)
            .ok_or_else(missing_client)?;
        // One request of a client at a time, in arrival order: the auth
        // check, the change and its rollback cannot interleave with
        // another request's.
        let _serial = tokio::select! {
            g = client.changes.lock() => g,
            _ = until(deadline) => return Err(late()),
        };
        if client.ip() != req.ip {
            return Err(ApiError::bad_request("Invalid realtime client."));
        }
        // Unstamped (a library call, or a node of an older version
        // forwarded it): received now, as far as this node can tell.
        let stamp = req.stamp.or_else(|| self.relay.stamp());
        let applied = || {
            if let Some(s) = stamp {
                client.applied_stamp.fetch_max(s, Ordering::AcqRel);
            }
        };
        let auth = tokio::select! {
            a = self.identify(&req) => a?,
            _ = until(deadline) => return Err(late()),
        };
        let previous_auth = client.auth();
        if let Some(prev) = &previous_auth
            && !auth.as_ref().is_some_and(|a| a.same_as(prev))
        {
            return Err(ApiError::forbidden(
                "The current and the previous request authorization don't match.",
            ));
        }
        // Superseded only once its auth passed the check against the auth
        // bound now: a request of another user is refused (403), never
        // answered 204 for a set it could not have had.
        if stamp.is_some_and(|s| s < client.applied_stamp.load(Ordering::Acquire)) {
            metrics::counter!(m::SUBSCRIPTIONS_SUPERSEDED).increment(1);
            return Ok(());
        }
        let previous: Vec<String> = client.subscriptions(&[]).into_keys().collect();
        // A set, not the list: a POST may carry 1,000 keys.
        let held_before: std::collections::HashSet<&str> =
            previous.iter().map(String::as_str).collect();
        // New keys with a `since` cursor: held until their history is
        // replayed, so replay and live messages neither overlap nor leave
        // a gap.
        let resumes: Vec<(String, String)> = req
            .subscriptions
            .iter()
            .filter(|k| !held_before.contains(k.as_str()))
            .filter_map(|k| protocol::since_of(k).map(|since| (k.clone(), since)))
            .collect();
        if let (Some(companion), Some(record)) = (&self.companion, &auth) {
            companion.bind(&req.client_id, req.authorization.as_deref(), req.ip, record);
        }
        let bound = auth.map(Arc::new);
        let changes = self
            .hub
            .replace_subscriptions_holding(&client, &req.subscriptions, bound.clone(), true)
            .map_err(subscribe_error)?;
        // Every topic of the new set, not only the new ones: a topic
        // another client just added may still be subscribing, and this
        // answer must wait for it too.
        let mut topics = changes.removed;
        let mut seen = std::collections::HashSet::new();
        for key in &req.subscriptions {
            let base = protocol::base_topic(key);
            if !key.is_empty() && seen.insert(base) {
                topics.push(Arc::from(base));
            }
        }
        // In companion mode PocketBase hears of every change, even to none.
        if topics.is_empty() && self.companion.is_none() {
            applied();
            return Ok(());
        }
        let synced = tokio::select! {
            r = self.sync_and_replay(&client, topics.clone(), resumes) => r,
            _ = until(deadline) => Err(RelayError::Unavailable(late().message)),
        };
        // Replays are delivered only once the answer is 204: one whose
        // request fails is dropped here unstarted, nothing of it sent.
        let (synced, replays) = match synced {
            Ok(Ok(replays)) => (Ok(()), replays),
            Ok(Err(refusal)) => {
                self.revert(&client, &previous, previous_auth, topics);
                return Err(refusal);
            }
            Err(e) => (Err(e), Vec::new()),
        };
        // Companion mode: PocketBase must have acknowledged the keys too.
        let bridged = match (&synced, &self.companion) {
            (Ok(()), Some(c)) => tokio::select! {
                r = c.bridges().set(&client, bound.as_deref(), req.authorization.as_deref(), &req.subscriptions) => r.map_err(bridge_error),
                _ = until(deadline) => Err(late()),
            },
            _ => Ok(()),
        };
        if let (Ok(()), Err(refusal)) = (&synced, bridged) {
            self.revert(&client, &previous, previous_auth, topics);
            return Err(refusal);
        }
        // A forwarded change stands only if it wins the race against its
        // sender giving up (`relay::Incoming::commit`).
        let synced = match (synced, commit) {
            (Ok(()), Some(commit)) => match commit.await {
                true => Ok(()),
                false => Err(RelayError::Unavailable(late().message)),
            },
            (r, _) => r,
        };
        match synced {
            Ok(()) => {
                applied();
                for replay in replays {
                    replay.start();
                }
                Ok(())
            }
            Err(e) => {
                drop(replays);
                tracing::warn!(client = client.id(), error = %e, "subscription failed; reverting");
                self.revert(&client, &previous, previous_auth, topics);
                Err(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("Subscriptions could not be applied: {e}"),
                ))
            }
        }
    }
}

impl Broker {
    /// The OAuth2 all-in-one flow's redirect (companion mode): hand the
    /// provider's answer to the client whose id is `state`, here or on the
    /// node that holds it. `Ok` when the client took it and a code came,
    /// as PocketBase decides between its success and failure redirects
    /// (`apis/record_auth_with_oauth2_redirect.go`).
    pub async fn oauth2_redirect(&self, redirect: OAuth2Redirect) -> Result<(), ApiError> {
        match protocol::node_tag_of(&redirect.state) {
            Some(tag) if tag != self.hub.node_tag() => {
                let tag = tag.to_owned();
                self.relay
                    .forward(&tag, Forwarded::OAuth2(redirect))
                    .await
                    .unwrap_or_else(|e| Err(ApiError::unavailable(e.to_string())))
            }
            _ => self.oauth2_redirect_local(&redirect),
        }
    }

    /// [`Broker::oauth2_redirect`] for a client of this node: it must exist,
    /// hold the key `@oauth2`, and have connected from the redirect's IP.
    /// It then gets one `@oauth2` event, `{"state","code"[,"error"]}`, and
    /// loses the key, as in PocketBase.
    pub fn oauth2_redirect_local(&self, redirect: &OAuth2Redirect) -> Result<(), ApiError> {
        let failure = |why: &str| Err(ApiError::bad_request(why.to_owned()));
        let Some(client) = self.hub.client_by_id(&redirect.state) else {
            return failure("Missing or invalid OAuth2 subscription client.");
        };
        if client.is_discarded() || !client.has_subscription(protocol::OAUTH2_TOPIC) {
            return failure("Missing or invalid OAuth2 subscription client.");
        }
        if client.ip() != redirect.ip {
            return failure("The OAuth2 redirect came from another IP than the realtime client.");
        }
        let mut data = serde_json::json!({"state": redirect.state, "code": redirect.code});
        if !redirect.error.is_empty() {
            data["error"] = redirect.error.clone().into();
        }
        let message = crate::client::Message::json(protocol::OAUTH2_TOPIC, &data)
            .expect("a JSON object frames");
        let _ = client.send(&message);
        self.hub.unsubscribe(&client, &[protocol::OAUTH2_TOPIC]);
        if !redirect.error.is_empty() || redirect.code.is_empty() {
            return failure("The OAuth2 provider returned an error or no code.");
        }
        Ok(())
    }

    /// Put a client's previous set and auth back after a failed change;
    /// relay interest follows the hub again (best effort, once the relay
    /// is back).
    fn revert(
        &self,
        client: &Arc<Client>,
        previous: &[String],
        previous_auth: Option<Arc<crate::auth::AuthRecord>>,
        topics: Vec<Arc<str>>,
    ) {
        if self
            .hub
            .replace_subscriptions(client, previous, previous_auth.clone())
            .is_ok()
        {
            let sync = self.relay.sync_topics(topics);
            tokio::spawn(async move {
                let _ = sync.await;
            });
            // PocketBase follows too (the member keeps its token).
            if let Some(c) = &self.companion {
                let (bridges, client, previous) =
                    (c.bridges().clone(), client.clone(), previous.to_vec());
                tokio::spawn(async move {
                    let _ = bridges
                        .set(&client, previous_auth.as_deref(), None, &previous)
                        .await;
                });
            }
        }
    }

    /// The identity a subscription request binds: verified by PocketBase in
    /// companion mode (503 when it cannot answer), else by the
    /// [`Authenticator`]. `None` is a guest.
    async fn identify(
        &self,
        req: &SubscribeRequest,
    ) -> Result<Option<crate::auth::AuthRecord>, ApiError> {
        match &self.companion {
            Some(c) => c
                .identify(req.authorization.as_deref(), req.ip)
                .await
                .map_err(|e| ApiError::unavailable(format!("{e}."))),
            None => Ok(self.auth.verify_header(req.authorization.as_deref())),
        }
    }

    /// Confirm the topics on the relay, then prepare the replay of each
    /// resumed key (started, and the key released for live messages once
    /// replayed, only after the request is answered 204). `Ok(Err(_))`: a
    /// resume that can never be delivered, refused with that answer.
    async fn sync_and_replay(
        &self,
        client: &Arc<Client>,
        topics: Vec<Arc<str>>,
        resumes: Vec<(String, String)>,
    ) -> Result<Result<Vec<crate::relay::PendingReplay>, ApiError>, RelayError> {
        self.relay.sync_topics(topics).await?;
        let mut replays = Vec::new();
        for (key, since) in resumes {
            let Some(stored) = self.hub.key_of(client, &key) else {
                continue;
            };
            match self.relay.replay(client.clone(), stored, since).await? {
                Ok(replay) => replays.push(replay),
                Err(refusal) => return Ok(Err(refusal)),
            }
        }
        Ok(Ok(replays))
    }
}

/// The answer to a subscription PocketBase did not take: its own status
/// and error JSON for a refusal, 503 otherwise.
fn bridge_error(e: crate::pocketbase::BridgeError) -> ApiError {
    use crate::pocketbase::BridgeError;
    match e {
        BridgeError::Refused { status, body } => ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST),
            message: body["message"]
                .as_str()
                .unwrap_or(crate::error::DEFAULT_BAD_REQUEST)
                .to_owned(),
            data: body["data"].as_object().cloned().unwrap_or_default(),
        },
        e => ApiError::unavailable(format!("{e}.")),
    }
}

/// The answer to a subscription change the hub refused.
fn subscribe_error(e: SubscribeError) -> ApiError {
    match e {
        SubscribeError::Gone => missing_client(),
        SubscribeError::OverBudget { max } => ApiError::validation(
            [(
                "subscriptions".to_owned(),
                field_error(
                    "validation_length_too_long",
                    &format!("the subscription keys must be no more than {max} bytes in total"),
                    Some(json!({"max": max})),
                ),
            )]
            .into_iter()
            .collect(),
        ),
        SubscribeError::NotLineSafe => ApiError::validation(
            [(
                "subscriptions".to_owned(),
                field_error(
                    "validation_match_invalid",
                    "must not contain CR or LF characters",
                    None,
                ),
            )]
            .into_iter()
            .collect(),
        ),
    }
}
