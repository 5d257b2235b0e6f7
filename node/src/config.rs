//! All configuration, in one struct: every field is a flag and a `FANOUT_*`
//! environment variable.
//!
//! The README's configuration table repeats each flag's name, variable,
//! default and the first sentence of its help; `node/tests/docs.rs` fails
//! when they disagree (it prints the row to paste), so write the first
//! sentence of each docstring to stand on its own.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

use crate::protocol;

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// What to do when messages were missed and history cannot fill the gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnGap {
    Close,
    Ignore,
}

/// Fanout: a PocketBase-compatible realtime broker.
#[derive(Debug, Clone, Parser)]
#[command(name = "fanout", version, about)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,

    /// Key publishers must send as `Authorization: Bearer <key>`. Without
    /// one, only loopback peers may publish, and a warning is logged at
    /// start.
    #[arg(long, env = "FANOUT_PUBLISH_KEY", hide_env_values = true)]
    pub publish_key: Option<String>,

    /// HS256 secret that verifies realtime auth tokens. Without one, every
    /// subscriber is a guest; an invalid or expired token also counts as a
    /// guest, as in PocketBase.
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Comma-separated IPs or CIDRs of the proxies whose `X-Forwarded-For`
    /// sets a client's real IP.
    #[arg(long, env = "FANOUT_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// Pushes a fan-out worker makes for one topic before it turns to the
    /// next topic with work (and yields). A flood on one topic therefore
    /// waits its turn instead of holding back the others; order is kept
    /// per topic.
    #[arg(long, env = "FANOUT_CHUNK_SIZE", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_size: u32,

    /// Fan-out workers, pushing to client queues in parallel; 0 means one
    /// per core. Each client belongs to one worker, and a broadcast's
    /// recipients are pushed by all workers at once.
    #[arg(long, env = "FANOUT_FANOUT_WORKERS", default_value_t = 0)]
    pub fanout_workers: usize,

    /// Events a client may have queued before it is disconnected as slow.
    #[arg(long, env = "FANOUT_CLIENT_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub client_queue: u32,

    /// Bytes of events a client may have waiting before it is disconnected
    /// as slow (default 4 MiB): each event's `id:` line and head, and the
    /// data of a publication once however many of the client's keys it
    /// matches. An empty queue always takes the next event.
    #[arg(long, env = "FANOUT_CLIENT_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_queue_bytes: u64,

    /// Bytes of subscription keys one client may hold (the sum of the key
    /// lengths); a POST beyond it gets 400.
    #[arg(long, env = "FANOUT_MAX_SUBSCRIPTION_BYTES", default_value_t = 256 * 1024)]
    pub max_subscription_bytes: usize,

    /// Deliveries per topic that the fan-out may have dispatched but not yet
    /// pushed; beyond it, publishes to that topic wait (see --publish-wait).
    /// Publishers of other topics are not held back.
    #[arg(
        long,
        env = "FANOUT_MAX_BACKLOG_DELIVERIES",
        default_value_t = 1_000_000
    )]
    pub max_backlog_deliveries: usize,

    /// Bytes of publications the fan-out may hold before every publish waits
    /// (see --publish-wait). Relayed work beyond twice this is shed, and its
    /// local recipients are disconnected.
    #[arg(long, env = "FANOUT_MAX_BACKLOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_backlog_bytes: usize,

    /// How long a publish waits for room in a full fan-out backlog before it
    /// gets 503.
    #[arg(long, env = "FANOUT_PUBLISH_WAIT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub publish_wait: Duration,

    /// Origins allowed to publish from a browser (CORS on /api/publish),
    /// comma-separated; `*` allows any. Without any, /api/publish answers no
    /// CORS.
    #[arg(long, env = "FANOUT_PUBLISH_CORS_ORIGINS", value_delimiter = ',')]
    pub publish_cors_origins: Vec<String>,

    /// Closes a stream after this long without a delivered message
    /// (PocketBase: 5m).
    #[arg(long, env = "FANOUT_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Closes a stream after this long, busy or not (PocketBase: 30m).
    #[arg(long, env = "FANOUT_MAX_LIFETIME", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_lifetime: Duration,

    /// Most SSE streams this node holds; new streams beyond it get 503.
    /// Each stream is an open file: a warning is logged at start when this
    /// exceeds the open-files limit (`RLIMIT_NOFILE`) less 64 reserved.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Largest request body accepted, in bytes; a larger declared
    /// `Content-Length` gets 413 before any of it is read.
    #[arg(long, env = "FANOUT_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long a request head may take, and how long a kept-alive
    /// connection may idle between requests (then it is closed unanswered).
    #[arg(long, env = "FANOUT_HEAD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub head_timeout: Duration,

    /// How long a request body may take; then 408.
    #[arg(long, env = "FANOUT_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Most connections that are not SSE streams (requests, keep-alive).
    /// At the cap new clients wait in the listen backlog; a connection kept
    /// alive between requests, or stalled for over 1 s halfway through a
    /// request, may be closed for a newcomer.
    #[arg(long, env = "FANOUT_MAX_HTTP_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_http_connections: u32,

    /// Largest `data` of one published message, in bytes of JSON (default
    /// 256 KiB; larger gets 413). With the largest event framing around it
    /// (2,558 bytes) it must fit `--client-queue-bytes`, or the node
    /// refuses to start.
    #[arg(long, env = "FANOUT_MAX_PAYLOAD_BYTES", default_value_t = 256 * 1024)]
    pub max_payload_bytes: usize,

    /// Most messages in one batch publish.
    #[arg(long, env = "FANOUT_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Closes a connection whose peer has not accepted written bytes for
    /// this long (a stalled reader).
    #[arg(long, env = "FANOUT_WRITE_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub write_timeout: Duration,

    /// Window over which deliberate mass closes are spread, each stream at
    /// a random moment within it, so their clients do not all reconnect in
    /// the same instant: a gap or new epoch closing a topic's streams (they
    /// get nothing more at once, and are closed within the window), and the
    /// shutdown drain (within at most half of --drain-timeout). 0s closes
    /// at once.
    #[arg(long, env = "FANOUT_CLOSE_SPREAD", default_value = "3s", value_parser = humantime::parse_duration)]
    pub close_spread: Duration,

    /// How long shutdown (SIGINT/SIGTERM) waits for connections to close.
    #[arg(long, env = "FANOUT_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Redis that nodes form a cluster through:
    /// `redis://[user:password@]host:port[/0]`,
    /// `redis+cluster://[user:password@]h1:p1,h2:p2,…` or
    /// `redis+sentinel://[user:password@]s1:p1,s2:p2,…/<master>`, each with
    /// a `rediss` form for TLS. A `redis://` URL that names a Redis Cluster
    /// node switches to cluster mode; a database number other than 0 is
    /// refused (pub/sub ignores it: use `--redis-prefix`). Without it, this
    /// node is a complete broker on its own. An unreachable Redis is logged
    /// as a warning, repeated with back-off, and /api/health answers 503
    /// until it connects.
    #[arg(long, env = "FANOUT_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// On a Redis Cluster, the partitions channels are grouped into, with
    /// one subscriber connection each; the same on every node.
    #[arg(long, env = "FANOUT_REDIS_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub redis_partitions: u16,

    /// Messages kept per topic, for resumes (`since`) and so that a node
    /// that missed some catches up instead of skipping them; 0 is plain
    /// pub/sub. With Redis the history is in Redis; a single node keeps it
    /// in memory.
    #[arg(long, env = "FANOUT_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: u64,

    /// How long a topic's history is kept after its last publish.
    #[arg(long, env = "FANOUT_HISTORY_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,

    /// What a node does when history cannot fill a gap: `close` the topic's
    /// streams on that node (clients reconnect and re-fetch) or `ignore` it
    /// (only counted and logged).
    #[arg(long, env = "FANOUT_ON_GAP", value_enum, default_value_t = OnGap::Close)]
    pub on_gap: OnGap,

    /// Prefix of every Redis channel and key Fanout uses. Nodes with the
    /// same Redis and prefix form one cluster: give each deployment that
    /// shares a Redis its own.
    #[arg(long, env = "FANOUT_REDIS_PREFIX", default_value = "fanout:")]
    pub redis_prefix: String,

    /// How long a subscription request forwarded to the node that holds the
    /// client waits for that node's answer; then the answer is 503, and the
    /// owner drops the request unapplied (decided on Redis's clock, so the
    /// nodes' own clocks need not agree). Must be below three
    /// --heartbeat-interval.
    #[arg(long, env = "FANOUT_FORWARD_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub forward_timeout: Duration,

    /// Cluster heartbeat and Redis subscriber PING period; a node is dropped
    /// from the membership after three missed intervals (at once when it
    /// stops cleanly). Three intervals must exceed --forward-timeout: with
    /// Redis, the node refuses to start otherwise.
    #[arg(long, env = "FANOUT_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// PocketBase's base URL (`http://host:port`) for companion mode:
    /// realtime auth tokens are verified by that PocketBase, and clients are
    /// bridged onto its realtime API (see docs/pocketbase.md). Needs
    /// `--pocketbase-secret` and PocketBase's hooks file
    /// (`deploy/pocketbase/pb_hooks/fanout.pb.js`); excludes `--jwt-secret`;
    /// plain HTTP only.
    #[arg(long, env = "FANOUT_POCKETBASE_URL")]
    pub pocketbase_url: Option<String>,

    /// The secret Fanout presents to PocketBase's hooks (`X-Fanout-Secret`);
    /// PocketBase reads the same value from its env `FANOUT_SECRET`.
    #[arg(long, env = "FANOUT_POCKETBASE_SECRET", hide_env_values = true)]
    pub pocketbase_secret: Option<String>,

    /// How long one call to PocketBase may take (then 503).
    #[arg(long, env = "FANOUT_POCKETBASE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub pocketbase_timeout: Duration,

    /// Most auth tokens whose verdict is cached; the least recently used
    /// leave first.
    #[arg(long, env = "FANOUT_POCKETBASE_TOKEN_CACHE", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub pocketbase_token_cache: u32,

    /// How long a verified token is trusted before PocketBase is asked
    /// again; a revoked token stops counting within this bound.
    #[arg(long, env = "FANOUT_POCKETBASE_AUTH_RECHECK", default_value = "1m", value_parser = humantime::parse_duration)]
    pub pocketbase_auth_recheck: Duration,

    /// Most token verifications under way at once (per node).
    #[arg(long, env = "FANOUT_POCKETBASE_VERIFY_CONCURRENCY", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub pocketbase_verify_concurrency: u32,

    /// Most token verifications under way at once for one client address;
    /// beyond it that address's subscription requests get 503.
    #[arg(long, env = "FANOUT_POCKETBASE_VERIFY_PER_IP", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub pocketbase_verify_per_ip: u32,

    /// Comma-separated subscription key prefixes bridged to PocketBase in
    /// companion mode (e.g. `posts/,comments/,example`); none bridges every
    /// key, so the custom messages of the app's hooks keep working.
    #[arg(long, env = "FANOUT_POCKETBASE_TOPICS", value_delimiter = ',')]
    pub pocketbase_topics: Vec<String>,

    /// Most realtime connections a node opens to PocketBase in companion
    /// mode (one per identity and 1,000 keys); beyond it a subscription
    /// request that needs one more gets 503.
    #[arg(long, env = "FANOUT_POCKETBASE_MAX_BRIDGES", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub pocketbase_max_bridges: u32,

    /// Log format: `text` or `json`. The level comes from `RUST_LOG`
    /// (default `info`).
    #[arg(long, env = "FANOUT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
}

