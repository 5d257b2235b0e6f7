//! The in-process relay: a single node is the whole broker.
//!
//! It keeps an in-memory history per topic (the same `--history-size` and
//! `--history-ttl` as in Redis), so a subscription with a `since` cursor
//! resumes on a node without Redis too.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{Forwarded, Incoming, NodeInfo, Publication, Relay, RelayError, RelayHealth};
use crate::{client::Client, error::ApiError, hub::Hub, metrics as m, protocol};

/// The in-process relay of a single node.
///
/// A publish is dispatched into the hub before it returns: the hub's
/// fan-out workers are the only queue, and the broker admits publishers
/// only while their backlog is under its bounds. A batch is dispatched
/// under one lock, so concurrent publishes do not interleave inside it.
pub struct LocalRelay {
    hub: Hub,
    /// Held while dispatching and replaying, so a replay sits between two
    /// dispatches, never inside one.
    history: parking_lot::Mutex<History>,
    address: SocketAddr,
    started_at: SystemTime,
    /// The origin of [`Relay::stamp`], and the last stamp handed out.
    epoch: Instant,
    last_stamp: std::sync::atomic::AtomicU64,
}

/// The last messages of each topic, bounded in count and age.
struct History {
    size: usize,
    ttl: Duration,
    topics: HashMap<String, VecDeque<(Instant, Publication)>>,
    publishes: u64,
}

impl History {
    fn keep(&mut self, p: &Publication) {
        if self.size == 0 {
            return;
        }
        let now = Instant::now();
        let kept = self
            .topics
            .entry(protocol::base_topic(&p.topic).to_owned())
            .or_default();
        kept.push_back((now, p.clone()));
        while kept.len() > self.size {
            kept.pop_front();
        }
        self.publishes += 1;
        if self.publishes.is_multiple_of(1024) {
            // Drop what has expired everywhere, now and then.
            let ttl = self.ttl;
            self.topics.retain(|_, kept| {
                while kept
                    .front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > ttl)
                {
                    kept.pop_front();
                }
                !kept.is_empty()
            });
        }
    }
}

impl LocalRelay {
    /// A relay without history.
    pub fn start(hub: Hub, address: SocketAddr) -> Arc<Self> {
        Self::with_history(hub, address, 0, Duration::ZERO)
    }

    /// A relay that keeps the last `size` messages of each topic, for
    /// `ttl` after they were published.
    pub fn with_history(hub: Hub, address: SocketAddr, size: usize, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            hub,
            history: parking_lot::Mutex::new(History {
                size,
                ttl,
                topics: HashMap::new(),
                publishes: 0,
            }),
            address,
            started_at: SystemTime::now(),
            epoch: Instant::now(),
            last_stamp: Default::default(),
        })
    }
}

impl Relay for LocalRelay {
    fn publish(&self, batch: Vec<Publication>) -> BoxFuture<'_, Result<(), RelayError>> {
        let mut history = self.history.lock();
        for p in &batch {
            self.hub.dispatch(&p.topic, &p.data, &p.audience);
            history.keep(p);
        }
        Box::pin(async { Ok(()) })
    }

    fn replay(
        &self,
        client: Arc<Client>,
        key: protocol::SubKey,
        since: String,
    ) -> BoxFuture<'_, Result<(), RelayError>> {
        let history = self.history.lock();
        let now = Instant::now();
        let kept = history.topics.get(protocol::base_topic(&key));
        let from = kept.and_then(|kept| {
            kept.iter()
                .rposition(|(at, p)| {
                    p.id.as_deref() == Some(since.as_str())
                        && now.duration_since(*at) <= history.ttl
                })
                .map(|i| i + 1)
        });
        match (kept, from) {
            (Some(kept), Some(from)) => {
                for (_, p) in kept.iter().skip(from) {
                    self.hub
                        .push_replay(&client, &key, &p.topic, &p.data, &p.audience);
                    metrics::counter!(m::RESUME_REPLAYED).increment(1);
                }
            }
            _ => metrics::counter!(m::RESUME_UNKNOWN_CURSOR).increment(1),
        }
        self.hub.release(&client, &key);
        Box::pin(async { Ok(()) })
    }

    fn sync_topics(&self, _topics: Vec<Arc<str>>) -> BoxFuture<'static, Result<(), RelayError>> {
        // Every publish already passes through this node's hub.
        Box::pin(async { Ok(()) })
    }

    fn forward(
        &self,
        _node: &str,
        _request: Forwarded,
    ) -> BoxFuture<'_, Result<Result<(), ApiError>, RelayError>> {
        // A single node holds every client; an id of another node is unknown.
        Box::pin(async { Ok(Err(super::missing_client())) })
    }

    fn stamp(&self) -> Option<u64> {
        // One node: its monotonic clock, strictly increasing.
        let now = self.epoch.elapsed().as_micros() as u64;
        let prev = self
            .last_stamp
            .fetch_update(
                std::sync::atomic::Ordering::AcqRel,
                std::sync::atomic::Ordering::Acquire,
                |last| Some(now.max(last + 1)),
            )
            .expect("always Some");
        Some(now.max(prev + 1))
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
            degraded: Vec::new(),
            membership_lost: None,
            shards: Vec::new(),
        }
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}
