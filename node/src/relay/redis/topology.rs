//! Which Redis the relay talks to, and how: one setting, `--redis-url`,
//! names a standalone Redis or a Redis Cluster.
//!
//! * `redis://[user:password@]host:port[/0]` (or `rediss://` for TLS,
//!   verified against the system's roots, or `SSL_CERT_FILE`): a
//!   standalone Redis. If that
//!   address turns out to be a cluster node (`cluster_enabled:1`), the relay
//!   switches to cluster mode, with that node as the seed, and logs it.
//!   Another database number than 0 is refused: Redis pub/sub ignores it,
//!   so it would not isolate two deployments (`--redis-prefix` does).
//! * `redis+cluster://[user:password@]h1:p1,h2:p2,...` (`rediss+cluster://`
//!   for TLS): a Redis Cluster, found through any of the seeds.
//! * `redis+sentinel://[user:password@]s1:p1,s2:p2/<master name>`: the
//!   primary that a group of Sentinels names (the credentials are the
//!   primary's; the Sentinels are asked without, in plain text;
//!   `rediss+sentinel://` speaks TLS to the primary). The relay asks the
//!   Sentinels again at every reconnect, checks `ROLE` before using an
//!   address, and checks it again every heartbeat: it never publishes to a
//!   replica.
//!
//! A cluster is reached through its seeds (one is enough), but never
//! depends on them: the node asks a seed for every node (`CLUSTER SLOTS`)
//! and builds the crate's cluster connection with all of them as its
//! initial nodes, so that it can start over through any live one (the
//! crate starts over from its initial nodes only). `probe.rs` refreshes the
//! list every heartbeat and rebuilds the connection if it still loses the
//! cluster.
//!
//! In cluster mode, commands go through the crate's cluster connection,
//! which routes each by its key's slot and follows `MOVED`/failovers;
//! publishing uses `SPUBLISH`, and the subscriber keeps its own connection
//! per partition (see `partition.rs` and `subscriber.rs`).

use redis::{
    Cmd, IntoConnectionInfo, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
};

use std::sync::Arc;

use super::COMMAND_TIMEOUT;

/// What `--redis-url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// A standalone Redis (or a cluster node, found out on connect).
    Plain(String),
    /// Seeds of a Redis Cluster, each as a `redis://` URL.
    Cluster(Vec<String>),
    /// A primary named by Sentinels.
    Sentinel {
        /// Each Sentinel as a `redis://` URL, without credentials.
        sentinels: Vec<String>,
        master: String,
        /// Credentials (and options) for the primary, as a URL whose
        /// address is replaced by the primary's.
        template: String,
    },
}

impl Target {
    pub(super) fn parse(url: &str) -> anyhow::Result<Self> {
        let url = url.trim();
        if let Some(rest) = url.strip_prefix("redis+cluster://") {
            return Ok(Self::Cluster(seeds("redis", rest)?));
        }
        if let Some(rest) = url.strip_prefix("rediss+cluster://") {
            return Ok(Self::Cluster(seeds("rediss", rest)?));
        }
        if let Some((tls, rest)) = url
            .strip_prefix("redis+sentinel://")
            .map(|r| (false, r))
            .or_else(|| url.strip_prefix("rediss+sentinel://").map(|r| (true, r)))
        {
            let (hosts, master) = rest.split_once('/').ok_or_else(|| {
                anyhow::anyhow!("a redis+sentinel:// URL ends with /<master name>")
            })?;
            let master = master.split(['?', '/']).next().unwrap_or_default();
            anyhow::ensure!(
                !master.is_empty(),
                "a redis+sentinel:// URL ends with /<master name>"
            );
            let (auth, hosts) = match hosts.rsplit_once('@') {
                Some((a, h)) => (format!("{a}@"), h),
                None => (String::new(), hosts),
            };
            let sentinels = seeds("redis", hosts)?;
            let scheme = if tls { "rediss" } else { "redis" };
            let template = format!("{scheme}://{auth}127.0.0.1:6379");
            template.as_str().into_connection_info()?;
            return Ok(Self::Sentinel {
                sentinels,
                master: master.to_owned(),
                template,
            });
        }
        // Let the crate judge the plain form (and refuse what it cannot do,
        // such as TLS without the feature).
        let info = url.into_connection_info()?;
        anyhow::ensure!(
            info.redis_settings().db() == 0,
            "{} names Redis database {}, but pub/sub channels are shared by all \
             databases of a server: a database number does not keep two deployments \
             apart (each would receive the other's messages). Use database 0 and give \
             each deployment its own FANOUT_REDIS_PREFIX (--redis-prefix)",
            redact(url),
            info.redis_settings().db()
        );
        Ok(Self::Plain(url.to_owned()))
    }
}

