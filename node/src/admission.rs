//! Which connections a node takes, and which it closes when it runs short
//! of room.
//!
//! Every connection costs a file descriptor, and a process has a fixed
//! number of them (`RLIMIT_NOFILE`). SSE streams are what the node is for
//! and are capped by `--max-connections`; every other connection (a request,
//! a kept-alive connection between requests, a client that is slow to send
//! its head or body) is capped by `--max-http-connections`, and all of them
//! together by the descriptors the process has, less a reserve for Redis,
//! the listener and the odd file.
//!
//! # Accept only what can be served
//!
//! At either cap the node stops accepting: a newcomer waits in the listen
//! backlog (see `server::BACKLOG`), as mini-redis's accept loop waits on a
//! semaphore, instead of being accepted and closed. A burst of thousands
//! of clients (a node died, and its clients reconnect to the others) is
//! thus served in turn: a fresh connection sends its head at once, becomes
//! a stream or gets its answer within milliseconds, and leaves room for the
//! next one.
//!
//! # Make room from connections that are really idle
//!
//! A newcomer is taken in place of a connection that has really been idle:
//!
//! * a kept-alive connection between requests: it has its answers, and
//!   closing an idle keep-alive connection is ordinary HTTP (nginx does the
//!   same when it runs out of connections);
//! * a connection that sent part of a request head, or part of a body, and
//!   then nothing for at least [`GRACE`]: a head fits in one packet, so a
//!   head stalled halfway is a half-sent request (a slowloris), not a slow
//!   network.
//!
//! Of those, the one waiting longest goes first. A connection whose request
//! is being handled is never closed this way, and neither is one that has
//! not sent anything yet, or that the node has not read from yet: a client
//! in a burst, or on a slow network, whose head is on its way. Those are
//! left to the first-head timeout (`--head-timeout`). So a flood of
//! half-sent requests delays health checks and new streams by about a
//! second per round of the cap, and a burst of legitimate connects is
//! never closed to make room for itself. Only when `accept` itself fails
//! for lack of descriptors is the longest-waiting connection closed
//! whatever it is doing on the wire.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Descriptors kept back from connections: Redis connections, the
/// listener, log files, and the one `accept` needs to take a connection it
/// may then close.
pub const FD_RESERVE: usize = 64;

/// How long a connection may wait on its client for the rest of a request
/// head or body before it may be closed to make room (see the module
/// documentation).
pub const GRACE: Duration = Duration::from_secs(1);

/// One tracked non-stream connection.
pub(crate) struct Entry {
    /// Milliseconds since the tracker's epoch at which the connection began
    /// waiting on its client, plus one; 0 while a request is handled.
    waiting_since: AtomicU64,
    /// Waiting between requests (kept alive): may make room at once.
    between_requests: AtomicBool,
    evict: CancellationToken,
}

impl Entry {
    /// The connection waits on its client for the rest of a request head
    /// or body: it may make room once it has waited [`GRACE`].
    pub(crate) fn waiting(&self, tracker: &Tracker) {
        self.between_requests.store(false, Ordering::Relaxed);
        self.waiting_since.store(tracker.now(), Ordering::Relaxed);
    }

    /// The connection is kept alive between requests: it may make room at
    /// once.
    pub(crate) fn idle(&self, tracker: &Tracker) {
        self.between_requests.store(true, Ordering::Relaxed);
        self.waiting_since.store(tracker.now(), Ordering::Relaxed);
    }

    /// A request is being handled.
    pub(crate) fn busy(&self) {
        self.waiting_since.store(0, Ordering::Relaxed);
    }

    /// Cancelled when the connection is chosen to make room.
    pub(crate) fn evicted(&self) -> &CancellationToken {
        &self.evict
    }

    /// When (tracker milliseconds) this connection may be closed to make
    /// room, and since when it waits; `None` while a request is handled.
    fn evictable_from(&self, grace: u64) -> Option<(u64, u64)> {
        let since = self.waiting_since.load(Ordering::Relaxed);
        if since == 0 {
            return None;
        }
        let from = if self.between_requests.load(Ordering::Relaxed) {
            since
        } else {
            since + grace
        };
        Some((from, since))
    }
}

/// A connection's place in the tracker; leaving it on drop.
pub(crate) struct Slot {
    tracker: Arc<Tracker>,
    id: u64,
    pub(crate) entry: Arc<Entry>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.tracker.conns.lock().remove(&self.id);
        self.tracker.released();
    }
}

/// The connections that are not streams, and the caps.
pub(crate) struct Tracker {
    epoch: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Entry>>>,
    max_http: usize,
    fd_budget: usize,
    /// [`GRACE`] in milliseconds (shorter in unit tests).
    grace: u64,
    /// Woken when a connection leaves or a stream ends; the accept loop
    /// is its one waiter.
    room: Notify,
}

impl Tracker {
    /// Caps of `max_http` non-stream connections and of `fd_budget`
    /// connections of any kind.
    pub(crate) fn new(max_http: usize, fd_budget: usize) -> Arc<Self> {
        Self::with_grace(max_http, fd_budget, GRACE)
    }

    fn with_grace(max_http: usize, fd_budget: usize, grace: Duration) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            next: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            max_http,
            fd_budget,
            grace: grace.as_millis() as u64,
            room: Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Non-stream connections open now.
    pub(crate) fn http_connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// A connection left or a stream ended: there may be room now.
    pub(crate) fn released(&self) {
        // One stored permit: a wake-up between the accept loop's check and
        // its wait is not lost.
        self.room.notify_one();
    }

    fn full(&self, conns: &HashMap<u64, Arc<Entry>>, streams: usize) -> bool {
        conns.len() >= self.max_http || streams + conns.len() >= self.fd_budget
    }

