//! Bridges: this node's clients carried onto PocketBase's own realtime API.
//!
//! Record events (`posts/*`, `posts/<id>`) and the custom messages an app's
//! hooks send through `$app.subscriptionsBroker()` exist only inside
//! PocketBase, which decides per client and key who may see what (List and
//! View rules, `filter`, `expand`, `fields`, hidden fields, email
//! visibility; PocketBase `apis/realtime.go`, `realtimeBroadcastRecord`).
//! Fanout copies none of that. Instead, the clients of one node are grouped
//! by verified identity into *buckets* (one per PocketBase auth record, and
//! one for guests), and each bucket holds its own subscription to
//! PocketBase, as one client of PocketBase would:
//!
//! * **Lanes.** A bucket's keys are the union of its members' keys. PocketBase
//!   takes at most 1,000 keys per client (`realtimeSubscribeForm`), so the
//!   union is spread over *lanes* of at most [`LANE_KEYS`] keys, each one
//!   `GET /api/realtime` of its own. A lane is what PocketBase counts as a
//!   client; [`BridgeConfig::max_lanes`] bounds them per node.
//! * **The POST.** A lane's keys are POSTed with a member's token (the one
//!   expiring last), again whenever they change. A member's subscription
//!   request is answered 204 only after PocketBase answered 204 for lanes
//!   holding all of its keys; PocketBase's 4xx reaches it as PocketBase sent
//!   it, and nothing changes.
//! * **Events.** An event PocketBase sends on a lane goes, with PocketBase's
//!   own data bytes, to the bucket's members holding that exact key, in the
//!   order the lane received them. Nothing is queued per lane: each event is
//!   pushed into the members' bounded queues before the next is read.
//! * **Loss.** When a lane's connection ends (PocketBase restarts, or closes
//!   it), every member holding one of its keys has its stream closed: the
//!   same "you may have missed something" signal a client of PocketBase
//!   would have had. The lane reconnects with back-off (100 ms doubling to
//!   5 s) and re-sends its keys for the members still there.
//!
//! PocketBase's work per event thus falls from one rule check and one send
//! per client to one per (node, identity, key): for a public feed read by
//! guests, one per node.

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    sync::{
        Arc, Weak,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::verify::SECRET_HEADER;
use crate::{
    auth::AuthRecord,
    client::{Client, CloseReason, Message},
};

/// Most keys one lane subscribes on PocketBase: PocketBase's own limit per
/// client (`apis/realtime.go`, `realtimeSubscribeForm`).
pub const LANE_KEYS: usize = 1000;

/// A bucket's identity: `(collectionId, recordId)`, or `None` for guests.
pub type Identity = Option<(String, String)>;

/// The identity of a verified record, or of a guest.
pub fn identity_of(record: Option<&AuthRecord>) -> Identity {
    record.map(|r| (r.collection_id.clone(), r.id.clone()))
}

/// Settings of a node's bridges.
#[derive(Debug, Clone)]
pub struct BridgeConfig {
    /// PocketBase's base URL, without a trailing `/`.
    pub url: String,
    /// The shared secret (`X-Fanout-Secret`), which gives lanes the hooks
    /// file's long timeouts.
    pub secret: String,
    /// How long a POST to PocketBase, or a lane's connect, may take.
    pub timeout: Duration,
    /// Most lanes (PocketBase connections) this node holds; a request that
    /// needs one more gets 503. Default 10,000.
    pub max_lanes: usize,
    /// Key prefixes that are bridged; empty bridges every key.
    pub topics: Vec<String>,
}

/// Why a subscription could not be bridged. Nothing changed either way.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BridgeError {
    /// PocketBase could not be reached or did not answer in time (503).
    #[error("PocketBase is unavailable: {0}")]
    Unavailable(String),
    /// PocketBase refused the keys with this status and error JSON.
    #[error("PocketBase refused the subscriptions ({status})")]
    Refused {
        status: u16,
        body: serde_json::Value,
    },
    /// This node holds as many lanes as it may (503).
    #[error("this node holds its maximum of {0} PocketBase connections")]
    TooManyLanes(usize),
}

