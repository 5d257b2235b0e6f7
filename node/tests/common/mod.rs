//! Test harness: an in-process node on a random port, and SSE clients that
//! talk to it over real sockets.
#![allow(dead_code)]

use std::time::Duration;

use eventsource_stream::{Event, Eventsource};
use fanout::{Config, Server};
use futures_util::{Stream, StreamExt};
use reqwest::StatusCode;
use serde_json::{Value, json};

/// Generous bound for anything that should happen "now".
pub const WAIT: Duration = Duration::from_secs(10);

pub struct Node {
    pub server: Server,
    pub base: String,
    pub http: reqwest::Client,
}

/// Start a node on 127.0.0.1:0 with the defaults, changed by `f`.
pub async fn start_with(f: impl FnOnce(&mut Config)) -> Node {
    let mut config = Config::defaults();
    config.listen = "127.0.0.1:0".parse().unwrap();
    f(&mut config);
    let server = Server::start(config).await.expect("server starts");
    let base = format!("http://{}", server.local_addr());
    Node {
        server,
        base,
        http: reqwest::Client::new(),
    }
}

pub async fn start() -> Node {
    start_with(|_| {}).await
}

pub type EventStream = std::pin::Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// One SSE client.
pub struct Sse {
    pub client_id: String,
    /// The `id:` of PB_CONNECT.
    pub connect_id: String,
    pub events: EventStream,
}

impl Node {
    /// Open a stream and read PB_CONNECT.
    pub async fn connect(&self) -> Sse {
        self.connect_with(&[]).await
    }

    pub async fn connect_with(&self, headers: &[(&str, &str)]) -> Sse {
        let mut req = self.http.get(format!("{}/api/realtime", self.base));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.expect("GET /api/realtime");
        assert_eq!(res.status(), StatusCode::OK);
        let mut events: EventStream = Box::pin(
            res.bytes_stream()
                .eventsource()
                .map(|r| r.map_err(|e| e.to_string())),
        );
        let first = tokio::time::timeout(WAIT, events.next())
            .await
            .expect("PB_CONNECT in time")
            .expect("stream open")
            .expect("valid SSE");
        assert_eq!(first.event, "PB_CONNECT");
        let data: Value = serde_json::from_str(&first.data).unwrap();
        Sse {
            client_id: data["clientId"].as_str().unwrap().to_owned(),
            connect_id: first.id,
            events,
        }
    }

    /// POST /api/realtime with a JSON body; the status and the JSON body.
    pub async fn post_subscriptions(
        &self,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!("{}/api/realtime", self.base))
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Set a client's subscriptions and insist on 204.
    pub async fn subscribe(&self, client_id: &str, topics: &[&str]) {
        let (status, body) = self
            .post_subscriptions(json!({"clientId": client_id, "subscriptions": topics}), &[])
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }

    /// POST /api/publish; the status and the JSON body.
    pub async fn publish_raw(&self, body: Value, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut req = self
            .http
            .post(format!("{}/api/publish", self.base))
            .json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn publish(&self, topic: &str, data: Value) {
        let (status, body) = self
            .publish_raw(json!({"topic": topic, "data": data}), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
}

impl Sse {
    /// The next event, failing the test if none comes in time.
    pub async fn next(&mut self) -> Event {
        tokio::time::timeout(WAIT, self.events.next())
            .await
            .expect("an event in time")
            .expect("stream still open")
            .expect("valid SSE")
    }

    /// The next event's name and parsed data.
    pub async fn next_json(&mut self) -> (String, Value) {
        let e = self.next().await;
        assert_eq!(e.id, self.client_id, "every event carries the client id");
        (e.event, serde_json::from_str(&e.data).expect("JSON data"))
    }

    /// Whether the server ends the stream within `within`.
    pub async fn closed_within(&mut self, within: Duration) -> bool {
        tokio::time::timeout(within, async {
            loop {
                match self.events.next().await {
                    None | Some(Err(_)) => return,
                    Some(Ok(_)) => {}
                }
            }
        })
        .await
        .is_ok()
    }
}

/// Poll `cond` until it holds, or fail after [`WAIT`].
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An HS256 token.
pub fn token(secret: &str, claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn user_token(secret: &str, id: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    token(
        secret,
        json!({"id": id, "collectionId": "users", "type": "auth", "exp": exp}),
    )
}