    /// Wait until a new connection can be taken: below both caps, or with
    /// a connection that may make room. `streams` is the number of open
    /// streams (read again on every wake-up). Until then the newcomer waits
    /// in the listen backlog.
    pub(crate) async fn room(&self, streams: impl Fn() -> usize) {
        loop {
            let wake = {
                let conns = self.conns.lock();
                if !self.full(&conns, streams()) {
                    return;
                }
                let now = self.now();
                match conns
                    .values()
                    .filter_map(|e| e.evictable_from(self.grace))
                    .map(|(from, _)| from)
                    .min()
                {
                    Some(from) if from <= now => return,
                    Some(from) => (from - now).min(self.grace),
                    // Busy, or not read from yet: one may start waiting
                    // without a wake-up, so look again after a grace.
                    None => self.grace,
                }
            };
            let _ = tokio::time::timeout(Duration::from_millis(wake), self.room.notified()).await;
        }
    }

    /// Track a new (or continuing) non-stream connection, making room as
    /// the module documentation says. `None`: no room now, and no
    /// connection may make room yet.
    pub(crate) fn admit(self: &Arc<Self>, streams: usize) -> Option<Slot> {
        let mut conns = self.conns.lock();
        while self.full(&conns, streams) {
            if !self.evict_oldest(&mut conns, false) {
                return None;
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        // Not waiting yet: its clock starts when its task first reads (a
        // connection the node has not got round to is not idle).
        let entry = Arc::new(Entry {
            waiting_since: AtomicU64::new(0),
            between_requests: AtomicBool::new(false),
            evict: CancellationToken::new(),
        });
        conns.insert(id, entry.clone());
        Some(Slot {
            tracker: self.clone(),
            id,
            entry,
        })
    }

    /// Close the connection waiting longest, within its grace or not (the
    /// process ran out of descriptors despite the budget); false when none
    /// is waiting.
    pub(crate) fn evict_one(&self) -> bool {
        self.evict_oldest(&mut self.conns.lock(), true)
    }

    /// Close the connection that has waited longest on its client among
    /// those that may make room (all waiting ones when `any`); false when
    /// there is none.
    fn evict_oldest(&self, conns: &mut HashMap<u64, Arc<Entry>>, any: bool) -> bool {
        let now = self.now();
        let oldest = conns
            .iter()
            .filter_map(|(id, e)| {
                let (from, since) = e.evictable_from(self.grace)?;
                (any || from <= now).then_some((since, *id))
            })
            .min();
        match oldest.and_then(|(_, id)| conns.remove(&id)) {
            Some(e) => {
                e.evict.cancel();
                metrics::counter!(m::CONNECTIONS_EVICTED).increment(1);
                true
            }
            None => false,
        }
    }
}

/// The process's open-files limit, raised to its hard limit first.
pub fn raise_nofile_limit() -> usize {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_connection_makes_room_only_once_really_idle_and_busy_ones_stay() {
        let t = Tracker::with_grace(2, 1000, 40 * MS);
        let admit = |t: &Arc<Tracker>| {
            let s = t.admit(0)?;
            s.entry.waiting(t);
            Some(s)
        };
        // Admitted but not read from yet: not waiting, cannot make room.
        let a = t.admit(0).unwrap();
        let x = t.admit(0).unwrap();
        std::thread::sleep(50 * MS);
        assert!(t.admit(0).is_none());
        drop(x);
        a.entry.waiting(&t);
        std::thread::sleep(3 * MS);
        let b = admit(&t).unwrap();
        // Both still within their grace: nobody makes room.
        assert!(t.admit(0).is_none());
        assert!(!a.entry.evicted().is_cancelled());
        // Past it, a (waiting longest) goes.
        std::thread::sleep(50 * MS);
        let c = admit(&t).unwrap();
        assert!(a.entry.evicted().is_cancelled());
        assert!(!b.entry.evicted().is_cancelled());
        // Busy connections stay.
        b.entry.busy();
        c.entry.busy();
        assert!(t.admit(0).is_none());
        // A kept-alive connection between requests makes room at once.
        c.entry.idle(&t);
        let _d = t.admit(0).unwrap();
        assert!(c.entry.evicted().is_cancelled());
        // Out of descriptors, the grace does not hold.
        let t1 = Tracker::with_grace(1, 1000, Duration::from_secs(60));
        let e = t1.admit(0).unwrap();
        e.entry.waiting(&t1);
        assert!(t1.admit(0).is_none());
        assert!(t1.evict_one());
        assert!(e.entry.evicted().is_cancelled());
        // The descriptor budget counts streams too.
        let t2 = Tracker::with_grace(100, 10, Duration::ZERO);
        let x = t2.admit(8).unwrap();
        x.entry.waiting(&t2);
        let y = t2.admit(8).unwrap();
        assert_eq!(t2.http_connections(), 2);
        let _z = t2.admit(8).unwrap();
        assert!(x.entry.evicted().is_cancelled());
        drop(y);
        assert_eq!(t2.http_connections(), 1);
    }

    #[tokio::test]
    async fn room_waits_for_a_slot_to_free_or_a_grace_to_pass() {
        let t = Tracker::with_grace(1, 1000, 200 * MS);
        let a = t.admit(0).unwrap();
        a.entry.waiting(&t);
        let started = tokio::time::Instant::now();
        // Nothing leaves: room comes when a's grace has passed.
        t.room(|| 0).await;
        assert!(started.elapsed() >= 190 * MS);
        a.entry.busy();
        let waiter = {
            let t = t.clone();
            tokio::spawn(async move { t.room(|| 0).await })
        };
        tokio::time::sleep(50 * MS).await;
        assert!(!waiter.is_finished());
        drop(a);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("a freed slot wakes the waiter")
            .unwrap();
    }
}