/// What `/api/health` reports about the bridges.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BridgesHealth {
    pub buckets: usize,
    pub lanes: usize,
    #[serde(rename = "lanesConnected")]
    pub lanes_connected: usize,
}

/// This node's bridges. Cheap to clone.
#[derive(Clone)]
pub struct Bridges {
    inner: Arc<Inner>,
}

struct Inner {
    config: BridgeConfig,
    hub: crate::hub::Hub,
    http: reqwest::Client,
    buckets: Mutex<HashMap<Identity, Arc<Bucket>>>,
    /// Client id → the bucket it is a member of.
    member_of: Mutex<HashMap<String, Identity>>,
    lanes: AtomicUsize,
}

struct Bucket {
    identity: Identity,
    st: Mutex<BucketState>,
    /// One POST round at a time per bucket.
    sync: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct BucketState {
    members: HashMap<String, Member>,
    /// Key → the members holding it.
    holders: HashMap<String, HashSet<String>>,
    lanes: Vec<Arc<Lane>>,
    /// Key → index of its lane.
    lane_of: HashMap<String, usize>,
    /// Removed from the node's buckets: a member must not join it.
    dead: bool,
}

struct Member {
    client: Weak<Client>,
    keys: Vec<String>,
    token: Option<(Arc<str>, u64)>,
}

struct Lane {
    keys: Mutex<BTreeSet<String>>,
    /// PocketBase's client id of the lane's connection, while connected.
    conn: watch::Sender<Option<String>>,
    /// What PocketBase acknowledged: its client id and the keys.
    posted: Mutex<Option<(String, BTreeSet<String>)>>,
    started: std::sync::atomic::AtomicBool,
    stop: CancellationToken,
}

impl Bridges {
    /// Bridges of `hub`'s clients to the PocketBase of `config`.
    pub fn new(hub: crate::hub::Hub, config: BridgeConfig) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(config.timeout)
            .pool_max_idle_per_host(64)
            .build()
            .expect("a plain HTTP client builds");
        Self {
            inner: Arc::new(Inner {
                config,
                hub,
                http,
                buckets: Mutex::new(HashMap::new()),
                member_of: Mutex::new(HashMap::new()),
                lanes: AtomicUsize::new(0),
            }),
        }
    }

    /// Whether `key` is bridged (`--pocketbase-topics`). `@oauth2` never
    /// is: Fanout serves the OAuth2 redirect itself.
    pub fn bridges(&self, key: &str) -> bool {
        let topics = &self.inner.config.topics;
        key != crate::protocol::OAUTH2_TOPIC
            && (topics.is_empty() || topics.iter().any(|p| key.starts_with(p.as_str())))
    }

