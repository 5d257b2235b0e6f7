//! One benchmark run: connect N SSE clients, subscribe each through a
//! different node than the one holding its stream, publish M messages from
//! P publishers spread over the nodes, and account for every delivery.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::sse;

/// Options of `fanout-bench run`.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// Node addresses (host:port), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8090")]
    pub nodes: Vec<SocketAddr>,
    /// SSE clients to open.
    #[arg(long, default_value_t = 1000)]
    pub clients: usize,
    /// Topics; client i subscribes to topic i % topics.
    #[arg(long, default_value_t = 1)]
    pub topics: usize,
    /// Messages to publish in all; message j goes to topic j % topics.
    #[arg(long, default_value_t = 100)]
    pub messages: usize,
    /// Concurrent publishers; publisher p publishes through node p % nodes.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,
    /// Messages per second over all publishers; 0 = as fast as accepted.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// Padding added to every message's data, in bytes.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Percentage of clients that stop reading after PB_CONNECT.
    #[arg(long, default_value_t = 0.0)]
    pub slow_percent: f64,
    /// Connect and measure memory only; publish nothing.
    #[arg(long)]
    pub idle: bool,
    /// How long idle connections are held before memory is read.
    #[arg(long, default_value = "3s", value_parser = humantime_secs)]
    pub hold: Duration,
    /// Server pids whose resident memory is reported (summed).
    #[arg(long, value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Source addresses for client sockets; past ~28k connections per
    /// (source, node) pair the ephemeral ports run out, so large runs
    /// spread over 127.0.0.2, 127.0.0.3, …. Default: as many 127.0.0.x as
    /// needed.
    #[arg(long, value_delimiter = ',')]
    pub source_ips: Vec<IpAddr>,
    /// Connections opened at once.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// `Authorization: Bearer` key for publishing.
    #[arg(long)]
    pub publish_key: Option<String>,
    /// Name of the system under test (e.g. fanout, pocketbase).
    #[arg(long, default_value = "fanout")]
    pub label: String,
    /// Name of the scenario.
    #[arg(long, default_value = "custom")]
    pub scenario: String,
    /// Stop waiting for deliveries after this long without progress.
    #[arg(long, default_value = "10s", value_parser = humantime_secs)]
    pub settle: Duration,
    /// Give up on the publish phase after this long.
    #[arg(long, default_value = "300s", value_parser = humantime_secs)]
    pub max_duration: Duration,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
    /// Connect and subscribe, then only receive: another process publishes
    /// (`--publishers` and `--messages` say what it will send). For runs
    /// larger than one process's open-files limit.
    #[arg(long)]
    pub listen_only: bool,
    /// Create this file once every client is connected and subscribed.
    #[arg(long)]
    pub ready_file: Option<std::path::PathBuf>,
    /// PocketBase record events instead of `POST /api/publish`: every
    /// client subscribes to `<collection>/*`, and publishers create records
    /// (number fields s, t, p, k; text x) with `POST
    /// /api/collections/<collection>/records` on `--pocketbase-url`, whose
    /// create rule must let them (`""`). Default: off.
    #[arg(long)]
    pub pocketbase_collection: Option<String>,
    /// PocketBase's address (host:port) for creating records. Default: the
    /// first of `--nodes` (PocketBase alone).
    #[arg(long)]
    pub pocketbase_url: Option<SocketAddr>,
    /// Per-user feed: a file of `<user id> <token>` lines. Client i
    /// subscribes with user i % users's token (`Authorization` header) and
    /// "topic" k is user k: message j is a record owned by user j % users
    /// (`owner` field), so `--topics` is set to the number of users and the
    /// collection's list rule must be `owner = @request.auth.id`.
    #[arg(long)]
    pub pocketbase_tokens: Option<std::path::PathBuf>,
    /// PocketBase's pid: its CPU seconds over the publish phase, its
    /// resident memory and its open sockets are reported apart from
    /// `--pids`.
    #[arg(long)]
    pub pocketbase_pid: Option<u32>,
}

/// Microseconds since the Unix epoch: publish and delivery times are
/// compared across processes.
fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn humantime_secs(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        _ => return Err(format!("bad duration unit in {s:?}")),
    };
    Ok(Duration::from_secs_f64(secs))
}