impl Target {
    /// The `host:port` of every address it names.
    pub(super) fn addresses(&self) -> Vec<(String, u16)> {
        let urls = match self {
            Self::Plain(u) => std::slice::from_ref(u),
            Self::Cluster(seeds) => &seeds[..],
            Self::Sentinel { sentinels, .. } => &sentinels[..],
        };
        urls.iter()
            .filter_map(|u| match u.as_str().into_connection_info().ok()?.addr() {
                redis::ConnectionAddr::Tcp(h, p)
                | redis::ConnectionAddr::TcpTls {
                    host: h, port: p, ..
                } => Some((h.clone(), *p)),
                _ => None,
            })
            .collect()
    }
}

/// `user:pass@h1:p1,h2:p2/...` into one URL per host.
fn seeds(scheme: &str, rest: &str) -> anyhow::Result<Vec<String>> {
    let rest = rest.split(['/', '?']).next().unwrap_or_default();
    let (auth, hosts) = match rest.rsplit_once('@') {
        Some((a, h)) => (format!("{a}@"), h),
        None => (String::new(), rest),
    };
    let urls: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("{scheme}://{auth}{h}"))
        .collect();
    anyhow::ensure!(
        !urls.is_empty(),
        "a redis+cluster:// URL needs at least one host"
    );
    for u in &urls {
        u.as_str().into_connection_info()?;
    }
    Ok(urls)
}

/// The connection commands (publish, membership) go through.
#[derive(Clone)]
pub(super) enum Commands {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Commands {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// One Redis server: the client for new connections, the commands, and
/// the history reads.
pub(super) struct Single {
    pub(super) client: redis::Client,
    pub(super) commands: Commands,
    /// A connection of its own for bulk history reads (catch-up, replay),
    /// so publishes never queue behind their replies.
    pub(super) reads: Commands,
    /// `host:port`.
    pub(super) address: String,
}

impl Single {
    fn new(client: redis::Client, address: String) -> Result<Self, String> {
        let manager = || {
            ConnectionManager::new_lazy_with_config(
                client.clone(),
                ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(std::time::Duration::from_secs(1)))
                    .set_response_timeout(Some(COMMAND_TIMEOUT))
                    .set_number_of_retries(2)
                    .set_max_delay(std::time::Duration::from_millis(500)),
            )
            .map_err(|e| e.to_string())
        };
        Ok(Self {
            commands: Commands::Single(manager()?),
            reads: Commands::Single(manager()?),
            client,
            address,
        })
    }
}

/// The relay's view of Redis, once it has been reached.
pub(super) enum Backend {
    Standalone {
        /// Replaced when Sentinel names another primary.
        current: parking_lot::RwLock<Arc<Single>>,
        /// Set when the primary comes from Sentinels.
        sentinel: Option<SentinelSpec>,
    },
    Cluster {
        /// Credentials and options for connections to single cluster nodes.
        template: redis::ConnectionInfo,
        /// Replaced by [`Backend::rebuild`] when it stops working.
        conns: parking_lot::RwLock<ClusterConns>,
        partitions: u16,
    },
}

/// The cluster connections in use, and the nodes they were built from.
pub(super) struct ClusterConns {
    commands: Commands,
    /// A cluster connection of its own for bulk history reads.
    reads: Commands,
    /// Every node `CLUSTER SLOTS` named when they were built: the crate
    /// reconnects through these (its "initial nodes") when it has lost
    /// its view, so none of them may be the only way in.
    pub(super) nodes: Vec<(String, u16)>,
}

/// Where to ask for the primary.
pub(super) struct SentinelSpec {
    sentinels: Vec<String>,
    master: String,
    template: redis::ConnectionInfo,
}

impl SentinelSpec {
    /// Ask the Sentinels, in turn, for the primary, and check that it says
    /// it is one.
    pub(super) async fn resolve(&self) -> Result<(redis::Client, String), String> {
        let mut last = String::from("no Sentinel answered");
        for url in &self.sentinels {
            match self.ask(url).await {
                Ok(found) => return Ok(found),
                Err(e) => last = format!("{}: {e}", redact(url)),
            }
        }
        Err(last)
    }