    /// Make `client`'s bridged keys `keys`, in the bucket of `record` (a
    /// guest's when `None`), and wait until PocketBase acknowledged them.
    /// `token` (the raw `Authorization` value) is what lanes of a user's
    /// bucket POST with.
    ///
    /// # Errors
    /// See [`BridgeError`]; on any error the client's bridged keys are what
    /// they were before.
    pub async fn set(
        &self,
        client: &Arc<Client>,
        record: Option<&AuthRecord>,
        token: Option<&str>,
        keys: &[String],
    ) -> Result<(), BridgeError> {
        let identity = identity_of(record);
        let mut wanted: Vec<String> = keys
            .iter()
            .filter(|k| !k.is_empty() && self.bridges(k))
            .cloned()
            .collect();
        wanted.sort();
        wanted.dedup();
        let moved_from = {
            let mut member_of = self.inner.member_of.lock();
            match member_of.insert(client.id().to_owned(), identity.clone()) {
                Some(old) if old != identity => Some(old),
                _ => None,
            }
        };
        // A member moving buckets (a guest who logged in) leaves the old one
        // first; it is put back there if the new one cannot take it.
        let left = moved_from
            .as_ref()
            .and_then(|old| Some((old.clone(), self.leave_bucket(old, client.id())?)));
        let token = match (record, token) {
            (Some(r), Some(t)) => Some((
                Arc::from(crate::auth::bearer_token(t)),
                r.claims.get("exp").and_then(|v| v.as_u64()).unwrap_or(0),
            )),
            _ => None,
        };
        let (bucket, previous) = loop {
            let bucket = self.bucket(&identity);
            let mut st = bucket.st.lock();
            if st.dead {
                continue;
            }
            // Without a new token (a rollback), a member keeps its own.
            let token = token
                .clone()
                .or_else(|| st.members.get(client.id()).and_then(|m| m.token.clone()));
            let member = Member {
                client: Arc::downgrade(client),
                keys: wanted.clone(),
                token,
            };
            let previous = st.members.insert(client.id().to_owned(), member);
            let prev_keys = previous
                .as_ref()
                .map(|m| m.keys.clone())
                .unwrap_or_default();
            let placed = self.place(&mut st, client.id(), &prev_keys, &wanted);
            if let Err(e) = placed {
                restore(&mut st, client.id(), previous);
                drop(st);
                self.undo_move(client.id(), &bucket, left);
                return Err(e);
            }
            drop(st);
            break (bucket, previous);
        };
        let Err(e) = self.sync(&bucket).await else {
            return Ok(());
        };
        {
            let mut st = bucket.st.lock();
            let prev_keys = previous
                .as_ref()
                .map(|m| m.keys.clone())
                .unwrap_or_default();
            let _ = self.place(&mut st, client.id(), &wanted, &prev_keys);
            restore(&mut st, client.id(), previous);
        }
        self.undo_move(client.id(), &bucket, left);
        self.sync_later(&bucket);
        Err(e)
    }

    /// After a failed [`Bridges::set`]: a member that moved buckets goes
    /// back to the old one with its old keys, and a bucket left empty by
    /// the attempt closes.
    fn undo_move(&self, client_id: &str, tried: &Arc<Bucket>, left: Option<(Identity, Member)>) {
        if let Some((old, member)) = left {
            let bucket = loop {
                let bucket = self.bucket(&old);
                let mut st = bucket.st.lock();
                if st.dead {
                    continue;
                }
                let keys = member.keys.clone();
                if self.place(&mut st, client_id, &[], &keys).is_ok() {
                    st.members.insert(client_id.to_owned(), member);
                }
                drop(st);
                break bucket;
            };
            self.inner
                .member_of
                .lock()
                .insert(client_id.to_owned(), old);
            self.sync_later(&bucket);
        } else if !tried.st.lock().members.contains_key(client_id) {
            self.inner.member_of.lock().remove(client_id);
        }
        self.drop_if_empty(tried);
    }

    /// A client left this node (its stream ended): its keys leave its
    /// bucket, and an empty bucket closes its lanes.
    pub fn leave(&self, client_id: &str) {
        let Some(identity) = self.inner.member_of.lock().remove(client_id) else {
            return;
        };
        self.leave_bucket(&identity, client_id);
    }

    /// What `/api/health` reports.
    pub fn health(&self) -> BridgesHealth {
        let buckets = self.inner.buckets.lock();
        let mut lanes_connected = 0;
        for b in buckets.values() {
            for lane in &b.st.lock().lanes {
                if lane.conn.borrow().is_some() {
                    lanes_connected += 1;
                }
            }
        }
        BridgesHealth {
            buckets: buckets.len(),
            lanes: self.inner.lanes.load(Ordering::Relaxed),
            lanes_connected,
        }
    }

    /// Stop every lane.
    pub fn close(&self) {
        for b in self.inner.buckets.lock().drain().map(|(_, b)| b) {
            let mut st = b.st.lock();
            st.dead = true;
            for lane in &st.lanes {
                lane.stop.cancel();
            }
        }
    }