impl Config {
    /// Companion mode's settings, when `--pocketbase-url` is set.
    ///
    /// # Errors
    /// A URL that is not `http://…`, a missing `--pocketbase-secret`, or
    /// `--jwt-secret` given as well.
    pub fn pocketbase(
        &self,
    ) -> Result<
        Option<(
            crate::pocketbase::VerifierConfig,
            crate::pocketbase::BridgeConfig,
        )>,
        String,
    > {
        let Some(url) = self.pocketbase_url.as_deref().filter(|u| !u.is_empty()) else {
            return Ok(None);
        };
        let url = url.trim_end_matches('/');
        if !url.starts_with("http://") {
            return Err(format!(
                "--pocketbase-url must be an http:// URL (got {url:?}); reach PocketBase over \
                 its internal address"
            ));
        }
        let Some(secret) = self.pocketbase_secret.clone().filter(|s| !s.is_empty()) else {
            return Err(
                "--pocketbase-url needs --pocketbase-secret (FANOUT_POCKETBASE_SECRET), the \
                 value PocketBase has in FANOUT_SECRET"
                    .to_owned(),
            );
        };
        if self.jwt_secret.as_deref().is_some_and(|s| !s.is_empty()) {
            return Err(
                "--jwt-secret and --pocketbase-url exclude each other: in companion mode \
                 PocketBase verifies every token"
                    .to_owned(),
            );
        }
        let bridges = crate::pocketbase::BridgeConfig {
            url: url.to_owned(),
            secret: secret.clone(),
            timeout: self.pocketbase_timeout,
            max_lanes: self.pocketbase_max_bridges as usize,
            topics: self
                .pocketbase_topics
                .iter()
                .map(|t| t.trim().to_owned())
                .filter(|t| !t.is_empty())
                .collect(),
        };
        let verifier = crate::pocketbase::VerifierConfig {
            url: url.to_owned(),
            secret,
            timeout: self.pocketbase_timeout,
            cache_entries: self.pocketbase_token_cache as usize,
            recheck: self.pocketbase_auth_recheck,
            concurrency: self.pocketbase_verify_concurrency as usize,
            per_ip: self.pocketbase_verify_per_ip as usize,
        };
        Ok(Some((verifier, bridges)))
    }

