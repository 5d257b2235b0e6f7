//! A lean SSE client: one hyper HTTP/1.1 connection per stream, bound to a
//! chosen source address, and a line scanner that hands `data:` lines to
//! the caller without allocating per event.

use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{Request, body::Incoming, header};
use hyper_util::rt::TokioIo;
use tokio::net::TcpSocket;

/// How a client behaves once connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Read every event.
    Read,
    /// Never read after PB_CONNECT: a stalled consumer.
    Stall,
}

/// Open `GET /api/realtime` on `node` from `source` and run the client in
/// one task: the connection and the body reader are polled together, so an
/// arriving event costs one task wake-up, not two. `ready` receives the
/// client id (from PB_CONNECT's `id:` line); after that, `on_data` gets the
/// payload of every `data:` line until the stream ends. `recv_buffer`
/// shrinks the socket's receive buffer.
pub fn spawn(
    node: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<u32>,
    mode: Mode,
    ready: tokio::sync::oneshot::Sender<anyhow::Result<String>>,
    mut on_data: impl FnMut(&[u8]) + Send + 'static,
) {
    tokio::spawn(async move {
        let io = match connect(node, source, recv_buffer).await {
            Ok(io) => io,
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        let (mut sender, conn) = match hyper::client::conn::http1::handshake(io).await {
            Ok(x) => x,
            Err(e) => {
                let _ = ready.send(Err(e.into()));
                return;
            }
        };
        let client = async move {
            let mut body = match request(&mut sender, node).await {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready.send(Err(e));
                    return;
                }
            };
            let mut scanner = Scanner::default();
            let mut id = None;
            while id.is_none() {
                let Some(chunk) = next_chunk(&mut body).await else {
                    let _ = ready.send(Err(anyhow::anyhow!("stream ended before PB_CONNECT")));
                    return;
                };
                scanner.feed(&chunk, |line| {
                    if let Some(v) = line.strip_prefix(b"id:") {
                        id.get_or_insert_with(|| String::from_utf8_lossy(v).trim().to_owned());
                    }
                });
            }
            let _ = ready.send(Ok(id.unwrap_or_default()));
            if mode == Mode::Stall {
                // Hold the body unread: hyper stops reading the socket.
                std::future::pending::<()>().await;
            }
            while let Some(chunk) = next_chunk(&mut body).await {
                scanner.feed(&chunk, |line| {
                    if let Some(d) = line.strip_prefix(b"data:") {
                        on_data(d);
                    }
                });
            }
        };
        // The connection ends when the client future is dropped, and vice
        // versa.
        tokio::select! {
            _ = conn => {}
            _ = client => {}
        }
    });
}

async fn connect(
    node: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> anyhow::Result<TokioIo<tokio::net::TcpStream>> {
    let socket = if node.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        // Runs back to back leave thousands of ports in TIME_WAIT; without
        // this, binding a source address skips them and connects crawl.
        socket.set_reuseaddr(true)?;
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let tcp = socket.connect(node).await.context("connect")?;
    tcp.set_nodelay(true)?;
    Ok(TokioIo::new(tcp))
}

async fn request(
    sender: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    node: SocketAddr,
) -> anyhow::Result<Incoming> {
    let req = Request::get("/api/realtime")
        .header(header::HOST, node.to_string())
        .header(header::ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    if !res.status().is_success() {
        bail!("GET /api/realtime: {}", res.status());
    }
    Ok(res.into_body())
}

async fn next_chunk(body: &mut Incoming) -> Option<Bytes> {
    loop {
        match body.frame().await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    return Some(data);
                }
            }
            _ => return None,
        }
    }
}

/// Splits a byte stream into lines (without the `\n`, and a trailing `\r`
/// removed), keeping a partial line between chunks.
#[derive(Default)]
struct Scanner {
    partial: Vec<u8>,
}

impl Scanner {
    fn feed(&mut self, mut chunk: &[u8], mut on_line: impl FnMut(&[u8])) {
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            let (line, rest) = chunk.split_at(pos);
            chunk = &rest[1..];
            if self.partial.is_empty() {
                on_line(trim_cr(line));
            } else {
                self.partial.extend_from_slice(line);
                on_line(trim_cr(&self.partial));
                self.partial.clear();
            }
        }
        self.partial.extend_from_slice(chunk);
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// The integer after `"key":` in a flat JSON object, without parsing it.
pub fn json_u64(data: &[u8], key: &[u8]) -> Option<u64> {
    let start = data
        .windows(key.len())
        .position(|w| w == key)
        .map(|p| p + key.len())?;
    let digits = data[start..]
        .iter()
        .skip_while(|b| **b == b' ')
        .take_while(|b| b.is_ascii_digit());
    let mut v: u64 = 0;
    let mut any = false;
    for d in digits {
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
        any = true;
    }
    any.then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_joins_lines_across_chunks() {
        let mut s = Scanner::default();
        let mut lines = Vec::new();
        for chunk in [&b"id:x\nda"[..], b"ta:{\"s\":1", b"2}\r\n\n"] {
            s.feed(chunk, |l| {
                lines.push(String::from_utf8(l.to_vec()).unwrap())
            });
        }
        assert_eq!(lines, ["id:x", "data:{\"s\":12}", ""]);
    }

    #[test]
    fn reads_numbers_from_payloads() {
        let d = br#"{"s":42,"t":1234567,"p":3,"k":0,"x":"aaa"}"#;
        assert_eq!(json_u64(d, b"\"s\":"), Some(42));
        assert_eq!(json_u64(d, b"\"t\":"), Some(1234567));
        assert_eq!(json_u64(d, b"\"k\":"), Some(0));
        assert_eq!(json_u64(d, b"\"q\":"), None);
    }
}