    fn bucket(&self, identity: &Identity) -> Arc<Bucket> {
        self.inner
            .buckets
            .lock()
            .entry(identity.clone())
            .or_insert_with(|| {
                Arc::new(Bucket {
                    identity: identity.clone(),
                    st: Mutex::new(BucketState::default()),
                    sync: tokio::sync::Mutex::new(()),
                })
            })
            .clone()
    }

    /// Take a member out of a bucket; what it was.
    fn leave_bucket(&self, identity: &Identity, client_id: &str) -> Option<Member> {
        let bucket = self.inner.buckets.lock().get(identity).cloned()?;
        let (member, empty) = {
            let mut st = bucket.st.lock();
            let member = st.members.remove(client_id)?;
            let _ = self.place(&mut st, client_id, &member.keys, &[]);
            (member, st.members.is_empty())
        };
        if empty {
            self.drop_if_empty(&bucket);
        } else {
            self.sync_later(&bucket);
        }
        Some(member)
    }

    /// Remove an empty bucket and stop its lanes.
    fn drop_if_empty(&self, bucket: &Arc<Bucket>) {
        let mut buckets = self.inner.buckets.lock();
        let mut st = bucket.st.lock();
        if !st.members.is_empty() || st.dead {
            return;
        }
        st.dead = true;
        if buckets
            .get(&bucket.identity)
            .is_some_and(|b| Arc::ptr_eq(b, bucket))
        {
            buckets.remove(&bucket.identity);
        }
        for lane in &st.lanes {
            lane.stop.cancel();
        }
        self.inner
            .lanes
            .fetch_sub(st.lanes.len(), Ordering::Relaxed);
    }

    /// Move `client_id` from holding `before` to holding `after`: holders
    /// and lane assignment follow; new lanes are opened as needed.
    fn place(
        &self,
        st: &mut BucketState,
        client_id: &str,
        before: &[String],
        after: &[String],
    ) -> Result<(), BridgeError> {
        let after_set: HashSet<&str> = after.iter().map(String::as_str).collect();
        let before_set: HashSet<&str> = before.iter().map(String::as_str).collect();
        // Room for the keys nobody holds yet.
        let new_keys = after
            .iter()
            .filter(|k| !st.holders.contains_key(k.as_str()))
            .count();
        let free: usize = st
            .lanes
            .iter()
            .map(|l| LANE_KEYS - l.keys.lock().len())
            .sum();
        let lanes_needed = new_keys.saturating_sub(free).div_ceil(LANE_KEYS);
        if lanes_needed > 0 {
            let max = self.inner.config.max_lanes;
            let now = self.inner.lanes.fetch_add(lanes_needed, Ordering::Relaxed);
            if now + lanes_needed > max {
                self.inner.lanes.fetch_sub(lanes_needed, Ordering::Relaxed);
                return Err(BridgeError::TooManyLanes(max));
            }
            for _ in 0..lanes_needed {
                st.lanes.push(self.open_lane());
            }
        }
        for key in before.iter().filter(|k| !after_set.contains(k.as_str())) {
            if let Some(h) = st.holders.get_mut(key) {
                h.remove(client_id);
                if h.is_empty() {
                    st.holders.remove(key);
                    if let Some(i) = st.lane_of.remove(key) {
                        st.lanes[i].keys.lock().remove(key);
                    }
                }
            }
        }
        for key in after.iter().filter(|k| !before_set.contains(k.as_str())) {
            let h = st.holders.entry(key.clone()).or_default();
            h.insert(client_id.to_owned());
            if !st.lane_of.contains_key(key) {
                let i = st
                    .lanes
                    .iter()
                    .position(|l| l.keys.lock().len() < LANE_KEYS)
                    .expect("room was made above");
                st.lanes[i].keys.lock().insert(key.clone());
                st.lane_of.insert(key.clone(), i);
            }
        }
        Ok(())
    }

