//! One realtime client: its identity, subscriptions, key/value store, bound
//! auth, and the bounded outbound queue its SSE stream drains.
//!
//! This is the Rust counterpart of PocketBase's `subscriptions.Client`. The
//! difference that matters is the queue: PocketBase blocks a goroutine per
//! message on an unbuffered channel, so order between messages is not
//! guaranteed and a stuck reader piles up goroutines. Here every send is a
//! non-blocking push into a bounded FIFO: order is kept, the sender never
//! waits, and a client that falls `queue capacity` events, or `queue bytes`
//! bytes of events, behind is disconnected (it reconnects and resubscribes,
//! as the SDKs do anyway). The queue holds only refcounted parts
//! ([`Frame`]), so one large publication queued for many keys and clients
//! is in memory once.
//!
//! ## What the byte bound counts
//! The bound is there to catch a client that falls behind, never one
//! delivery. So each event is charged its `id:` line and its head, and the
//! data of a publication is charged once per client however many of the
//! client's keys it matches: a client holding `t` and fifteen `t?options=…`
//! keys is charged a 256 KiB publication once, not sixteen times (the
//! sixteen frames share one [`Bytes`] of data, which is what is in memory).
//! And an empty queue always takes the next event: a client that has read
//! everything is not behind, whatever the size of what comes next. The
//! configuration refuses a payload limit that no queue could carry
//! ([`crate::Config::validate`]), so this only matters for relayed
//! publications from a node configured otherwise.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::Arc,
    time::SystemTime,
};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use serde::Serialize;

use crate::{
    auth::AuthRecord,
    protocol::{self, Frame, SubKey, SubscriptionOptions},
};

/// A message for one or more clients: an SSE event name and JSON data.
///
/// The SSE frame is built once, when the message is made, and shared by
/// every client it is sent to.
#[derive(Debug, Clone)]
pub struct Message {
    frame: Frame,
}

/// Why a [`Message`] could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("the event name must not contain CR or LF")]
    NameNotLineSafe,
    #[error("data must be valid JSON")]
    InvalidJson,
    #[error("data must not contain CR or LF")]
    DataNotLineSafe,
}

impl Message {
    /// A message with raw data. The data must be one line of JSON.
    pub fn new(name: &str, data: &[u8]) -> Result<Self, MessageError> {
        if !protocol::is_line_safe(name.as_bytes()) {
            return Err(MessageError::NameNotLineSafe);
        }
        let raw: &serde_json::value::RawValue =
            serde_json::from_slice(data).map_err(|_| MessageError::InvalidJson)?;
        Self::from_parts(name, &protocol::one_line_json(raw.get()))
    }

    /// A message whose data is `data` as given, JSON or not: what
    /// PocketBase's own messages may carry (a hook's
    /// `SubscriptionMessage` takes any bytes). It must be one line.
    pub fn raw(name: &str, data: &[u8]) -> Result<Self, MessageError> {
        if !protocol::is_line_safe(data) {
            return Err(MessageError::DataNotLineSafe);
        }
        Self::from_parts(name, data)
    }

    /// A message whose data is `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(name: &str, value: &T) -> Result<Self, MessageError> {
        if !protocol::is_line_safe(name.as_bytes()) {
            return Err(MessageError::NameNotLineSafe);
        }
        let data = serde_json::to_vec(value).map_err(|_| MessageError::InvalidJson)?;
        Self::from_parts(name, &data)
    }

    fn from_parts(name: &str, data: &[u8]) -> Result<Self, MessageError> {
        let frame = protocol::event_frame(name, data).map_err(|_| MessageError::NameNotLineSafe)?;
        Ok(Self { frame })
    }

    pub fn name(&self) -> &str {
        let head = &self.frame.head[b"event:".len()..self.frame.head.len() - b"\ndata:".len()];
        std::str::from_utf8(head).expect("a name is UTF-8")
    }

    /// The event's `event:…\ndata:…\n\n` bytes, as one buffer.
    pub fn frame(&self) -> Bytes {
        self.frame.to_vec().into()
    }
}

/// Why a send did not reach a client's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The queue was full: the client has just been disconnected as slow.
    #[error("client queue full; client disconnected")]
    Full,
    /// The client is already discarded.
    #[error("client discarded")]
    Closed,
}

/// Why a client's stream ended, as counted in metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Its queue overflowed.
    Slow,
    /// The fan-out backlog of one of its topics overflowed on this node
    /// (see `Hub::dispatch`).
    Overloaded,
    /// Discarded through the library API or unregistered.
    Discarded,
    /// It missed a message (the relay lost it): the stream is closed so the
    /// client reconnects and re-fetches.
    Gap,
    /// The server is shutting down.
    Shutdown,
}