    async fn ask(&self, url: &str) -> Result<(redis::Client, String), String> {
        let sentinel = redis::Client::open(url).map_err(|e| e.to_string())?;
        let query = async {
            let mut conn = sentinel.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&self.master)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        let (host, port) = tokio::time::timeout(COMMAND_TIMEOUT, query)
            .await
            .map_err(|_| "timed out".to_owned())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no primary named {:?}", self.master))?;
        let info = at(&self.template, &host, port);
        let client = redis::Client::open(info).map_err(|e| e.to_string())?;
        let address = format!("{host}:{port}");
        if !is_primary(&client).await? {
            return Err(format!("{address} is not a primary (yet)"));
        }
        Ok((client, address))
    }
}

/// Whether the server behind `client` answers `ROLE` with `master`.
pub(super) async fn is_primary(client: &redis::Client) -> Result<bool, String> {
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("ROLE")
            .query_async::<Vec<Value>>(&mut conn)
            .await
    };
    let role = tokio::time::timeout(COMMAND_TIMEOUT, query)
        .await
        .map_err(|_| "ROLE timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    Ok(matches!(role.first(), Some(Value::BulkString(r)) if r == b"master"))
}

impl Backend {
    pub(super) fn commands(&self) -> Commands {
        match self {
            Self::Standalone { current, .. } => current.read().commands.clone(),
            Self::Cluster { conns, .. } => conns.read().commands.clone(),
        }
    }

    /// The connection for bulk history reads.
    pub(super) fn reads(&self) -> Commands {
        match self {
            Self::Standalone { current, .. } => current.read().reads.clone(),
            Self::Cluster { conns, .. } => conns.read().reads.clone(),
        }
    }

    pub(super) fn is_sentinel(&self) -> bool {
        matches!(
            self,
            Self::Standalone {
                sentinel: Some(_),
                ..
            }
        )
    }

    /// The standalone server in use now.
    pub(super) fn single(&self) -> Option<Arc<Single>> {
        match self {
            Self::Standalone { current, .. } => Some(current.read().clone()),
            Self::Cluster { .. } => None,
        }
    }

    /// New standalone connections in place of the current ones. The
    /// connection manager reconnects on errors only; a Redis that came back
    /// at another address (a restarted pod) leaves the old connection
    /// silent, not closed, and every command on it times out until the
    /// kernel gives up on it, many minutes later.
    pub(super) fn renew(&self) -> Result<(), String> {
        let Self::Standalone { current, .. } = self else {
            return Ok(());
        };
        let old = current.read().clone();
        *current.write() = Arc::new(Single::new(old.client.clone(), old.address.clone())?);
        Ok(())
    }

    /// With Sentinels: ask them for the primary, and switch to it if it
    /// moved. `Ok(true)` when it moved.
    pub(super) async fn follow_sentinels(&self) -> Result<bool, String> {
        let Self::Standalone {
            current,
            sentinel: Some(spec),
        } = self
        else {
            return Ok(false);
        };
        let (client, address) = spec.resolve().await?;
        if current.read().address == address {
            return Ok(false);
        }
        tracing::warn!(primary = %address, "Sentinel names a new primary: switching to it");
        *current.write() = Arc::new(Single::new(client, address)?);
        Ok(true)
    }

