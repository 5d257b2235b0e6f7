//! Companion mode: Fanout in front of an unchanged PocketBase app.
//!
//! PocketBase cannot scale out (its maintainers: pocketbase#234, #528,
//! #5038), so a PocketBase app that outgrows one process routes
//! `/api/realtime` to a Fanout cluster instead. PocketBase stays the single
//! writer and the only rule engine; Fanout holds the connections.
//!
//! What this module holds today:
//! * [`verify`]: the identity of a realtime client, verified by PocketBase
//!   itself through the shipped hooks file, cached and bounded;
//! * [`Companion`]: that verifier plus the streams bound through it, whose
//!   tokens are asked again every [`VerifierConfig::recheck`], so that a
//!   revoked identity (password change, deleted record, rotated collection
//!   secret) stops counting within that bound: the stream becomes a guest,
//!   as PocketBase itself unsets a revoked client's auth
//!   (`apis/realtime.go`, auth-state maintenance) and keeps it connected.
//!
//! * [`bridge`]: this node's clients carried onto PocketBase's own realtime
//!   API, one bucket per verified identity, so record events and the
//!   custom messages of the app's hooks reach them exactly as PocketBase
//!   decides.
//!
//! `/api/oauth2-redirect` is not served yet; see docs/pocketbase.md.

pub mod bridge;
pub mod verify;

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use bridge::{BridgeConfig, BridgeError, Bridges, BridgesHealth};
pub use verify::{TokenVerifier, VerifierConfig, VerifyError};

use crate::{auth::AuthRecord, hub::Hub, metrics as m};

/// How often PocketBase's reachability is probed for `/api/health`.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Verifications a recheck round runs at once.
const RECHECK_CONCURRENCY: usize = 4;

/// What `/api/health` reports about PocketBase.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct PocketBaseHealth {
    /// Whether the last call or probe reached PocketBase's verification
    /// route and was accepted.
    pub healthy: bool,
    /// Why not, when not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Tokens whose verdict is cached.
    #[serde(rename = "cachedTokens")]
    pub cached_tokens: usize,
    /// Streams bound to a verified identity.
    #[serde(rename = "boundStreams")]
    pub bound_streams: usize,
    /// The bridges' buckets and lanes.
    pub bridges: BridgesHealth,
}

/// A stream bound to an identity through a token.
#[derive(Clone)]
struct Bound {
    token: Arc<str>,
    ip: IpAddr,
    record: AuthRecord,
}

/// The companion of one node: verifies tokens through PocketBase and keeps
/// the identities bound through them current. Cheap to share (`Arc`).
pub struct Companion {
    verifier: Arc<TokenVerifier>,
    bridges: Bridges,
    hub: Hub,
    /// Client id → its binding; at most one entry per local stream
    /// (entries of gone or rebound clients leave at the next recheck).
    bound: Mutex<HashMap<String, Bound>>,
    stop: CancellationToken,
}

impl std::fmt::Debug for Companion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Companion")
            .field("verifier", &self.verifier)
            .finish()
    }
}

