//! Accepted connections: the SSE fast path, and hyper for everything else.
//!
//! Why not hand every connection to hyper: hyper keeps an 8 KiB read buffer
//! and a 4 KiB write buffer for the life of a connection, and an SSE
//! connection lives for up to 30 minutes while doing nothing but write.
//! Measured with massif (`valgrind --tool=massif target/release/fanout`
//! while `fanout-bench run --clients 2000 --idle` held 2,000 idle streams),
//! those two buffers were 12 KiB of the ~15 KiB of heap per stream, and
//! resident memory was ~21 KiB per stream (`fanout-bench run --clients
//! 10000 --idle --pids <pid>`; 4.8 KiB with this module). So each connection's request head is read here first, into a
//! small buffer, and parsed with `httparse`:
//!
//! * `GET /api/realtime` over HTTP/1.1 without a body is served right here:
//!   a fixed response head, then the client's SSE frames in chunked
//!   encoding, straight onto the socket. Once the stream ends, the
//!   connection goes on with hyper, so keep-alive still works.
//! * Anything else (including a realtime GET that must be refused: shutting
//!   down, too many streams) goes to hyper with the bytes already read, and
//!   from there to the axum router. The router also serves
//!   `GET /api/realtime` itself, with the same bytes, for HTTP/1.0 clients
//!   and for embedding.
//! * A realtime GET followed by more bytes in the same read (a pipelined
//!   request) is refused with 400 and the connection closed: the stream
//!   never ends in time to answer what follows it.
//!
//! Every connection that is not a stream is tracked by
//! [`crate::admission`], which keeps the node reachable when it runs short
//! of connections or file descriptors.

use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{Router, extract::ConnectInfo, http::HeaderMap};
use bytes::{Buf, Bytes, BytesMut};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::{GracefulShutdown, Watcher},
};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tokio_io_timeout::TimeoutStream;
use tokio_util::task::TaskTracker;
use tower::ServiceExt;

use crate::{
    admission::{Entry, Slot, Tracker},
    error::ApiError,
    http::PeerAddr,
    realip::RealIp,
    sse::{HEADERS, Streams},
};

/// Longest request head read before deciding; longer ones go to hyper,
/// which answers 431.
const MAX_HEAD: usize = 16 * 1024;

type Io = Pin<Box<TimeoutStream<TcpStream>>>;

/// What every connection task needs.
pub(crate) struct Conns {
    pub router: Router,
    pub streams: Streams,
    pub real_ip: RealIp,
    pub write_timeout: Duration,
    /// How long a client may take to send a request head, or stay idle
    /// between requests.
    pub head_timeout: Duration,
    pub tracker: Arc<Tracker>,
}

/// A request's connection, for handlers that wait on the client (the body
/// reader marks the connection as waiting, so it can make room).
#[derive(Clone)]
pub struct ConnHandle {
    entry: Arc<Entry>,
    tracker: Arc<Tracker>,
}

impl ConnHandle {
    pub(crate) fn waiting(&self) {
        self.entry.waiting(&self.tracker);
    }

    pub(crate) fn busy(&self) {
        self.entry.busy();
    }

    fn idle(&self) {
        self.entry.idle(&self.tracker);
    }
}