    /// The defaults, as if started with no flags and no environment.
    pub fn defaults() -> Self {
        Self::parse_from(["fanout"])
    }

    /// Settings that parse one by one but not together;
    /// [`crate::Server::start`] (and the binary, with exit code 2) refuses
    /// to start with them, giving this message.
    ///
    /// * `--max-payload-bytes` must fit a client queue: a message of the
    ///   largest payload, framed as an event (at most
    ///   [`protocol::MAX_EVENT_OVERHEAD`] bytes more), must not exceed
    ///   `--client-queue-bytes`. Otherwise a publish could be answered 200
    ///   and then disconnect every subscriber of its topic.
    /// * With Redis, three `--heartbeat-interval`s must exceed
    ///   `--forward-timeout`.
    /// * Companion mode's settings must go together ([`Config::pocketbase`]).
    pub fn validate(&self) -> Result<(), String> {
        let clustered = self.redis_url.as_deref().is_some_and(|u| !u.is_empty());
        if clustered && self.heartbeat_interval * 3 <= self.forward_timeout {
            return Err(format!(
                "--heartbeat-interval ({}) times three must exceed --forward-timeout ({}): \
                 raise FANOUT_HEARTBEAT_INTERVAL or lower FANOUT_FORWARD_TIMEOUT",
                humantime::format_duration(self.heartbeat_interval),
                humantime::format_duration(self.forward_timeout),
            ));
        }
        self.pocketbase()?;
        let framed = self
            .max_payload_bytes
            .saturating_add(protocol::MAX_EVENT_OVERHEAD);
        if framed as u64 > self.client_queue_bytes {
            return Err(format!(
                "--max-payload-bytes (FANOUT_MAX_PAYLOAD_BYTES) is {} bytes, but a client queue \
                 holds at most --client-queue-bytes (FANOUT_CLIENT_QUEUE_BYTES) = {} bytes, and \
                 a message of the largest payload takes up to {framed} bytes as an event: no \
                 subscriber could receive it. Raise --client-queue-bytes to at least {framed} \
                 or lower --max-payload-bytes to at most {}.",
                self.max_payload_bytes,
                self.client_queue_bytes,
                self.client_queue_bytes
                    .saturating_sub(protocol::MAX_EVENT_OVERHEAD as u64),
            ));
        }
        Ok(())
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::defaults()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse() {
        let c = Config::try_parse_from([
            "fanout",
            "--listen",
            "0.0.0.0:9000",
            "--trusted-proxies",
            "10.0.0.0/8, 127.0.0.1",
            "--idle-timeout",
            "90s",
        ])
        .unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.trusted_proxies.len(), 2);
        assert_eq!(c.idle_timeout, Duration::from_secs(90));
        assert!(Config::try_parse_from(["fanout", "--trusted-proxies", "nope"]).is_err());
        assert!(Config::try_parse_from(["fanout", "--chunk-size", "0"]).is_err());
    }