impl Companion {
    /// Start the companion of `hub`: its PocketBase probe and its recheck
    /// task run until [`Companion::close`] or the runtime ends.
    pub fn start(hub: Hub, config: VerifierConfig, bridges: BridgeConfig) -> Arc<Self> {
        let recheck = config.recheck.max(Duration::from_secs(1));
        let companion = Arc::new(Self {
            verifier: TokenVerifier::new(config),
            bridges: Bridges::new(hub.clone(), bridges),
            hub,
            bound: Mutex::new(HashMap::new()),
            stop: CancellationToken::new(),
        });
        let weak = Arc::downgrade(&companion);
        let stop = companion.stop.clone();
        tokio::spawn(async move {
            let mut probe = tokio::time::interval(PROBE_INTERVAL);
            let mut recheck = tokio::time::interval(recheck);
            recheck.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = probe.tick() => {
                        let Some(c) = weak.upgrade() else { return };
                        if let Err(e) = c.verifier.probe().await {
                            tracing::warn!(error = %e, "PocketBase is not usable for token verification");
                        }
                    }
                    _ = recheck.tick() => {
                        let Some(c) = weak.upgrade() else { return };
                        c.recheck().await;
                    }
                }
            }
        });
        companion
    }

    /// The verified identity of a subscription request's `Authorization`
    /// value from `ip`: `Ok(None)` is a guest.
    pub async fn identify(
        &self,
        header: Option<&str>,
        ip: IpAddr,
    ) -> Result<Option<AuthRecord>, VerifyError> {
        self.verifier.verify_header(header, ip).await
    }

    /// Remember that `client_id` is now bound to `record` through the token
    /// in `header`, so the binding is rechecked.
    pub fn bind(&self, client_id: &str, header: Option<&str>, ip: IpAddr, record: &AuthRecord) {
        let Some(header) = header else { return };
        self.bound.lock().insert(
            client_id.to_owned(),
            Bound {
                token: Arc::from(crate::auth::bearer_token(header)),
                ip,
                record: record.clone(),
            },
        );
    }

    /// A client left this node (its stream ended): its binding and bridged
    /// keys go at once.
    pub fn left(&self, client_id: &str) {
        self.bound.lock().remove(client_id);
        self.bridges.leave(client_id);
    }

    /// What `/api/health` reports.
    pub fn health(&self) -> PocketBaseHealth {
        let state = self.verifier.health();
        PocketBaseHealth {
            healthy: state.is_ok(),
            reason: state.err(),
            cached_tokens: self.verifier.cached_tokens(),
            bound_streams: self.bound.lock().len(),
            bridges: self.bridges.health(),
        }
    }

    /// This node's bridges onto PocketBase's realtime API.
    pub fn bridges(&self) -> &Bridges {
        &self.bridges
    }

    /// Stop the background tasks.
    pub fn close(&self) {
        self.stop.cancel();
        self.bridges.close();
    }

    /// Ask PocketBase again about every token a local stream is bound
    /// through; unbind the streams whose identity it no longer confirms.
    /// A token PocketBase cannot judge now (unreachable) keeps its streams.
    async fn recheck(&self) {
        let snapshot: Vec<(String, Bound)> = {
            let mut bound = self.bound.lock();
            // Gone or rebound clients leave first.
            bound.retain(|id, b| {
                self.hub
                    .client_by_id(id)
                    .and_then(|c| c.auth())
                    .is_some_and(|a| a.same_as(&b.record))
            });
            bound.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let mut by_token: HashMap<Arc<str>, (IpAddr, AuthRecord, Vec<String>)> = HashMap::new();
        for (id, b) in snapshot {
            by_token
                .entry(b.token)
                .or_insert_with(|| (b.ip, b.record, Vec::new()))
                .2
                .push(id);
        }
        let verdicts = futures_util::stream::iter(by_token)
            .map(|(token, (ip, record, clients))| async move {
                let verdict = self.verifier.verify(&token, ip).await;
                (record, clients, verdict)
            })
            .buffer_unordered(RECHECK_CONCURRENCY)
            .collect::<Vec<_>>()
            .await;
        for (record, clients, verdict) in verdicts {
            match verdict {
                Ok(Some(now)) if now.same_as(&record) => {}
                Ok(_) => {
                    for id in clients {
                        self.revoke(&id, &record);
                    }
                }
                Err(_) => {}
            }
        }
    }

    fn revoke(&self, client_id: &str, record: &AuthRecord) {
        self.bound.lock().remove(client_id);
        let Some(client) = self.hub.client_by_id(client_id) else {
            return;
        };
        if self.hub.unbind_auth_if(&client, record) {
            metrics::counter!(m::POCKETBASE_REVOKED).increment(1);
            // Its bridged keys move to the guest bucket, as PocketBase now
            // treats the stream as a guest.
            let keys: Vec<String> = client.subscriptions(&[]).into_keys().collect();
            let bridges = self.bridges.clone();
            tokio::spawn(async move {
                if let Err(e) = bridges.set(&client, None, None, &keys).await {
                    tracing::debug!(error = %e, "could not move a revoked stream to the guests");
                }
            });
            tracing::info!(
                client = client_id,
                collection = %record.collection_id,
                "PocketBase no longer accepts this stream's token; it is a guest now"
            );
        }
    }
}

impl Drop for Companion {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