/// Accept until shutdown, then wait up to `drain` for connections to end.
pub(crate) async fn serve(listener: TcpListener, conns: Conns, drain: Duration) {
    let conns = Arc::new(conns);
    let tracker = TaskTracker::new();
    let graceful = GracefulShutdown::new();
    let streams = || conns.streams.broker.hub().total_clients();
    loop {
        // Accept only what can be served: at a cap, the next client waits
        // in the listen backlog until there is room (see `admission`).
        tokio::select! {
            _ = conns.tracker.room(streams) => {}
            _ = conns.streams.shutdown.cancelled() => break,
        }
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = conns.streams.shutdown.cancelled() => break,
        };
        match accepted {
            Ok((tcp, peer)) => {
                // The room may have gone since (a stream that ended became
                // a kept-alive connection): wait for it again.
                let slot = loop {
                    if let Some(slot) = conns.tracker.admit(streams()) {
                        break Some(slot);
                    }
                    tokio::select! {
                        _ = conns.tracker.room(streams) => {}
                        _ = conns.streams.shutdown.cancelled() => break None,
                    }
                };
                let Some(slot) = slot else { break };
                tracker.spawn(handle(conns.clone(), tcp, peer, graceful.watcher(), slot));
            }
            Err(e) if is_per_connection(&e) => {}
            Err(e) => {
                // EMFILE and friends: the node is at a resource limit
                // despite its budget. Make room, and back off briefly
                // instead of spinning.
                tracing::error!(error = %e, "accept failed");
                conns.tracker.evict_one();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    drop(listener);
    tracker.close();
    // Streams end because shutdown closed every client queue; hyper
    // connections finish their requests and close; connections still
    // waiting for a request head give up on the cancellation.
    let wait = async {
        graceful.shutdown().await;
        tracker.wait().await;
    };
    if tokio::time::timeout(drain, wait).await.is_err() {
        tracing::warn!(?drain, "drain timeout; closing with connections open");
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn handle(
    conns: Arc<Conns>,
    tcp: TcpStream,
    peer: SocketAddr,
    watcher: Watcher,
    mut slot: Slot,
) {
    let _ = tcp.set_nodelay(true);
    let mut stream = TimeoutStream::new(tcp);
    stream.set_write_timeout(Some(conns.write_timeout));
    let mut io: Io = Box::pin(stream);
    let mut head = BytesMut::with_capacity(1024);
    // Not waiting (evictable) until part of a head has come and stalled;
    // a connection that has sent nothing yet is left to the head timeout.
    let started = || slot.entry.waiting(&conns.tracker);
    let read = tokio::time::timeout(conns.head_timeout, read_head(&mut io, &mut head, started));
    let realtime = tokio::select! {
        r = read => match r {
            Ok(Ok(Some(realtime))) => realtime,
            // Closed, failed, or slow to send a head: nothing to answer.
            Ok(Ok(None)) | Ok(Err(_)) | Err(_) => return,
        },
        // Closed to make room for a newer connection (half-sent after its
        // grace).
        _ = slot.entry.evicted().cancelled() => return,
        // A connection that has not sent a request yet must not hold up
        // shutdown.
        _ = conns.streams.shutdown.cancelled() => return,
    };
    // A whole head: being served, not waiting on the client.
    slot.entry.busy();
    let mut prefix = head.freeze();
    match realtime {
        Head::Other => {}
        Head::Pipelined => {
            refuse_pipelined(&mut io).await;
            return;
        }
        Head::Realtime(xff) => {
            // A stream is counted as a stream, not as a request connection.
            drop(slot);
            let served = serve_sse(&conns, &mut io, peer, xff, prefix.clone()).await;
            // A stream ended (or was refused): room for a newcomer.
            conns.tracker.released();
            match served {
                // Refused (the router answers), or ended cleanly: the
                // connection goes on with hyper.
                Some(rest) => prefix = rest,
                None => return,
            }
            if prefix.is_empty() && conns.streams.shutdown.is_cancelled() {
                return;
            }
            let streams = conns.streams.broker.hub().total_clients();
            // Kept alive after its stream if there is room at once; closing
            // it otherwise is ordinary HTTP.
            match conns.tracker.admit(streams) {
                Some(s) => {
                    s.entry.idle(&conns.tracker);
                    slot = s;
                }
                None => {
                    metrics::counter!(crate::metrics::CONNECTIONS_REFUSED).increment(1);
                    return;
                }
            }
        }
    }
    serve_hyper(&conns, io, peer, prefix, watcher, slot).await;
}

/// What a complete request head asks for.
enum Head {
    /// A realtime GET this module serves, with its `X-Forwarded-For` values.
    Realtime(Vec<Vec<u8>>),
    /// A realtime GET with more bytes behind it.
    Pipelined,
    /// Anything else: hyper and the router serve it.
    Other,
}

/// Read until a complete request head is buffered; `None` when the peer
/// went away first. `partial` is called once, when the first bytes read do
/// not make a whole head.
async fn read_head(
    io: &mut Io,
    buf: &mut BytesMut,
    partial: impl FnOnce(),
) -> io::Result<Option<Head>> {
    let mut partial = Some(partial);
    loop {
        if io.read_buf(buf).await? == 0 {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(buf) {
            Ok(httparse::Status::Complete(n)) => {
                return Ok(Some(match fast_path(&req) {
                    Some(_) if n < buf.len() => Head::Pipelined,
                    Some(xff) => Head::Realtime(xff),
                    None => Head::Other,
                }));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {
                if let Some(f) = partial.take() {
                    f();
                }
            }
            // Malformed, too many headers or too long: hyper answers.
            _ => return Ok(Some(Head::Other)),
        }
    }
}

/// Answer a realtime GET with a request pipelined behind it: 400, with
/// the error JSON, and close.
async fn refuse_pipelined(io: &mut Io) {
    let body = ApiError::bad_request(
        "A request pipelined behind GET /api/realtime cannot be answered; send it on another connection.",
    )
    .body();
    let head = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let _ = io.write_all(head.as_bytes()).await;
    let _ = io.write_all(&body).await;
    let _ = io.shutdown().await;
}

/// The `X-Forwarded-For` values of a request this module serves itself:
/// an HTTP/1.1 `GET /api/realtime` with no body.
fn fast_path(req: &httparse::Request<'_, '_>) -> Option<Vec<Vec<u8>>> {
    let path = req.path?;
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    if req.method? != "GET" || path != "/api/realtime" || req.version? != 1 {
        return None;
    }
    let mut xff = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") && h.value != b"0"
            || h.name.eq_ignore_ascii_case("transfer-encoding")
            || h.name.eq_ignore_ascii_case("upgrade")
        {
            return None;
        }
        if h.name.eq_ignore_ascii_case("x-forwarded-for") {
            xff.push(h.value.to_vec());
        }
    }
    Some(xff)
}

/// The response head of a stream. The same headers as the router's
/// handler (`http::realtime_connect`) and as PocketBase.
fn response_head() -> Vec<u8> {
    let mut head = b"HTTP/1.1 200 OK\r\n".to_vec();
    let cors = [
        // What the router's permissive CORS layer adds.
        ("access-control-allow-origin", "*"),
        ("access-control-expose-headers", "*"),
    ];
    for (name, value) in HEADERS.iter().chain(&cors) {
        head.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    let date = httpdate::fmt_http_date(std::time::SystemTime::now());
    head.extend_from_slice(
        format!("transfer-encoding: chunked\r\ndate: {date}\r\n\r\n").as_bytes(),
    );
    head
}

/// Serve one SSE stream on the connection. Returns the bytes to hand to
/// hyper afterwards (empty when the connection should just continue), or
/// `None` when the connection is finished (peer gone, write failed, or
/// bytes arrived during the stream that cannot be replayed).
async fn serve_sse(
    conns: &Conns,
    io: &mut Io,
    peer: SocketAddr,
    xff: Vec<Vec<u8>>,
    head: Bytes,
) -> Option<Bytes> {
    // Refusals (503) are the router's job; give it the request.
    if conns.streams.refusal().is_some() {
        return Some(head);
    }
    let mut headers = HeaderMap::new();
    for v in xff {
        if let Ok(v) = axum::http::HeaderValue::from_bytes(&v) {
            headers.append("x-forwarded-for", v);
        }
    }
    // A bad X-Forwarded-For is the router's to answer (400).
    let Ok(ip) = conns.real_ip.resolve(peer.ip(), &headers) else {
        return Some(head);
    };
    let mut body = conns.streams.open(ip);
    // The response head goes out with the first batch (PB_CONNECT).
    let mut out = response_head();
    let mut ignored = [0u8; 64];
    enum Step {
        Batch(bool),
        Read(io::Result<usize>),
    }
    loop {
        let step = tokio::select! {
            more = std::future::poll_fn(|cx| body.poll_batch(cx, &mut out, true)) => Step::Batch(more),
            // A streaming client sends nothing more; reading only tells us
            // when it goes away.
            read = io.read(&mut ignored) => Step::Read(read),
        };
        match step {
            Step::Batch(true) => {
                if let Err(e) = io.write_all(&out).await {
                    // A stalled reader trips the write timeout here.
                    body.set_close_reason(if e.kind() == io::ErrorKind::TimedOut {
                        "write_timeout"
                    } else {
                        "write_failed"
                    });
                    return None;
                }
                // A fresh buffer: an idle stream keeps no burst-sized one.
                out = Vec::new();
            }
            Step::Batch(false) => {
                out.extend_from_slice(b"0\r\n\r\n");
                return io.write_all(&out).await.ok().map(|_| Bytes::new());
            }
            Step::Read(Ok(0) | Err(_)) => return None,
            // Pipelined bytes cannot be replayed after the stream.
            Step::Read(Ok(_)) => {
                let _ = io.write_all(&out).await;
                return None;
            }
        }
    }
}

/// Serve the connection with hyper and the router, replaying `prefix`.
async fn serve_hyper(
    conns: &Conns,
    io: Io,
    peer: SocketAddr,
    prefix: Bytes,
    watcher: Watcher,
    slot: Slot,
) {
    let router = conns.router.clone();
    let handle = ConnHandle {
        entry: slot.entry.clone(),
        tracker: conns.tracker.clone(),
    };
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(PeerAddr(peer)));
        req.extensions_mut().insert(handle.clone());
        handle.busy();
        let handle = handle.clone();
        let answer = router.clone().oneshot(req);
        async move {
            let res = answer.await;
            // A stream the router serves (HTTP/1.0) stays busy while its
            // body streams; anything else is idle until the next request
            // head (hyper's head timeout).
            let streaming = matches!(&res, Ok(r) if r
                .headers()
                .get(axum::http::header::CONTENT_TYPE)
                .is_some_and(|v| v == "text/event-stream"));
            if !streaming {
                handle.idle();
            }
            res
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(conns.head_timeout)
        .serve_connection(TokioIo::new(Replay { prefix, io }), service);
    tokio::select! {
        r = watcher.watch(conn) => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        }
        _ = slot.entry.evicted().cancelled() => {}
    }
}

/// An IO that yields `prefix` before reading from `io`.
struct Replay {
    prefix: Bytes,
    io: Io,
}

impl AsyncRead for Replay {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        self.io.as_mut().poll_read(cx, buf)
    }
}

impl AsyncWrite for Replay {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.io.as_mut().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.io.as_mut().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Option<Vec<Vec<u8>>> {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        assert!(req.parse(raw).unwrap().is_complete());
        fast_path(&req)
    }

    #[test]
    fn only_plain_http11_realtime_gets_take_the_fast_path() {
        assert_eq!(
            parse(b"GET /api/realtime HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n"),
            Some(vec![b"1.2.3.4".to_vec()])
        );
        assert!(parse(b"GET /api/realtime?x=1 HTTP/1.1\r\nHost: x\r\n\r\n").is_some());
        assert!(parse(b"GET /api/realtime HTTP/1.0\r\n\r\n").is_none());
        assert!(parse(b"POST /api/realtime HTTP/1.1\r\nContent-Length: 2\r\n\r\n").is_none());
        assert!(parse(b"GET /api/realtimeX HTTP/1.1\r\n\r\n").is_none());
        assert!(parse(b"GET /api/realtime HTTP/1.1\r\nContent-Length: 5\r\n\r\n").is_none());
        assert!(parse(b"GET /api/realtime HTTP/1.1\r\nUpgrade: websocket\r\n\r\n").is_none());
    }
}
