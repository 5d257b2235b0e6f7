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
//! Each distinct subscription key is stored once ([`SubKey`], whose bytes
//! are also the key's `event:<key>\ndata:` head): the index and every client
//! holding the key share it. A client's keys are held against a byte budget
//! (`max_subscription_bytes`).
//!
//! ## Fan-out
//! A publication's data (`<json>\n\n`) is made once and shared by refcount
//! by every key and client it goes to; an event is two refcounted parts (the
//! key's head and the data), and each stream adds its own `id:` line when it
//! writes. So a 244 KiB message that matches 1,000 keys of a client costs
//! 1,000 × two pointers in its queue, and is charged once against the
//! client's queue bound in bytes (see [`crate::client`]).
//!
//! Pushing is done by a fixed set of fan-out workers (one per core by
//! default). Every client belongs to one worker (`seq % workers`), and each
//! snapshot is partitioned the same way, so a large recipient set is split
//! across the workers and pushed in parallel. Pushing never waits on a
//! client: a full queue disconnects that client.
//!
//! ## Fairness and the backlog
//! Each worker keeps one FIFO per base topic and serves the topics with
//! work round-robin, `chunk_size` pushes per turn. A message of one topic
//! therefore waits behind at most one turn of every other busy topic, never
//! behind a whole flood: with the default 512 pushes per turn, a few hundred
//! microseconds per busy topic. Order is kept per topic (and so per key),
//! which is the order Redis guarantees anyway; messages of different topics
//! may interleave differently for different clients.
//!
//! The work not yet pushed is the backlog, counted in deliveries per topic
//! and in bytes of held publications. A publisher is admitted while each of
//! its topics has fewer than `max_backlog_deliveries` deliveries waiting and
//! the node holds less than `max_backlog_bytes` ([`Hub::admit`] waits a
//! bounded time for that, then the publish is refused with 503). So a flood
//! holds back the publishers of the flooded topic, not those of the others,
//! unless it fills the memory bound. Work
//! that arrives from other nodes cannot be refused; if it would take the
//! held bytes past twice the bound, that publication is not queued and its
//! local recipients are disconnected (`CloseReason::Overloaded`): they
//! reconnect, as after any missed message.
//!
//! Dispatch itself never awaits: the relay's receive loop hands a burst of
//! messages to the workers back to back, and the workers push each client
//! several events before its writer runs, so a burst costs each client one
//! write instead of one per event.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{
        Arc, OnceLock, Weak,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use tokio::sync::Notify;

use crate::{
    auth::AuthRecord,
    client::{Client, CloseReason, SendError},
    metrics as m,
    protocol::{self, ClientIdGen, Frame, SubKey},
};

/// Settings of the hub.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// This node's tag, the first characters of every client id it makes.
    pub node_tag: String,
    /// Pushes a fan-out worker makes for one topic before it turns to the
    /// next topic with work (and yields to the scheduler).
    pub chunk_size: usize,
    /// Fan-out workers; 0 means one per core.
    pub workers: usize,
    /// Events a client may have queued before it is disconnected as slow.
    pub queue_capacity: usize,
    /// Bytes of events a client may have queued before it is disconnected
    /// as slow.
    pub queue_bytes: usize,
    /// Bytes of subscription keys one client may hold.
    pub max_subscription_bytes: usize,
    /// Publishers wait while this many deliveries are not yet pushed.
    pub max_backlog_deliveries: usize,
    /// Publishers wait while publications of this many bytes are held by
    /// the fan-out; at twice this, relayed work is shed (see the module
    /// documentation).
    pub max_backlog_bytes: usize,
    /// Window over which mass closes ([`Hub::close_topic`],
    /// [`Hub::close_all`]) are spread at random; zero closes at once.
    /// Default 3 s (`--close-spread`).
    pub close_spread: Duration,
}