    pub(super) fn partitions(&self) -> Option<u16> {
        match self {
            Self::Standalone { .. } => None,
            Self::Cluster { partitions, .. } => Some(*partitions),
        }
    }
}

/// Reach Redis and find out what it is.
pub(super) async fn connect(target: &Target, partitions: u16) -> Result<Backend, String> {
    match target {
        Target::Cluster(seeds) => cluster(seeds, partitions).await,
        Target::Sentinel {
            sentinels,
            master,
            template,
        } => {
            let spec = SentinelSpec {
                sentinels: sentinels.clone(),
                master: master.clone(),
                template: template
                    .as_str()
                    .into_connection_info()
                    .map_err(|e| e.to_string())?,
            };
            let (client, address) = spec.resolve().await?;
            tracing::info!(primary = %address, master = %master, "Sentinel names the primary");
            Ok(Backend::Standalone {
                current: parking_lot::RwLock::new(Arc::new(Single::new(client, address)?)),
                sentinel: Some(spec),
            })
        }
        Target::Plain(url) => {
            let client = redis::Client::open(url.as_str()).map_err(|e| e.to_string())?;
            let mut probe =
                tokio::time::timeout(COMMAND_TIMEOUT, client.get_multiplexed_async_connection())
                    .await
                    .map_err(|_| "connect timed out".to_owned())?
                    .map_err(|e| e.to_string())?;
            let info: String = tokio::time::timeout(
                COMMAND_TIMEOUT,
                redis::cmd("INFO").arg("cluster").query_async(&mut probe),
            )
            .await
            .map_err(|_| "INFO timed out".to_owned())?
            .map_err(|e| e.to_string())?;
            if info.contains("cluster_enabled:1") {
                tracing::warn!(
                    url = %redact(url),
                    "this Redis is a cluster node: switching to cluster mode (name the cluster as redis+cluster://h1:p1,h2:p2 to say so)"
                );
                return cluster(std::slice::from_ref(url), partitions).await;
            }
            Ok(Backend::Standalone {
                current: parking_lot::RwLock::new(Arc::new(Single::new(client, redact(url))?)),
                sentinel: None,
            })
        }
    }
}

async fn cluster(seeds: &[String], partitions: u16) -> Result<Backend, String> {
    let template = seeds[0]
        .as_str()
        .into_connection_info()
        .map_err(|e| e.to_string())?;
    let candidates: Vec<(String, u16)> = Target::Cluster(seeds.to_vec()).addresses();
    let conns = cluster_conns(&template, &candidates).await?;
    tracing::info!(
        partitions,
        nodes = conns.nodes.len(),
        "connected to the Redis Cluster"
    );
    Ok(Backend::Cluster {
        template,
        conns: parking_lot::RwLock::new(conns),
        partitions,
    })
}

/// Learn every node of the cluster from the first of `candidates` that
/// answers `CLUSTER SLOTS`, then open the cluster connections with all of
/// them as the crate's initial nodes. Given one seed, the crate would
/// otherwise know only that seed once it has to start over (after it lost
/// every connection it had, e.g. when that seed dies): it retries the
/// dead seed without pause and every command fails with
/// `ClusterConnectionNotFound`.
pub(super) async fn cluster_conns(
    template: &redis::ConnectionInfo,
    candidates: &[(String, u16)],
) -> Result<ClusterConns, String> {
    let mut last = String::from("no cluster node known");
    let mut nodes = None;
    for (host, port) in candidates {
        match cluster_nodes(template, host, *port).await {
            Ok(found) if !found.is_empty() => {
                nodes = Some(found);
                break;
            }
            Ok(_) => last = format!("{host}:{port}: CLUSTER SLOTS names no node"),
            Err(e) => last = format!("{host}:{port}: {e}"),
        }
    }
    let nodes = nodes.ok_or(last)?;
    let mut builder = ClusterClientBuilder::new(nodes.iter().map(|(h, p)| at(template, h, *p)))
        .connection_timeout(std::time::Duration::from_secs(1))
        .response_timeout(COMMAND_TIMEOUT)
        .retries(3);
    let redis = template.redis_settings();
    if let Some(user) = redis.username() {
        builder = builder.username(user);
    }
    if let Some(password) = redis.password() {
        builder = builder.password(password);
    }
    let client = builder.build().map_err(|e| e.to_string())?;
    let connect = || async {
        tokio::time::timeout(COMMAND_TIMEOUT, client.get_async_connection())
            .await
            .map_err(|_| "cluster connect timed out".to_owned())?
            .map_err(|e| e.to_string())
    };
    Ok(ClusterConns {
        commands: Commands::Cluster(connect().await?),
        reads: Commands::Cluster(connect().await?),
        nodes,
    })
}

/// Every node (primaries and replicas) that the node at `host:port` names
/// in `CLUSTER SLOTS`.
pub(super) async fn cluster_nodes(
    template: &redis::ConnectionInfo,
    host: &str,
    port: u16,
) -> Result<Vec<(String, u16)>, String> {
    let client = redis::Client::open(at(template, host, port)).map_err(|e| e.to_string())?;
    let query = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async::<Vec<Value>>(&mut conn)
            .await
    };
    let ranges = tokio::time::timeout(std::time::Duration::from_secs(1), query)
        .await
        .map_err(|_| "timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut nodes: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Value::Array(items) = range else { continue };
        for n in items.iter().skip(2).filter_map(node_address) {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
    }
    Ok(nodes)
}

/// `host:port` of one node entry of a `CLUSTER SLOTS` range.
pub(super) fn node_address(v: &Value) -> Option<(String, u16)> {
    match v {
        Value::Array(node) => match (node.first(), node.get(1)) {
            (Some(Value::BulkString(h)), Some(Value::Int(p))) => {
                Some((String::from_utf8_lossy(h).into_owned(), *p as u16))
            }
            _ => None,
        },
        _ => None,
    }
}

impl Backend {
    /// On a cluster: new cluster connections, built from every node that
    /// any of `known` names now, in place of the current ones. The nodes
    /// they were built from.
    pub(super) async fn rebuild(
        &self,
        known: &[(String, u16)],
    ) -> Result<Vec<(String, u16)>, String> {
        let Self::Cluster {
            template, conns, ..
        } = self
        else {
            return Ok(Vec::new());
        };
        let fresh = cluster_conns(template, known).await?;
        let nodes = fresh.nodes.clone();
        *conns.write() = fresh;
        Ok(nodes)
    }

