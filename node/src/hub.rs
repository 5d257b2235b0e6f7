//! The local hub: this node's client registry, its topic index, and the
//! chunked fan-out of a message to the local subscribers of its topic.
//!
//! The hub only knows local clients. Messages reach it from the relay
//! ([`crate::relay`]), which calls [`Hub::dispatch`] from one task, in the
//! order the relay received them; the hub keeps that order for every client.
//!
//! ## Index
//! `base topic → subscription key → subscribers`. A publish to topic `T`
//! reaches keys equal to `T` or starting with `T?` (the SDKs' `?options=`
//! form), which all share the base topic (the part before the first `?`), so
//! a publish costs one lookup plus the subscribers of `T`, never a scan of
//! all clients. Each key's subscriber list keeps a lazily rebuilt snapshot
//! (`Arc<[Arc<Client>]>`) so that a publish takes the index lock only long
//! enough to clone a few `Arc`s.
//!
//! ## Fan-out
//! The SSE frame `event:<key>\ndata:<json>\n\n` is encoded once per key and
//! shared by refcount; each stream adds its own `id:` line when it writes.
//! Pushing is done by a fixed set of fan-out workers (one per core by
//! default). Every client belongs to one worker (`seq % workers`), and each
//! snapshot is partitioned the same way, so a large recipient set is split
//! across the workers and pushed in parallel. Each worker takes messages
//! from its own FIFO queue, in dispatch order, so every client receives
//! messages in the order they were dispatched, with no barrier between
//! messages. A worker yields to the scheduler after every `chunk_size`
//! pushes, so a huge broadcast does not keep the writers of already-served
//! clients waiting. Pushing never waits on a client: a full queue
//! disconnects that client.
//!
//! Dispatch itself never awaits: the relay's receive loop hands a burst of
//! messages to the workers back to back, and the workers push each client
//! several events before its writer runs, so a burst costs each client one
//! write instead of one per event.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Instant,
};

use bytes::Bytes;
use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::{
    auth::AuthRecord,
    client::{Client, CloseReason, SendError, options_of},
    metrics as m,
    protocol::{self, ClientIdGen},
};

/// Settings of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This node's tag, the first characters of every client id it makes.
    pub node_tag: String,
    /// Pushes a fan-out worker makes before it yields to the scheduler.
    pub chunk_size: usize,
    /// Fan-out workers; 0 means one per core.
    pub workers: usize,
    /// Events a client may have queued before it is disconnected as slow.
    pub queue_capacity: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            node_tag: protocol::random_alphanumeric(protocol::NODE_TAG_LEN),
            chunk_size: 512,
            queue_capacity: 1024,
            workers: 0,
        }
    }
}

/// Who a dispatched message is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// Every subscriber of the topic.
    All,
    /// Only this client (if it is local and subscribed).
    Client(String),
    /// Only clients bound to this auth record id (if local and subscribed).
    User(String),
}

/// Subscribers of one key, partitioned by fan-out worker
/// (`partition[w]` holds the clients with `seq % workers == w`).
type Snapshot = Arc<[Vec<Arc<Client>>]>;

fn partition<'a>(clients: impl Iterator<Item = &'a Arc<Client>>, workers: usize) -> Snapshot {
    let mut parts = vec![Vec::new(); workers];
    for c in clients {
        parts[(c.seq % workers as u64) as usize].push(c.clone());
    }
    parts.into()
}

#[derive(Default)]
struct Subscribers {
    members: HashMap<u64, Arc<Client>>,
    snapshot: OnceLock<Snapshot>,
}

impl Subscribers {
    fn snapshot(&self, workers: usize) -> Snapshot {
        self.snapshot
            .get_or_init(|| partition(self.members.values(), workers))
            .clone()
    }

    fn changed(&mut self) {
        self.snapshot = OnceLock::new();
    }
}

/// Subscription keys of one base topic.
#[derive(Default)]
struct Topic {
    keys: HashMap<Arc<str>, Subscribers>,
}