impl Default for HubConfig {
    fn default() -> Self {
        Self {
            node_tag: protocol::random_alphanumeric(protocol::NODE_TAG_LEN),
            chunk_size: 512,
            queue_capacity: 1024,
            queue_bytes: 4 << 20,
            workers: 0,
            max_subscription_bytes: 256 << 10,
            max_backlog_deliveries: 1_000_000,
            max_backlog_bytes: 64 << 20,
            close_spread: Duration::from_secs(3),
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

/// Why a subscription change was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    /// The client is no longer registered.
    #[error("client not registered")]
    Gone,
    /// The keys would take the client past its byte budget.
    #[error("subscription keys over the budget of {max} bytes")]
    OverBudget { max: usize },
    /// A key contains CR or LF.
    #[error("a subscription key contains CR or LF")]
    NotLineSafe,
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
    /// Members whose history is being replayed: live messages skip them
    /// until [`Hub::release`].
    held: HashSet<u64>,
    snapshot: OnceLock<Snapshot>,
}

impl Subscribers {
    fn snapshot(&self, workers: usize) -> Snapshot {
        self.snapshot
            .get_or_init(|| {
                partition(
                    self.members
                        .iter()
                        .filter(|(seq, _)| !self.held.contains(seq))
                        .map(|(_, c)| c),
                    workers,
                )
            })
            .clone()
    }

    /// A live member (not held).
    fn live(&self, seq: u64) -> Option<&Arc<Client>> {
        self.members.get(&seq).filter(|_| !self.held.contains(&seq))
    }

    fn changed(&mut self) {
        self.snapshot = OnceLock::new();
    }
}

/// The keys a publication matches, with their subscribers.
type Targets = Vec<(SubKey, Snapshot)>;

/// Subscription keys of one base topic.
struct Topic {
    name: Arc<str>,
    keys: HashMap<SubKey, Subscribers>,
}

#[derive(Default)]
struct Index {
    topics: HashMap<Arc<str>, Topic>,
}

impl Index {
    /// The stored copy of `key`, if any client holds it.
    fn intern(&self, key: &str) -> Option<SubKey> {
        let topic = self.topics.get(protocol::base_topic(key))?;
        topic.keys.get_key_value(key).map(|(k, _)| k.clone())
    }

    /// Adds `client` under `key`; true when the base topic is new here.
    fn add(&mut self, key: &SubKey, client: &Arc<Client>, held: bool) -> bool {
        let base = protocol::base_topic(key);
        let (topic, new) = match self.topics.get_mut(base) {
            Some(t) => (t, false),
            None => {
                let name: Arc<str> = Arc::from(base);
                let t = self.topics.entry(name.clone()).or_insert(Topic {
                    name,
                    keys: HashMap::new(),
                });
                (t, true)
            }
        };
        let subs = topic.keys.entry(key.clone()).or_default();
        subs.members.insert(client.seq, client.clone());
        if held {
            subs.held.insert(client.seq);
        }
        subs.changed();
        new
    }

    /// Removes `client` from `key`; the base topic when it is now gone.
    fn remove(&mut self, key: &str, seq: u64) -> Option<Arc<str>> {
        let base = protocol::base_topic(key);
        let topic = self.topics.get_mut(base)?;
        if let Some(subs) = topic.keys.get_mut(key) {
            subs.held.remove(&seq);
            if subs.members.remove(&seq).is_some() {
                subs.changed();
            }
            if subs.members.is_empty() {
                topic.keys.remove(key);
            }
        }
        if topic.keys.is_empty() {
            return self.topics.remove(base).map(|t| t.name);
        }
        None
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

/// What the fan-out has not pushed yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Backlog {
    /// Pushes into client queues still to do.
    pub deliveries: usize,
    /// Bytes of publications held until they are pushed.
    pub bytes: usize,
    /// Topics whose publishers are held back (deliveries at the bound).
    pub saturated_topics: usize,
    /// Whether every publisher is held back (bytes at the bound).
    pub saturated: bool,
}

/// Called with the base topics whose local interest changed outside a
/// subscription request (a client left, was dropped as slow, or a library
/// call changed its keys), so the relay can follow.
pub type TopicsChanged = Box<dyn Fn(Vec<Arc<str>>) + Send + Sync>;

/// One publication on its way through the fan-out workers. Dropped when
/// the last worker is done with it, which releases its bytes.
struct Dispatch {
    data: Bytes,
    targets: Vec<(SubKey, Snapshot)>,
    charge: usize,
    at: Instant,
    hub: Weak<HubInner>,
}

impl Drop for Dispatch {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.backlog_bytes.fetch_sub(self.charge, Ordering::Relaxed);
        }
    }
}

/// One worker's share of a [`Dispatch`], and how far it got.
struct Job {
    dispatch: Arc<Dispatch>,
    key: usize,
    pos: usize,
}

impl Job {
    /// Push up to `quota` events; whether the job is finished.
    fn run(
        &mut self,
        w: usize,
        quota: usize,
        pushed: &mut usize,
        slow: &mut Vec<Arc<Client>>,
    ) -> bool {
        let d = &self.dispatch;
        while self.key < d.targets.len() {
            let (key, subs) = &d.targets[self.key];
            let part = &subs[w];
            while self.pos < part.len() {
                if *pushed >= quota {
                    return false;
                }
                let client = &part[self.pos];
                if let Err(SendError::Full) = client.push(Frame::new(key, &d.data)) {
                    slow.push(client.clone());
                }
                self.pos += 1;
                *pushed += 1;
            }
            self.key += 1;
            self.pos = 0;
        }
        true
    }
}

/// The queues of one fan-out worker: a FIFO per base topic, and the
/// round-robin order of the topics that have work.
#[derive(Default)]
struct WorkerQueues {
    topics: HashMap<Arc<str>, VecDeque<Job>>,
    ready: VecDeque<Arc<str>>,
}

#[derive(Default)]
struct Worker {
    queues: Mutex<WorkerQueues>,
    wake: Notify,
}

impl Worker {
    fn enqueue(&self, topic: &Arc<str>, job: Job) {
        let mut q = self.queues.lock();
        let fifo = q.topics.entry(topic.clone()).or_default();
        fifo.push_back(job);
        if fifo.len() == 1 {
            q.ready.push_back(topic.clone());
        }
        drop(q);
        self.wake.notify_one();
    }

    /// The first job of the next topic in turn.
    fn next(&self) -> Option<(Arc<str>, Job)> {
        let mut q = self.queues.lock();
        let topic = q.ready.pop_front()?;
        let job = q.topics.get_mut(&topic)?.pop_front()?;
        Some((topic, job))
    }

