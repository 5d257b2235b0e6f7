//! The relay: how a published message reaches the hub of every node.
//!
//! Every publish goes through the relay, and every delivery comes out of it,
//! even on a single node. That gives one path and one ordering rule for both
//! deployments: a node's hub receives messages from exactly one relay loop,
//! in the relay's order, and dispatches them one at a time.
//!
//! * [`LocalRelay`]: the embedded default. An in-process queue; the node is
//!   the whole broker.
//! * The Redis relay (cluster mode) implements the same trait.
//!
//! Nothing outside this module and [`crate::broker`] knows which one runs.

use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::hub::{Audience, Hub};

/// One message on its way to the hubs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publication {
    /// The topic; subscribers of `topic` and `topic?…` receive it.
    pub topic: String,
    /// One line of JSON.
    pub data: bytes::Bytes,
    /// All subscribers, or only one client's or one user's.
    pub audience: Audience,
}

/// Why the relay could not do what was asked.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum RelayError {
    /// The backend (Redis) cannot be reached; nothing was done.
    #[error("relay unavailable: {0}")]
    Unavailable(String),
}

/// What `/api/health` reports about the relay.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RelayHealth {
    /// `local` or `redis`.
    pub kind: &'static str,
    pub healthy: bool,
    /// Why it is unhealthy, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Carries publications to every node's hub.
pub trait Relay: Send + Sync + 'static {
    /// Hand messages to the relay. Resolves when the relay has accepted them
    /// (for Redis: when PUBLISH returned); they are then delivered, in this
    /// order, to every node with subscribers, this one included.
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>>;

    /// Make the relay's interest in these base topics match the hub
    /// (subscribe where the hub has local subscribers, unsubscribe where it
    /// has none). Resolves once the backend acknowledged it, so a publish
    /// that starts afterwards reaches this node.
    fn sync_topics(&self, topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>>;

    fn health(&self) -> RelayHealth;
}

/// The in-process relay of a single node.
///
/// A bounded queue feeds one task that dispatches into the hub, so a burst
/// of publishes waits for room (backpressure on the HTTP publisher) instead
/// of growing memory without bound.
pub struct LocalRelay {
    tx: mpsc::Sender<Vec<Publication>>,
}

impl LocalRelay {
    /// Start the dispatch task. It ends when the relay is dropped.
    pub fn start(hub: Hub) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<Vec<Publication>>(1024);
        tokio::spawn(async move {
            while let Some(batch) = rx.recv().await {
                for p in batch {
                    hub.dispatch(&p.topic, &p.data, &p.audience).await;
                }
            }
        });
        Arc::new(Self { tx })
    }
}

impl Relay for LocalRelay {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>> {
        Box::pin(async move {
            self.tx
                .send(batch)
                .await
                .map_err(|_| RelayError::Unavailable("local relay stopped".into()))
        })
    }

    fn sync_topics(&self, _topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>> {
        // Every publish already passes through this node's hub.
        Box::pin(async { Ok(()) })
    }

    fn health(&self) -> RelayHealth {
        RelayHealth {
            kind: "local",
            healthy: !self.tx.is_closed(),
            reason: self
                .tx
                .is_closed()
                .then(|| "local relay stopped".to_owned()),
        }
    }
}
