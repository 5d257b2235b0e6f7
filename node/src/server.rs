//! Starting and stopping a node: the listener, the relay, the HTTP server,
//! and graceful shutdown.

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    net::{TcpListener, TcpSocket},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

use crate::{
    admission::Tracker,
    auth::{Authenticator, KeySource},
    broker::Broker,
    config::Config,
    conn::{self, Conns},
    http::{AppState, router},
    hub::{Hub, HubConfig},
    protocol,
    realip::RealIp,
    relay::{LocalRelay, RedisConfig, RedisRelay, Relay},
    sse::{Streams, Timeouts},
};

/// Listen backlog asked of the kernel, which caps it at
/// `net.core.somaxconn`. tokio's `TcpListener::bind` uses 128, which turns
/// a reconnect storm of thousands of clients into seconds of SYN retries;
/// and at the connection caps new clients wait here (see `admission`).
const BACKLOG: u32 = 65_535;

/// Below this effective backlog a reconnect storm overflows it (clients
/// then retry their SYN after 1 s, 3 s, …): warned about at start.
const BACKLOG_WANTED: u32 = 4096;

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The listen backlog the kernel grants: `BACKLOG` capped by
/// `net.core.somaxconn` (`None` where that cannot be read).
fn effective_backlog() -> Option<u32> {
    let somaxconn = std::fs::read_to_string("/proc/sys/net/core/somaxconn").ok()?;
    Some(somaxconn.trim().parse::<u32>().ok()?.min(BACKLOG))
}

/// Lanes that apply forwarded requests: one client's requests always take
/// the same lane, which applies them one at a time, in arrival order.
const FORWARD_LANES: usize = 16;

/// Answers subscription requests that other nodes forwarded to this one.
async fn serve_forwarded(
    broker: Broker,
    mut incoming: tokio::sync::mpsc::Receiver<crate::relay::Incoming>,
    shutdown: CancellationToken,
) {
    let lanes: Vec<_> = (0..FORWARD_LANES)
        .map(|_| {
            // Bounded: a full lane holds the relay's bounded queue back, and
            // past that the sender is told the node is overloaded (503).
            let (tx, mut rx) = tokio::sync::mpsc::channel::<crate::relay::Incoming>(64);
            let broker = broker.clone();
            tokio::spawn(async move {
                while let Some(crate::relay::Incoming {
                    request,
                    deadline,
                    commit,
                    reply,
                }) = rx.recv().await
                {
                    if tokio::time::Instant::now() >= deadline {
                        // The sender may have answered 503 already; dropping
                        // `reply` sends nothing.
                        metrics::counter!(crate::metrics::FORWARDS_EXPIRED).increment(1);
                        continue;
                    }
                    let answer = match request {
                        crate::relay::Forwarded::Subscribe(request) => {
                            broker
                                .subscribe_local_committed(request, Some(deadline), commit)
                                .await
                        }
                        crate::relay::Forwarded::OAuth2(redirect) => {
                            broker.oauth2_redirect_local(&redirect)
                        }
                    };
                    let _ = reply.send(answer);
                }
            });
            tx
        })
        .collect();
    loop {
        let next = tokio::select! {
            next = incoming.recv() => next,
            _ = shutdown.cancelled() => return,
        };
        let Some(req) = next else { return };
        let client = match &req.request {
            crate::relay::Forwarded::Subscribe(r) => &r.client_id,
            crate::relay::Forwarded::OAuth2(r) => &r.state,
        };
        let lane = client
            .bytes()
            .fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize));
        let _ = lanes[lane % FORWARD_LANES].send(req).await;
    }
}

/// A running node.
pub struct Server {
    addr: SocketAddr,
    broker: Broker,
    shutdown: CancellationToken,
    drain: Duration,
    close_spread: Duration,
    task: JoinHandle<()>,
}

