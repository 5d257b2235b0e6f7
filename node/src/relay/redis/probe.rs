//! Health from the publish path itself, and the cluster connections kept
//! reachable through any live node.
//!
//! A node is healthy only if a publish would succeed. Pinging a connection
//! or writing the membership key proves little: on a Redis Cluster the
//! membership key lives on one shard while publishes go to all of them, and
//! a Redis user may be allowed `PING` and `HSET` but not `EVAL`. So every
//! heartbeat interval this task runs the real publish command (the history
//! script, or `PUBLISH`/`SPUBLISH` without history) for a probe topic of
//! each partition, routed exactly as a publish of that partition is, and
//! each publish records its own outcome too. A partition whose last
//! publish or probe failed is unhealthy (see `Shared::health` for what
//! that makes of the node's health).
//!
//! Probe topics are `_fanout_probe_<n>`, the first `n` whose partition is
//! the partition probed; their history keys live `--history-ttl` like any
//! topic's, and nobody subscribes to their channels.
//!
//! On a cluster, the same task asks a live node for the cluster's nodes
//! (`CLUSTER SLOTS`) every interval, so that the list of nodes to reach
//! the cluster through never depends on the node the URL named. When a
//! probe fails for want of a connection (the crate lost its view of the
//! cluster, e.g. its seed died), the cluster connections are built anew
//! from every node known; such rebuilds are paced (backoff from one
//! heartbeat interval to [`MAX_REBUILD_BACKOFF`]).
//!
//! At start, [`Shared::check_permissions`] asks Redis (`ACL DRYRUN`)
//! whether this node's Redis user may run every command Fanout sends; a
//! missing one is logged and named in health.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::future::join_all;
use redis::ErrorKind;

use super::{COMMAND_TIMEOUT, Shared, partition_of, topology::Commands};

/// Longest wait between two rebuilds of the cluster connections.
const MAX_REBUILD_BACKOFF: Duration = Duration::from_secs(10);

/// Why a probe failed, and whether for want of a connection.
struct Failure {
    reason: String,
    connection: bool,
}

fn is_connection_error(e: &redis::RedisError) -> bool {
    e.kind() == ErrorKind::ClusterConnectionNotFound
        || e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
}

impl Shared {
    /// The probe topic of partition `k`.
    fn probe_topic(&self, k: usize) -> &str {
        let partitions = self.partitions().unwrap_or(1);
        let topics = self.probe_topics.get_or_init(|| {
            let mut topics = vec![String::new(); partitions as usize];
            let mut missing = partitions as usize;
            let mut n = 0u64;
            while missing > 0 {
                let t = format!("_fanout_probe_{n}");
                let p = partition_of(&t, partitions) as usize;
                if topics[p].is_empty() {
                    topics[p] = t;
                    missing -= 1;
                }
                n += 1;
            }
            topics
        });
        &topics[k]
    }