/// What the stream finds when it looks at the queue.
pub(crate) enum Take {
    /// Frames moved into the caller's batch; `size` is their encoded size
    /// with the `id:` lines ([`Client::encode`]).
    Data {
        size: usize,
        events: usize,
    },
    Empty,
    Closed(CloseReason),
}

struct Queue {
    frames: VecDeque<Frame>,
    /// Bytes held against the byte bound: every frame's `id:` line and
    /// head, and the data of each distinct publication once (see the
    /// module documentation).
    bytes: usize,
    /// Queued frames per shared data of at least [`SHARED_DATA_MIN`]
    /// bytes, keyed by the data's address and length: its bytes are
    /// charged when the first such frame is queued and released when the
    /// last one is taken.
    shared: HashMap<(usize, usize), u32, foldhash::fast::FixedState>,
    closed: Option<CloseReason>,
}

/// Data shorter than this is charged with every frame, so the common small
/// event costs no lookup; what that overcounts is at most this many bytes
/// per event.
const SHARED_DATA_MIN: usize = 1024;

/// How a frame is charged: its whole length, or without its data when
/// the data is shared (`Some(key)`).
fn shared_key(frame: &Frame) -> Option<(usize, usize)> {
    (frame.data.len() >= SHARED_DATA_MIN).then(|| (frame.data.as_ptr() as usize, frame.data.len()))
}

impl Queue {
    fn new() -> Self {
        Self {
            frames: VecDeque::new(),
            bytes: 0,
            shared: HashMap::with_hasher(foldhash::fast::FixedState::default()),
            closed: None,
        }
    }

    /// Drop everything queued and mark the queue closed.
    fn close(&mut self, reason: CloseReason) {
        self.closed = Some(reason);
        self.frames = VecDeque::new();
        self.shared = HashMap::with_hasher(foldhash::fast::FixedState::default());
        self.bytes = 0;
    }
}

/// Per-client mutable state, behind one lock.
#[derive(Default)]
pub(crate) struct ClientState {
    /// Keys shared with the topic index (one allocation per distinct key).
    pub(crate) subscriptions: HashSet<SubKey>,
    /// Sum of the key lengths, held against the per-client budget.
    pub(crate) subscription_bytes: usize,
    pub(crate) auth: Option<Arc<AuthRecord>>,
    pub(crate) store: HashMap<String, serde_json::Value>,
    /// Cleared by the hub when the client is unregistered; after that no
    /// subscription may be added, so the topic index cannot leak it.
    pub(crate) registered: bool,
}

/// A connected realtime client.
pub struct Client {
    /// Process-unique number, cheaper to hash than the id.
    pub(crate) seq: u64,
    id: Arc<str>,
    id_line: Bytes,
    ip: IpAddr,
    connected_at: SystemTime,
    capacity: usize,
    max_bytes: usize,
    queue: Mutex<Queue>,
    /// The stream's waker: woken when the queue becomes non-empty or closes.
    waker: AtomicWaker,
    /// Woken when the stream took frames or the queue closed: a replay
    /// waiting for room ([`Client::push_when_room`]) looks again.
    drained: tokio::sync::Notify,
    pub(crate) state: Mutex<ClientState>,
    /// Held for the whole of a subscription request (checks, change, relay
    /// confirmation, rollback), so one client's requests apply one at a
    /// time, in arrival order (tokio's mutex is fair).
    pub(crate) changes: tokio::sync::Mutex<()>,
    /// The stamp of the last subscription request applied (0: none), read
    /// and written under `changes`: an older request is superseded.
    pub(crate) applied_stamp: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("id", &self.id)
            .field("ip", &self.ip)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub(crate) fn new(seq: u64, id: String, ip: IpAddr, capacity: usize, max_bytes: usize) -> Self {
        Self {
            seq,
            id_line: protocol::id_line(&id),
            id: id.into(),
            ip,
            connected_at: SystemTime::now(),
            capacity: capacity.max(1),
            max_bytes: max_bytes.max(1),
            queue: Mutex::new(Queue::new()),
            waker: AtomicWaker::new(),
            drained: tokio::sync::Notify::new(),
            state: Mutex::new(ClientState {
                registered: true,
                ..Default::default()
            }),
            changes: tokio::sync::Mutex::new(()),
            applied_stamp: Default::default(),
        }
    }

    /// The 40-character client id (the SSE `id:` of every event).
    pub fn id(&self) -> &str {
        &self.id
    }

    pub(crate) fn id_arc(&self) -> &Arc<str> {
        &self.id
    }

