//! Cluster membership: a hash of node entries and a sorted set of the
//! times until which each node counts as alive, both under one hash tag.

use std::{sync::Arc, time::Duration};

use redis::AsyncCommands;

use super::{Shared, topology, unix_ms};
use crate::relay::{NodeInfo, RelayError};

impl Shared {
    /// With Sentinels: ask them every heartbeat which server is the
    /// primary; when they name another one (or the one in use says it is
    /// no longer a primary), switch to it and make the subscriber reconnect
    /// there. Publishes do not go to a former primary for longer than a
    /// heartbeat interval after the Sentinels switched.
    async fn check_primary(&self) {
        let Some(backend) = self.backend.get().filter(|b| b.is_sentinel()) else {
            return;
        };
        let Some(single) = backend.single() else {
            return;
        };
        if !matches!(topology::is_primary(&single.client).await, Ok(true)) {
            self.set_commands(Err(format!("{} is no longer the primary", single.address)));
        }
        match backend.follow_sentinels().await {
            Ok(true) => {
                self.set_commands(Ok(()));
                self.links[0].reconnect.lock().cancel();
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot find the primary through Sentinel"),
        }
    }

    /// Whether the node with tag `tag` is a live member of the cluster.
    pub(super) async fn is_alive(&self, tag: &str) -> Result<bool, RelayError> {
        let mut conn = self.commands()?;
        let until: Option<f64> = self
            .command("ZSCORE", conn.zscore(&self.alive_key, tag))
            .await?;
        Ok(until.is_some_and(|t| t as u64 > unix_ms()))
    }

    /// The live members of the cluster.
    pub(super) async fn nodes(&self) -> Result<Vec<NodeInfo>, RelayError> {
        let s = self;
        let mut conn = s.commands()?;
        let tags: Vec<String> = s
            .command(
                "ZRANGEBYSCORE",
                redis::cmd("ZRANGEBYSCORE")
                    .arg(&s.alive_key)
                    .arg(unix_ms())
                    .arg("+inf")
                    .query_async(&mut conn),
            )
            .await?;
        if tags.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<String>> = s
            .command(
                "HMGET",
                redis::cmd("HMGET")
                    .arg(&s.members_key)
                    .arg(&tags)
                    .query_async(&mut conn),
            )
            .await?;
        let mut nodes: Vec<NodeInfo> = values
            .into_iter()
            .flatten()
            .filter_map(|v| serde_json::from_str(&v).ok())
            .collect();
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    /// Leave the cluster: stop the heartbeat, then remove this node's entry.
    pub(super) async fn leave(&self) {
        let s = self;
        s.stop.cancel();
        // A heartbeat in flight must land before the entry is removed,
        // or it would list this node again.
        let heartbeat = s.heartbeat.lock().take();
        if let Some(h) = heartbeat {
            let _ = h.await;
        }
        let tag = s.hub.node_tag();
        let Ok(mut conn) = s.commands() else { return };
        let mut pipe = redis::pipe();
        pipe.zrem(&s.alive_key, tag).ignore();
        pipe.hdel(&s.members_key, tag).ignore();
        let _ = s.command("ZREM", pipe.query_async::<()>(&mut conn)).await;
    }
}

/// Refreshes this node's heartbeat key; its success or failure is also the
/// health of the command connection.
pub(super) async fn run_heartbeat(shared: Arc<Shared>) {
    let every = shared
        .config
        .heartbeat_interval
        .max(Duration::from_millis(100));
    let ttl = (every * 3).as_millis() as u64;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        shared.check_primary().await;
        if shared
            .stalled
            .swap(false, std::sync::atomic::Ordering::Relaxed)
            && let Some(backend) = shared.backend.get()
        {
            tracing::warn!("a Redis command timed out: opening new connections");
            if let Err(e) = backend.renew() {
                tracing::warn!(error = %e, "cannot renew the Redis connections");
            }
        }
        let info = NodeInfo::of(&shared.hub, shared.config.address, shared.started_at);
        let body = serde_json::to_string(&info).expect("node info serialises");
        let tag = shared.hub.node_tag();
        let now = unix_ms();
        let Ok(mut conn) = shared.commands() else {
            continue;
        };
        let mut pipe = redis::pipe();
        pipe.hset(&shared.members_key, tag, body).ignore();
        pipe.zadd(&shared.alive_key, tag, now + ttl).ignore();
        pipe.cmd("ZRANGEBYSCORE")
            .arg(&shared.alive_key)
            .arg("-inf")
            .arg(format!("({now}"));
        let Ok((dead,)) = shared
            .command("HSET", pipe.query_async::<(Vec<String>,)>(&mut conn))
            .await
        else {
            continue;
        };
        if !dead.is_empty() {
            // Forget members past their time.
            let mut pipe = redis::pipe();
            pipe.zrem(&shared.alive_key, &dead).ignore();
            pipe.hdel(&shared.members_key, &dead).ignore();
            let _ = shared
                .command("ZREM", pipe.query_async::<()>(&mut conn))
                .await;
        }
    }
}