    /// One publish of partition `k`'s probe topic, routed as a publish of
    /// that partition is.
    async fn probe(&self, k: usize, conn: Commands) -> Result<(), Failure> {
        let topic = self.probe_topic(k).to_owned();
        let cmd = if self.history_on() {
            let envelope = format!(r#"{{"topic":"{topic}","data":null}}"#).into_bytes();
            self.history_cmd(&topic, envelope, None)
        } else {
            self.publish_cmd(self.topic_channel(&topic), b"{}".to_vec())
        };
        let primary = self.links[k].primary.lock().clone();
        let mut conn = conn;
        let run = async {
            match (
                &mut conn,
                primary.as_deref().and_then(super::topology::route_to),
            ) {
                (Commands::Cluster(c), Some(route)) => c
                    .route_command(cmd, redis::cluster_routing::RoutingInfo::SingleNode(route))
                    .await
                    .map(|_| ()),
                _ => cmd.query_async::<redis::Value>(&mut conn).await.map(|_| ()),
            }
        };
        match tokio::time::timeout(COMMAND_TIMEOUT, run).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure {
                reason: format!("publish probe failed: {e}"),
                connection: is_connection_error(&e),
            }),
            Err(_) => Err(Failure {
                reason: "publish probe timed out".into(),
                connection: true,
            }),
        }
    }

    /// Probe every partition; true when one failed for want of a
    /// connection.
    async fn probe_partitions(&self) -> bool {
        let Ok(conn) = self.commands() else {
            return false;
        };
        let n = self.active_links().len();
        let results = join_all((0..n).map(|k| self.probe(k, conn.clone()))).await;
        let mut broken = false;
        for (k, r) in results.into_iter().enumerate() {
            match r {
                Ok(()) => self.set_publish(k, Ok(())),
                Err(f) => {
                    // A partition the cluster lost cannot be reached
                    // through any node: no reason to rebuild for it.
                    broken |= f.connection && self.links[k].orphaned.lock().is_none();
                    self.set_publish(k, Err(f.reason));
                }
            }
        }
        broken
    }

    /// Refresh the list of cluster nodes from any node that answers; the
    /// URL's seeds stay on it, so a list of dead nodes cannot lock the node
    /// out for good. The same answer tells whether the cluster still has a
    /// live primary for the membership keys.
    async fn refresh_nodes(&self) {
        let Some(super::topology::Backend::Cluster { template, .. }) = self.backend.get() else {
            return;
        };
        let known = self.known_nodes.lock().clone();
        for (host, port) in &known {
            if let Ok((owner, found, failed)) =
                super::subscriber::slots_from(template, host, *port, &self.members_key).await
                && !found.is_empty()
            {
                self.remember_nodes(found);
                let mut orphaned = self.membership_orphaned.lock();
                match owner {
                    Some(o) if !failed.contains(&o) => *orphaned = None,
                    _ => {
                        orphaned.get_or_insert_with(Instant::now);
                    }
                }
                return;
            }
        }
    }

    /// The URL's seeds and `found`, as the nodes to ask.
    pub(super) fn remember_nodes(&self, found: Vec<(String, u16)>) {
        let mut nodes = self.target.addresses();
        for n in found {
            if !nodes.contains(&n) {
                nodes.push(n);
            }
        }
        *self.known_nodes.lock() = nodes;
    }

    /// Ask Redis whether this node's user may run every command Fanout
    /// sends (`ACL DRYRUN`, Redis 7), and keep the answer for health;
    /// logged at the `first` check and whenever it changes.
    pub(super) async fn check_permissions(&self, first: bool) {
        let Ok(mut conn) = self.commands() else {
            return;
        };
        let user: String = match self
            .bounded(
                "ACL WHOAMI",
                redis::cmd("ACL").arg("WHOAMI").query_async(&mut conn),
            )
            .await
        {
            Ok(u) => u,
            Err(e) => {
                if first {
                    tracing::info!(error = %e, "cannot check the Redis user's permissions; the publish probe still checks the publish path");
                }
                return;
            }
        };
        let topic = self.probe_topic(0).to_owned();
        let key = |kind: &str| match self.partitions() {
            Some(_) => format!("{}:{kind}:{topic}", self.partition_tag(0)),
            None => format!("{}{kind}:{topic}", self.config.prefix),
        };
        let (m, h) = (key("m"), key("h"));
        let channel = self.topic_channel(&topic);
        let members = self.members_key.clone();
        let alive = self.alive_key.clone();
        let cluster = self.partitions().is_some();
        let (publish, subscribe, unsubscribe) = if cluster {
            ("SPUBLISH", "SSUBSCRIBE", "SUNSUBSCRIBE")
        } else {
            ("PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE")
        };
        let mut needed: Vec<Vec<String>> = vec![
            vec!["PING".into()],
            vec![publish.into(), channel.clone(), "x".into()],
            vec![subscribe.into(), channel.clone()],
            vec![unsubscribe.into(), channel.clone()],
            vec!["HSET".into(), members.clone(), "n".into(), "v".into()],
            vec!["HDEL".into(), members.clone(), "n".into()],
            vec!["HMGET".into(), members, "n".into()],
            vec!["ZADD".into(), alive.clone(), "1".into(), "n".into()],
            vec!["ZREM".into(), alive.clone(), "n".into()],
            vec!["ZSCORE".into(), alive.clone(), "n".into()],
            vec!["ZRANGEBYSCORE".into(), alive, "0".into(), "+inf".into()],
        ];
        if self.history_on() {
            needed.extend([
                vec![
                    "EVAL".into(),
                    "return 1".into(),
                    "2".into(),
                    m.clone(),
                    h.clone(),
                ],
                vec!["HGET".into(), m.clone(), "e".into()],
                vec!["HSET".into(), m.clone(), "e".into(), "x".into()],
                vec!["HINCRBY".into(), m.clone(), "s".into(), "1".into()],
                vec!["HMGET".into(), m.clone(), "e".into(), "s".into()],
                vec!["DEL".into(), h.clone()],
                vec!["XADD".into(), h.clone(), "*".into(), "m".into(), "x".into()],
                vec!["XRANGE".into(), h.clone(), "-".into(), "+".into()],
                vec!["PEXPIRE".into(), h, "1000".into()],
                vec!["PEXPIRE".into(), m, "1000".into()],
                // A resume looks its cursor up in the ids set.
                vec!["ZSCORE".into(), key("i"), "x".into()],
            ]);
        }
        if matches!(self.target, super::topology::Target::Plain(_)) {
            // To find out whether the URL names a cluster node.
            needed.push(vec!["INFO".into(), "cluster".into()]);
        }
        if cluster {
            needed.push(vec!["CLUSTER".into(), "SLOTS".into()]);
            needed.push(vec!["CLUSTER".into(), "NODES".into()]);
            needed.push(vec!["CLUSTER".into(), "KEYSLOT".into(), "x".into()]);
        }
        if self.backend.get().is_some_and(|b| b.is_sentinel()) {
            needed.push(vec!["ROLE".into()]);
        }
        let mut missing = Vec::new();
        for args in &needed {
            let mut c = redis::cmd("ACL");
            c.arg("DRYRUN").arg(&user).arg(args);
            match self
                .bounded("ACL DRYRUN", c.query_async::<String>(&mut conn))
                .await
            {
                Ok(answer) if answer == "OK" => {}
                Ok(answer) => {
                    missing.push(format!("{}: {answer}", args[..args.len().min(2)].join(" ")))
                }
                Err(e) => {
                    if first {
                        tracing::info!(error = %e, "cannot check the Redis user's permissions (ACL DRYRUN); the publish probe still checks the publish path");
                    }
                    return;
                }
            }
        }
        let before = std::mem::replace(&mut *self.missing_permissions.lock(), missing.clone());
        if before == missing && !first {
            return;
        }
        if missing.is_empty() {
            tracing::info!(user, "the Redis user may run every command Fanout needs");
        } else {
            tracing::error!(user, missing = ?missing, "the Redis user may not run commands Fanout needs (see docs/operations.md, Redis ACL)");
        }
        self.report_health();
    }
}

