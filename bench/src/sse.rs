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

/// An open stream whose `PB_CONNECT` has been read.
pub struct Stream {
    pub client_id: String,
    body: Incoming,
    scanner: Scanner,
}

/// Open `GET /api/realtime` on `node` from `source` and read `PB_CONNECT`.
/// `recv_buffer` shrinks the socket's receive buffer (slow consumers).
pub async fn open(
    node: SocketAddr,
    source: Option<IpAddr>,
    recv_buffer: Option<u32>,
) -> anyhow::Result<Stream> {
    let socket = if node.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .with_context(|| format!("bind {ip}"))?;
    }
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    let tcp = socket.connect(node).await.context("connect")?;
    tcp.set_nodelay(true)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::get("/api/realtime")
        .header(header::HOST, node.to_string())
        .header(header::ACCEPT, "text/event-stream")
        .body(Empty::<Bytes>::new())?;
    let res = sender.send_request(req).await?;
    if !res.status().is_success() {
        bail!("GET /api/realtime: {}", res.status());
    }
    let mut stream = Stream {
        client_id: String::new(),
        body: res.into_body(),
        scanner: Scanner::default(),
    };
    let mut id = None;
    while id.is_none() {
        let Some(chunk) = stream.next_chunk().await else {
            bail!("stream ended before PB_CONNECT");
        };
        stream.scanner.feed(&chunk, |line| {
            if let Some(v) = line.strip_prefix(b"id:") {
                id.get_or_insert_with(|| String::from_utf8_lossy(v).trim().to_owned());
            }
        });
    }
    stream.client_id = id.unwrap_or_default();
    Ok(stream)
}

impl Stream {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        loop {
            match self.body.frame().await {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(data);
                    }
                }
                _ => return None,
            }
        }
    }

    /// Read until the stream ends, calling `on_data` with the payload of
    /// every `data:` line.
    pub async fn run(mut self, mut on_data: impl FnMut(&[u8])) {
        while let Some(chunk) = self.next_chunk().await {
            self.scanner.feed(&chunk, |line| {
                if let Some(d) = line.strip_prefix(b"data:") {
                    on_data(d);
                }
            });
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
            s.feed(chunk, |l| lines.push(String::from_utf8(l.to_vec()).unwrap()));
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
