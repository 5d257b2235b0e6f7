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
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_util::Stream;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::{
    broker::Broker,
    client::{Client, CloseReason, Take},
    error::ApiError,
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

/// The response headers of a stream, as PocketBase sends them. Both the
/// router's handler and the connection fast path write exactly these (CORS
/// comes on top, from the router's layer or written alongside).
pub const HEADERS: &[(&str, &str)] = &[
    ("content-type", "text/event-stream"),
    ("cache-control", "no-store"),
    ("x-accel-buffering", "no"),
    ("x-content-type-options", "nosniff"),
    ("x-frame-options", "SAMEORIGIN"),
    ("x-xss-protection", "1; mode=block"),
];

/// Opens streams: the one place that decides whether a new stream is
/// accepted and registers its client, for both ways a stream is served
/// (`conn.rs` on the socket, `http.rs` through the router).
#[derive(Clone)]
pub struct Streams {
    pub broker: Broker,
    pub timeouts: Timeouts,
    pub max_connections: usize,
    pub shutdown: CancellationToken,
}

impl Streams {
    /// Why a new stream would be refused now (503), if it would.
    pub fn refusal(&self) -> Option<ApiError> {
        if self.shutdown.is_cancelled() {
            Some(ApiError::unavailable("The server is shutting down."))
        } else if self.broker.hub().total_clients() >= self.max_connections {
            Some(ApiError::unavailable(
                "Too many realtime connections on this node.",
            ))
        } else {
            None
        }
    }

    /// Register a client for a stream from `ip` and make its body.
    pub fn open(&self, ip: IpAddr) -> ClientStream {
        let client = self.broker.connect(ip);
        if self.shutdown.is_cancelled() {
            // Shutdown began after `refusal` and may have closed every
            // stream already: do not open one it would wait for.
            client.close(CloseReason::Shutdown);
        }
        tracing::debug!(client = client.id(), %ip, "stream opened");
        ClientStream::new(self.broker.clone(), client, self.timeouts)
    }
}

/// The body of one SSE response.
pub struct ClientStream {
    broker: Broker,
    client: Arc<Client>,
    batch: Vec<protocol::Frame>,
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
        )
        .expect("PB_CONNECT is line-safe");
        // A new client's queue is empty and open, so this cannot fail.
        let _ = client.push(connect);
        let now = Instant::now();
        let ends_at = now + timeouts.max_lifetime;
        Self {
            broker,
            client,
            batch: Vec::new(),
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

    fn finish(&mut self, reason: &'static str) {
        self.reason = reason;
        self.done = true;
    }
}

impl ClientStream {
    /// Wait for the next batch of events and append it to `out`, as one
    /// HTTP chunk when `chunked` (the connection writes it to the socket as
    /// is), with a single copy of the frames. `Ready(false)` once the
    /// stream has ended.
    pub fn poll_batch(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Vec<u8>,
        chunked: bool,
    ) -> Poll<bool> {
        if self.done {
            return Poll::Ready(false);
        }
        // Register before looking, so a push in between wakes us.
        self.client.register(cx.waker());
        loop {
            match self.client.take(&mut self.batch, BATCH_BYTES) {
                Take::Data { size, events } => {
                    out.reserve(size + 16);
                    if chunked {
                        use std::io::Write;
                        let _ = write!(out, "{size:x}\r\n");
                    }
                    self.client.encode(&mut self.batch, out);
                    if chunked {
                        out.extend_from_slice(b"\r\n");
                    }
                    m::delivered().increment(events as u64);
                    self.last_delivery = Instant::now();
                    return Poll::Ready(true);
                }
                Take::Closed(reason) => {
                    self.finish(match reason {
                        CloseReason::Slow => "slow",
                        CloseReason::Overloaded => "overloaded",
                        CloseReason::Gap => "gap",
                        CloseReason::Discarded => "discarded",
                        CloseReason::Shutdown => "shutdown",
                    });
                    return Poll::Ready(false);
                }
                Take::Empty => {}
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            if now >= self.ends_at {
                self.finish("max_lifetime");
                return Poll::Ready(false);
            }
            let idle_at = self.last_delivery + self.idle;
            if now >= idle_at {
                self.finish("idle");
                return Poll::Ready(false);
            }
            // A delivery moved the idle deadline: re-arm and look again.
            self.timer.as_mut().reset(idle_at.min(self.ends_at));
        }
    }
}

/// The body of a response served through hyper (HTTP/1.0 clients).
impl Stream for ClientStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut out = Vec::new();
        match self.poll_batch(cx, &mut out, false) {
            Poll::Ready(true) => Poll::Ready(Some(Ok(Bytes::from(out)))),
            Poll::Ready(false) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
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
