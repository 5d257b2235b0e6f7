//! The in-process relay: a single node is the whole broker.
//!
//! It keeps an in-memory history per topic (the same `--history-size` and
//! `--history-ttl` as in Redis), so a subscription with a `since` cursor
//! resumes on a node without Redis too. A replay runs in its own task,
//! paced by the client's stream (see [`super::redis`]'s history module
//! for the same design on Redis): it takes a page of what follows its
//! position under the history lock, pushes it as the client drains, and
//! releases the key under the lock once nothing follows, so no publish
//! falls between replay and live delivery.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::future::BoxFuture;
use tokio::sync::mpsc;

use super::{
    Forwarded, Incoming, NodeInfo, PendingReplay, Publication, Relay, RelayError, RelayHealth,
};
use crate::{client::Client, error::ApiError, hub::Hub, metrics as m, protocol};

/// The in-process relay of a single node.
///
/// A publish is dispatched into the hub before it returns: the hub's
/// fan-out workers are the only queue, and the broker admits publishers
/// only while their backlog is under its bounds. A batch is dispatched
/// under one lock, so concurrent publishes do not interleave inside it.
pub struct LocalRelay {
    hub: Hub,
    /// Held while dispatching and while a replay takes a page or releases
    /// its key, so the release sits between two dispatches.
    history: Arc<parking_lot::Mutex<History>>,
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
    topics: HashMap<String, Kept>,
    /// Messages kept so far: each one's sequence number.
    publishes: u64,
}

/// One topic's last messages, each with its sequence number (increasing,
/// not contiguous: the counter is shared by all topics).
#[derive(Default)]
struct Kept {
    messages: VecDeque<(Instant, u64, Publication)>,
    /// The sequence number of the last message dropped (trimmed or
    /// expired); a replay behind it missed messages.
    dropped: u64,
}

impl History {
    fn keep(&mut self, p: &Publication) {
        if self.size == 0 {
            return;
        }
        let now = Instant::now();
        let before = self.publishes;
        self.publishes += 1;
        let seq = self.publishes;
        let kept = self
            .topics
            .entry(protocol::base_topic(&p.topic).to_owned())
            .or_insert_with(|| Kept {
                messages: VecDeque::new(),
                // Whatever this topic had before expired with it.
                dropped: before,
            });
        kept.messages.push_back((now, seq, p.clone()));
        while kept.messages.len() > self.size {
            if let Some((_, s, _)) = kept.messages.pop_front() {
                kept.dropped = s;
            }
        }
        if self.publishes.is_multiple_of(1024) {
            // Drop what has expired everywhere, now and then.
            let ttl = self.ttl;
            self.topics.retain(|_, kept| {
                while kept
                    .messages
                    .front()
                    .is_some_and(|(at, _, _)| now.duration_since(*at) > ttl)
                {
                    if let Some((_, s, _)) = kept.messages.pop_front() {
                        kept.dropped = s;
                    }
                }
                !kept.messages.is_empty()
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
            history: Arc::new(parking_lot::Mutex::new(History {
                size,
                ttl,
                topics: HashMap::new(),
                publishes: 0,
            })),
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
    ) -> BoxFuture<'_, Result<Result<PendingReplay, ApiError>, RelayError>> {
        let history = self.history.lock();
        let now = Instant::now();
        let base = protocol::base_topic(&key).to_owned();
        let kept = history.topics.get(&base);
        let cursor = kept.and_then(|kept| {
            kept.messages
                .iter()
                .rev()
                .find(|(at, _, p)| {
                    p.id.as_deref() == Some(since.as_str())
                        && now.duration_since(*at) <= history.ttl
                })
                .map(|(_, seq, _)| *seq)
        });
        let Some(after) = cursor else {
            metrics::counter!(m::RESUME_UNKNOWN_CURSOR).increment(1);
            drop(history);
            let hub = self.hub.clone();
            return Box::pin(async move {
                Ok(Ok(PendingReplay::new(move || hub.release(&client, &key))))
            });
        };
        // A message the client's queue can never take is refused now.
        let too_large = kept.is_some_and(|kept| {
            kept.messages
                .iter()
                .filter(|(_, seq, _)| *seq > after)
                .any(|(_, _, p)| super::too_large_for(&client, &key, p.data.len()))
        });
        drop(history);
        if too_large {
            let refusal = super::undeliverable_replay(&client);
            return Box::pin(async { Ok(Err(refusal)) });
        }
        let (hub, history) = (self.hub.clone(), self.history.clone());
        Box::pin(async move {
            Ok(Ok(PendingReplay::new(move || {
                tokio::spawn(run_replay(hub, history, client, key, base, after));
            })))
        })
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

/// Messages a replay takes from the history at a time.
const REPLAY_PAGE: usize = 64;

/// Deliver `base`'s messages after sequence number `after` to `client`'s
/// held `key`, a page at a time, each page pushed as the client's stream
/// drains; then release the key under the history lock, once nothing
/// follows what was pushed. A replay that fell behind the history's trim
/// closes the client's stream (it missed messages).
async fn run_replay(
    hub: Hub,
    history: Arc<parking_lot::Mutex<History>>,
    client: Arc<Client>,
    key: protocol::SubKey,
    base: String,
    mut after: u64,
) {
    loop {
        if !hub.is_held(&client, &key) {
            return; // unsubscribed or gone meanwhile
        }
        let page: Vec<Publication> = {
            let history = history.lock();
            let Some(kept) = history.topics.get(&base) else {
                hub.release(&client, &key);
                return;
            };
            if kept.dropped > after {
                drop(history);
                tracing::warn!(topic = %base, client = client.id(), "a replay fell behind the history's trim");
                metrics::counter!(m::HISTORY_GAPS).increment(1);
                hub.close_lost(&client);
                return;
            }
            let page: Vec<(u64, Publication)> = kept
                .messages
                .iter()
                .filter(|(_, seq, _)| *seq > after)
                .take(REPLAY_PAGE)
                .map(|(_, seq, p)| (*seq, p.clone()))
                .collect();
            match page.last() {
                None => {
                    // Nothing follows: live from the next dispatch on.
                    hub.release(&client, &key);
                    return;
                }
                Some((seq, _)) => after = *seq,
            }
            page.into_iter().map(|(_, p)| p).collect()
        };
        for p in page {
            if !hub.is_held(&client, &key) {
                return; // unsubscribed or gone meanwhile
            }
            let pushed = hub
                .push_replay_paced(
                    &client,
                    &key,
                    &p.topic,
                    &p.data,
                    &p.audience,
                    super::REPLAY_STALL,
                )
                .await;
            if pushed.is_err() {
                return;
            }
            metrics::counter!(m::RESUME_REPLAYED).increment(1);
        }
    }
}