/// Probes the publish path every heartbeat interval, refreshes the list of
/// cluster nodes, and rebuilds the cluster connections when they lost the
/// cluster. A task of its own, so that a slow answer never holds up the
/// membership heartbeat.
pub(super) async fn run_probe(shared: Arc<Shared>) {
    let every = shared
        .config
        .heartbeat_interval
        .max(Duration::from_millis(100));
    shared.check_permissions(true).await;
    let mut tick = tokio::time::interval(every);
    let mut backoff = every;
    let mut next_rebuild = Instant::now();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        if !shared.missing_permissions.lock().is_empty() {
            // Until the user is granted what it lacks.
            shared.check_permissions(false).await;
        }
        let broken = shared.probe_partitions().await;
        // Health may change with time alone (`LOST_AFTER`).
        shared.report_health();
        let Some(backend) = shared.backend.get() else {
            continue;
        };
        if backend.partitions().is_none() {
            continue;
        }
        shared.refresh_nodes().await;
        if !broken {
            backoff = every;
            continue;
        }
        if Instant::now() < next_rebuild {
            continue;
        }
        let known = shared.known_nodes.lock().clone();
        match backend.rebuild(&known).await {
            Ok(nodes) => {
                tracing::warn!(
                    nodes = nodes.len(),
                    "the Redis Cluster connection lost the cluster: rebuilt it from every known node"
                );
                shared.remember_nodes(nodes);
            }
            Err(e) => {
                tracing::warn!(error = %e, ?backoff, "cannot rebuild the Redis Cluster connection")
            }
        }
        next_rebuild = Instant::now() + backoff;
        backoff = (backoff * 2).min(MAX_REBUILD_BACKOFF);
    }
}
