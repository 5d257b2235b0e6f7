//! Test harness for Fanout.
//!
//! * [`Api`]: HTTP and SSE clients for one node's base URL.
//! * [`RedisServer`]: a private `redis-server` on a free port.
//! * [`NodeProcess`]: the real `fanout` binary on a free port.
//!
//! Everything runs over real sockets on loopback; each test owns its own
//! processes and ports, so tests run in parallel.

use std::{
    path::PathBuf,
    pin::Pin,
    process::Stdio,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

pub mod pocketbase;

use eventsource_stream::{Event, Eventsource};
use futures_util::{Stream, StreamExt};
pub use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// Generous bound for anything that should happen "now".
pub const WAIT: Duration = Duration::from_secs(15);

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

/// Like [`wait_until`], with an async condition.
pub async fn wait_for<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free TCP port on 127.0.0.1 (free when asked; the OS may reuse it).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
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

/// A PocketBase-style auth token for user `id`, valid for an hour.
pub fn user_token(secret: &str, id: &str) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    token(
        secret,
        json!({"id": id, "collectionId": "users", "type": "auth", "exp": exp}),
    )
}

pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, String>> + Send>>;

/// One SSE client.
pub struct Sse {
    pub client_id: String,
    /// The `id:` of PB_CONNECT.
    pub connect_id: String,
    pub events: EventStream,
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