    #[test]
    fn a_payload_limit_no_client_queue_can_carry_is_refused() {
        assert_eq!(Config::defaults().validate(), Ok(()));
        let mut c = Config::defaults();
        c.max_payload_bytes = 4 << 20;
        let e = c.validate().unwrap_err();
        assert!(e.contains("--max-payload-bytes") && e.contains("--client-queue-bytes"));
        c.max_payload_bytes = (c.client_queue_bytes as usize) - protocol::MAX_EVENT_OVERHEAD;
        assert_eq!(c.validate(), Ok(()));
        c.max_payload_bytes += 1;
        assert!(c.validate().is_err());
    }

    #[test]
    fn three_heartbeats_must_exceed_the_forward_timeout_with_redis() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(["fanout"].iter().chain(args))
                .unwrap()
                .validate()
        };
        let redis = ["--redis-url", "redis://127.0.0.1:1"];
        let err = parse(&[&redis[..], &["--heartbeat-interval", "1s"]].concat()).unwrap_err();
        assert!(err.contains("--forward-timeout (3s)"), "{err}");
        assert!(parse(&[&redis[..], &["--heartbeat-interval", "1001ms"]].concat()).is_ok());
        assert!(parse(&redis).is_ok());
        // A single node forwards nothing.
        assert!(parse(&["--heartbeat-interval", "1s"]).is_ok());
    }
}