#[derive(Default)]
struct Index {
    topics: HashMap<Arc<str>, Topic>,
}

impl Index {
    /// Adds `client` under `key`; true when the base topic is new here.
    fn add(&mut self, key: &Arc<str>, client: &Arc<Client>) -> bool {
        let base = protocol::base_topic(key);
        let (topic, new) = match self.topics.get_mut(base) {
            Some(t) => (t, false),
            None => (self.topics.entry(Arc::from(base)).or_default(), true),
        };
        let subs = topic.keys.entry(key.clone()).or_default();
        subs.members.insert(client.seq, client.clone());
        subs.changed();
        new
    }

    /// Removes `client` from `key`; true when the base topic is now gone.
    fn remove(&mut self, key: &str, seq: u64) -> bool {
        let base = protocol::base_topic(key);
        let Some(topic) = self.topics.get_mut(base) else {
            return false;
        };
        if let Some(subs) = topic.keys.get_mut(key) {
            if subs.members.remove(&seq).is_some() {
                subs.changed();
            }
            if subs.members.is_empty() {
                topic.keys.remove(key);
            }
        }
        if topic.keys.is_empty() {
            self.topics.remove(base);
            return true;
        }
        false
    }
}

/// The result of changing a client's subscriptions.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TopicChanges {
    /// Base topics that now have local subscribers and had none.
    pub added: Vec<Arc<str>>,
    /// Base topics that had local subscribers and now have none.
    pub removed: Vec<Arc<str>>,
}

impl TopicChanges {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }

    /// Every base topic whose presence changed.
    pub fn all(self) -> Vec<Arc<str>> {
        let mut v = self.added;
        v.extend(self.removed);
        v
    }
}

/// Work for one fan-out worker.
enum Work {
    /// Frames and the subscribers to push them to (this worker's partition).
    Push(Arc<Vec<(Bytes, Snapshot)>>),
    /// Answer once everything queued before it is pushed.
    Barrier(oneshot::Sender<()>),
}

struct HubInner {
    config: HubConfig,
    /// Number of fan-out workers (resolved from the config).
    worker_count: usize,
    /// Started on first dispatch, inside the runtime.
    workers: OnceLock<Vec<mpsc::UnboundedSender<Work>>>,
    ids: ClientIdGen,
    next_seq: AtomicU64,
    clients: RwLock<HashMap<Arc<str>, Arc<Client>>>,
    index: RwLock<Index>,
    /// Auth record id → its local clients, for directed sends.
    users: RwLock<HashMap<String, HashMap<u64, Arc<Client>>>>,
    subscriptions: AtomicUsize,
}

/// This node's clients and topics. Cheap to clone.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("node_tag", &self.inner.config.node_tag)
            .field("clients", &self.total_clients())
            .finish_non_exhaustive()
    }
}

