//! A reconnect storm: SDK-like clients on several nodes, one event that
//! closes many of their streams at once (a node killed, Redis restarted
//! empty), and how the cluster takes them back.
//!
//! Each client does what the PocketBase JS SDK does: `GET /api/realtime`,
//! `PB_CONNECT`, then `POST /api/realtime` with its subscription; when its
//! stream ends it waits the SDK's back-off (200, 300, 500, 1000, 1200,
//! 1500, 2000 ms, reset by a success) and connects again. A load balancer
//! is modelled too: each attempt goes to a random node, and a node that
//! refuses the TCP connect (it is dead) is skipped at once, as nginx does.
//!
//! Measured: the time from the first close until every closed client is
//! subscribed again, the attempts that failed in a way a client sees (an
//! HTTP error, a stream closed before `PB_CONNECT`, a subscription POST
//! that is not 204), the peak rate of reconnects (per 100 ms), and the
//! nodes' peak resident memory (`VmHWM`).

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use parking_lot::Mutex;
use serde::Serialize;

use crate::sse;

/// The JS SDK's reconnect intervals (`predefinedReconnectIntervals`), ms.
const BACKOFF_MS: [u64; 7] = [200, 300, 500, 1000, 1200, 1500, 2000];

#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    /// Nodes, `host:port`, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub nodes: Vec<SocketAddr>,
    /// Clients, spread evenly over the nodes at first.
    #[arg(long, default_value_t = 3000)]
    pub clients: usize,
    /// Shell command run once every client is subscribed (e.g. `kill -9
    /// PID`); the storm is what follows.
    #[arg(long)]
    pub event: String,
    /// How many streams the event closes: the clients subscribed on this
    /// node (index into --nodes) when it happens; without it, all of them.
    #[arg(long)]
    pub victim: Option<usize>,
    /// Server pids whose peak resident memory (VmHWM) is reported.
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Give up this long after the event, in seconds.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// Label of the result line.
    #[arg(long, default_value = "storm")]
    pub label: String,
    /// Append the result line to this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct StormReport {
    pub scenario: &'static str,
    pub label: String,
    pub clients: usize,
    pub nodes: usize,
    /// From spawning every client at once until all were subscribed, ms.
    pub setup_ms: u64,
    /// Client-visible failures while connecting everyone at first.
    pub setup_failures: u64,
    /// Streams the event closed.
    pub closed: u64,
    /// From the first close until every closed client was subscribed again, ms.
    pub recovered_ms: u64,
    /// From the first close to the last, ms.
    pub closes_span_ms: u64,
    /// Client-visible failed attempts after the event (HTTP error, closed
    /// before PB_CONNECT, subscription POST not 204).
    pub failures: u64,
    /// TCP connects a dead node refused (a balancer retries these at once).
    pub dead_node_refusals: u64,
    /// Most successful reconnects within one 100 ms window.
    pub peak_reconnects_per_100ms: u64,
    /// Peak resident memory (VmHWM) of each pid in --pids, KiB (0: gone).
    pub peak_rss_kib: Vec<u64>,
}