    /// The next event, if one comes within `within`.
    pub async fn next_within(&mut self, within: Duration) -> Option<Event> {
        match tokio::time::timeout(within, self.events.next()).await {
            Ok(Some(Ok(e))) => Some(e),
            _ => None,
        }
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

/// HTTP and SSE access to one node.
#[derive(Clone)]
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: reqwest::Client::new(),
        }
    }

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

    async fn post(&self, path: &str, body: Value, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        let mut req = self.http.post(format!("{}{path}", self.base)).json(&body);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let text = res.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// POST /api/realtime; the status and the JSON body.
    pub async fn post_subscriptions(
        &self,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        self.post("/api/realtime", body, headers).await
    }

    /// Set a client's subscriptions and insist on 204.
    pub async fn subscribe(&self, client_id: &str, topics: &[&str]) {
        let (status, body) = self
            .post_subscriptions(json!({"clientId": client_id, "subscriptions": topics}), &[])
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }

    /// Set a client's subscriptions with `Authorization: <token>` and
    /// insist on 204.
    pub async fn subscribe_as(&self, client_id: &str, topics: &[&str], token: &str) {
        let (status, body) = self
            .post_subscriptions(
                json!({"clientId": client_id, "subscriptions": topics}),
                &[("authorization", token)],
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    }

    /// POST /api/publish; the status and the JSON body.
    pub async fn publish_raw(&self, body: Value, headers: &[(&str, &str)]) -> (StatusCode, Value) {
        self.post("/api/publish", body, headers).await
    }

    /// Publish and insist on 200.
    pub async fn publish(&self, topic: &str, data: Value) {
        let (status, body) = self
            .publish_raw(json!({"topic": topic, "data": data}), &[])
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    /// Publish, retrying while the node answers 503 ("try again"), and
    /// insist on 200 in the end.
    pub async fn publish_retrying(&self, topic: &str, data: Value) {
        self.publish_until_ok(json!({"topic": topic, "data": data}))
            .await
    }

    /// Publish with the publisher's own message id, retrying on 503.
    pub async fn publish_retrying_with_id(&self, topic: &str, id: &str, data: Value) {
        self.publish_until_ok(json!({"topic": topic, "id": id, "data": data}))
            .await
    }

    async fn publish_until_ok(&self, message: Value) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (status, body) = self.publish_raw(message.clone(), &[]).await;
            if status == StatusCode::OK {
                return;
            }
            // 504: the outcome is unknown (a stalled Redis); a retry with
            // the same message id publishes it at most once.
            assert!(
                [StatusCode::SERVICE_UNAVAILABLE, StatusCode::GATEWAY_TIMEOUT].contains(&status),
                "{status}: {body}"
            );
            assert!(tokio::time::Instant::now() < deadline, "still 503: {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.http
            .get(format!("{}/metrics", self.base))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// One unlabelled metric's value (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// GET a path; the status and the JSON body (null if not JSON or no
    /// answer).
    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        match self.http.get(format!("{}{path}", self.base)).send().await {
            Ok(res) => {
                let status = res.status();
                let text = res.text().await.unwrap_or_default();
                (status, serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(_) => (StatusCode::BAD_GATEWAY, Value::Null),
        }
    }

    /// Wait until `/api/health` answers 200; its body.
    pub async fn wait_healthy(&self) -> Value {
        wait_for("the node healthy", || async {
            self.get_json("/api/health").await.0 == StatusCode::OK
        })
        .await;
        self.get_json("/api/health").await.1
    }
}

/// A resume key: `topic?options=` with `{"query":{"since":…}}`, URL-encoded.
pub fn since_key(topic: &str, since: &str) -> String {
    let options = serde_json::json!({"query": {"since": since}}).to_string();
    let encoded: String = form_urlencoded::byte_serialize(options.as_bytes()).collect();
    format!("{topic}?options={encoded}")
}

/// A `redis-server` on loopback `port` that keeps nothing on disk, quiet,
/// killed with its handle; callers add their own arguments.
fn redis_server(port: u16) -> Command {
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .stdout(Stdio::null())
        .kill_on_drop(true);
    cmd
}

/// A private `redis-server` process.
pub struct RedisServer {
    pub port: u16,
    password: Option<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Start one on a free port and wait until it answers.
    pub async fn start() -> Self {
        Self::start_on(free_port()).await
    }

    /// Start one on `port` (e.g. again, after [`RedisServer::stop`]).
    pub async fn start_on(port: u16) -> Self {
        Self::spawn(port, &[]).await
    }

    /// Start one on a free port with extra arguments (`--requirepass` is
    /// honoured by [`RedisServer::url`]).
    pub async fn start_with(extra: &[&str]) -> Self {
        Self::spawn(free_port(), extra).await
    }

    /// Start one on `port` with extra arguments (a restart with the same
    /// persistence settings).
    pub async fn start_on_with(port: u16, extra: &[&str]) -> Self {
        Self::spawn(port, extra).await
    }

    async fn spawn(port: u16, extra: &[&str]) -> Self {
        let password = extra
            .iter()
            .position(|a| *a == "--requirepass")
            .and_then(|i| extra.get(i + 1))
            .map(|p| p.to_string());
        let child = redis_server(port)
            .args(extra)
            .spawn()
            .expect("redis-server is installed (scripts/test installs it)");
        let server = Self {
            port,
            password,
            child: Some(child),
        };
        wait_for("redis-server to answer", || async {
            server.connection().await.is_ok()
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub async fn connection(&self) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await?;
        Ok(conn)
    }

    /// Run one command.
    pub async fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        let mut conn = self.connection().await.expect("redis reachable");
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c.query_async(&mut conn).await.expect("redis command")
    }

    /// Stop the server and wait until it is gone.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }
}

/// Where cargo put the `fanout` binary.
pub fn fanout_bin() -> PathBuf {
    if let Ok(p) = std::env::var("FANOUT_BIN") {
        return p.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/fanout");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build -p fanout` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// A `fanout` process. Its stdout (JSON logs) goes to [`NodeProcess::log_path`].
pub struct NodeProcess {
    pub api: Api,
    pub port: u16,
    pub log_path: PathBuf,
    child: Option<Child>,
}

impl std::ops::Deref for NodeProcess {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl NodeProcess {
    /// Start a node with `env` (FANOUT_* variables) and wait until its
    /// health endpoint answers 200.
    pub async fn start(env: &[(&str, &str)]) -> Self {
        Self::start_on(free_port(), env).await
    }

    /// Start a node and wait only until it answers (healthy or not).
    pub async fn start_unchecked(env: &[(&str, &str)]) -> Self {
        Self::spawn(&mut Command::new(fanout_bin()), free_port(), env, false).await
    }

    pub async fn start_on(port: u16, env: &[(&str, &str)]) -> Self {
        Self::start_bin(&fanout_bin(), port, env).await
    }

    /// Start a node whose process may open at most `nofile` files.
    pub async fn start_with_nofile(nofile: u32, env: &[(&str, &str)]) -> Self {
        let script = format!("ulimit -n {nofile} && exec \"$0\"");
        Self::spawn(
            Command::new("sh").arg("-c").arg(script).arg(fanout_bin()),
            free_port(),
            env,
            true,
        )
        .await
    }

    /// Start `bin` (a fanout binary) on `port`.
    pub async fn start_bin(bin: &std::path::Path, port: u16, env: &[(&str, &str)]) -> Self {
        Self::spawn(&mut Command::new(bin), port, env, true).await
    }

    async fn spawn(cmd: &mut Command, port: u16, env: &[(&str, &str)], healthy: bool) -> Self {
        let log_path = std::env::temp_dir().join(format!("fanout-node-{port}.log"));
        let log = std::fs::File::create(&log_path).expect("log file");
        cmd.env("FANOUT_LISTEN", format!("127.0.0.1:{port}"))
            .env("FANOUT_LOG_FORMAT", "json")
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(log)
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let node = Self {
            api: Api::new(format!("http://127.0.0.1:{port}")),
            port,
            log_path,
            child: Some(cmd.spawn().expect("fanout binary starts")),
        };
        wait_for("node healthy", || async {
            let status = node.api.get_json("/api/health").await.0;
            status == StatusCode::OK || !healthy && status != StatusCode::BAD_GATEWAY
        })
        .await;
        node
    }

    /// The node tag from /api/health.
    pub async fn tag(&self) -> String {
        self.api.get_json("/api/health").await.1["data"]["node"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    /// What the node has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().and_then(Child::id).expect("running") as i32
    }

    /// Resident memory of the process, in KiB (`VmRSS`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("/proc status of the node");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    /// The node's address.
    pub fn addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.port).into()
    }

    /// A stream whose client reads PB_CONNECT and then nothing more, with
    /// a small receive buffer: a stalled reader. The socket and the client
    /// id.
    pub async fn stalled_stream(&self) -> (tokio::net::TcpStream, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut sock = socket.connect(self.addr()).await.unwrap();
        sock.write_all(b"GET /api/realtime HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut all = String::new();
        let mut buf = vec![0; 4096];
        tokio::time::timeout(WAIT, async {
            while !all.contains("\"}\n\n") {
                let n = sock.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before PB_CONNECT: {all}");
                all.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
        .await
        .expect("PB_CONNECT in time");
        let id = all
            .split("\"clientId\":\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("PB_CONNECT data")
            .to_owned();
        (sock, id)
    }

    /// Send a signal (e.g. SIGSTOP 19, SIGCONT 18).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { kill(self.pid(), sig) };
    }

    /// SIGSTOP, and wait until every thread of the process has stopped:
    /// `kill` returns before that, and on a busy machine a thread woken by
    /// I/O may run on for milliseconds.
    pub async fn freeze(&self) {
        self.signal(SIGSTOP);
        let tasks = format!("/proc/{}/task", self.pid());
        wait_until("every thread stopped", || {
            std::fs::read_dir(&tasks).unwrap().all(|t| {
                let stat =
                    std::fs::read_to_string(t.unwrap().path().join("stat")).unwrap_or_default();
                // The state follows the parenthesised command name.
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(['T', 't']))
            })
        })
        .await;
    }

    /// SIGKILL, and wait for the process to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub async fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { kill(child.id().unwrap() as i32, 15) };
        tokio::time::timeout(WAIT, child.wait())
            .await
            .expect("exits after SIGTERM")
            .unwrap()
    }
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}

pub const SIGSTOP: i32 = 19;
pub const SIGCONT: i32 = 18;

/// A TCP proxy on loopback that can delay what the client sends, cut
/// every connection, or silence the connections open now: a slow or broken
/// network between a node and Redis.
pub struct TcpProxy {
    pub port: u16,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: tokio::sync::watch::Sender<u64>,
    /// Connections numbered below this forward nothing.
    silenced_below: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// What clients sent, as read (before any delay), up to `SENT_CAP`.
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    accepted: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl TcpProxy {
    /// Forward a free loopback port to `target`.
    pub async fn start(target: u16) -> Self {
        use std::sync::{Arc, atomic::AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let delay_ms = Arc::new(AtomicU64::new(0));
        let (cut, cuts) = tokio::sync::watch::channel(0u64);
        let delay = delay_ms.clone();
        let silenced_below = Arc::new(AtomicU64::new(0));
        let accepted = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = sent.clone();
        let (silenced, count) = (silenced_below.clone(), accepted.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mute = Mute(silenced.clone(), n);
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let mut cut = cuts.clone();
                cut.mark_unchanged();
                let mut cut2 = cut.clone();
                let delay = delay.clone();
                let mute2 = mute.clone();
                let record = record.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = pump(cr, sw, Some(ClientSide { delay, sent: record }), mute) => {}
                        _ = cut.changed() => {}
                    }
                });
                tokio::spawn(async move {
                    tokio::select! {
                        _ = pump(sr, cw, None, mute2) => {}
                        _ = cut2.changed() => {}
                    }
                });
            }
        });
        Self {
            port,
            delay_ms,
            cut,
            silenced_below,
            accepted,
            sent,
            task,
        }
    }

    /// How many times `needle` occurs in what clients have sent so far (a
    /// command counts once it reached the proxy, before any delay).
    pub fn sent_count(&self, needle: &[u8]) -> usize {
        self.sent
            .lock()
            .unwrap()
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    /// From now on, the connections open now forward nothing in either
    /// direction but stay open, as when the server's address went away
    /// without a reset; new connections work.
    pub fn silence(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.silenced_below
            .store(self.accepted.load(Relaxed), Relaxed);
    }

    /// Delay everything the client sends by `d` from now on.
    pub fn set_delay(&self, d: Duration) {
        self.delay_ms
            .store(d.as_millis() as u64, std::sync::atomic::Ordering::Relaxed);
    }

    /// Close every connection open now.
    pub fn cut(&self) {
        self.cut.send_modify(|g| *g += 1);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.cut();
    }
}

/// What a proxy does to what clients send: delay it, and record it.
struct ClientSide {
    delay: std::sync::Arc<std::sync::atomic::AtomicU64>,
    sent: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

/// How much of what clients send `TcpProxy` keeps for `sent_count`.
const SENT_CAP: usize = 16 << 20;

/// A proxied connection's number, and the number below which connections
/// are silenced.
#[derive(Clone)]
struct Mute(std::sync::Arc<std::sync::atomic::AtomicU64>, u64);

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    client_side: Option<ClientSide>,
    Mute(silenced_below, conn): Mute,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if let Some(ClientSide { delay: d, sent }) = &client_side {
            {
                let mut sent = sent.lock().unwrap();
                if sent.len() + n <= SENT_CAP {
                    sent.extend_from_slice(&buf[..n]);
                }
            }
            let ms = d.load(std::sync::atomic::Ordering::Relaxed);
            if ms > 0 {
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
        }
        if conn < silenced_below.load(std::sync::atomic::Ordering::Relaxed) {
            continue;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A port that is free, and whose cluster-bus port (+10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let p = free_port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

/// A private Redis Cluster: six `redis-server` processes (three primaries,
/// three replicas) on loopback, each in its own directory.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    pub password: Option<String>,
    children: std::collections::HashMap<u16, Child>,
    _dir: TempDir,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// At most two clusters (six servers each) at once in one test process:
/// on two cores, more make failovers and timings unreliable.
static CLUSTERS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("{name}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl RedisCluster {
    /// Start six nodes, create the cluster, and wait until it is ok.
    pub async fn start(password: Option<&str>) -> Self {
        let slot = CLUSTERS.acquire().await.expect("semaphore open");
        let dir = TempDir::new("fanout-redis-cluster");
        let mut ports = Vec::new();
        let mut children = std::collections::HashMap::new();
        for _ in 0..6 {
            let port = free_cluster_port();
            children.insert(port, Self::spawn_node(&dir, port, password));
            ports.push(port);
        }
        let cluster = Self {
            ports,
            password: password.map(str::to_owned),
            children,
            _dir: dir,
            _slot: slot,
        };
        cluster.start_tail().await
    }

    fn spawn_node(dir: &TempDir, port: u16, password: Option<&str>) -> Child {
        let node_dir = dir.0.join(port.to_string());
        std::fs::create_dir_all(&node_dir).unwrap();
        let mut cmd = redis_server(port);
        cmd.args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            "1000",
            // A replica may take over however long it has been cut
            // off: the tests kill primaries on purpose.
            "--cluster-replica-validity-factor",
            "0",
        ])
        .arg("--dir")
        .arg(&node_dir);
        if let Some(pw) = password {
            cmd.args(["--requirepass", pw, "--masterauth", pw]);
        }
        cmd.spawn().expect("redis-server is installed")
    }

    async fn start_tail(self) -> Self {
        let cluster = self;
        let password = cluster.password.clone();
        let password = password.as_deref();
        for &p in &cluster.ports {
            wait_for("cluster node answers", || async {
                cluster.try_cmd::<String>(p, &["PING"]).await.is_ok()
            })
            .await;
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for p in &cluster.ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        create.args(["--cluster-replicas", "1", "--cluster-yes"]);
        if let Some(pw) = password {
            create.args(["-a", pw, "--no-auth-warning"]);
        }
        let out = create.output().await.expect("redis-cli runs");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok().await;
        // Every replica in sync, so that a failover can happen at once.
        for &p in &cluster.ports {
            wait_for("replica in sync", || async {
                match cluster.try_cmd::<String>(p, &["INFO", "replication"]).await {
                    Ok(info) => {
                        info.contains("role:master") || info.contains("master_link_status:up")
                    }
                    Err(_) => false,
                }
            })
            .await;
        }
        cluster
    }

    /// Wait until every live node reports `cluster_state:ok` and agrees on
    /// three primaries that cover every slot.
    pub async fn wait_ok(&self) {
        wait_for("cluster_state:ok everywhere", || async {
            for &p in self.children.keys() {
                match self.try_cmd::<String>(p, &["CLUSTER", "INFO"]).await {
                    Ok(info) if info.contains("cluster_state:ok") => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
    }

    /// `redis://[:password@]127.0.0.1:<port>`.
    pub fn url_of(&self, port: u16) -> String {
        match &self.password {
            Some(pw) => format!("redis://:{pw}@127.0.0.1:{port}"),
            None => format!("redis://127.0.0.1:{port}"),
        }
    }

    /// `redis+cluster://…` naming every node.
    pub fn cluster_url(&self) -> String {
        let hosts: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        match &self.password {
            Some(pw) => format!("redis+cluster://:{pw}@{}", hosts.join(",")),
            None => format!("redis+cluster://{}", hosts.join(",")),
        }
    }

    /// Run one command on the node at `port`.
    pub async fn try_cmd<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        redis_cmd(&self.url_of(port), args).await
    }

    pub async fn cmd<T: redis::FromRedisValue>(&self, port: u16, args: &[&str]) -> T {
        self.try_cmd(port, args).await.expect("redis command")
    }

    /// `(node id, port)` of each live primary, from `CLUSTER NODES`.
    pub async fn primaries(&self) -> Vec<(String, u16)> {
        let live = *self.children.keys().next().expect("a live node");
        let nodes: String = self.cmd(live, &["CLUSTER", "NODES"]).await;
        nodes
            .lines()
            .filter(|l| l.contains("master") && !l.contains("fail"))
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let id = f.next()?.to_owned();
                let port = f.next()?.split(['@', ':']).nth(1)?.parse().ok()?;
                Some((id, port))
            })
            .collect()
    }

    /// The port of the primary that owns the slot of `key`.
    pub async fn owner_of(&self, key: &str) -> u16 {
        let live = *self.children.keys().next().expect("a live node");
        let slot: i64 = self.cmd(live, &["CLUSTER", "KEYSLOT", key]).await;
        let ranges: Vec<redis::Value> = self.cmd(live, &["CLUSTER", "SLOTS"]).await;
        for r in ranges {
            if let redis::Value::Array(items) = r
                && let (Some(redis::Value::Int(a)), Some(redis::Value::Int(b))) =
                    (items.first(), items.get(1))
                && (*a..=*b).contains(&slot)
                && let Some(redis::Value::Array(primary)) = items.get(2)
                && let Some(redis::Value::Int(port)) = primary.get(1)
            {
                return *port as u16;
            }
        }
        panic!("no owner for slot {slot}");
    }

    /// SIGKILL the node at `port`.
    pub async fn kill(&mut self, port: u16) {
        if let Some(mut c) = self.children.remove(&port) {
            let _ = c.kill().await;
        }
    }

    /// Send a signal (SIGSTOP, SIGCONT) to the node at `port`.
    pub fn signal(&self, port: u16, sig: i32) {
        let pid = self.children[&port].id().expect("running") as i32;
        // SAFETY: kill(2) on our own child's pid.
        unsafe { kill(pid, sig) };
    }

    /// The port of the replica of the primary at `primary`.
    pub async fn replica_of(&self, primary: u16) -> u16 {
        let nodes: String = self.cmd(primary, &["CLUSTER", "NODES"]).await;
        let id = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .and_then(|l| l.split_whitespace().next())
            .expect("own id")
            .to_owned();
        nodes
            .lines()
            .filter(|l| l.contains("slave") && l.contains(&id))
            .filter_map(|l| {
                l.split_whitespace()
                    .nth(1)?
                    .split(['@', ':'])
                    .nth(1)?
                    .parse()
                    .ok()
            })
            .next()
            .expect("a replica")
    }

    /// Start a new empty primary and add it to the cluster; its port.
    pub async fn add_primary(&mut self) -> u16 {
        let existing = self.primaries().await[0].1;
        let port = free_cluster_port();
        let child = Self::spawn_node(&self._dir, port, self.password.as_deref());
        self.children.insert(port, child);
        self.ports.push(port);
        wait_for("new node answers", || async {
            self.try_cmd::<String>(port, &["PING"]).await.is_ok()
        })
        .await;
        self.cli(&[
            "--cluster",
            "add-node",
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{existing}"),
        ])
        .await;
        let total = self.children.len();
        wait_for("every node knows every other", || async {
            for &p in self.children.keys() {
                match self.try_cmd::<String>(p, &["CLUSTER", "NODES"]).await {
                    Ok(nodes) if nodes.lines().count() == total => {}
                    _ => return false,
                }
            }
            true
        })
        .await;
        port
    }

    /// `redis-cli --cluster rebalance --cluster-use-empty-masters`, once
    /// every node agrees on the configuration.
    pub async fn rebalance(&self) {
        // A new primary says `cluster_state:fail` for its first 2 s, and
        // refuses the keys `MIGRATE` sends it with CLUSTERDOWN meanwhile.
        self.wait_ok().await;
        let any = self.primaries().await[0].1;
        wait_for("every node agrees on the configuration", || async {
            let mut cmd = Command::new("redis-cli");
            cmd.args(["--cluster", "check", &format!("127.0.0.1:{any}")]);
            if let Some(pw) = &self.password {
                cmd.args(["-a", pw, "--no-auth-warning"]);
            }
            cmd.output().await.is_ok_and(|o| {
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("All nodes agree")
            })
        })
        .await;
        self.cli(&[
            "--cluster",
            "rebalance",
            &format!("127.0.0.1:{any}"),
            "--cluster-use-empty-masters",
        ])
        .await;
    }

    async fn cli(&self, args: &[&str]) {
        let mut cmd = Command::new("redis-cli");
        cmd.args(args);
        if let Some(pw) = &self.password {
            cmd.args(["-a", pw, "--no-auth-warning"]);
        }
        let out = cmd.output().await.expect("redis-cli runs");
        assert!(
            out.status.success(),
            "redis-cli {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A private Sentinel group: a primary, a replica and three Sentinels
/// (`redis-server --sentinel`), on loopback.
pub struct RedisSentinels {
    pub sentinel_ports: Vec<u16>,
    pub data_ports: Vec<u16>,
    children: std::collections::HashMap<u16, Child>,
    dir: TempDir,
}

pub const SENTINEL_MASTER: &str = "mymaster";

impl RedisSentinels {
    pub async fn start() -> Self {
        let dir = TempDir::new("fanout-sentinel");
        let mut children = std::collections::HashMap::new();
        let primary = free_port();
        let replica = free_port();
        for (port, extra) in [
            (primary, vec![]),
            (
                replica,
                vec!["--replicaof".to_owned(), format!("127.0.0.1 {primary}")],
            ),
        ] {
            // Its own directory: a replica writes the RDB of its full sync
            // there (in the working directory otherwise).
            let data_dir = dir.0.join(port.to_string());
            std::fs::create_dir(&data_dir).expect("a data directory");
            let child = redis_server(port)
                .arg("--dir")
                .arg(&data_dir)
                .args(&extra)
                .spawn()
                .expect("redis-server is installed");
            children.insert(port, child);
        }
        let mut group = Self {
            sentinel_ports: Vec::new(),
            data_ports: vec![primary, replica],
            children,
            dir,
        };
        wait_for("the replica is in sync", || async {
            group
                .try_cmd::<String>(replica, &["INFO", "replication"])
                .await
                .is_ok_and(|i| i.contains("master_link_status:up"))
        })
        .await;
        for _ in 0..3 {
            let port = free_port();
            let conf = group.dir.0.join(format!("sentinel-{port}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                     sentinel monitor {SENTINEL_MASTER} 127.0.0.1 {primary} 2\n\
                     sentinel down-after-milliseconds {SENTINEL_MASTER} 1000\n\
                     sentinel failover-timeout {SENTINEL_MASTER} 5000\n\
                     sentinel parallel-syncs {SENTINEL_MASTER} 1\n",
                    dir = group.dir.0.display()
                ),
            )
            .unwrap();
            let child = Command::new("redis-server")
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .expect("redis-server runs as a Sentinel");
            group.children.insert(port, child);
            group.sentinel_ports.push(port);
        }
        // Every Sentinel knows the replica and the other Sentinels.
        for &s in &group.sentinel_ports {
            wait_for("Sentinels discover each other and the replica", || async {
                let Ok(v) = group
                    .try_cmd::<Vec<(String, String)>>(s, &["SENTINEL", "MASTER", SENTINEL_MASTER])
                    .await
                else {
                    return false;
                };
                let get = |k: &str| v.iter().find(|(a, _)| a == k).map(|(_, b)| b.clone());
                get("num-slaves").as_deref() == Some("1")
                    && get("num-other-sentinels").as_deref() == Some("2")
            })
            .await;
        }
        group
    }

    /// `redis+sentinel://s1,s2,s3/mymaster`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .sentinel_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect();
        format!("redis+sentinel://{}/{SENTINEL_MASTER}", hosts.join(","))
    }

    pub async fn try_cmd<T: redis::FromRedisValue>(
        &self,
        port: u16,
        args: &[&str],
    ) -> redis::RedisResult<T> {
        redis_cmd(&format!("redis://127.0.0.1:{port}"), args).await
    }

    /// The primary's port, as a live Sentinel names it.
    pub async fn primary(&self) -> u16 {
        for &s in &self.sentinel_ports {
            if let Ok((_, port)) = self
                .try_cmd::<(String, u16)>(
                    s,
                    &["SENTINEL", "get-master-addr-by-name", SENTINEL_MASTER],
                )
                .await
            {
                return port;
            }
        }
        panic!("no Sentinel answers");
    }

    /// Wait until the Sentinels name a primary other than `old`, and it
    /// says it is one.
    pub async fn wait_new_primary(&self, old: u16) -> u16 {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let new = self.primary().await;
            let is_primary = self
                .try_cmd::<Vec<redis::Value>>(new, &["ROLE"])
                .await
                .is_ok_and(
                    |r| matches!(r.first(), Some(redis::Value::BulkString(b)) if b == b"master"),
                );
            if new != old && is_primary {
                return new;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no new primary in time"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `SENTINEL FAILOVER`, asked of the first Sentinel.
    pub async fn failover(&self) {
        let _: String = self
            .try_cmd(
                self.sentinel_ports[0],
                &["SENTINEL", "FAILOVER", SENTINEL_MASTER],
            )
            .await
            .expect("SENTINEL FAILOVER");
    }

    /// SIGKILL the server at `port`.
    pub async fn kill(&mut self, port: u16) {
        if let Some(mut c) = self.children.remove(&port) {
            let _ = c.kill().await;
        }
    }
}

/// A CA and a server certificate for 127.0.0.1 and localhost, made with
/// the `openssl` command in `dir`: `(ca.crt, server.crt, server.key)`.
pub fn tls_files(dir: &std::path::Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=fanout-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=localhost",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "san.ext",
        "-out",
        "server.crt",
    ]);
    (
        dir.join("ca.crt"),
        dir.join("server.crt"),
        dir.join("server.key"),
    )
}

/// One command on a fresh connection to `url`, bounded to 2 s to connect.
pub async fn redis_cmd<T: redis::FromRedisValue>(
    url: &str,
    args: &[&str],
) -> redis::RedisResult<T> {
    let client = redis::Client::open(url)?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .map_err(|_| redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)))??;
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(&mut conn).await
}

/// Publishes `0, 1, 2, …` to one topic at a steady interval until
/// finished: the fault tests' load.
pub struct SteadyPublisher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    task: tokio::task::JoinHandle<(Vec<u64>, Vec<u64>)>,
}

impl SteadyPublisher {
    pub fn start(api: Api, topic: &str, every: Duration) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = stop.clone();
        let topic = topic.to_owned();
        let task = tokio::spawn(async move {
            let (mut ok, mut refused) = (Vec::new(), Vec::new());
            let mut n = 0u64;
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = api
                    .publish_raw(json!({"topic": topic, "data": n}), &[])
                    .await;
                match status {
                    StatusCode::OK => ok.push(n),
                    // 504: sent, outcome unknown (a stalled Redis); not
                    // acknowledged either way.
                    StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                        refused.push(n)
                    }
                    s => panic!("{s}: {body}"),
                }
                n += 1;
                tokio::time::sleep(every).await;
            }
            (ok, refused)
        });
        Self { stop, task }
    }

    /// Stop; the numbers answered 200 and those not acknowledged (503, or
    /// 504: outcome unknown).
    pub async fn finish(self) -> (Vec<u64>, Vec<u64>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.task.await.expect("publisher task")
    }
}

/// The numbers a client received, until it is quiet for a second.
pub async fn received_numbers(sse: &mut Sse) -> Vec<u64> {
    let mut seen = Vec::new();
    while let Some(e) = sse.next_within(Duration::from_secs(1)).await {
        seen.push(e.data.parse().expect("a number"));
    }
    seen
}

/// Of the acknowledged numbers, which a client missed and which it got
/// twice, and whether what it got was in order.
#[derive(Debug)]
pub struct Account {
    pub missing: Vec<u64>,
    pub duplicated: Vec<u64>,
    pub in_order: bool,
}

impl Account {
    pub fn of(seen: &[u64], acked: &[u64]) -> Self {
        let mut counts: std::collections::HashMap<u64, usize> = Default::default();
        for n in seen {
            *counts.entry(*n).or_default() += 1;
        }
        let mut duplicated: Vec<u64> = counts
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(n, _)| *n)
            .collect();
        duplicated.sort();
        Self {
            missing: acked
                .iter()
                .copied()
                .filter(|n| !counts.contains_key(n))
                .collect(),
            duplicated,
            in_order: seen.windows(2).all(|w| w[0] < w[1]),
        }
    }
}

/// Print what a client received of a steady publisher's numbers, and
/// check it: in order, no duplicate, the last acknowledged number arrived,
/// and (when `lossless`) no acknowledged number missing. The account.
pub fn check_delivery(
    what: &str,
    seen: &[u64],
    acked: &[u64],
    refused: &[u64],
    lossless: bool,
) -> Account {
    let a = Account::of(seen, acked);
    eprintln!(
        "{what}: {} answered 200, {} answered 503, {} acknowledged but missed ({:?}), duplicated {:?}",
        acked.len(),
        refused.len(),
        a.missing.len(),
        a.missing,
        a.duplicated
    );
    assert!(
        a.in_order && a.duplicated.is_empty(),
        "{what}: order kept, no duplicate"
    );
    assert_eq!(
        seen.last(),
        acked.last(),
        "{what}: the last acknowledged message arrived"
    );
    if lossless {
        assert!(
            a.missing.is_empty(),
            "{what}: acknowledged but missed {:?}",
            a.missing
        );
    }
    a
}

impl NodeProcess {
    /// CPU time (user + system) the node has used so far, in seconds, from
    /// `/proc/<pid>/stat` (clock ticks of 1/100 s, as on Linux).
    pub fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
            .expect("/proc stat of the node");
        // The fields after the command name, which may hold spaces.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 =
            f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
        ticks as f64 / 100.0
    }
}

impl RedisCluster {
    /// Three primaries without replicas, with `cluster-require-full-coverage
    /// no`: a killed primary's slots stay lost while the others serve.
    pub async fn start_without_replicas() -> Self {
        let slot = CLUSTERS.acquire().await.expect("semaphore open");
        let dir = TempDir::new("fanout-redis-cluster");
        let mut ports = Vec::new();
        let mut children = std::collections::HashMap::new();
        for _ in 0..3 {
            let port = free_cluster_port();
            children.insert(port, Self::spawn_node(&dir, port, None));
            ports.push(port);
        }
        let cluster = Self {
            ports,
            password: None,
            children,
            _dir: dir,
            _slot: slot,
        };
        for &p in &cluster.ports {
            wait_for("cluster node answers", || async {
                cluster.try_cmd::<String>(p, &["PING"]).await.is_ok()
            })
            .await;
            let _: () = cluster
                .cmd(p, &["CONFIG", "SET", "cluster-require-full-coverage", "no"])
                .await;
        }
        let mut args = vec!["--cluster".to_owned(), "create".to_owned()];
        args.extend(cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")));
        args.extend(["--cluster-replicas", "0", "--cluster-yes"].map(str::to_owned));
        cluster
            .cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .await;
        cluster.wait_ok().await;
        cluster
    }

    /// Wait until a live node's `CLUSTER NODES` marks the node at `port`
    /// failed (`fail`, the cluster's verdict, not one node's `fail?`).
    pub async fn wait_marked_failed(&self, port: u16) {
        let live = *self.children.keys().next().expect("a live node");
        let needle = format!(":{port}@");
        wait_for("the cluster marks the node failed", || async {
            let nodes: String = self.cmd(live, &["CLUSTER", "NODES"]).await;
            nodes.lines().any(|l| {
                l.contains(&needle)
                    && l.split_whitespace()
                        .nth(2)
                        .is_some_and(|f| f.split(',').any(|x| x == "fail"))
            })
        })
        .await;
    }
}

/// Where Debian's libfaketime lives.
const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";

/// Environment for [`NodeProcess::start`] that shifts the node's wall clock
/// by `offset` (libfaketime's syntax: `"+30s"`, `"-30s"`) and leaves its
/// monotonic clock alone, as on a drifting VM. Panics without libfaketime
/// (`apt-get install faketime`; scripts/test installs it).
pub fn skewed_wall_clock(offset: &str) -> Vec<(&'static str, String)> {
    let lib = std::env::var("FANOUT_LIBFAKETIME").unwrap_or_else(|_| LIBFAKETIME.into());
    assert!(
        std::path::Path::new(&lib).exists(),
        "{lib} missing: apt-get install faketime (or set FANOUT_LIBFAKETIME)"
    );
    vec![
        ("LD_PRELOAD", lib),
        ("FAKETIME", offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1".to_owned()),
    ]
}
