//! An in-process node on a random port; clients come from the testkit.
#![allow(dead_code, unused_imports)]

use fanout::{Config, Server};
pub use fanout_testkit::{Api, Sse, WAIT, user_token, wait_until};

pub struct Node {
    pub server: Server,
    pub api: Api,
}

impl std::ops::Deref for Node {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// Start a node on 127.0.0.1:0 with the defaults, changed by `f`.
pub async fn start_with(f: impl FnOnce(&mut Config)) -> Node {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    f(&mut config);
    let server = Server::start(config).await.expect("server starts");
    let api = Api::new(format!("http://{}", server.local_addr()));
    Node { server, api }
}

pub async fn start() -> Node {
    start_with(|_| {}).await
}

/// A raw TCP connection to the node that has sent `request` (nothing when
/// empty): for exact bytes and connections no HTTP client would make.
pub async fn raw(node: &Node, request: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut sock = tokio::net::TcpStream::connect(node.server.local_addr())
        .await
        .unwrap();
    sock.write_all(request).await.unwrap();
    sock
}

/// Read from a raw socket until `needle` shows up; everything read so far.
pub async fn read_until(sock: &mut tokio::net::TcpStream, needle: &str) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = String::new();
    let mut buf = vec![0; 4096];
    tokio::time::timeout(WAIT, async {
        while !all.contains(needle) {
            let n = sock.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before {needle:?}: {all}");
            all.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {needle:?} in: {all}"));
    all
}