    fn open_lane(&self) -> Arc<Lane> {
        let (conn, _) = watch::channel(None);
        Arc::new(Lane {
            keys: Mutex::new(BTreeSet::new()),
            conn,
            posted: Mutex::new(None),
            started: std::sync::atomic::AtomicBool::new(false),
            stop: CancellationToken::new(),
        })
    }

    /// POST every lane of `bucket` whose keys differ from what PocketBase
    /// acknowledged; connect lanes first where needed.
    async fn sync(&self, bucket: &Arc<Bucket>) -> Result<(), BridgeError> {
        let _one = bucket.sync.lock().await;
        let (lanes, token) = {
            let st = bucket.st.lock();
            let token = st
                .members
                .values()
                .filter_map(|m| m.token.clone())
                .max_by_key(|(_, exp)| *exp)
                .map(|(t, _)| t);
            (st.lanes.clone(), token)
        };
        for lane in lanes {
            self.ensure_running(bucket, &lane);
            let keys = lane.keys.lock().clone();
            let pb_id = self.connected(&lane).await?;
            if lane
                .posted
                .lock()
                .as_ref()
                .is_some_and(|(id, k)| *id == pb_id && *k == keys)
            {
                continue;
            }
            self.post(&pb_id, &keys, token.as_deref()).await?;
            *lane.posted.lock() = Some((pb_id, keys));
        }
        Ok(())
    }

    /// A background [`Bridges::sync`], for changes nobody waits on.
    fn sync_later(&self, bucket: &Arc<Bucket>) {
        let this = self.clone();
        let bucket = bucket.clone();
        tokio::spawn(async move {
            if let Err(e) = this.sync(&bucket).await {
                tracing::debug!(error = %e, "background bridge sync failed");
            }
        });
    }

    /// Wait for the lane's connection; its PocketBase client id.
    async fn connected(&self, lane: &Lane) -> Result<String, BridgeError> {
        let mut rx = lane.conn.subscribe();
        let wait = rx.wait_for(|c| c.is_some());
        match tokio::time::timeout(self.inner.config.timeout, wait).await {
            Ok(Ok(id)) => Ok(id.clone().expect("waited for Some")),
            _ => Err(BridgeError::Unavailable(
                "no realtime connection to PocketBase".to_owned(),
            )),
        }
    }

    async fn post(
        &self,
        pb_id: &str,
        keys: &BTreeSet<String>,
        token: Option<&str>,
    ) -> Result<(), BridgeError> {
        let mut req = self
            .inner
            .http
            .post(format!("{}/api/realtime", self.inner.config.url))
            .timeout(self.inner.config.timeout)
            .json(&serde_json::json!({"clientId": pb_id, "subscriptions": keys}));
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let res = req
            .send()
            .await
            .map_err(|e| BridgeError::Unavailable(e.without_url().to_string()))?;
        let status = res.status().as_u16();
        if status == 204 {
            return Ok(());
        }
        let body = res.json().await.unwrap_or(serde_json::Value::Null);
        if (400..500).contains(&status) {
            Err(BridgeError::Refused { status, body })
        } else {
            Err(BridgeError::Unavailable(format!(
                "PocketBase answered {status} to a subscription"
            )))
        }
    }

    /// The lane is lost: its holders leave the bucket and the node at once
    /// (nothing more reaches them), and their streams are closed spread
    /// over `--close-spread`, so they reconnect and re-fetch, not all in
    /// the same instant.
    fn close_holders(&self, bucket: &Bucket, lane: &Lane) {
        let keys = lane.keys.lock().clone();
        let ids: Vec<String> = {
            let st = bucket.st.lock();
            let mut ids = HashSet::new();
            for k in &keys {
                if let Some(h) = st.holders.get(k) {
                    ids.extend(h.iter().cloned());
                }
            }
            ids.into_iter().collect()
        };
        for id in &ids {
            self.leave(id);
        }
        self.inner.hub.close_clients(&ids, CloseReason::Gap);
    }

