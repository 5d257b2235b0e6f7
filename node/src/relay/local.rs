//! The in-process relay: a single node is the whole broker.

use std::{net::SocketAddr, sync::Arc, time::SystemTime};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Incoming, NodeInfo, Publication, Relay, RelayError, RelayHealth, SubscribeRequest};
use crate::{error::ApiError, hub::Hub};

/// The in-process relay of a single node.
///
/// A publish is dispatched into the hub before it returns: the hub's
/// fan-out workers are the only queue, and the broker admits publishers
/// only while their backlog is under its bounds. A batch is dispatched
/// under one lock, so concurrent publishes do not interleave inside it.
pub struct LocalRelay {
    hub: Hub,
    order: parking_lot::Mutex<()>,
    address: SocketAddr,
    started_at: SystemTime,
}

impl LocalRelay {
    pub fn start(hub: Hub, address: SocketAddr) -> Arc<Self> {
        Arc::new(Self {
            hub,
            order: parking_lot::Mutex::new(()),
            address,
            started_at: SystemTime::now(),
        })
    }
}

impl Relay for LocalRelay {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>> {
        let _order = self.order.lock();
        for p in &batch {
            self.hub.dispatch(&p.topic, &p.data, &p.audience);
        }
        Box::pin(async { Ok(()) })
    }

    fn sync_topics(&self, _topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>> {
        // Every publish already passes through this node's hub.
        Box::pin(async { Ok(()) })
    }

    fn forward(
        &self,
        _node: &str,
        _request: SubscribeRequest,
    ) -> BoxFuture<'_, Result<Result<(), ApiError>, RelayError>> {
        // A single node holds every client; an id of another node is unknown.
        Box::pin(async { Ok(Err(super::missing_client())) })
    }

    fn take_incoming(&self) -> Option<mpsc::Receiver<Incoming>> {
        None
    }

    fn nodes(&self) -> BoxFuture<'_, Result<Vec<NodeInfo>, RelayError>> {
        let me = NodeInfo::of(&self.hub, self.address, self.started_at);
        Box::pin(async move { Ok(vec![me]) })
    }

    fn health(&self) -> RelayHealth {
        RelayHealth {
            kind: "local",
            mode: None,
            healthy: true,
            reason: None,
            shards: Vec::new(),
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
