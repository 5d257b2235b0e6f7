//! Mass closes, spread over a window.
//!
//! Some closes hit many streams at once on purpose: a topic's history
//! cannot fill a gap (a Redis restarted without persistence is a new epoch
//! for every topic), a publish reached no subscriber of this node, or the
//! node drains for shutdown. Closed in the same instant, every one of
//! those clients reconnects within the SDK's first retry (200 ms), and a
//! whole node's worth of connects and subscription POSTs lands on the
//! cluster at once. So each client's close is put off by a random delay,
//! uniform over `--close-spread` (3 s by default), and the reconnects are
//! spread as evenly.
//!
//! The close is still the "you may have missed something" signal: the
//! caller stops delivering to a client at once (a gap's clients are
//! unregistered before their close is scheduled), so a client never
//! receives a message from past the gap on the stream that missed some;
//! it learns of the gap at most the window after the node did, reconnects,
//! and re-fetches on `PB_CONNECT`.

use std::{sync::Arc, time::Duration};

use rand::Rng;

use crate::client::{Client, CloseReason};

/// Close `clients` for `reason`, each at a random moment within `window`
/// from now; all at once when `window` is zero or no tokio runtime runs
/// (a library caller outside one). Returns at once.
pub(crate) fn close_spread(clients: Vec<Arc<Client>>, reason: CloseReason, window: Duration) {
    let runtime = match tokio::runtime::Handle::try_current() {
        Ok(runtime) if !window.is_zero() && !clients.is_empty() => runtime,
        _ => return close_now(clients, reason),
    };
    let mut rng = rand::rng();
    let mut plan: Vec<(Duration, Arc<Client>)> = clients
        .into_iter()
        .map(|c| (window.mul_f64(rng.random::<f64>()), c))
        .collect();
    plan.sort_by_key(|(at, _)| *at);
    let start = tokio::time::Instant::now();
    runtime.spawn(async move {
        for (at, client) in plan {
            tokio::time::sleep_until(start + at).await;
            client.close(reason);
        }
    });
}

fn close_now(clients: Vec<Arc<Client>>, reason: CloseReason) {
    for client in clients {
        client.close(reason);
    }
}