    /// Start the lane's connection task, once.
    fn ensure_running(&self, bucket: &Arc<Bucket>, lane: &Arc<Lane>) {
        if lane.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = self.clone();
        let bucket = Arc::downgrade(bucket);
        let lane = lane.clone();
        tokio::spawn(async move { this.run_lane(bucket, lane).await });
    }

    /// A lane's connection: connect, read PB_CONNECT, deliver events;
    /// on loss close the holders' streams and reconnect with back-off.
    async fn run_lane(self, bucket: Weak<Bucket>, lane: Arc<Lane>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if lane.stop.is_cancelled() || bucket.strong_count() == 0 {
                return;
            }
            let mut connected = false;
            let ended = tokio::select! {
                _ = lane.stop.cancelled() => return,
                r = self.stream_lane(&bucket, &lane, &mut connected) => r,
            };
            lane.conn.send_replace(None);
            *lane.posted.lock() = None;
            if let Err(e) = ended {
                tracing::warn!(error = %e, connected, "PocketBase realtime connection lost");
            }
            // Members were told their keys were live only while connected:
            // only then may they have missed something.
            if connected {
                backoff = Duration::from_millis(100);
                if let Some(b) = bucket.upgrade() {
                    self.close_holders(&b, &lane);
                }
            }
            tokio::select! {
                _ = lane.stop.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// One connection of a lane, until it ends; `connected` tells whether
    /// it got as far as PB_CONNECT.
    async fn stream_lane(
        &self,
        bucket: &Weak<Bucket>,
        lane: &Arc<Lane>,
        connected: &mut bool,
    ) -> Result<(), String> {
        let res = tokio::time::timeout(
            self.inner.config.timeout,
            self.inner
                .http
                .get(format!("{}/api/realtime", self.inner.config.url))
                .header(SECRET_HEADER, &self.inner.config.secret)
                .send(),
        )
        .await
        .map_err(|_| "connect timed out".to_owned())?
        .map_err(|e| e.without_url().to_string())?;
        if !res.status().is_success() {
            return Err(format!("PocketBase answered {}", res.status()));
        }
        let mut events = res.bytes_stream().eventsource();
        while let Some(event) = events.next().await {
            let event = event.map_err(|e| e.to_string())?;
            if !*connected {
                if event.event != "PB_CONNECT" {
                    return Err("PocketBase's first event was not PB_CONNECT".to_owned());
                }
                let id = serde_json::from_str::<serde_json::Value>(&event.data)
                    .ok()
                    .and_then(|v| v["clientId"].as_str().map(str::to_owned))
                    .ok_or("PB_CONNECT without a clientId")?;
                *connected = true;
                lane.conn.send_replace(Some(id));
                if let Some(b) = bucket.upgrade() {
                    self.sync_later(&b);
                }
                continue;
            }
            let Some(b) = bucket.upgrade() else {
                return Ok(());
            };
            deliver(&b, &event.event, event.data.as_bytes());
        }
        Err("PocketBase ended the connection".to_owned())
    }
}

/// Push one PocketBase event to the bucket's members holding its key.
fn deliver(bucket: &Bucket, key: &str, data: &[u8]) {
    let Ok(message) = Message::raw(key, data) else {
        tracing::debug!("PocketBase sent an event Fanout cannot frame; dropped");
        return;
    };
    let clients: Vec<Arc<Client>> = {
        let st = bucket.st.lock();
        let Some(holders) = st.holders.get(key) else {
            return;
        };
        holders
            .iter()
            .filter_map(|id| st.members.get(id)?.client.upgrade())
            .collect()
    };
    for c in clients {
        let _ = c.send(&message);
    }
}

/// Put a member back as it was before a failed change.
fn restore(st: &mut BucketState, client_id: &str, previous: Option<Member>) {
    match previous {
        Some(m) => {
            st.members.insert(client_id.to_owned(), m);
        }
        None => {
            st.members.remove(client_id);
        }
    }
}