    /// Put an unfinished job back at the head of its topic, and the topic
    /// at the back of the turn order if it still has work.
    fn requeue(&self, topic: Arc<str>, unfinished: Option<Job>) {
        let mut q = self.queues.lock();
        let Some(fifo) = q.topics.get_mut(&topic) else {
            return;
        };
        if let Some(job) = unfinished {
            fifo.push_front(job);
        }
        if fifo.is_empty() {
            q.topics.remove(&topic);
        } else {
            q.ready.push_back(topic);
        }
    }
}

struct HubInner {
    config: HubConfig,
    /// Number of fan-out workers (resolved from the config).
    worker_count: usize,
    /// Started on first dispatch, inside the runtime.
    workers: OnceLock<Vec<Arc<Worker>>>,
    ids: ClientIdGen,
    next_seq: AtomicU64,
    clients: RwLock<HashMap<Arc<str>, Arc<Client>>>,
    index: RwLock<Index>,
    /// Auth record id → its local clients, for directed sends.
    users: RwLock<HashMap<String, HashMap<u64, Arc<Client>>>>,
    subscriptions: AtomicUsize,
    backlog_deliveries: AtomicUsize,
    backlog_bytes: AtomicUsize,
    backlog_jobs: AtomicUsize,
    /// Deliveries not yet pushed, per base topic with any.
    topic_backlog: Mutex<HashMap<Arc<str>, usize>>,
    topics_changed: OnceLock<TopicsChanged>,
    closed: AtomicBool,
}

impl Drop for HubInner {
    fn drop(&mut self) {
        self.closed.store(true, Ordering::Relaxed);
        for w in self.workers.get().into_iter().flatten() {
            w.wake.notify_one();
        }
    }
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
                backlog_deliveries: AtomicUsize::new(0),
                backlog_bytes: AtomicUsize::new(0),
                backlog_jobs: AtomicUsize::new(0),
                topic_backlog: Mutex::new(HashMap::new()),
                topics_changed: OnceLock::new(),
                closed: AtomicBool::new(false),
            }),
        }
    }

    pub fn config(&self) -> &HubConfig {
        &self.inner.config
    }

    /// Set, once, what is told about topics whose local interest changed
    /// outside a subscription request (the broker points it at the relay).
    pub fn on_topics_changed(&self, f: TopicsChanged) {
        let _ = self.inner.topics_changed.set(f);
    }

    fn topics_changed(&self, changes: TopicChanges) {
        if changes.is_empty() {
            return;
        }
        if let Some(f) = self.inner.topics_changed.get() {
            f(changes.all());
        }
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
            self.inner.config.queue_bytes,
        ));
        self.inner
            .clients
            .write()
            .insert(client.id_arc().clone(), client.clone());
        client
    }

    /// Remove a client: discard it, drop its subscriptions and auth binding,
    /// and tell the relay about the base topics that lost their last local
    /// subscriber. A no-op for unknown ids.
    pub fn unregister(&self, id: &str) {
        let changes = self.unregister_quiet(id, CloseReason::Discarded);
        self.topics_changed(changes);
    }

    fn unregister_quiet(&self, id: &str, reason: CloseReason) -> TopicChanges {
        match self.detach(id) {
            Some((client, changes)) => {
                client.close(reason);
                changes
            }
            None => TopicChanges::default(),
        }
    }

    /// Unregister without closing the stream: nothing more reaches the
    /// client, and its close is the caller's.
    fn detach(&self, id: &str) -> Option<(Arc<Client>, TopicChanges)> {
        let client = self.inner.clients.write().remove(id)?;
        let mut st = client.state.lock();
        st.registered = false;
        st.subscription_bytes = 0;
        let keys: Vec<SubKey> = st.subscriptions.drain().collect();
        if let Some(auth) = st.auth.take() {
            self.unbind_user(&auth.id, client.seq);
        }
        drop(st);
        let mut changes = TopicChanges::default();
        let mut index = self.inner.index.write();
        for key in &keys {
            if let Some(gone) = index.remove(key, client.seq) {
                changes.removed.push(gone);
            }
        }
        drop(index);
        self.inner
            .subscriptions
            .fetch_sub(keys.len(), Ordering::Relaxed);
        Some((client, changes))
    }

    /// Let live messages of `key` reach `client` again (its history has
    /// been replayed).
    pub fn release(&self, client: &Client, key: &str) {
        let mut index = self.inner.index.write();
        if let Some(subs) = index
            .topics
            .get_mut(protocol::base_topic(key))
            .and_then(|t| t.keys.get_mut(key))
            && subs.held.remove(&client.seq)
        {
            subs.changed();
        }
    }

    /// Push one message of the history to `client` for `key`, if it
    /// matches the key and the message's audience includes the client.
    pub fn push_replay(
        &self,
        client: &Arc<Client>,
        key: &SubKey,
        topic: &str,
        data: &[u8],
        audience: &Audience,
    ) {
        let Some(frame) = Self::replay_frame(client, key, topic, data, audience) else {
            return;
        };
        if let Err(SendError::Full) = client.push(frame) {
            self.drop_slow(vec![client.clone()]);
        }
    }

    /// [`Hub::push_replay`], paced by the client's stream: waits for room
    /// in its queue (see [`Client::push_when_room`]) rather than closing it
    /// as slow. `Err` when the client is closed (or was, as not reading).
    pub(crate) async fn push_replay_paced(
        &self,
        client: &Arc<Client>,
        key: &SubKey,
        topic: &str,
        data: &[u8],
        audience: &Audience,
        stall: std::time::Duration,
    ) -> Result<(), SendError> {
        let Some(frame) = Self::replay_frame(client, key, topic, data, audience) else {
            return Ok(());
        };
        let pushed = client.push_when_room(frame, stall).await;
        if let Err(SendError::Full) = pushed {
            self.drop_slow(vec![client.clone()]);
        }
        pushed
    }

    /// The event a replayed message makes for `client`'s `key`, if it
    /// matches the key and the message's audience includes the client.
    fn replay_frame(
        client: &Client,
        key: &SubKey,
        topic: &str,
        data: &[u8],
        audience: &Audience,
    ) -> Option<Frame> {
        if !protocol::key_matches(key, topic) {
            return None;
        }
        let allowed = match audience {
            Audience::All => true,
            Audience::Client(id) => id.as_str() == client.id(),
            Audience::User(u) => client.auth().is_some_and(|a| a.id == *u),
        };
        if !allowed {
            return None;
        }
        let data = protocol::event_data(data).ok()?;
        Some(Frame::new(key, &data))
    }

    /// Close and unregister one client whose replay missed messages (its
    /// history was trimmed or lost before it was replayed): the SDK
    /// reconnects and the app re-fetches, as after any missed message.
    pub(crate) fn close_lost(&self, client: &Client) {
        let changes = self.unregister_quiet(client.id(), CloseReason::Gap);
        self.topics_changed(changes);
    }

    /// Whether `client` still holds `key` as held (not yet released).
    pub(crate) fn is_held(&self, client: &Client, key: &str) -> bool {
        let index = self.inner.index.read();
        index
            .topics
            .get(protocol::base_topic(key))
            .and_then(|t| t.keys.get(key))
            .is_some_and(|subs| subs.held.contains(&client.seq))
    }

    /// The stored key `key` of `client`, if it holds it.
    pub fn key_of(&self, client: &Client, key: &str) -> Option<SubKey> {
        client.state.lock().subscriptions.get(key).cloned()
    }

    /// Unregister every local subscriber of the base topic `base` at once
    /// (nothing more reaches them), and close their streams spread over
    /// [`HubConfig::close_spread`]; how many there were.
    pub fn close_topic(&self, base: &str, reason: CloseReason) -> usize {
        let ids: Vec<Arc<str>> = {
            let index = self.inner.index.read();
            let Some(topic) = index.topics.get(base) else {
                return 0;
            };
            let mut ids: Vec<Arc<str>> = topic
                .keys
                .values()
                .flat_map(|s| s.members.values().map(|c| c.id_arc().clone()))
                .collect();
            ids.sort();
            ids.dedup();
            ids
        };
        self.close_clients(&ids, reason)
    }

    /// Unregister these clients at once (nothing more reaches them), and
    /// close their streams spread over [`HubConfig::close_spread`]; how
    /// many were still registered.
    pub fn close_clients(&self, ids: &[impl AsRef<str>], reason: CloseReason) -> usize {
        let mut changes = TopicChanges::default();
        let mut closing = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some((client, gone)) = self.detach(id.as_ref()) {
                changes.removed.extend(gone.removed);
                closing.push(client);
            }
        }
        self.topics_changed(changes);
        let n = closing.len();
        crate::closing::close_spread(closing, reason, self.inner.config.close_spread);
        n
    }

    /// Close every stream, spread over [`HubConfig::close_spread`].
    /// Clients stay registered until their streams end.
    pub fn close_all(&self, reason: CloseReason) {
        self.close_all_within(reason, self.inner.config.close_spread);
    }

    /// Close every stream, spread over `window` (server shutdown, bounded
    /// by its drain). Clients stay registered until their streams end.
    pub fn close_all_within(&self, reason: CloseReason, window: Duration) {
        let clients: Vec<Arc<Client>> = self.inner.clients.read().values().cloned().collect();
        crate::closing::close_spread(clients, reason, window);
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

    /// Replace a client's whole subscription set and bind `auth` to it;
    /// the relay is told about the topic changes.
    pub fn set_subscriptions(
        &self,
        client: &Arc<Client>,
        keys: &[String],
        auth: Option<AuthRecord>,
    ) -> Result<(), SubscribeError> {
        let changes = self.replace_subscriptions(client, keys, auth.map(Arc::new))?;
        self.topics_changed(changes);
        Ok(())
    }

    /// [`Hub::set_subscriptions`] without telling the relay: the caller
    /// syncs the returned changes itself (and waits for them).
    pub(crate) fn replace_subscriptions(
        &self,
        client: &Arc<Client>,
        keys: &[String],
        auth: Option<Arc<AuthRecord>>,
    ) -> Result<TopicChanges, SubscribeError> {
        self.replace_subscriptions_holding(client, keys, auth, false)
    }

    /// [`Hub::replace_subscriptions`]; with `hold_resumes`, new keys that
    /// carry a `since` cursor are held (no live messages) until the broker
    /// has replayed their history and calls [`Hub::release`].
    pub(crate) fn replace_subscriptions_holding(
        &self,
        client: &Arc<Client>,
        keys: &[String],
        auth: Option<Arc<AuthRecord>>,
        hold_resumes: bool,
    ) -> Result<TopicChanges, SubscribeError> {
        let wanted: HashSet<&str> = keys
            .iter()
            .map(String::as_str)
            .filter(|k| !k.is_empty())
            .collect();
        self.check_keys(wanted.iter().copied())?;
        let mut st = client.state.lock();
        if !st.registered {
            return Err(SubscribeError::Gone);
        }
        let removed: Vec<SubKey> = st
            .subscriptions
            .iter()
            .filter(|k| !wanted.contains(k.as_str()))
            .cloned()
            .collect();
        let added: Vec<&str> = wanted
            .iter()
            .filter(|k| !st.subscriptions.contains(**k))
            .copied()
            .collect();
        let changes = self.apply(client, &mut st, &added, &removed, hold_resumes);
        self.rebind(client, &mut st.auth, auth);
        Ok(changes)
    }

    /// Line safety and the byte budget of a whole set of distinct keys.
    fn check_keys<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Result<(), SubscribeError> {
        let mut total = 0;
        for k in keys {
            if !protocol::is_line_safe(k.as_bytes()) {
                return Err(SubscribeError::NotLineSafe);
            }
            total += k.len();
        }
        let max = self.inner.config.max_subscription_bytes;
        if total > max {
            return Err(SubscribeError::OverBudget { max });
        }
        Ok(())
    }

    /// Add subscription keys to a client (PocketBase's `Subscribe`); the
    /// relay is told about the topic changes.
    pub fn subscribe(&self, client: &Arc<Client>, keys: &[&str]) -> Result<(), SubscribeError> {
        let mut st = client.state.lock();
        if !st.registered {
            return Err(SubscribeError::Gone);
        }
        let added: Vec<&str> = keys
            .iter()
            .copied()
            .filter(|k| !k.is_empty() && !st.subscriptions.contains(*k))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let kept = st.subscriptions.iter().map(SubKey::as_str);
        self.check_keys(kept.chain(added.iter().copied()))?;
        let changes = self.apply(client, &mut st, &added, &[], false);
        drop(st);
        self.topics_changed(changes);
        Ok(())
    }

    /// Remove subscription keys from a client; all of them when `keys` is
    /// empty (PocketBase's `Unsubscribe`). The relay is told about the
    /// topics no local client wants any more.
    pub fn unsubscribe(&self, client: &Arc<Client>, keys: &[&str]) {
        let mut st = client.state.lock();
        let removed: Vec<SubKey> = st
            .subscriptions
            .iter()
            .filter(|k| keys.is_empty() || keys.contains(&k.as_str()))
            .cloned()
            .collect();
        let changes = self.apply(client, &mut st, &[], &removed, false);
        drop(st);
        self.topics_changed(changes);
    }

    /// Update the index and the client's set together, under the client's
    /// state lock (taken by the caller), then the index lock: always in that
    /// order, so concurrent POSTs and disconnects of one client serialise.
    /// Keys must have been checked ([`Hub::check_keys`]).
    fn apply(
        &self,
        client: &Arc<Client>,
        st: &mut crate::client::ClientState,
        added: &[&str],
        removed: &[SubKey],
        hold_resumes: bool,
    ) -> TopicChanges {
        let mut changes = TopicChanges::default();
        if added.is_empty() && removed.is_empty() {
            return changes;
        }
        let mut index = self.inner.index.write();
        for key in removed {
            st.subscriptions.remove(key.as_str());
            st.subscription_bytes -= key.len();
            if let Some(gone) = index.remove(key, client.seq) {
                changes.removed.push(gone);
            }
        }
        for key in added {
            let Some(key) = index.intern(key).or_else(|| SubKey::new(key).ok()) else {
                continue;
            };
            let held = hold_resumes && protocol::since_of(&key).is_some();
            if index.add(&key, client, held) {
                changes
                    .added
                    .push(index.topics[protocol::base_topic(&key)].name.clone());
            }
            st.subscription_bytes += key.len();
            st.subscriptions.insert(key);
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

    /// Make a client a guest if it is still bound to `record` (PocketBase's
    /// "unset auth" when a token is revoked); its subscriptions stay.
    /// Whether it was unbound.
    pub fn unbind_auth_if(&self, client: &Arc<Client>, record: &AuthRecord) -> bool {
        let mut st = client.state.lock();
        if !st.registered || !st.auth.as_ref().is_some_and(|a| a.same_as(record)) {
            return false;
        }
        self.rebind(client, &mut st.auth, None);
        true
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

    /// What the fan-out has not pushed yet.
    pub fn backlog(&self) -> Backlog {
        let i = &self.inner;
        let bytes = i.backlog_bytes.load(Ordering::Relaxed);
        let max = i.config.max_backlog_deliveries;
        Backlog {
            deliveries: i.backlog_deliveries.load(Ordering::Relaxed),
            bytes,
            saturated_topics: i
                .topic_backlog
                .lock()
                .values()
                .filter(|n| **n >= max)
                .count(),
            saturated: bytes >= i.config.max_backlog_bytes,
        }
    }

    /// Whether a publish to `topics` must wait.
    fn held_back(&self, topics: &[&str]) -> bool {
        let i = &self.inner;
        if i.backlog_bytes.load(Ordering::Relaxed) >= i.config.max_backlog_bytes {
            return true;
        }
        let backlog = i.topic_backlog.lock();
        topics.iter().any(|t| {
            backlog
                .get(protocol::base_topic(t))
                .is_some_and(|n| *n >= i.config.max_backlog_deliveries)
        })
    }

    fn topic_pushed(&self, topic: &Arc<str>, pushed: usize) {
        let mut backlog = self.inner.topic_backlog.lock();
        if let Some(n) = backlog.get_mut(topic) {
            *n = n.saturating_sub(pushed);
            if *n == 0 {
                backlog.remove(topic);
            }
        }
    }

    /// Wait, at most `wait`, until a publish to `topics` is under the
    /// backlog bounds. False when it is not: the publisher should be told
    /// to retry (503).
    pub async fn admit(&self, topics: &[&str], wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while self.held_back(topics) {
            if Instant::now() >= deadline {
                metrics::counter!(m::PUBLISH_BACKPRESSURE_REFUSED).increment(1);
                return false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        true
    }

    /// Fan a message for `topic` out to the matching local subscribers in
    /// `audience`, one event per matching key, named after that key.
    /// Returns the number of events handed to the fan-out workers.
    ///
    /// `data` must be one line of JSON; data with a line break is refused
    /// (0). Never waits: the workers push. Every client receives the
    /// messages of one topic in dispatch order, so callers dispatch from
    /// one task (the relay's receive loop).
    pub fn dispatch(&self, topic: &str, data: &[u8], audience: &Audience) -> usize {
        metrics::counter!(m::DISPATCHED).increment(1);
        let Ok(data) = protocol::event_data(data) else {
            tracing::warn!(topic, "refused to dispatch data with a line break");
            return 0;
        };
        let Some((base, targets)) = self.targets(topic, audience) else {
            return 0;
        };
        let total: usize = targets
            .iter()
            .map(|(_, s)| s.iter().map(Vec::len).sum::<usize>())
            .sum();
        if total == 0 {
            return 0;
        }
        let inner = &self.inner;
        let charge = data.len() + 128 + 32 * targets.len();
        let held = inner.backlog_bytes.load(Ordering::Relaxed);
        if held + charge > 2 * inner.config.max_backlog_bytes && held > 0 {
            self.shed(topic, &targets);
            return 0;
        }
        inner.backlog_bytes.fetch_add(charge, Ordering::Relaxed);
        inner.backlog_deliveries.fetch_add(total, Ordering::Relaxed);
        *inner.topic_backlog.lock().entry(base.clone()).or_default() += total;
        let dispatch = Arc::new(Dispatch {
            data,
            targets,
            charge,
            at: Instant::now(),
            hub: Arc::downgrade(inner),
        });
        for (w, worker) in self.workers().iter().enumerate() {
            if dispatch.targets.iter().any(|(_, s)| !s[w].is_empty()) {
                inner.backlog_jobs.fetch_add(1, Ordering::Relaxed);
                worker.enqueue(
                    &base,
                    Job {
                        dispatch: dispatch.clone(),
                        key: 0,
                        pos: 0,
                    },
                );
            }
        }
        total
    }

    /// Drop a publication the backlog has no room for: its recipients are
    /// disconnected, so none of them silently misses it.
    fn shed(&self, topic: &str, targets: &[(SubKey, Snapshot)]) {
        let mut seen = HashSet::new();
        for (_, subs) in targets {
            for c in subs.iter().flatten() {
                if seen.insert(c.seq) {
                    c.close(CloseReason::Overloaded);
                }
            }
        }
        metrics::counter!(m::BACKLOG_SHED).increment(1);
        tracing::warn!(
            topic,
            clients = seen.len(),
            "fan-out backlog full: publication shed, its recipients disconnected"
        );
        let ids: Vec<Arc<str>> = targets
            .iter()
            .flat_map(|(_, s)| s.iter().flatten())
            .map(|c| c.id_arc().clone())
            .collect();
        let mut changes = TopicChanges::default();
        for id in ids {
            changes
                .removed
                .extend(self.unregister_quiet(&id, CloseReason::Overloaded).removed);
        }
        self.topics_changed(changes);
    }

    /// Resolves once everything dispatched so far has been pushed into its
    /// clients' queues (once the backlog is empty).
    pub async fn barrier(&self) {
        while self.inner.backlog_jobs.load(Ordering::Acquire) > 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn workers(&self) -> &[Arc<Worker>] {
        self.inner.workers.get_or_init(|| {
            (0..self.inner.worker_count)
                .map(|w| {
                    let worker = Arc::new(Worker::default());
                    tokio::spawn(fan_out_worker(
                        w,
                        worker.clone(),
                        Arc::downgrade(&self.inner),
                        self.inner.config.chunk_size.max(1),
                    ));
                    worker
                })
                .collect()
        })
    }

    /// Unregister clients whose queue overflowed.
    fn drop_slow(&self, slow: Vec<Arc<Client>>) {
        let mut changes = TopicChanges::default();
        for client in slow {
            tracing::info!(
                client = client.id(),
                "disconnecting slow client (queue full)"
            );
            metrics::counter!(m::SLOW_CLIENT_DISCONNECTS).increment(1);
            // The stream ends on its own; dropping it from the index now
            // stops further fan-out work for it.
            changes.removed.extend(
                self.unregister_quiet(client.id(), CloseReason::Slow)
                    .removed,
            );
        }
        self.topics_changed(changes);
    }

    /// The base topic and the matching keys with their subscribers, under
    /// the index read lock.
    fn targets(&self, topic: &str, audience: &Audience) -> Option<(Arc<str>, Targets)> {
        let index = self.inner.index.read();
        let entry = index.topics.get(protocol::base_topic(topic))?;
        let keys = entry
            .keys
            .iter()
            .filter(|(k, _)| protocol::key_matches(k, topic));
        let workers = self.inner.worker_count;
        let targets = match audience {
            Audience::All => keys
                .map(|(k, s)| (k.clone(), s.snapshot(workers)))
                .collect(),
            Audience::Client(id) => {
                let seq = self.inner.clients.read().get(id.as_str()).map(|c| c.seq)?;
                keys.filter_map(|(k, s)| {
                    let c = s.live(seq)?;
                    Some((k.clone(), partition(std::iter::once(c), workers)))
                })
                .collect()
            }
            Audience::User(user) => {
                let users = self.inner.users.read();
                let mine = users.get(user.as_str())?;
                keys.filter_map(|(k, s)| {
                    let mut v = mine.keys().filter_map(|seq| s.live(*seq)).peekable();
                    v.peek()?;
                    Some((k.clone(), partition(v, workers)))
                })
                .collect()
            }
        };
        Some((entry.name.clone(), targets))
    }
}

/// One fan-out worker: serves the topics with work round-robin, `chunk`
/// pushes per turn, each topic's messages in dispatch order.
async fn fan_out_worker(w: usize, worker: Arc<Worker>, hub: Weak<HubInner>, chunk: usize) {
    loop {
        let Some((topic, mut job)) = worker.next() else {
            if hub.strong_count() == 0 {
                return;
            }
            worker.wake.notified().await;
            continue;
        };
        let mut slow = Vec::new();
        let mut pushed = 0;
        let done = job.run(w, chunk, &mut pushed, &mut slow);
        let Some(inner) = hub.upgrade() else { return };
        inner
            .backlog_deliveries
            .fetch_sub(pushed, Ordering::Relaxed);
        let hub_ref = Hub {
            inner: inner.clone(),
        };
        hub_ref.topic_pushed(&topic, pushed);
        if done {
            if Arc::strong_count(&job.dispatch) == 1 {
                metrics::histogram!(m::FANOUT_SECONDS)
                    .record(job.dispatch.at.elapsed().as_secs_f64());
            }
            drop(job);
            worker.requeue(topic, None);
            inner.backlog_jobs.fetch_sub(1, Ordering::Release);
        } else {
            worker.requeue(topic, Some(job));
        }
        if !slow.is_empty() {
            hub_ref.drop_slow(slow);
        }
        drop((inner, hub_ref));
        // Let the writers of the clients served so far run.
        tokio::task::yield_now().await;
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
            ..HubConfig::default()
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
        let ch = h.replace_subscriptions(&a, &keys(&["t1", "t1?options=x", "t2"]), None);
        let mut added = ch.unwrap().added;
        added.sort();
        assert_eq!(added, [Arc::from("t1"), Arc::from("t2")]);
        let ch = h.replace_subscriptions(&b, &keys(&["t2"]), None).unwrap();
        assert!(ch.is_empty());
        let ch = h.replace_subscriptions(&a, &keys(&["t3"]), None).unwrap();
        assert_eq!(ch.added, [Arc::from("t3")]);
        assert_eq!(ch.removed, [Arc::from("t1")]);
        assert_eq!(
            h.unregister_quiet(b.id(), CloseReason::Discarded).removed,
            [Arc::from("t2")]
        );
        assert_eq!(h.topics(), [Arc::from("t3")]);
        // An unregistered client cannot subscribe again.
        assert_eq!(
            h.set_subscriptions(&b, &keys(&["t9"]), None),
            Err(SubscribeError::Gone)
        );
        assert!(!h.has_topic("t9"));
    }

    #[test]
    fn clients_share_one_copy_of_each_key_within_a_byte_budget() {
        let h = Hub::new(HubConfig {
            node_tag: "TestNode".into(),
            max_subscription_bytes: 10,
            ..HubConfig::default()
        });
        let a = h.register(ip());
        let b = h.register(ip());
        h.set_subscriptions(&a, &keys(&["abcde", "fghij"]), None)
            .unwrap();
        assert_eq!(
            h.set_subscriptions(&b, &keys(&["abcde", "fghijk"]), None),
            Err(SubscribeError::OverBudget { max: 10 })
        );
        assert_eq!(
            h.subscribe(&a, &["x"]),
            Err(SubscribeError::OverBudget { max: 10 })
        );
        assert_eq!(h.subscribe(&b, &["a\nb"]), Err(SubscribeError::NotLineSafe));
        h.set_subscriptions(&b, &keys(&["abcde"]), None).unwrap();
        let ka = h.key_of(&a, "abcde").unwrap();
        let kb = h.key_of(&b, "abcde").unwrap();
        assert_eq!(
            ka.head().as_ptr(),
            kb.head().as_ptr(),
            "one allocation for both clients"
        );
    }

    #[tokio::test]
    async fn one_busy_topic_does_not_hold_back_another() {
        // One worker, 2 pushes per turn: 1,000 flood events are queued
        // before the quiet topic's one; it is pushed after one turn.
        let h = Hub::new(HubConfig {
            node_tag: "TestNode".into(),
            chunk_size: 2,
            workers: 1,
            queue_capacity: 100_000,
            queue_bytes: 1 << 30,
            ..HubConfig::default()
        });
        let flood = h.register(ip());
        let quiet = h.register(ip());
        h.set_subscriptions(&flood, &keys(&["flood"]), None)
            .unwrap();
        h.set_subscriptions(&quiet, &keys(&["quiet"]), None)
            .unwrap();
        for i in 0..1000 {
            h.dispatch("flood", i.to_string().as_bytes(), &Audience::All);
        }
        h.dispatch("quiet", b"1", &Audience::All);
        assert_eq!(h.backlog().deliveries, 1001);
        while quiet.queued() == 0 {
            tokio::task::yield_now().await;
        }
        assert!(flood.queued() <= 4, "flood pushed {} first", flood.queued());
        h.barrier().await;
        assert_eq!(flood.queued(), 1000);
        assert_eq!(h.backlog(), Backlog::default());
    }

    #[tokio::test]
    async fn publishers_wait_for_the_backlog_then_give_up() {
        let h = Hub::new(HubConfig {
            node_tag: "TestNode".into(),
            workers: 1,
            max_backlog_deliveries: 10,
            queue_capacity: 100_000,
            ..HubConfig::default()
        });
        let c = h.register(ip());
        h.set_subscriptions(&c, &keys(&["t"]), None).unwrap();
        assert!(h.admit(&["t"], Duration::ZERO).await);
        for _ in 0..10 {
            h.dispatch("t", b"1", &Audience::All);
        }
        assert_eq!(h.backlog().saturated_topics, 1);
        assert!(!h.admit(&["t?x"], Duration::ZERO).await);
        // Another topic's publisher is not held back.
        assert!(h.admit(&["other"], Duration::ZERO).await);
        // The worker drains it within the wait.
        assert!(h.admit(&["t"], Duration::from_secs(5)).await);
    }

    #[tokio::test]
    async fn relayed_work_past_twice_the_byte_bound_is_shed_and_its_recipients_dropped() {
        let h = Hub::new(HubConfig {
            node_tag: "TestNode".into(),
            workers: 1,
            max_backlog_bytes: 1000,
            queue_capacity: 100_000,
            queue_bytes: 1 << 30,
            ..HubConfig::default()
        });
        let c = h.register(ip());
        h.set_subscriptions(&c, &keys(&["t"]), None).unwrap();
        let big = vec![b'1'; 900];
        // Nothing runs the worker in between: the first two fit in 2 × 1000.
        assert_eq!(h.dispatch("t", &big, &Audience::All), 1);
        assert_eq!(h.dispatch("t", &big, &Audience::All), 0);
        assert!(c.is_discarded());
        assert!(h.client_by_id(c.id()).is_none());
        assert!(!h.has_topic("t"));
    }

    #[tokio::test]
    async fn dispatch_names_each_event_after_the_key() {
        let h = hub(10, 10);
        let a = h.register(ip());
        let b = h.register(ip());
        let c = h.register(ip());
        h.set_subscriptions(&a, &keys(&["news", "news?options=%7B%7D"]), None)
            .unwrap();
        h.set_subscriptions(&b, &keys(&["news2"]), None).unwrap();
        h.set_subscriptions(&c, &keys(&["other"]), None).unwrap();
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
            h.set_subscriptions(c, &keys(&["t"]), None).unwrap();
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
        h.set_subscriptions(&slow, &keys(&["t"]), None).unwrap();
        h.set_subscriptions(&fast, &keys(&["t"]), None).unwrap();
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
        h.set_subscriptions(&a, &keys(&["t"]), Some(user("u1")))
            .unwrap();
        h.set_subscriptions(&a2, &keys(&["t"]), Some(user("u1")))
            .unwrap();
        h.set_subscriptions(&b, &keys(&["t"]), Some(user("u2")))
            .unwrap();
        assert_eq!(h.dispatch("t", b"1", &Audience::Client(b.id().into())), 1);
        assert_eq!(h.dispatch("t", b"2", &Audience::User("u1".into())), 2);
        assert_eq!(h.dispatch("t", b"3", &Audience::User("nobody".into())), 0);
        h.barrier().await;
        assert!(drained(&b).contains("data:1") && drained(&a).contains("data:2"));
        assert!(drained(&a2).contains("data:2"));
        // Re-binding to another user moves the client between user sets.
        h.set_subscriptions(&a2, &keys(&["t"]), Some(user("u2")))
            .unwrap();
        assert_eq!(h.clients_of_user("u2").len(), 2);
        h.unregister(b.id());
        assert_eq!(h.clients_of_user("u2").len(), 1);
    }
}