    /// The real IP of the request that opened the stream.
    pub fn ip(&self) -> IpAddr {
        self.ip
    }

    pub fn connected_at(&self) -> SystemTime {
        self.connected_at
    }

    /// The auth record bound by the subscription POST, if any.
    pub fn auth(&self) -> Option<Arc<AuthRecord>> {
        self.state.lock().auth.clone()
    }

    /// The subscriptions whose `key + "?"` starts with any of `prefixes`
    /// (all of them when `prefixes` is empty), as PocketBase's
    /// `Subscriptions(prefixes...)`.
    pub fn subscriptions(&self, prefixes: &[&str]) -> HashMap<String, SubscriptionOptions> {
        let st = self.state.lock();
        st.subscriptions
            .iter()
            .filter(|k| {
                prefixes.is_empty()
                    || prefixes.iter().any(|p| {
                        let k = k.as_bytes();
                        let p = p.as_bytes();
                        // `k + "?"` starts with `p`
                        if p.len() <= k.len() {
                            k.starts_with(p)
                        } else {
                            p.len() == k.len() + 1 && p.starts_with(k) && p[k.len()] == b'?'
                        }
                    })
            })
            // Parsed on demand: the options are for library users, and
            // keeping them parsed per client would double the key memory.
            .map(|k| (k.to_string(), SubscriptionOptions::parse(k)))
            .collect()
    }

    /// Whether the client holds exactly this subscription key.
    pub fn has_subscription(&self, key: &str) -> bool {
        self.state.lock().subscriptions.contains(key)
    }

    /// A value from the client's free-form store.
    pub fn get(&self, key: &str) -> Option<serde_json::Value> {
        self.state.lock().store.get(key).cloned()
    }

    pub fn set(&self, key: impl Into<String>, value: serde_json::Value) {
        self.state.lock().store.insert(key.into(), value);
    }

    pub fn unset(&self, key: &str) {
        self.state.lock().store.remove(key);
    }

    /// Queue a message for this client. Never blocks.
    ///
    /// A full queue disconnects the client ([`SendError::Full`]); the hub
    /// drops it from its registry once its stream ends.
    pub fn send(&self, message: &Message) -> Result<(), SendError> {
        self.push(message.frame.clone())
    }

    pub(crate) fn push(&self, frame: Frame) -> Result<(), SendError> {
        let mut q = self.queue.lock();
        if q.closed.is_some() {
            return Err(SendError::Closed);
        }
        if !self.has_room(&q, &frame) {
            q.close(CloseReason::Slow);
            drop(q);
            self.waker.wake();
            self.drained.notify_waiters();
            return Err(SendError::Full);
        }
        self.enqueue(q, frame);
        Ok(())
    }

    /// Whether the queue takes `frame` now. An empty queue always takes
    /// the event: the client is not behind.
    fn has_room(&self, q: &Queue, frame: &Frame) -> bool {
        let data_held = shared_key(frame).is_some_and(|k| q.shared.contains_key(&k));
        let size =
            self.id_line.len() + frame.head.len() + if data_held { 0 } else { frame.data.len() };
        q.frames.is_empty() || (q.frames.len() < self.capacity && q.bytes + size <= self.max_bytes)
    }

