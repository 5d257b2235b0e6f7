//! Cluster membership: a hash of node entries and a sorted set of the
//! times until which each node counts as alive, both under one hash tag.
//!
//! Those times are on Redis's clock: every script below reads `TIME`
//! inside Redis, so a node whose wall clock is off by any amount is listed
//! exactly as long as any other (see `clock.rs`). A heartbeat also gives
//! this node a sample of Redis's clock.

use std::{sync::Arc, time::Duration};

use super::{Shared, topology};
use crate::relay::{NodeInfo, RelayError};

/// Redis's time in ms, in a script. `replicate_commands` lets a script
/// that read `TIME` write on Redis before 7 (a no-op since).
const NOW: &str = "if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
";

/// KEYS: members hash, alive set. ARGV: tag, entry, TTL (ms). Refreshes
/// the entry and its deadline, forgets the members past theirs, and
/// returns `TIME` (seconds, microseconds).
const HEARTBEAT: &str = "
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', '(' .. now, 'LIMIT', 0, 1000)
if #dead > 0 then
  redis.call('ZREM', KEYS[2], unpack(dead))
  redis.call('HDEL', KEYS[1], unpack(dead))
end
return t";

/// KEYS: members hash, alive set. The entries of the live members.
const LIVE: &str = "
local tags = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf')
if #tags == 0 then return {} end
return redis.call('HMGET', KEYS[1], unpack(tags))";

/// KEYS: alive set. ARGV: tag. 1 if that node is a live member.
const ALIVE: &str = "
local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
if deadline and tonumber(deadline) > now then return 1 end
return 0";

fn script(body: &str) -> redis::Cmd {
    let mut c = redis::cmd("EVAL");
    c.arg(format!("{NOW}{body}"));
    c
}

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
        let mut cmd = script(ALIVE);
        cmd.arg(1).arg(&self.alive_key).arg(tag);
        let alive: i64 = self.command("ZSCORE", cmd.query_async(&mut conn)).await?;
        Ok(alive == 1)
    }

    /// The live members of the cluster.
    pub(super) async fn nodes(&self) -> Result<Vec<NodeInfo>, RelayError> {
        let s = self;
        let mut conn = s.commands()?;
        let mut cmd = script(LIVE);
        cmd.arg(2).arg(&s.members_key).arg(&s.alive_key);
        let values: Vec<Option<String>> = s
            .command("ZRANGEBYSCORE", cmd.query_async(&mut conn))
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
        let Ok(mut conn) = shared.commands() else {
            continue;
        };
        let mut cmd = script(HEARTBEAT);
        cmd.arg(2)
            .arg(&shared.members_key)
            .arg(&shared.alive_key)
            .arg(tag)
            .arg(body)
            .arg(ttl);
        let before = tokio::time::Instant::now();
        let Ok((secs, micros)) = shared
            .command("HSET", cmd.query_async::<(u64, u64)>(&mut conn))
            .await
        else {
            continue;
        };
        let first = shared.clock.now().is_none();
        shared.clock.record(
            before,
            tokio::time::Instant::now(),
            secs * 1_000_000 + micros,
        );
        if first {
            shared.report_health();
        }
    }
}
