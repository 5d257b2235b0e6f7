//! All configuration, in one struct: every field is a flag and a `FANOUT_*`
//! environment variable. The README's table is generated from the same names.

use std::{net::SocketAddr, time::Duration};

use clap::{Parser, ValueEnum};
use ipnet::IpNet;

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

    /// Key required as `Authorization: Bearer <key>` on POST /api/publish.
    /// Without one, publishing is accepted from loopback addresses only.
    #[arg(long, env = "FANOUT_PUBLISH_KEY", hide_env_values = true)]
    pub publish_key: Option<String>,

    /// HS256 secret that verifies realtime auth tokens. Without one, every
    /// subscriber is a guest.
    #[arg(long, env = "FANOUT_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Comma-separated IPs or CIDRs of proxies whose X-Forwarded-For is
    /// trusted for the client's real IP.
    #[arg(long, env = "FANOUT_TRUSTED_PROXIES", value_delimiter = ',', value_parser = parse_net)]
    pub trusted_proxies: Vec<IpNet>,

    /// Pushes a fan-out worker makes before yielding to the scheduler, so a
    /// large broadcast is handed to the writers in chunks.
    #[arg(long, env = "FANOUT_CHUNK_SIZE", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub chunk_size: u32,

    /// Fan-out workers pushing to client queues in parallel (each client
    /// belongs to one); 0 means one per core.
    #[arg(long, env = "FANOUT_FANOUT_WORKERS", default_value_t = 0)]
    pub fanout_workers: usize,

    /// Events a client may have waiting before it is disconnected as slow.
    #[arg(long, env = "FANOUT_CLIENT_QUEUE", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub client_queue: u32,

    /// Bytes of events (as written, `id:` lines included) a client may have
    /// waiting before it is disconnected as slow.
    #[arg(long, env = "FANOUT_CLIENT_QUEUE_BYTES", default_value_t = 4 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub client_queue_bytes: u64,

    /// Bytes of subscription keys one client may hold (the sum of the key
    /// lengths); a POST beyond it gets 400.
    #[arg(long, env = "FANOUT_MAX_SUBSCRIPTION_BYTES", default_value_t = 256 * 1024)]
    pub max_subscription_bytes: usize,

    /// Deliveries the fan-out may have dispatched but not yet pushed before
    /// publishers are held back (see --publish-wait).
    #[arg(
        long,
        env = "FANOUT_MAX_BACKLOG_DELIVERIES",
        default_value_t = 1_000_000
    )]
    pub max_backlog_deliveries: usize,

    /// Bytes of publications the fan-out may hold before publishers are
    /// held back; relayed work beyond twice this is shed, and its local
    /// recipients are disconnected.
    #[arg(long, env = "FANOUT_MAX_BACKLOG_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_backlog_bytes: usize,

    /// How long a publish waits for a full fan-out backlog before it is
    /// refused with 503.
    #[arg(long, env = "FANOUT_PUBLISH_WAIT", default_value = "2s", value_parser = humantime::parse_duration)]
    pub publish_wait: Duration,

    /// Origins allowed to publish from a browser (CORS on /api/publish).
    /// Empty: no CORS on publish. Comma-separated; `*` allows any origin.
    #[arg(long, env = "FANOUT_PUBLISH_CORS_ORIGINS", value_delimiter = ',')]
    pub publish_cors_origins: Vec<String>,

    /// Close a stream after this long without a delivered message
    /// (PocketBase: 5m).
    #[arg(long, env = "FANOUT_IDLE_TIMEOUT", default_value = "5m", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,

    /// Close a stream after this long in any case (PocketBase: 30m).
    #[arg(long, env = "FANOUT_MAX_LIFETIME", default_value = "30m", value_parser = humantime::parse_duration)]
    pub max_lifetime: Duration,

    /// Most SSE streams this node holds; beyond it new ones get 503.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", default_value_t = 100_000)]
    pub max_connections: usize,

    /// Largest request body accepted, in bytes; a larger declared
    /// `Content-Length` is refused (413) before any of it is read.
    #[arg(long, env = "FANOUT_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// How long a client may take to send a request head, and how long a
    /// kept-alive connection may sit idle between requests.
    #[arg(long, env = "FANOUT_HEAD_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub head_timeout: Duration,

    /// How long a client may take to send a whole request body (408 after).
    #[arg(long, env = "FANOUT_BODY_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub body_timeout: Duration,

    /// Most connections that are not SSE streams (requests, keep-alive).
    /// At the cap new clients wait in the listen backlog; a connection kept
    /// alive between requests, or stalled for over 1 s halfway through a
    /// request, may be closed for a newcomer.
    #[arg(long, env = "FANOUT_MAX_HTTP_CONNECTIONS", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_http_connections: u32,

    /// Largest `data` of one published message, in bytes of JSON.
    #[arg(long, env = "FANOUT_MAX_PAYLOAD_BYTES", default_value_t = 256 * 1024)]
    pub max_payload_bytes: usize,

    /// Most messages in one batch publish.
    #[arg(long, env = "FANOUT_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Close a connection whose peer has not accepted written bytes for this
    /// long (a stalled reader).
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

    /// On SIGINT/SIGTERM, how long to wait for connections to close.
    #[arg(long, env = "FANOUT_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// Redis URL: `redis://[user:password@]host:port` for a standalone
    /// Redis (a cluster node is detected), or
    /// `redis+cluster://[user:password@]h1:p1,h2:p2` for a Redis Cluster.
    /// With it, nodes form a cluster that relays every publish through
    /// Redis; without it, this node is a complete broker on its own.
    #[arg(long, env = "FANOUT_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// Partitions of the channels on a Redis Cluster: each node keeps one
    /// subscriber connection per partition. Every node of a deployment must
    /// use the same number.
    #[arg(long, env = "FANOUT_REDIS_PARTITIONS", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub redis_partitions: u16,

    /// Messages kept per topic in Redis, so a node that missed some (a
    /// subscriber reconnect, a failover) catches up instead of skipping
    /// them. 0: plain pub/sub, no offsets, no history.
    #[arg(long, env = "FANOUT_HISTORY_SIZE", default_value_t = 1000)]
    pub history_size: u64,

    /// How long a topic's history is kept after its last publish.
    #[arg(long, env = "FANOUT_HISTORY_TTL", default_value = "5m", value_parser = humantime::parse_duration)]
    pub history_ttl: Duration,

    /// What a node does when a topic's history cannot fill a gap: `close`
    /// the topic's local streams (clients reconnect and re-fetch), or
    /// `ignore` it (only counted and logged).
    #[arg(long, env = "FANOUT_ON_GAP", value_enum, default_value_t = OnGap::Close)]
    pub on_gap: OnGap,

    /// Prefix of every Redis channel and key Fanout uses.
    #[arg(long, env = "FANOUT_REDIS_PREFIX", default_value = "fanout:")]
    pub redis_prefix: String,

    /// How long a subscription request forwarded to the node holding the
    /// client waits for its answer (then 404).
    #[arg(long, env = "FANOUT_FORWARD_TIMEOUT", default_value = "3s", value_parser = humantime::parse_duration)]
    pub forward_timeout: Duration,

    /// How often a cluster node refreshes its heartbeat in Redis and pings
    /// its subscriber connection; a node is listed until three intervals
    /// pass without one.
    #[arg(long, env = "FANOUT_HEARTBEAT_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration)]
    pub heartbeat_interval: Duration,

    /// Log format.
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
    /// The defaults, as if started with no flags and no environment.
    pub fn defaults() -> Self {
        Self::parse_from(["fanout"])
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
}