impl Server {
    /// Bind the listener and start serving.
    ///
    /// Errors: settings that cannot work together ([`Config::validate`]),
    /// an address that cannot be bound, an invalid Redis URL.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        config.validate().map_err(anyhow::Error::msg)?;
        let listener =
            bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let hub = Hub::new(HubConfig {
            node_tag: protocol::random_alphanumeric(protocol::NODE_TAG_LEN),
            chunk_size: config.chunk_size as usize,
            queue_capacity: config.client_queue as usize,
            queue_bytes: config.client_queue_bytes as usize,
            workers: config.fanout_workers,
            max_subscription_bytes: config.max_subscription_bytes,
            max_backlog_deliveries: config.max_backlog_deliveries,
            max_backlog_bytes: config.max_backlog_bytes,
            close_spread: config.close_spread,
        });
        // Install the recorder before anything counts: the relay resolves
        // some counters once, at start. Every series is exported from now
        // on, at zero, so dashboards and alerts see it before its first event.
        crate::metrics::handle();
        crate::metrics::register(config.redis_url.as_deref().is_some_and(|u| !u.is_empty()));
        let relay: Arc<dyn Relay> = match &config.redis_url {
            Some(url) if !url.is_empty() => RedisRelay::start(
                hub.clone(),
                RedisConfig {
                    url: url.clone(),
                    prefix: config.redis_prefix.clone(),
                    partitions: config.redis_partitions,
                    history_size: config.history_size,
                    history_ttl: config.history_ttl,
                    close_on_gap: config.on_gap == crate::config::OnGap::Close,
                    forward_timeout: config.forward_timeout,
                    heartbeat_interval: config.heartbeat_interval,
                    address: addr,
                },
            )
            .context("invalid Redis configuration")?,
            _ => LocalRelay::with_history(
                hub.clone(),
                addr,
                config.history_size as usize,
                config.history_ttl,
            ),
        };
        let incoming = relay.take_incoming();
        let auth = Authenticator::new(match &config.jwt_secret {
            Some(s) if !s.is_empty() => KeySource::Hs256(s.as_bytes().to_vec()),
            _ => KeySource::None,
        });
        let pocketbase = config.pocketbase().map_err(anyhow::Error::msg)?;
        let mut broker =
            Broker::new(hub.clone(), relay, auth).with_publish_wait(config.publish_wait);
        if let Some((verifier, bridges)) = pocketbase {
            tracing::info!(url = %verifier.url, "companion mode: realtime bridged to PocketBase");
            broker =
                broker.with_companion(crate::pocketbase::Companion::start(hub, verifier, bridges));
        }
        let shutdown = CancellationToken::new();
        if let Some(incoming) = incoming {
            tokio::spawn(serve_forwarded(broker.clone(), incoming, shutdown.clone()));
        }
        let streams = Streams {
            broker: broker.clone(),
            timeouts: Timeouts {
                idle: config.idle_timeout,
                max_lifetime: config.max_lifetime,
            },
            max_connections: config.max_connections,
            shutdown: shutdown.clone(),
        };
        let real_ip = RealIp::new(config.trusted_proxies.clone());
        let nofile = crate::admission::raise_nofile_limit();
        let fd_budget = nofile.saturating_sub(crate::admission::FD_RESERVE).max(16);
        let tracker = Tracker::new(config.max_http_connections as usize, fd_budget);
        let conns = Conns {
            router: router(AppState::new(
                config.clone(),
                real_ip.clone(),
                streams.clone(),
                tracker.clone(),
            )),
            streams,
            real_ip,
            write_timeout: config.write_timeout,
            head_timeout: config.head_timeout,
            tracker,
        };
        let backlog = effective_backlog();
        tracing::info!(nofile, fd_budget, ?backlog, "connection budget");
        if backlog.is_some_and(|b| b < BACKLOG_WANTED) {
            tracing::warn!(
                ?backlog,
                "the listen backlog is small for a reconnect storm; raise net.core.somaxconn to {BACKLOG_WANTED} or more"
            );
        }
        if config.max_connections > fd_budget {
            tracing::warn!(
                max_connections = config.max_connections,
                nofile,
                fd_budget,
                "--max-connections exceeds the open-files budget (RLIMIT_NOFILE less {} \
                 reserved): the node runs out of descriptors at {fd_budget} connections, \
                 before the stream limit; raise the limit (ulimit -n, systemd LimitNOFILE, \
                 compose ulimits) or lower FANOUT_MAX_CONNECTIONS",
                crate::admission::FD_RESERVE,
            );
        }
        let task = tokio::spawn(conn::serve(listener, conns, config.drain_timeout));
        tracing::info!(%addr, node = broker.hub().node_tag(), "fanout listening");
        Ok(Self {
            addr,
            broker,
            shutdown,
            drain: config.drain_timeout,
            close_spread: config.close_spread,
            task,
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    /// Stop accepting, end every stream (clients reconnect elsewhere), and
    /// wait up to the drain timeout for connections to close.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        // Spread, so the clients do not all land on the other nodes at
        // once; within half the drain, so they are all closed before it.
        let spread = self.close_spread.min(self.drain / 2);
        self.broker
            .hub()
            .close_all_within(crate::client::CloseReason::Shutdown, spread);
        self.broker.close().await;
        if let Some(c) = self.broker.companion() {
            c.close();
        }
        // The accept loop drains for at most the drain timeout itself.
        match tokio::time::timeout(self.drain + Duration::from_secs(1), self.task).await {
            Ok(joined) => joined.context("server task failed"),
            Err(_) => {
                tracing::warn!(drain = ?self.drain, "drain timeout; exiting with open connections");
                Ok(())
            }
        }
    }
}