    /// Push a replayed event, paced by the stream: wait (at most `stall`
    /// without the stream taking anything) until the queue has room for
    /// it, instead of closing the client as slow. A replay larger than the
    /// queue is delivered as the client reads it. `Err(Full)` when the
    /// stream took nothing for `stall` (the client is not reading; it is
    /// then closed as slow), `Err(Closed)` when it is closed.
    pub(crate) async fn push_when_room(
        &self,
        frame: Frame,
        stall: std::time::Duration,
    ) -> Result<(), SendError> {
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let q = self.queue.lock();
                if q.closed.is_some() {
                    return Err(SendError::Closed);
                }
                if self.has_room(&q, &frame) {
                    self.enqueue(q, frame);
                    return Ok(());
                }
            }
            if tokio::time::timeout(stall, drained).await.is_err() {
                self.close(CloseReason::Slow);
                return Err(SendError::Full);
            }
        }
    }

    /// The queue's byte bound (`--client-queue-bytes`).
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    fn enqueue(&self, mut q: parking_lot::MutexGuard<'_, Queue>, frame: Frame) {
        let shared = shared_key(&frame);
        let data_held = shared.is_some_and(|k| q.shared.contains_key(&k));
        let size =
            self.id_line.len() + frame.head.len() + if data_held { 0 } else { frame.data.len() };
        if let Some(k) = shared {
            *q.shared.entry(k).or_insert(0) += 1;
        }
        q.bytes += size;
        q.frames.push_back(frame);
        let first = q.frames.len() == 1;
        drop(q);
        // The stream drains everything it finds, so only the push that makes
        // the queue non-empty needs to wake it. The stream registers its
        // waker before it looks at the queue, so this wake cannot be lost.
        if first {
            self.waker.wake();
        }
    }

    /// Close the client: its stream ends and further sends fail.
    pub fn discard(&self) {
        self.close(CloseReason::Discarded);
    }

    pub(crate) fn close(&self, reason: CloseReason) {
        let mut q = self.queue.lock();
        if q.closed.is_none() {
            q.close(reason);
        }
        drop(q);
        self.waker.wake();
        self.drained.notify_waiters();
    }

    pub fn is_discarded(&self) -> bool {
        self.queue.lock().closed.is_some()
    }

    /// Frames waiting to be written.
    pub fn queued(&self) -> usize {
        self.queue.lock().frames.len()
    }

    /// Bytes held against the queue's byte bound: what waits to be
    /// written, with the data of one publication counted once however many
    /// of the client's keys it was queued for.
    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// Move queued frames, up to about `max_bytes`, into `batch`. The caller
    /// learns their encoded size first, so it can frame the write (an HTTP
    /// chunk header) and encode everything with one copy.
    pub(crate) fn take(&self, batch: &mut Vec<Frame>, max_bytes: usize) -> Take {
        let mut size = 0;
        {
            let mut q = self.queue.lock();
            if let Some(reason) = q.closed {
                return Take::Closed(reason);
            }
            while size < max_bytes {
                let Some(f) = q.frames.pop_front() else { break };
                size += f.len() + self.id_line.len();
                let mut charged = self.id_line.len() + f.head.len();
                match shared_key(&f) {
                    Some(k) => {
                        let last = q.shared.get_mut(&k).is_none_or(|n| {
                            *n -= 1;
                            *n == 0
                        });
                        if last {
                            q.shared.remove(&k);
                            charged += f.data.len();
                        }
                    }
                    None => charged += f.data.len(),
                }
                q.bytes -= charged;
                batch.push(f);
            }
            if q.frames.is_empty() && q.frames.capacity() > 64 {
                // Give back a burst's worth of queue memory.
                q.frames.shrink_to(8);
            }
            if q.shared.is_empty() && q.shared.capacity() > 64 {
                q.shared.shrink_to(8);
            }
        }
        if batch.is_empty() {
            return Take::Empty;
        }
        self.drained.notify_waiters();
        Take::Data {
            size,
            events: batch.len(),
        }
    }

    /// Append the frames of `batch` to `out`, each behind the `id:` line,
    /// so a burst costs one write.
    pub(crate) fn encode(&self, batch: &mut Vec<Frame>, out: &mut Vec<u8>) {
        for f in batch.drain(..) {
            out.extend_from_slice(&self.id_line);
            out.extend_from_slice(&f.head);
            out.extend_from_slice(&f.data);
        }
    }

    /// Register the stream's waker; call before [`Client::take`].
    pub(crate) fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(cap: usize) -> Client {
        Client::new(
            1,
            "c".repeat(40),
            "127.0.0.1".parse().unwrap(),
            cap,
            1 << 20,
        )
    }

    fn take_all(c: &Client) -> Vec<u8> {
        let (mut batch, mut out) = (Vec::new(), Vec::new());
        if let Take::Data { size, .. } = c.take(&mut batch, usize::MAX) {
            c.encode(&mut batch, &mut out);
            assert_eq!(out.len(), size);
        }
        out
    }

    #[test]
    fn sends_arrive_in_order_with_id_lines() {
        let c = client(8);
        c.send(&Message::new("a", b"1").unwrap()).unwrap();
        c.send(&Message::new("b", b"2").unwrap()).unwrap();
        let id = "c".repeat(40);
        assert_eq!(
            String::from_utf8(take_all(&c)).unwrap(),
            format!("id:{id}\nevent:a\ndata:1\n\nid:{id}\nevent:b\ndata:2\n\n")
        );
        assert!(matches!(c.take(&mut Vec::new(), 1), Take::Empty));
    }

    #[test]
    fn overflow_disconnects_and_later_sends_are_dropped() {
        let c = client(2);
        let m = Message::new("m", b"{}").unwrap();
        c.send(&m).unwrap();
        c.send(&m).unwrap();
        assert_eq!(c.send(&m), Err(SendError::Full));
        assert!(c.is_discarded());
        assert_eq!(c.send(&m), Err(SendError::Closed));
        assert!(matches!(
            c.take(&mut Vec::new(), 1),
            Take::Closed(CloseReason::Slow)
        ));
    }

    #[test]
    fn a_queue_over_its_byte_bound_disconnects() {
        let c = Client::new(1, "c".repeat(40), "127.0.0.1".parse().unwrap(), 100, 200);
        let m = Message::new("m", &[b'1'; 100]).unwrap();
        // 44 (id line) + 13 (head) + 102 (data) = 159 bytes: one fits.
        c.send(&m).unwrap();
        assert_eq!(c.queued_bytes(), 159);
        assert_eq!(c.send(&m), Err(SendError::Full));
        assert!(matches!(
            c.take(&mut Vec::new(), 1),
            Take::Closed(CloseReason::Slow)
        ));
    }

    fn key(k: &str) -> SubKey {
        SubKey::new(k).unwrap()
    }

    #[test]
    fn data_shared_by_several_keys_is_charged_once() {
        let c = Client::new(1, "c".repeat(40), "127.0.0.1".parse().unwrap(), 100, 8000);
        let data = protocol::event_data(&[b'1'; 4000]).unwrap();
        let keys: Vec<SubKey> = (0..16).map(|i| key(&format!("t?options={i}"))).collect();
        for k in &keys {
            c.push(Frame::new(k, &data)).unwrap();
        }
        let heads: usize = keys.iter().map(|k| 44 + k.head().len()).sum();
        assert_eq!(c.queued_bytes(), 4002 + heads);
        // Taking one frame leaves the data charged for the other fifteen.
        let mut batch = Vec::new();
        c.take(&mut batch, 1);
        assert_eq!(batch.len(), 1);
        assert_eq!(c.queued_bytes(), 4002 + heads - 44 - keys[0].head().len());
        let out = take_all(&c);
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches("event:t?options=").count(), 15);
        assert_eq!(c.queued_bytes(), 0);
        // Different data is charged on its own: two 4 KB publications
        // queued together exceed 8000 bytes.
        c.push(Frame::new(&keys[0], &data)).unwrap();
        let other = protocol::event_data(&[b'2'; 4000]).unwrap();
        assert_eq!(c.push(Frame::new(&keys[0], &other)), Err(SendError::Full));
    }

    #[test]
    fn an_empty_queue_takes_an_event_larger_than_its_byte_bound() {
        let c = Client::new(1, "c".repeat(40), "127.0.0.1".parse().unwrap(), 100, 200);
        let m = Message::new("m", &[b'1'; 1000]).unwrap();
        c.send(&m).unwrap();
        assert!(take_all(&c).len() > 1000);
        c.send(&m).unwrap();
        assert_eq!(
            c.send(&Message::new("m", b"1").unwrap()),
            Err(SendError::Full)
        );
    }

    #[test]
    fn discard_drops_pending_sends_without_panicking() {
        // PocketBase client_test "Send": m1, m2 received; after Discard, m3
        // and m4 are silently dropped.
        let c = client(8);
        c.send(&Message::new("m1", b"1").unwrap()).unwrap();
        c.send(&Message::new("m2", b"2").unwrap()).unwrap();
        assert!(
            String::from_utf8(take_all(&c))
                .unwrap()
                .contains("event:m2")
        );
        c.discard();
        assert!(c.is_discarded());
        assert_eq!(
            c.send(&Message::new("m3", b"3").unwrap()),
            Err(SendError::Closed)
        );
        assert_eq!(
            c.send(&Message::new("m4", b"4").unwrap()),
            Err(SendError::Closed)
        );
    }

    #[test]
    fn messages_validate_their_parts() {
        assert_eq!(
            Message::new("a\nb", b"{}").unwrap_err(),
            MessageError::NameNotLineSafe
        );
        assert_eq!(
            Message::new("a", b"{nope").unwrap_err(),
            MessageError::InvalidJson
        );
        let m = Message::new("a", b"{\n\"x\": 1\n}").unwrap();
        assert_eq!(&m.frame()[..], b"event:a\ndata:{\"x\": 1}\n\n");
        assert_eq!(m.name(), "a");
        let m = Message::json("a", &serde_json::json!({"k": "v\nw"})).unwrap();
        assert_eq!(&m.frame()[..], b"event:a\ndata:{\"k\":\"v\\nw\"}\n\n");
    }

    #[test]
    fn store_get_set_unset() {
        let c = client(1);
        assert_eq!(c.get("k"), None);
        c.set("k", serde_json::json!(1));
        assert_eq!(c.get("k"), Some(serde_json::json!(1)));
        c.unset("k");
        assert_eq!(c.get("k"), None);
    }
}