/// One run's result, printed as a JSON line.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Report {
    pub scenario: String,
    pub label: String,
    pub nodes: usize,
    pub clients: usize,
    pub connected: usize,
    pub connect_errors: usize,
    pub slow_clients: usize,
    pub topics: usize,
    pub messages: usize,
    pub publishers: usize,
    pub payload_bytes: usize,
    pub publish_errors: u64,
    pub expected: u64,
    pub received: u64,
    pub missing: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub misrouted: u64,
    pub deliveries_per_sec: f64,
    pub publish_secs: f64,
    pub deliver_secs: f64,
    pub connect_per_sec: f64,
    pub latency_ms: Latency,
    pub rss_kib: Rss,
    /// CPU seconds used while publishing and delivering: by the servers
    /// (the given pids) and by this load generator. A generator well below
    /// one core while the server is at one is not the bottleneck.
    pub cpu_secs: Cpu,
    /// Fanout's own counters at the end of the run, summed over the nodes
    /// (empty for other servers): slow-client disconnects and stream
    /// closes by reason.
    #[serde(default)]
    pub server_counters: std::collections::BTreeMap<String, f64>,
    /// When publishing began and when the last delivery arrived
    /// (`unix_us`), so that runs split over processes add up.
    #[serde(default)]
    pub publish_start_unix_us: u64,
    #[serde(default)]
    pub last_delivery_unix_us: u64,
    /// Latency of each record-creating request (`--pocketbase-collection`),
    /// in ms: PocketBase runs its realtime broadcast on the write path.
    #[serde(default)]
    pub create_ms: Latency,
    /// PocketBase's own figures (`--pocketbase-pid`).
    #[serde(default)]
    pub pocketbase: PocketBaseStats,
}

/// PocketBase's process, measured from /proc.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct PocketBaseStats {
    /// user + system CPU seconds from the first create to the last delivery.
    pub cpu_secs: f64,
    /// `cpu_secs` per record created, in milliseconds.
    pub cpu_ms_per_record: f64,
    /// Resident memory with every client connected, and the highest seen
    /// while publishing, in KiB.
    pub rss_kib_connected: u64,
    pub rss_kib_peak: u64,
    /// Open sockets (TCP connections plus its listener) with every client
    /// connected, and the most seen while publishing.
    pub sockets_connected: u64,
    pub sockets_peak: u64,
}

/// How many of a process's file descriptors are sockets.
fn open_sockets(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |dir| {
        dir.filter_map(Result::ok)
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|l| l.to_string_lossy().starts_with("socket:"))
            })
            .count() as u64
    })
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Cpu {
    pub server: f64,
    pub bench: f64,
}

/// user + system CPU seconds of a process (`self` for this one).
fn cpu_secs(pid: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which may contain spaces.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

fn servers_cpu(pids: &[u32]) -> f64 {
    pids.iter().map(|p| cpu_secs(&p.to_string())).sum()
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct Rss {
    /// Before any client connected.
    pub baseline: u64,
    /// With every client connected and idle.
    pub connected: u64,
    /// Highest seen while publishing.
    pub peak: u64,
    /// (connected - baseline) / clients, in bytes.
    pub per_connection_bytes: u64,
}

/// Resident memory of the given pids, in KiB.
fn rss_kib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum()
}

/// Delivery accounting shared by every reader.
struct Stats {
    received: AtomicU64,
    duplicated: AtomicU64,
    out_of_order: AtomicU64,
    misrouted: AtomicU64,
    /// When the last delivery arrived (`unix_us`).
    last_us: AtomicU64,
    shards: Vec<Mutex<Histogram<u64>>>,
}

impl Stats {
    fn new() -> Self {
        Self {
            received: AtomicU64::new(0),
            duplicated: AtomicU64::new(0),
            out_of_order: AtomicU64::new(0),
            misrouted: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            shards: (0..64)
                .map(|_| Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()))
                .collect(),
        }
    }
}

fn bar(quiet: bool, len: u64, what: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len} {per_sec} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    b.set_prefix(what.to_owned());
    b
}

fn source_ips(args: &RunArgs) -> Vec<IpAddr> {
    if !args.source_ips.is_empty() {
        return args.source_ips.clone();
    }
    // About 28k ephemeral ports per (source, destination) pair; stay well
    // below with 20k per source address and node. Each run takes a fresh
    // 127.x.y.0/24: ports a previous run left in TIME_WAIT on the same
    // source address make binding crawl (seen: 7,000 → 300 connects/s).
    let per_source = 20_000 * args.nodes.len().max(1);
    let n = args.clients.div_ceil(per_source).clamp(1, 250);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32);
    let (x, y) = (1 + (seed % 254) as u8, (seed >> 8) as u8);
    (0..n)
        .map(|i| IpAddr::from([127, x, y, 1 + i as u8]))
        .collect()
}