struct Shared {
    nodes: Vec<SocketAddr>,
    http: reqwest::Client,
    subscribed: AtomicUsize,
    /// Clients subscribed on each node.
    live: Vec<AtomicUsize>,
    failures: AtomicU64,
    /// Failures by what the client saw (for the log).
    failure_kinds: Mutex<std::collections::BTreeMap<String, u64>>,
    dead_refusals: AtomicU64,
    closed: AtomicU64,
    /// Ms since `start` of every close and of every successful reconnect.
    closes: Mutex<Vec<u64>>,
    reconnects: Mutex<Vec<u64>>,
    start: Instant,
    /// Set once every client is subscribed: closes count from then on.
    armed: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

enum Attempt {
    /// Subscribed on the node of this index; resolves when the stream ends.
    Live(usize, tokio::sync::oneshot::Receiver<()>),
    /// Failed as a client would see it, and how.
    Failed(String),
}

/// One try, through the modelled balancer: random node, dead ones skipped.
async fn attempt(s: &Shared, i: usize, first: Option<usize>) -> Attempt {
    let n = s.nodes.len();
    let start = first.unwrap_or_else(|| (i.wrapping_mul(2654435761) ^ s.ms() as usize) % n);
    for k in 0..n {
        let index = (start + k) % n;
        let node = s.nodes[index];
        // From the address the POST comes from: a client is bound to it.
        let source = None;
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (end_tx, end_rx) = tokio::sync::oneshot::channel::<()>();
        // Dropped with the reader closure when the stream ends.
        let guard = end_tx;
        sse::spawn(node, source, None, sse::Mode::Read, ready_tx, move |_| {
            let _ = &guard;
        });
        let id = match ready_rx.await {
            Ok(Ok(id)) => id,
            Ok(Err(e)) if format!("{e:#}").contains("Connection refused") => {
                s.dead_refusals.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Ok(Err(e)) => {
                let e = format!("{e:#}");
                return Attempt::Failed(e.split(" (os error").next().unwrap_or(&e).to_owned());
            }
            Err(_) => return Attempt::Failed("no answer".into()),
        };
        let res = s
            .http
            .post(format!("http://{node}/api/realtime"))
            .json(&serde_json::json!({"clientId": id, "subscriptions": ["storm"]}))
            .send()
            .await;
        return match res {
            Ok(r) if r.status().as_u16() == 204 => Attempt::Live(index, end_rx),
            Ok(r) => Attempt::Failed(format!("POST /api/realtime: {}", r.status())),
            Err(e) => Attempt::Failed(format!("POST /api/realtime: {e}")),
        };
    }
    Attempt::Failed("every node refused the connect".into())
}

/// One SDK-like client, forever.
async fn client(s: Arc<Shared>, i: usize, first: usize) {
    let mut tries = 0usize;
    let mut placed = Some(first);
    loop {
        match attempt(&s, i, placed.take()).await {
            Attempt::Live(node, end) => {
                if tries > 0 || s.armed.load(Ordering::Relaxed) {
                    s.reconnects.lock().push(s.ms());
                }
                tries = 0;
                s.live[node].fetch_add(1, Ordering::AcqRel);
                s.subscribed.fetch_add(1, Ordering::AcqRel);
                let _ = end.await;
                s.live[node].fetch_sub(1, Ordering::AcqRel);
                s.subscribed.fetch_sub(1, Ordering::AcqRel);
                if s.armed.load(Ordering::Relaxed) {
                    s.closed.fetch_add(1, Ordering::Relaxed);
                    s.closes.lock().push(s.ms());
                }
            }
            Attempt::Failed(kind) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                *s.failure_kinds.lock().entry(kind).or_default() += 1;
            }
        }
        let wait = BACKOFF_MS[tries.min(BACKOFF_MS.len() - 1)];
        tries += 1;
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
}

fn hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub async fn storm(args: StormArgs) -> anyhow::Result<StormReport> {
    let s = Arc::new(Shared {
        nodes: args.nodes.clone(),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        subscribed: AtomicUsize::new(0),
        live: args.nodes.iter().map(|_| AtomicUsize::new(0)).collect(),
        failure_kinds: Mutex::new(Default::default()),
        failures: AtomicU64::new(0),
        dead_refusals: AtomicU64::new(0),
        closed: AtomicU64::new(0),
        closes: Mutex::new(Vec::new()),
        reconnects: Mutex::new(Vec::new()),
        start: Instant::now(),
        armed: false.into(),
    });
    let n = args.nodes.len();
    // Every client at once: this is itself a burst of connects.
    for i in 0..args.clients {
        tokio::spawn(client(s.clone(), i, i % n));
    }
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    while s.subscribed.load(Ordering::Acquire) < args.clients {
        anyhow::ensure!(Instant::now() < deadline, "setup timed out");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let setup_ms = s.ms();
    let setup_failures = s.failures.swap(0, Ordering::Relaxed);
    let setup_kinds = std::mem::take(&mut *s.failure_kinds.lock());
    if !setup_kinds.is_empty() {
        eprintln!("storm: setup failures: {setup_kinds:?}");
    }
    s.dead_refusals.store(0, Ordering::Relaxed);
    let expected = match args.victim {
        Some(v) => s.live[v].load(Ordering::Acquire) as u64,
        None => args.clients as u64,
    };
    s.armed.store(true, Ordering::Release);
    eprintln!(
        "storm: {} clients subscribed in {setup_ms} ms; event: {}",
        args.clients, args.event
    );
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(&args.event)
        .status()?;
    anyhow::ensure!(status.success(), "event command failed: {status}");
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    loop {
        let done = s.closed.load(Ordering::Relaxed) >= expected
            && s.subscribed.load(Ordering::Acquire) >= args.clients;
        if done {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "not recovered: {} closed of {expected}, {} subscribed of {}",
            s.closed.load(Ordering::Relaxed),
            s.subscribed.load(Ordering::Acquire),
            args.clients
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let end = s.ms();
    let kinds = s.failure_kinds.lock().clone();
    if !kinds.is_empty() {
        eprintln!("storm: failures after the event: {kinds:?}");
    }
    let closes = s.closes.lock().clone();
    let first = closes.iter().copied().min().unwrap_or(end);
    let last = closes.iter().copied().max().unwrap_or(end);
    let mut buckets = std::collections::HashMap::<u64, u64>::new();
    for t in s.reconnects.lock().iter().filter(|t| **t >= first) {
        *buckets.entry(t / 100).or_default() += 1;
    }
    Ok(StormReport {
        scenario: "storm",
        label: args.label,
        clients: args.clients,
        nodes: n,
        setup_ms,
        setup_failures,
        closed: s.closed.load(Ordering::Relaxed),
        recovered_ms: end - first,
        closes_span_ms: last - first,
        failures: s.failures.load(Ordering::Relaxed),
        dead_node_refusals: s.dead_refusals.load(Ordering::Relaxed),
        peak_reconnects_per_100ms: buckets.values().copied().max().unwrap_or(0),
        peak_rss_kib: args.pids.iter().map(|p| hwm_kib(*p)).collect(),
    })
}

pub fn summary(r: &StormReport) -> String {
    format!(
        "storm {}: {} clients on {} nodes (setup {} ms, {} failures); {} closed over {} ms, all back in {} ms; {} failed attempts, {} dead-node refusals; peak {} reconnects/100 ms; peak RSS {:?} KiB\n",
        r.label,
        r.clients,
        r.nodes,
        r.setup_ms,
        r.setup_failures,
        r.closed,
        r.closes_span_ms,
        r.recovered_ms,
        r.failures,
        r.dead_node_refusals,
        r.peak_reconnects_per_100ms,
        r.peak_rss_kib
    )
}
