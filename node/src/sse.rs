//! The SSE response body of one client.
//!
//! The body is a stream of pre-encoded bytes: `PB_CONNECT` first, then
//! whatever the client's queue holds, drained in batches so a burst costs
//! one write. It ends when the client is idle for the idle timeout (no
//! delivered message), reaches its maximum lifetime, or is closed (slow,
//! discarded by the library, server shutdown). When hyper drops it (the end,
//! or the peer going away) the guard unregisters the client.
//!
//! This is the per-event hot path, so it is a hand-written `Stream`: one
//! atomic waker for the queue, and one timer that is re-armed only when it
//! fires (deliveries just record the time), instead of a timer reset and a
//! notification future per event.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};

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

/// The body of one SSE response.
pub struct ClientStream {
    broker: Broker,
    client: Arc<Client>,
    scratch: Vec<Bytes>,
    timer: Pin<Box<Sleep>>,
    idle: Duration,
    last_delivery: Instant,
    ends_at: Instant,
    reason: &'static str,
    done: bool,
}

impl ClientStream {
    /// The body stream of a registered client. `PB_CONNECT` is queued
    /// first, so it is the first thing written.
    pub fn new(broker: Broker, client: Arc<Client>, timeouts: Timeouts) -> Self {
        let connect = protocol::event_frame(
            protocol::CONNECT_EVENT,
            &protocol::connect_data(client.id()),
        );
        // A new client's queue is empty and open, so this cannot fail.
        let _ = client.push(connect);
        let now = Instant::now();
        let ends_at = now + timeouts.max_lifetime;
        Self {
            broker,
            client,
            scratch: Vec::new(),
            timer: Box::pin(tokio::time::sleep_until((now + timeouts.idle).min(ends_at))),
            idle: timeouts.idle,
            last_delivery: now,
            ends_at,
            reason: "client",
            done: false,
        }
    }

    /// Record why the stream ends, when the writer (not the stream) ends it.
    pub fn set_close_reason(&mut self, reason: &'static str) {
        self.reason = reason;
    }

    fn finish(&mut self, reason: &'static str) -> Poll<Option<Result<Bytes, Infallible>>> {
        self.reason = reason;
        self.done = true;
        Poll::Ready(None)
    }
}

impl Stream for ClientStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        // Register before looking, so a push in between wakes us.
        this.client.register(cx.waker());
        loop {
            match this.client.take(&mut this.scratch, BATCH_BYTES) {
                Take::Data { bytes, events } => {
                    m::delivered().increment(events as u64);
                    this.last_delivery = Instant::now();
                    return Poll::Ready(Some(Ok(bytes)));
                }
                Take::Closed(reason) => {
                    return this.finish(match reason {
                        CloseReason::Slow => "slow",
                        CloseReason::Discarded => "discarded",
                        CloseReason::Shutdown => "shutdown",
                    });
                }
                Take::Empty => {}
            }
            if this.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if now >= this.ends_at {
                return this.finish("max_lifetime");
            }
            let idle_at = this.last_delivery + this.idle;
            if now >= idle_at {
                return this.finish("idle");
            }
            // A delivery moved the idle deadline: re-arm and look again.
            this.timer.as_mut().reset(idle_at.min(this.ends_at));
        }
    }
}

impl Drop for ClientStream {
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