fn topic_name(k: usize) -> String {
    format!("bench{k}")
}

pub async fn run(mut args: RunArgs) -> anyhow::Result<Report> {
    let users: Arc<Vec<(String, String)>> = Arc::new(match &args.pocketbase_tokens {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, token)| (id.to_owned(), token.trim().to_owned()))
            .collect(),
        None => Vec::new(),
    });
    if args.pocketbase_tokens.is_some() {
        if args.pocketbase_collection.is_none() {
            bail!("--pocketbase-tokens needs --pocketbase-collection");
        }
        args.topics = users.len();
    }
    if args.nodes.is_empty() || args.topics == 0 || args.publishers == 0 {
        bail!("need at least one node, topic and publisher");
    }
    let sources = source_ips(&args);
    let http_for: Vec<reqwest::Client> = sources
        .iter()
        .map(|ip| {
            reqwest::Client::builder()
                .local_address(*ip)
                .pool_max_idle_per_host(256)
                .build()
        })
        .collect::<Result<_, _>>()?;
    // Against PocketBase, few idle subscription connections stay open, so
    // that its open sockets are its SSE streams, not this generator's
    // keep-alive pool.
    let subscribe_for: Vec<reqwest::Client> = if args.pocketbase_collection.is_some() {
        sources
            .iter()
            .map(|ip| {
                reqwest::Client::builder()
                    .local_address(*ip)
                    .pool_max_idle_per_host(1)
                    .build()
            })
            .collect::<Result<_, _>>()?
    } else {
        http_for.clone()
    };
    let baseline = rss_kib(&args.pids);
    let stats = Arc::new(Stats::new());
    let slow_every = if args.slow_percent > 0.0 {
        (100.0 / args.slow_percent).round().max(1.0) as usize
    } else {
        0
    };

    // Connect and subscribe. Each client's reader is set up before it
    // connects; it counts what it receives from the start.
    let connect_bar = bar(args.quiet, args.clients as u64, "connect");
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let mut connecting = tokio::task::JoinSet::new();
    let connect_started = Instant::now();
    let mut subscribers = vec![0u64; args.topics];
    let mut slow_clients = 0;
    for i in 0..args.clients {
        let permit = sem.clone().acquire_owned().await?;
        let node = args.nodes[i % args.nodes.len()];
        let sub_node = args.nodes[(i + 1) % args.nodes.len()];
        let src_idx = i % sources.len();
        let http = subscribe_for[src_idx].clone();
        let topic = i % args.topics;
        let slow = slow_every > 0 && i % slow_every == 0;
        let (ready, id) = tokio::sync::oneshot::channel();
        sse::spawn(
            node,
            Some(sources[src_idx]),
            slow.then_some(4096),
            if slow {
                sse::Mode::Stall
            } else {
                sse::Mode::Read
            },
            ready,
            reader(stats.clone(), topic, args.publishers),
        );
        let bar = connect_bar.clone();
        let key = match &args.pocketbase_collection {
            Some(c) => format!("{c}/*"),
            None => topic_name(topic),
        };
        let users = users.clone();
        connecting.spawn(async move {
            let _permit = permit;
            let client_id = id.await.context("client task ended")??;
            // 503 means "try again, nothing changed" (Fanout's companion
            // mode answers it when a client address has too many token
            // verifications in flight).
            let retry_until = Instant::now() + Duration::from_secs(60);
            loop {
                let mut req =
                    http.post(format!("http://{sub_node}/api/realtime"))
                        .json(&serde_json::json!({
                            "clientId": client_id,
                            "subscriptions": [key],
                        }));
                if let Some((_, token)) = users.get(topic) {
                    req = req.header("authorization", token);
                }
                let res = req.send().await.context("subscribe")?;
                let status = res.status();
                if status.is_success() {
                    break;
                }
                if status != reqwest::StatusCode::SERVICE_UNAVAILABLE
                    || Instant::now() > retry_until
                {
                    bail!(
                        "subscribe: {status} {}",
                        res.text().await.unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            bar.inc(1);
            anyhow::Ok((topic, slow))
        });
    }
    let mut connected = 0;
    let mut connect_errors = 0;
    let mut first_error = None;
    while let Some(r) = connecting.join_next().await {
        match r? {
            Ok((topic, slow)) => {
                connected += 1;
                if slow {
                    slow_clients += 1;
                } else {
                    subscribers[topic] += 1;
                }
            }
            Err(e) => {
                connect_errors += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    let connect_secs = connect_started.elapsed().as_secs_f64();
    connect_bar.finish_and_clear();
    if let Some(e) = first_error {
        eprintln!("{connect_errors} clients failed to connect; first error: {e:#}");
    }

    tokio::time::sleep(if args.idle {
        args.hold
    } else {
        Duration::from_secs(1)
    })
    .await;
    let connected_rss = rss_kib(&args.pids);
    let pb_pid: Vec<u32> = args.pocketbase_pid.into_iter().collect();
    let pb_connected = (
        rss_kib(&pb_pid),
        pb_pid.first().map_or(0, |&p| open_sockets(p)),
    );
    if let Some(path) = &args.ready_file {
        std::fs::write(path, format!("{connected}\n"))?;
    }
    let mut report = Report {
        scenario: args.scenario.clone(),
        label: args.label.clone(),
        nodes: args.nodes.len(),
        clients: args.clients,
        connected,
        connect_errors,
        slow_clients,
        topics: args.topics,
        messages: if args.idle { 0 } else { args.messages },
        publishers: args.publishers,
        payload_bytes: args.payload_bytes,
        connect_per_sec: connected as f64 / connect_secs.max(1e-9),
        rss_kib: Rss {
            baseline,
            connected: connected_rss,
            peak: connected_rss,
            per_connection_bytes: (connected_rss.saturating_sub(baseline) * 1024)
                / connected.max(1) as u64,
        },
        ..Default::default()
    };
    if args.idle {
        return Ok(report);
    }

    // Publish.
    let expected: u64 = (0..args.messages)
        .map(|j| subscribers[j % args.topics])
        .sum();
    let deliver_bar = bar(args.quiet, expected, "deliver");
    let peak = Arc::new(AtomicU64::new(connected_rss));
    let pb_rss_peak = Arc::new(AtomicU64::new(pb_connected.0));
    let pb_sockets_peak = Arc::new(AtomicU64::new(pb_connected.1));
    let create_hist = Arc::new(Mutex::new(Histogram::<u64>::new_with_bounds(
        1,
        600_000_000,
        3,
    )?));
    let sampler = {
        let (pids, peak) = (args.pids.clone(), peak.clone());
        let (pb_pid, pb_rss, pb_sockets) =
            (pb_pid.clone(), pb_rss_peak.clone(), pb_sockets_peak.clone());
        tokio::spawn(async move {
            loop {
                peak.fetch_max(rss_kib(&pids), Ordering::Relaxed);
                if let Some(&p) = pb_pid.first() {
                    pb_rss.fetch_max(rss_kib(&[p]), Ordering::Relaxed);
                    pb_sockets.fetch_max(open_sockets(p), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let publish_errors = Arc::new(AtomicU64::new(0));
    let pad = "x".repeat(args.payload_bytes);
    let cpu_before = (
        servers_cpu(&args.pids),
        cpu_secs("self"),
        servers_cpu(&pb_pid),
    );
    let publish_started = Instant::now();
    let publish_started_us = unix_us();
    let mut publishers = tokio::task::JoinSet::new();
    for p in (0..args.publishers).filter(|_| !args.listen_only) {
        let node = args.nodes[p % args.nodes.len()];
        let url = match &args.pocketbase_collection {
            Some(c) => format!(
                "http://{}/api/collections/{c}/records",
                args.pocketbase_url.unwrap_or(args.nodes[0])
            ),
            None => format!("http://{node}/api/publish"),
        };
        let pocketbase = args.pocketbase_collection.is_some();
        let (users, create_hist) = (users.clone(), create_hist.clone());
        let http = http_for[0].clone();
        let key = args.publish_key.clone();
        let errors = publish_errors.clone();
        let pad = pad.clone();
        let (messages, topics, publishers_n, rate) =
            (args.messages, args.topics, args.publishers, args.rate);
        publishers.spawn(async move {
            let mut seq = vec![0u64; topics];
            let mut tick = (rate > 0.0).then(|| {
                let mut t =
                    tokio::time::interval(Duration::from_secs_f64(publishers_n as f64 / rate));
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            for j in (p..messages).step_by(publishers_n) {
                if let Some(t) = tick.as_mut() {
                    t.tick().await;
                }
                let k = j % topics;
                let s = seq[k];
                seq[k] += 1;
                let t_us = unix_us();
                let body = if pocketbase {
                    let owner = users
                        .get(k)
                        .map(|(id, _)| format!(r#","owner":"{id}""#))
                        .unwrap_or_default();
                    format!(r#"{{"s":{s},"t":{t_us},"p":{p},"k":{k},"x":"{pad}"{owner}}}"#)
                } else {
                    format!(
                        r#"{{"topic":"{}","data":{{"s":{s},"t":{t_us},"p":{p},"k":{k},"x":"{pad}"}}}}"#,
                        topic_name(k)
                    )
                };
                let mut req = http
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body);
                if let Some(key) = &key {
                    req = req.bearer_auth(key);
                }
                let sent = Instant::now();
                match req.send().await {
                    Ok(r) if r.status().is_success() => {
                        // The whole answer, as a client waits for it.
                        let _ = r.bytes().await;
                        let us = sent.elapsed().as_micros() as u64;
                        let _ = create_hist.lock().record(us.max(1));
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
    }
    let deadline = publish_started + args.max_duration;
    let mut publish_secs = None;
    let mut last_progress = (0, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        while let Some(r) = publishers.try_join_next() {
            r?;
        }
        if publish_secs.is_none() && publishers.is_empty() {
            publish_secs = Some(publish_started.elapsed().as_secs_f64());
        }
        let got = stats.received.load(Ordering::Relaxed);
        deliver_bar.set_position(got);
        // A listener's clock starts with the first delivery.
        if got != last_progress.0 || (args.listen_only && got == 0) {
            last_progress = (got, Instant::now());
        }
        if publishers.is_empty() && (got >= expected || last_progress.1.elapsed() > args.settle) {
            break;
        }
        if Instant::now() > deadline {
            eprintln!("max duration reached; reporting what arrived");
            publishers.abort_all();
            break;
        }
    }
    deliver_bar.finish_and_clear();
    sampler.abort();

    let mut hist = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    for s in &stats.shards {
        hist.add(&*s.lock())?;
    }
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let received = stats.received.load(Ordering::Relaxed);
    let deliver_secs = (stats
        .last_us
        .load(Ordering::Relaxed)
        .saturating_sub(publish_started_us)) as f64
        / 1e6;
    report.publish_errors = publish_errors.load(Ordering::Relaxed);
    report.expected = expected;
    report.received = received;
    report.missing = expected.saturating_sub(received);
    report.duplicated = stats.duplicated.load(Ordering::Relaxed);
    report.out_of_order = stats.out_of_order.load(Ordering::Relaxed);
    report.misrouted = stats.misrouted.load(Ordering::Relaxed);
    report.deliveries_per_sec = received as f64 / deliver_secs.max(1e-9);
    report.publish_secs = publish_secs.unwrap_or(args.max_duration.as_secs_f64());
    report.deliver_secs = deliver_secs;
    report.publish_start_unix_us = publish_started_us;
    report.last_delivery_unix_us = stats.last_us.load(Ordering::Relaxed);
    report.latency_ms = Latency {
        p50: ms(0.5),
        p90: ms(0.9),
        p99: ms(0.99),
        p999: ms(0.999),
        max: hist.max() as f64 / 1000.0,
    };
    report.rss_kib.peak = peak.load(Ordering::Relaxed);
    report.server_counters = server_counters(&http_for[0], &args.nodes).await;
    report.cpu_secs = Cpu {
        server: servers_cpu(&args.pids) - cpu_before.0,
        bench: cpu_secs("self") - cpu_before.1,
    };
    {
        let h = create_hist.lock();
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        report.create_ms = Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: h.max() as f64 / 1000.0,
        };
    }
    if !pb_pid.is_empty() {
        let cpu = servers_cpu(&pb_pid) - cpu_before.2;
        let created = (args.messages as u64).saturating_sub(report.publish_errors);
        report.pocketbase = PocketBaseStats {
            cpu_secs: cpu,
            cpu_ms_per_record: cpu * 1000.0 / created.max(1) as f64,
            rss_kib_connected: pb_connected.0,
            rss_kib_peak: pb_rss_peak.load(Ordering::Relaxed),
            sockets_connected: pb_connected.1,
            sockets_peak: pb_sockets_peak.load(Ordering::Relaxed),
        };
    }
    Ok(report)
}

/// Fanout's slow-client and close counters from every node's /metrics.
async fn server_counters(
    http: &reqwest::Client,
    nodes: &[SocketAddr],
) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for node in nodes {
        let Ok(res) = http.get(format!("http://{node}/metrics")).send().await else {
            continue;
        };
        let Ok(text) = res.text().await else { continue };
        for line in text.lines().filter(|l| {
            l.starts_with("fanout_slow_client_disconnects_total")
                || l.starts_with("fanout_connections_closed_total")
        }) {
            if let Some((name, value)) = line.rsplit_once(' ')
                && let Ok(v) = value.parse::<f64>()
            {
                *out.entry(name.to_owned()).or_insert(0.0) += v;
            }
        }
    }
    out
}

/// The per-client delivery check: order per publisher, topic, latency.
///
/// Per publisher it keeps the lowest sequence number not yet received and
/// the numbers received beyond it, so an event that arrives after a later
/// one (PocketBase does not order one client's events) is counted once, as
/// out of order, and only a number never received counts as missing.
fn reader(
    stats: Arc<Stats>,
    topic: usize,
    publishers: usize,
) -> impl FnMut(&[u8]) + Send + 'static {
    let mut next = vec![0u64; publishers];
    let mut ahead = vec![std::collections::BTreeSet::<u64>::new(); publishers];
    // One past the highest sequence number received, per publisher.
    let mut high = vec![0u64; publishers];
    let shard = topic % stats.shards.len();
    move |data| {
        let now = unix_us();
        let (Some(s), Some(t), Some(p), Some(k)) = (
            sse::json_u64(data, b"\"s\":"),
            sse::json_u64(data, b"\"t\":"),
            sse::json_u64(data, b"\"p\":"),
            sse::json_u64(data, b"\"k\":"),
        ) else {
            return;
        };
        if k as usize != topic {
            stats.misrouted.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let p = p as usize;
        let (Some(n), Some(ahead), Some(high)) =
            (next.get_mut(p), ahead.get_mut(p), high.get_mut(p))
        else {
            stats.misrouted.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if s < *n || ahead.contains(&s) {
            stats.duplicated.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if s < *high {
            stats.out_of_order.fetch_add(1, Ordering::Relaxed);
        }
        *high = (*high).max(s + 1);
        if s > *n {
            ahead.insert(s);
        } else {
            *n = s + 1;
            while ahead.remove(n) {
                *n += 1;
            }
        }
        stats.received.fetch_add(1, Ordering::Relaxed);
        stats.last_us.fetch_max(now, Ordering::Relaxed);
        let _ = stats.shards[shard]
            .lock()
            .record(now.saturating_sub(t).max(1));
    }
}

/// A human summary of a report.
pub fn summary(r: &Report) -> String {
    let mut s = format!(
        "{} / {}: {} clients ({} connected, {} slow) on {} node(s), {} topics\n  connect: {:.0}/s\n  memory: baseline {} KiB, connected {} KiB ({} B/conn), peak {} KiB\n",
        r.label,
        r.scenario,
        r.clients,
        r.connected,
        r.slow_clients,
        r.nodes,
        r.topics,
        r.connect_per_sec,
        r.rss_kib.baseline,
        r.rss_kib.connected,
        r.rss_kib.per_connection_bytes,
        r.rss_kib.peak
    );
    if r.messages > 0 {
        s += &format!(
            "  published {} messages in {:.2}s ({} errors)\n  deliveries: {}/{} (missing {}, duplicated {}, out of order {}, misrouted {})\n  throughput: {:.0} deliveries/s\n  latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}\n  cpu seconds: server {:.2}, load generator {:.2}\n",
            r.messages,
            r.publish_secs,
            r.publish_errors,
            r.received,
            r.expected,
            r.missing,
            r.duplicated,
            r.out_of_order,
            r.misrouted,
            r.deliveries_per_sec,
            r.latency_ms.p50,
            r.latency_ms.p90,
            r.latency_ms.p99,
            r.latency_ms.p999,
            r.latency_ms.max,
            r.cpu_secs.server,
            r.cpu_secs.bench
        );
        if r.create_ms.max > 0.0 {
            s += &format!(
                "  create request ms: p50 {:.2}  p99 {:.2}  max {:.2}\n",
                r.create_ms.p50, r.create_ms.p99, r.create_ms.max
            );
        }
        if r.pocketbase.rss_kib_connected > 0 {
            let pb = &r.pocketbase;
            s += &format!(
                "  pocketbase: cpu {:.2}s ({:.3} ms/record), rss {} KiB connected, {} KiB peak, sockets {} connected, {} peak\n",
                pb.cpu_secs,
                pb.cpu_ms_per_record,
                pb.rss_kib_connected,
                pb.rss_kib_peak,
                pb.sockets_connected,
                pb.sockets_peak
            );
        }
    }
    s
}