    /// The nodes the cluster connections were built from (empty
    /// standalone).
    pub(super) fn cluster_seeds(&self) -> Vec<(String, u16)> {
        match self {
            Self::Cluster { conns, .. } => conns.read().nodes.clone(),
            Self::Standalone { .. } => Vec::new(),
        }
    }
}

/// `template` (credentials, TLS, options) aimed at `host:port`: a TLS
/// template stays TLS.
pub(super) fn at(template: &redis::ConnectionInfo, host: &str, port: u16) -> redis::ConnectionInfo {
    let addr = match template.addr() {
        redis::ConnectionAddr::TcpTls {
            insecure,
            tls_params,
            ..
        } => redis::ConnectionAddr::TcpTls {
            host: host.to_owned(),
            port,
            insecure: *insecure,
            tls_params: tls_params.clone(),
        },
        _ => redis::ConnectionAddr::Tcp(host.to_owned(), port),
    };
    template.clone().set_addr(addr)
}

/// A URL without its password, for logs.
pub(super) fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// The routing that sends a command or pipeline to the cluster node at
/// `address` (`host:port`, as a link's `primary` holds it): publishes,
/// probes and history reads of a partition go to the primary its link
/// follows, not wherever the cluster connection's slot map points.
pub(super) fn route_to(address: &str) -> Option<redis::cluster_routing::SingleNodeRoutingInfo> {
    let (host, port) = address.rsplit_once(':')?;
    Some(redis::cluster_routing::SingleNodeRoutingInfo::ByAddress {
        host: host.to_owned(),
        port: port.parse().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_topology() {
        assert_eq!(
            Target::parse("redis://127.0.0.1:6379").unwrap(),
            Target::Plain("redis://127.0.0.1:6379".into())
        );
        assert_eq!(
            Target::parse("redis+cluster://u:p@h1:7000,h2:7001").unwrap(),
            Target::Cluster(vec![
                "redis://u:p@h1:7000".into(),
                "redis://u:p@h2:7001".into()
            ])
        );
        assert!(Target::parse("redis+cluster://").is_err());
        assert!(Target::parse("redis://127.0.0.1:6379/0").is_ok());
        let e = Target::parse("redis://u:secret@127.0.0.1:6379/1").unwrap_err();
        assert!(e.to_string().contains("FANOUT_REDIS_PREFIX"), "{e}");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert_eq!(
            Target::parse("redis+sentinel://u:p@s1:26379,s2:26380/mymaster").unwrap(),
            Target::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26380".into()],
                master: "mymaster".into(),
                template: "redis://u:p@127.0.0.1:6379".into(),
            }
        );
        assert!(Target::parse("redis+sentinel://s1:26379").is_err());
        assert!(Target::parse("nope://x").is_err());
        assert_eq!(redact("redis://u:secret@h:1"), "redis://***@h:1");
    }
}
