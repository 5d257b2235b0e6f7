//! The SSE response body of one client.
//!
//! The body is a stream of pre-encoded bytes: `PB_CONNECT` first, then
//! whatever the client's queue holds, drained in batches so a burst costs
//! one write. It ends when the client is idle for the idle timeout (no
//! delivered message), reaches its maximum lifetime, is discarded (slow or by
//! the library), or the server shuts down. When hyper drops it (the end, or
//! the peer going away) the guard unregisters the client.

use std::{convert::Infallible, sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::Broker,
    client::{Client, CloseReason, Take},
    metrics as m, protocol,
};

/// Upper bound of one write batch.
const BATCH_BYTES: usize = 64 * 1024;

/// Stream lifetimes.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub idle: Duration,
    pub max_lifetime: Duration,
}

/// Unregisters the client when the body is dropped, however that happens.
struct Guard {
    broker: Broker,
    client: Arc<Client>,
    reason: &'static str,
}

impl Guard {
    fn closing(&mut self, reason: &'static str) {
        self.reason = reason;
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        metrics::counter!(m::CONNECTIONS_CLOSED, "reason" => self.reason).increment(1);
        tracing::debug!(
            client = self.client.id(),
            reason = self.reason,
            "stream closed"
        );
        self.broker.disconnect(self.client.id());
    }
}

struct State {
    guard: Guard,
    scratch: Vec<Bytes>,
    sleep: std::pin::Pin<Box<Sleep>>,
    idle: Duration,
    ends_at: Instant,
    shutdown: CancellationToken,
}

/// The body stream of a registered client. `PB_CONNECT` is queued first, so
/// it is the first thing written.
pub fn stream(
    broker: Broker,
    client: Arc<Client>,
    timeouts: Timeouts,
    shutdown: CancellationToken,
) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let connect = protocol::event_frame(
        protocol::CONNECT_EVENT,
        &protocol::connect_data(client.id()),
    );
    // A new client's queue is empty and open, so this cannot fail.
    let _ = client.push(connect);
    let now = Instant::now();
    let ends_at = now + timeouts.max_lifetime;
    let state = State {
        guard: Guard {
            broker,
            client,
            reason: "client",
        },
        scratch: Vec::new(),
        sleep: Box::pin(tokio::time::sleep_until((now + timeouts.idle).min(ends_at))),
        idle: timeouts.idle,
        ends_at,
        shutdown,
    };
    futures_util::stream::unfold(state, |mut st| async move {
        loop {
            match st.guard.client.take(&mut st.scratch, BATCH_BYTES) {
                Take::Data { bytes, events } => {
                    metrics::counter!(m::DELIVERED).increment(events as u64);
                    let next = (Instant::now() + st.idle).min(st.ends_at);
                    st.sleep.as_mut().reset(next);
                    return Some((Ok(bytes), st));
                }
                Take::Closed(reason) => {
                    st.guard.closing(match reason {
                        CloseReason::Slow => "slow",
                        CloseReason::Discarded => "discarded",
                    });
                    return None;
                }
                Take::Empty => {}
            }
            tokio::select! {
                _ = st.guard.client.changed() => {}
                _ = st.sleep.as_mut() => {
                    let reason = if Instant::now() >= st.ends_at { "max_lifetime" } else { "idle" };
                    st.guard.closing(reason);
                    return None;
                }
                _ = st.shutdown.cancelled() => {
                    st.guard.closing("shutdown");
                    return None;
                }
            }
        }
    })
}
