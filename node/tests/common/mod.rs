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
