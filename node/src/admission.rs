//! Which connections a node keeps when it runs short of room.
//!
//! Every connection costs a file descriptor, and a process has a fixed
//! number of them (`RLIMIT_NOFILE`). SSE streams are what the node is for
//! and are capped by `--max-connections`; every other connection (a request,
//! a kept-alive connection between requests, a client that is slow to send
//! its head or body) is capped by `--max-http-connections`, and all of them
//! together by the descriptors the process has, less a reserve for Redis,
//! the listener and the odd file.
//!
//! When a new connection would pass either cap, the node closes the
//! non-stream connection that has been *waiting on its client* the longest
//! (for a request head, for more of a body, or idle between requests) to
//! make room. A connection whose request is being handled is never closed
//! this way. So a flood of half-sent requests cannot lock out health checks
//! or new streams: each newcomer pushes out the oldest idler, and a request
//! that arrives whole is served before it can become the oldest. When no
//! connection is waiting, the newcomer itself is closed.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// Descriptors kept back from connections: Redis connections, the
/// listener, log files, and the one `accept` needs to take a connection it
/// may then close.
pub const FD_RESERVE: usize = 64;

/// One tracked non-stream connection.
pub(crate) struct Entry {
    /// Milliseconds since the tracker's epoch at which the connection began
    /// waiting on its client, plus one; 0 while a request is handled.
    waiting_since: AtomicU64,
    evict: CancellationToken,
}

impl Entry {
    /// The connection is waiting on its client (head, body, keep-alive).
    pub(crate) fn waiting(&self, tracker: &Tracker) {
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
    }
}

/// The connections that are not streams, and the caps.
pub(crate) struct Tracker {
    epoch: Instant,
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Arc<Entry>>>,
    max_http: usize,
    fd_budget: usize,
}

impl Tracker {
    pub(crate) fn new(max_http: usize, fd_budget: usize) -> Arc<Self> {
        Arc::new(Self {
            epoch: Instant::now(),
            next: AtomicU64::new(1),
            conns: Mutex::new(HashMap::new()),
            max_http,
            fd_budget,
        })
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Non-stream connections open now.
    pub(crate) fn http_connections(&self) -> usize {
        self.conns.lock().len()
    }

    /// Track a new (or continuing) non-stream connection, making room as
    /// the module documentation says. `None`: no room, close it.
    pub(crate) fn admit(self: &Arc<Self>, streams: usize) -> Option<Slot> {
        let mut conns = self.conns.lock();
        while conns.len() >= self.max_http || streams + conns.len() >= self.fd_budget {
            if !evict_oldest(&mut conns) {
                metrics::counter!(m::CONNECTIONS_REFUSED).increment(1);
                return None;
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(Entry {
            waiting_since: AtomicU64::new(self.now()),
            evict: CancellationToken::new(),
        });
        conns.insert(id, entry.clone());
        Some(Slot {
            tracker: self.clone(),
            id,
            entry,
        })
    }

    /// Close the connection waiting longest, if any (the process ran out of
    /// descriptors despite the budget).
    pub(crate) fn evict_one(&self) -> bool {
        evict_oldest(&mut self.conns.lock())
    }
}

/// Close the connection that has waited longest on its client; false when
/// none is waiting.
fn evict_oldest(conns: &mut HashMap<u64, Arc<Entry>>) -> bool {
    let oldest = conns
        .iter()
        .filter_map(|(id, e)| {
            let since = e.waiting_since.load(Ordering::Relaxed);
            (since > 0).then_some((since, *id))
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

    #[test]
    fn the_longest_waiting_connection_makes_room_and_busy_ones_stay() {
        let t = Tracker::new(2, 1000);
        let a = t.admit(0).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let b = t.admit(0).unwrap();
        // a waits longest: it goes.
        let c = t.admit(0).unwrap();
        assert!(a.entry.evicted().is_cancelled());
        assert!(!b.entry.evicted().is_cancelled());
        // Both left are busy: nothing can make room.
        b.entry.busy();
        c.entry.busy();
        assert!(t.admit(0).is_none());
        // The descriptor budget counts streams too.
        c.entry.waiting(&t);
        let t2 = Tracker::new(100, 10);
        let _x = t2.admit(8).unwrap();
        let _y = t2.admit(8).unwrap();
        assert_eq!(t2.http_connections(), 2);
        let _z = t2.admit(8).unwrap();
        assert!(_x.entry.evicted().is_cancelled());
        drop(_y);
        assert_eq!(t2.http_connections(), 1);
    }
}
