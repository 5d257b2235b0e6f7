//! Starting and stopping a node: the listener, the relay, the HTTP server,
//! and graceful shutdown.

use std::{io, net::SocketAddr, pin::Pin, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    task::JoinHandle,
};
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;

use crate::{
    auth::{Authenticator, KeySource},
    broker::Broker,
    config::Config,
    http::{AppState, PeerAddr, router},
    hub::{Hub, HubConfig},
    protocol,
    redis_relay::{RedisConfig, RedisRelay},
    relay::{LocalRelay, Relay},
};

/// Listen backlog. tokio's `TcpListener::bind` uses 128, which turns a
/// reconnect storm of thousands of clients into seconds of SYN retries.
const BACKLOG: u32 = 4096;

/// Accepted connections get a write timeout: a peer that stops reading
/// stalls hyper's write, and without a timeout that connection (and its
/// buffers) would live forever. The timeout only runs while a write is
/// pending, so quiet streams are unaffected.
struct TimeoutListener {
    inner: TcpListener,
    write_timeout: Duration,
}

impl axum::serve::Listener for TimeoutListener {
    type Io = Pin<Box<TimeoutStream<TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.inner.accept().await {
                Ok((stream, addr)) => {
                    let _ = stream.set_nodelay(true);
                    let mut stream = TimeoutStream::new(stream);
                    stream.set_write_timeout(Some(self.write_timeout));
                    return (Box::pin(stream), addr);
                }
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => {
                    // EMFILE and friends: the node is at a resource limit.
                    // Back off briefly instead of spinning.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

fn is_per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

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

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TimeoutListener>>
    for PeerAddr
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, TimeoutListener>) -> Self {
        PeerAddr(*stream.remote_addr())
    }
}

/// Answers subscription requests that other nodes forwarded to this one.
async fn serve_forwarded(
    broker: Broker,
    mut incoming: tokio::sync::mpsc::Receiver<crate::relay::Incoming>,
    shutdown: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            next = incoming.recv() => next,
            _ = shutdown.cancelled() => return,
        };
        let Some(crate::relay::Incoming { request, reply }) = next else {
            return;
        };
        let broker = broker.clone();
        tokio::spawn(async move {
            let _ = reply.send(broker.subscribe_local(request).await);
        });
    }
}

/// A running node.
pub struct Server {
    addr: SocketAddr,
    broker: Broker,
    shutdown: CancellationToken,
    drain: Duration,
    task: JoinHandle<io::Result<()>>,
}

impl Server {
    /// Bind the listener and start serving.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        let listener =
            bind(config.listen).with_context(|| format!("cannot listen on {}", config.listen))?;
        let addr = listener.local_addr()?;
        let hub = Hub::new(HubConfig {
            node_tag: protocol::random_alphanumeric(protocol::NODE_TAG_LEN),
            chunk_size: config.chunk_size as usize,
            queue_capacity: config.client_queue as usize,
            workers: config.fanout_workers,
        });
        let relay: Arc<dyn Relay> = match &config.redis_url {
            Some(url) if !url.is_empty() => RedisRelay::start(
                hub.clone(),
                RedisConfig {
                    url: url.clone(),
                    prefix: config.redis_prefix.clone(),
                    forward_timeout: config.forward_timeout,
                    heartbeat_interval: config.heartbeat_interval,
                    address: addr,
                },
            )
            .context("invalid Redis configuration")?,
            _ => LocalRelay::start(hub.clone(), addr),
        };
        let incoming = relay.take_incoming();
        let auth = Authenticator::new(match &config.jwt_secret {
            Some(s) if !s.is_empty() => KeySource::Hs256(s.as_bytes().to_vec()),
            _ => KeySource::None,
        });
        let broker = Broker::new(hub, relay, auth);
        let shutdown = CancellationToken::new();
        if let Some(incoming) = incoming {
            tokio::spawn(serve_forwarded(broker.clone(), incoming, shutdown.clone()));
        }
        // Install the recorder before the first request counts anything.
        crate::metrics::handle();
        let app = router(AppState::new(
            broker.clone(),
            config.clone(),
            shutdown.clone(),
        ));
        let listener = TimeoutListener {
            inner: listener,
            write_timeout: config.write_timeout,
        };
        let signal = shutdown.clone().cancelled_owned();
        let task = tokio::spawn(async move {
            axum::serve(
                listener,
                app.into_make_service_with_connect_info::<PeerAddr>(),
            )
            .with_graceful_shutdown(signal)
            .await
        });
        tracing::info!(%addr, node = broker.hub().node_tag(), "fanout listening");
        Ok(Self {
            addr,
            broker,
            shutdown,
            drain: config.drain_timeout,
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
        self.broker
            .hub()
            .close_all(crate::client::CloseReason::Shutdown);
        self.broker.close().await;
        match tokio::time::timeout(self.drain, self.task).await {
            Ok(joined) => {
                joined.context("server task failed")??;
                Ok(())
            }
            Err(_) => {
                tracing::warn!(drain = ?self.drain, "drain timeout; exiting with open connections");
                Ok(())
            }
        }
    }
}