impl Hub {
    pub fn new(config: HubConfig) -> Self {
        let worker_count = match config.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        Self {
            inner: Arc::new(HubInner {
                worker_count,
                workers: OnceLock::new(),
                ids: ClientIdGen::new(&config.node_tag),
                config,
                next_seq: AtomicU64::new(1),
                clients: Default::default(),
                index: Default::default(),
                users: Default::default(),
                subscriptions: AtomicUsize::new(0),
            }),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// The tag that starts every client id of this node.
    pub fn node_tag(&self) -> &str {
        self.inner.ids.node_tag()
    }

    /// Create and register a new client for a stream from `ip`.
    pub fn register(&self, ip: IpAddr) -> Arc<Client> {
        let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
        let client = Arc::new(Client::new(
            seq,
            self.inner.ids.next_id(),
            ip,
            self.inner.config.queue_capacity,
        ));
        self.inner
            .clients
            .write()
            .insert(client.id_arc().clone(), client.clone());
        client
    }

    /// Remove a client: discard it, drop its subscriptions and auth binding.
    /// A no-op for unknown ids. Returns the base topics that lost their last
    /// local subscriber.
    pub fn unregister(&self, id: &str) -> TopicChanges {
        let Some(client) = self.inner.clients.write().remove(id) else {
            return TopicChanges::default();
        };
        client.close(CloseReason::Discarded);
        let mut st = client.state.lock();
        st.registered = false;
        let keys: Vec<Arc<str>> = st.subscriptions.drain().map(|(k, _)| k).collect();
        if let Some(auth) = st.auth.take() {
            self.unbind_user(&auth.id, client.seq);
        }
        drop(st);
        let mut changes = TopicChanges::default();
        let mut index = self.inner.index.write();
        for key in &keys {
            if index.remove(key, client.seq) {
                changes.removed.push(Arc::from(protocol::base_topic(key)));
            }
        }
        drop(index);
        self.inner
            .subscriptions
            .fetch_sub(keys.len(), Ordering::Relaxed);
        changes
    }

    /// Close every stream (server shutdown). Clients stay registered until
    /// their streams end.
    pub fn close_all(&self, reason: CloseReason) {
        for client in self.inner.clients.read().values() {
            client.close(reason);
        }
    }

    /// A copy of the registry (PocketBase's `Clients()`).
    pub fn clients(&self) -> HashMap<String, Arc<Client>> {
        self.inner
            .clients
            .read()
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    /// All clients split into chunks of `size` (PocketBase's
    /// `ChunkedClients`); a size of 0 counts as 1.
    pub fn chunked_clients(&self, size: usize) -> Vec<Vec<Arc<Client>>> {
        let all: Vec<Arc<Client>> = self.inner.clients.read().values().cloned().collect();
        all.chunks(size.max(1)).map(<[_]>::to_vec).collect()
    }

    pub fn total_clients(&self) -> usize {
        self.inner.clients.read().len()
    }

    pub fn client_by_id(&self, id: &str) -> Option<Arc<Client>> {
        self.inner.clients.read().get(id).cloned()
    }

    /// Local clients bound to the auth record `user_id`.
    pub fn clients_of_user(&self, user_id: &str) -> Vec<Arc<Client>> {
        self.inner
            .users
            .read()
            .get(user_id)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Distinct base topics with local subscribers.
    pub fn total_topics(&self) -> usize {
        self.inner.index.read().topics.len()
    }

    /// Subscription keys held by local clients.
    pub fn total_subscriptions(&self) -> usize {
        self.inner.subscriptions.load(Ordering::Relaxed)
    }

    /// Whether any local client subscribes to a key of this base topic.
    pub fn has_topic(&self, base: &str) -> bool {
        self.inner.index.read().topics.contains_key(base)
    }

    /// All base topics with local subscribers.
    pub fn topics(&self) -> Vec<Arc<str>> {
        self.inner.index.read().topics.keys().cloned().collect()
    }

    /// Replace a client's whole subscription set (the realtime POST) and
    /// bind `auth` to it. `None` when the client is no longer registered.
    pub fn set_subscriptions(
        &self,
        client: &Arc<Client>,
        keys: &[String],
        auth: Option<AuthRecord>,
    ) -> Option<TopicChanges> {
        let mut st = client.state.lock();
        if !st.registered {
            return None;
        }
        let wanted: HashSet<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| !k.is_empty())
            .collect();
        let removed: Vec<Arc<str>> = st
            .subscriptions
            .keys()
            .filter(|k| !wanted.contains(&***k))
            .cloned()
            .collect();
        let added: Vec<Arc<str>> = wanted
            .iter()
            .filter(|k| !st.subscriptions.contains_key(**k))
            .map(|k| Arc::<str>::from(*k))
            .collect();
        let changes = self.apply(client, &mut st.subscriptions, &added, &removed);
        self.rebind(client, &mut st.auth, auth.map(Arc::new));
        Some(changes)
    }

    /// Add subscription keys to a client (PocketBase's `Subscribe`).
    pub fn subscribe(&self, client: &Arc<Client>, keys: &[&str]) -> Option<TopicChanges> {
        let mut st = client.state.lock();
        if !st.registered {
            return None;
        }
        let added: Vec<Arc<str>> = keys
            .iter()
            .filter(|k| !k.is_empty() && !st.subscriptions.contains_key(**k))
            .collect::<HashSet<_>>()
            .into_iter()
            .map(|k| Arc::<str>::from(*k))
            .collect();
        Some(self.apply(client, &mut st.subscriptions, &added, &[]))
    }

    /// Remove subscription keys from a client; all of them when `keys` is
    /// empty (PocketBase's `Unsubscribe`).
    pub fn unsubscribe(&self, client: &Arc<Client>, keys: &[&str]) -> TopicChanges {
        let mut st = client.state.lock();
        let removed: Vec<Arc<str>> = st
            .subscriptions
            .keys()
            .filter(|k| keys.is_empty() || keys.contains(&&***k))
            .cloned()
            .collect();
        self.apply(client, &mut st.subscriptions, &[], &removed)
    }

    /// Update the index and the client's map together, under the client's
    /// state lock (taken by the caller), then the index lock: always in that
    /// order, so concurrent POSTs and disconnects of one client serialise.
    fn apply(
        &self,
        client: &Arc<Client>,
        subs: &mut HashMap<Arc<str>, Arc<protocol::SubscriptionOptions>>,
        added: &[Arc<str>],
        removed: &[Arc<str>],
    ) -> TopicChanges {
        let mut changes = TopicChanges::default();
        if added.is_empty() && removed.is_empty() {
            return changes;
        }
        let mut index = self.inner.index.write();
        for key in removed {
            subs.remove(key);
            if index.remove(key, client.seq) {
                changes.removed.push(Arc::from(protocol::base_topic(key)));
            }
        }
        for key in added {
            subs.insert(key.clone(), options_of(key));
            if index.add(key, client) {
                changes.added.push(Arc::from(protocol::base_topic(key)));
            }
        }
        drop(index);
        self.inner
            .subscriptions
            .fetch_add(added.len(), Ordering::Relaxed);
        self.inner
            .subscriptions
            .fetch_sub(removed.len(), Ordering::Relaxed);
        changes
    }

    fn rebind(
        &self,
        client: &Arc<Client>,
        slot: &mut Option<Arc<AuthRecord>>,
        auth: Option<Arc<AuthRecord>>,
    ) {
        let same_user = match (&*slot, &auth) {
            (Some(a), Some(b)) => a.id == b.id,
            (None, None) => true,
            _ => false,
        };
        if !same_user {
            if let Some(old) = slot.as_ref() {
                self.unbind_user(&old.id, client.seq);
            }
            if let Some(new) = auth.as_ref() {
                self.inner
                    .users
                    .write()
                    .entry(new.id.clone())
                    .or_default()
                    .insert(client.seq, client.clone());
            }
        }
        *slot = auth;
    }

    fn unbind_user(&self, user_id: &str, seq: u64) {
        let mut users = self.inner.users.write();
        if let Some(m) = users.get_mut(user_id) {
            m.remove(&seq);
            if m.is_empty() {
                users.remove(user_id);
            }
        }
    }

    /// Fan a message for `topic` out to the matching local subscribers in
    /// `audience`, one event per matching key, named after that key.
    /// Returns the number of events handed to the fan-out workers.
    ///
    /// `data` must be one line of JSON. Never waits: the workers push. Every
    /// client receives what is dispatched in dispatch order, so callers
    /// dispatch from one task (the relay's receive loop).
    pub fn dispatch(&self, topic: &str, data: &[u8], audience: &Audience) -> usize {
        let targets = self.targets(topic, audience);
        let total: usize = targets
            .iter()
            .map(|(_, s)| s.iter().map(Vec::len).sum::<usize>())
            .sum();
        metrics::counter!(m::DISPATCHED).increment(1);
        if total == 0 {
            return 0;
        }
        let frames: Arc<Vec<(Bytes, Snapshot)>> = Arc::new(
            targets
                .into_iter()
                .map(|(key, subs)| (protocol::event_frame(&key, data), subs))
                .collect(),
        );
        for (w, worker) in self.workers().iter().enumerate() {
            if frames.iter().any(|(_, s)| !s[w].is_empty()) {
                let _ = worker.send(Work::Push(frames.clone()));
            }
        }
        total
    }

    /// Resolves once every message dispatched before the call has been
    /// pushed into its clients' queues.
    pub async fn barrier(&self) {
        let waits: Vec<_> = self
            .workers()
            .iter()
            .map(|w| {
                let (tx, rx) = oneshot::channel();
                let _ = w.send(Work::Barrier(tx));
                rx
            })
            .collect();
        for rx in waits {
            let _ = rx.await;
        }
    }

    fn workers(&self) -> &[mpsc::UnboundedSender<Work>] {
        self.inner.workers.get_or_init(|| {
            (0..self.inner.worker_count)
                .map(|w| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(fan_out_worker(
                        w,
                        rx,
                        Arc::downgrade(&self.inner),
                        self.inner.config.chunk_size.max(1),
                    ));
                    tx
                })
                .collect()
        })
    }

    /// Unregister clients whose queue overflowed.
    fn drop_slow(&self, slow: Vec<Arc<Client>>) {
        for client in slow {
            tracing::info!(
                client = client.id(),
                "disconnecting slow client (queue full)"
            );
            metrics::counter!(m::SLOW_CLIENT_DISCONNECTS).increment(1);
            // The stream ends on its own; dropping it from the index now
            // stops further fan-out work for it.
            self.unregister(client.id());
        }
    }

    /// The matching keys and their subscribers, under the index read lock.
    fn targets(&self, topic: &str, audience: &Audience) -> Vec<(Arc<str>, Snapshot)> {
        let index = self.inner.index.read();
        let Some(entry) = index.topics.get(protocol::base_topic(topic)) else {
            return Vec::new();
        };
        let keys = entry
            .keys
            .iter()
            .filter(|(k, _)| protocol::key_matches(k, topic));
        let workers = self.inner.worker_count;
        match audience {
            Audience::All => keys
                .map(|(k, s)| (k.clone(), s.snapshot(workers)))
                .collect(),
            Audience::Client(id) => {
                let Some(seq) = self.inner.clients.read().get(id.as_str()).map(|c| c.seq) else {
                    return Vec::new();
                };
                keys.filter_map(|(k, s)| {
                    let c = s.members.get(&seq)?;
                    Some((k.clone(), partition(std::iter::once(c), workers)))
                })
                .collect()
            }
            Audience::User(user) => {
                let users = self.inner.users.read();
                let Some(mine) = users.get(user.as_str()) else {
                    return Vec::new();
                };
                keys.filter_map(|(k, s)| {
                    let mut v = mine.keys().filter_map(|seq| s.members.get(seq)).peekable();
                    v.peek()?;
                    Some((k.clone(), partition(v, workers)))
                })
                .collect()
            }
        }
    }
}

/// One fan-out worker: pushes its partition of every dispatched message,
/// in dispatch order.
async fn fan_out_worker(
    w: usize,
    mut rx: mpsc::UnboundedReceiver<Work>,
    hub: std::sync::Weak<HubInner>,
    chunk: usize,
) {
    while let Some(work) = rx.recv().await {
        let frames = match work {
            Work::Push(frames) => frames,
            Work::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
        };
        let started = Instant::now();
        let mut slow = Vec::new();
        let mut pushed = 0;
        for (frame, subs) in frames.iter() {
            for client in &subs[w] {
                if let Err(SendError::Full) = client.push(frame.clone()) {
                    slow.push(client.clone());
                }
                pushed += 1;
                if pushed % chunk == 0 {
                    // Let the writers of the clients served so far run.
                    tokio::task::yield_now().await;
                }
            }
        }
        metrics::histogram!(m::FANOUT_SECONDS).record(started.elapsed().as_secs_f64());
        if !slow.is_empty()
            && let Some(inner) = hub.upgrade()
        {
            Hub { inner }.drop_slow(slow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Take;

    fn hub(chunk: usize, cap: usize) -> Hub {
        Hub::new(HubConfig {
            node_tag: "TestNode".into(),
            chunk_size: chunk,
            queue_capacity: cap,
            workers: 3,
        })
    }

    fn ip() -> IpAddr {
        "127.0.0.1".parse().unwrap()
    }

    fn drained(c: &Client) -> String {
        let (mut batch, mut out) = (Vec::new(), Vec::new());
        if let Take::Data { .. } = c.take(&mut batch, usize::MAX) {
            c.encode(&mut batch, &mut out);
        }
        String::from_utf8(out).unwrap()
    }

    fn keys(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn registry_basics() {
        // PocketBase broker_test: Clients() is a copy, ChunkedClients,
        // TotalClients, ClientById, Register, Unregister.
        let h = hub(10, 10);
        assert!(h.clients().is_empty());
        assert!(h.chunked_clients(2).is_empty());
        assert_eq!(h.total_clients(), 0);
        let a = h.register(ip());
        let b = h.register(ip());
        let c = h.register(ip());
        let mut copy = h.clients();
        copy.clear();
        assert_eq!(h.total_clients(), 3);
        let sizes: Vec<usize> = h.chunked_clients(2).iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![2, 1]);
        assert_eq!(h.chunked_clients(0).len(), 3);
        assert!(h.client_by_id(a.id()).is_some());
        assert!(h.client_by_id("missing").is_none());
        h.unregister(b.id());
        assert!(h.client_by_id(b.id()).is_none());
        assert!(b.is_discarded());
        assert!(h.client_by_id(a.id()).is_some() && h.client_by_id(c.id()).is_some());
        h.unregister("missing");
        assert_eq!(h.total_clients(), 2);
    }

    #[test]
    fn subscriptions_prefix_and_exact_lookup() {
        // PocketBase client_test: prefix table and HasSubscription.
        let h = hub(10, 10);
        let c = h.register(ip());
        h.subscribe(&c, &["", "sub1", "sub11", "sub2"]).unwrap();
        assert_eq!(c.subscriptions(&[]).len(), 3);
        assert!(c.subscriptions(&["missing"]).is_empty());
        let mut s: Vec<String> = c.subscriptions(&["sub1"]).into_keys().collect();
        s.sort();
        assert_eq!(s, ["sub1", "sub11"]);
        assert_eq!(
            c.subscriptions(&["sub2"]).into_keys().collect::<Vec<_>>(),
            ["sub2"]
        );
        assert_eq!(
            c.subscriptions(&["sub1?"]).into_keys().collect::<Vec<_>>(),
            ["sub1"]
        );
        assert!(c.has_subscription("sub1") && !c.has_subscription("sub"));
        h.unsubscribe(&c, &["sub1"]);
        assert!(!c.has_subscription("sub1"));
        h.unsubscribe(&c, &[]);
        assert!(c.subscriptions(&[]).is_empty());
        assert_eq!(h.total_topics(), 0);
        assert_eq!(h.total_subscriptions(), 0);
    }

    #[test]
    fn replacing_reports_topic_presence_changes() {
        let h = hub(10, 10);
        let a = h.register(ip());
        let b = h.register(ip());
        let ch = h.set_subscriptions(&a, &keys(&["t1", "t1?options=x", "t2"]), None);
        let mut added = ch.unwrap().added;
        added.sort();
        assert_eq!(added, [Arc::from("t1"), Arc::from("t2")]);
        let ch = h.set_subscriptions(&b, &keys(&["t2"]), None).unwrap();
        assert!(ch.is_empty());
        let ch = h.set_subscriptions(&a, &keys(&["t3"]), None).unwrap();
        assert_eq!(ch.added, [Arc::from("t3")]);
        assert_eq!(ch.removed, [Arc::from("t1")]);
        assert_eq!(h.unregister(b.id()).removed, [Arc::from("t2")]);
        assert_eq!(h.topics(), [Arc::from("t3")]);
        // An unregistered client cannot subscribe again.
        assert!(h.set_subscriptions(&b, &keys(&["t9"]), None).is_none());
        assert!(!h.has_topic("t9"));
    }

    #[tokio::test]
    async fn dispatch_names_each_event_after_the_key() {
        let h = hub(10, 10);
        let a = h.register(ip());
        let b = h.register(ip());
        let c = h.register(ip());
        h.set_subscriptions(&a, &keys(&["news", "news?options=%7B%7D"]), None);
        h.set_subscriptions(&b, &keys(&["news2"]), None);
        h.set_subscriptions(&c, &keys(&["other"]), None);
        assert_eq!(h.dispatch("news", b"{\"n\":1}", &Audience::All), 2);
        h.barrier().await;
        let out = drained(&a);
        assert!(out.contains("event:news\ndata:{\"n\":1}\n\n"));
        assert!(out.contains("event:news?options=%7B%7D\ndata:{\"n\":1}\n\n"));
        assert_eq!(drained(&b), "");
        assert_eq!(drained(&c), "");
    }

    #[tokio::test]
    async fn chunked_dispatch_keeps_order_for_every_client() {
        let h = hub(7, 1000);
        let clients: Vec<_> = (0..100).map(|_| h.register(ip())).collect();
        for c in &clients {
            h.set_subscriptions(c, &keys(&["t"]), None);
        }
        for i in 0..50 {
            assert_eq!(
                h.dispatch("t", i.to_string().as_bytes(), &Audience::All),
                100
            );
        }
        h.barrier().await;
        for c in &clients {
            let seen: Vec<u32> = drained(c)
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.parse().unwrap())
                .collect();
            assert_eq!(seen, (0..50).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn a_full_queue_disconnects_only_that_client() {
        let h = hub(10, 3);
        let slow = h.register(ip());
        let fast = h.register(ip());
        h.set_subscriptions(&slow, &keys(&["t"]), None);
        h.set_subscriptions(&fast, &keys(&["t"]), None);
        for i in 0..10 {
            h.dispatch("t", i.to_string().as_bytes(), &Audience::All);
            h.barrier().await;
            drained(&fast);
        }
        assert!(slow.is_discarded());
        assert!(h.client_by_id(slow.id()).is_none());
        assert!(!fast.is_discarded());
    }

    #[tokio::test]
    async fn directed_dispatch_reaches_only_the_audience() {
        let h = hub(10, 10);
        let a = h.register(ip());
        let b = h.register(ip());
        let a2 = h.register(ip());
        let user = |id: &str| AuthRecord {
            id: id.into(),
            collection_id: "users".into(),
            claims: Default::default(),
        };
        h.set_subscriptions(&a, &keys(&["t"]), Some(user("u1")));
        h.set_subscriptions(&a2, &keys(&["t"]), Some(user("u1")));
        h.set_subscriptions(&b, &keys(&["t"]), Some(user("u2")));
        assert_eq!(h.dispatch("t", b"1", &Audience::Client(b.id().into())), 1);
        assert_eq!(h.dispatch("t", b"2", &Audience::User("u1".into())), 2);
        assert_eq!(h.dispatch("t", b"3", &Audience::User("nobody".into())), 0);
        h.barrier().await;
        assert!(drained(&b).contains("data:1") && drained(&a).contains("data:2"));
        assert!(drained(&a2).contains("data:2"));
        // Re-binding to another user moves the client between user sets.
        h.set_subscriptions(&a2, &keys(&["t"]), Some(user("u2")));
        assert_eq!(h.clients_of_user("u2").len(), 2);
        h.unregister(b.id());
        assert_eq!(h.clients_of_user("u2").len(), 1);
    }
}
