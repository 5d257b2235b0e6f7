//! Per-topic offsets and a bounded history in Redis, so a node never skips
//! a message silently.
//!
//! Every publish runs one Lua script (a batch is one pipeline of them): it
//! takes the topic's next offset (`HINCRBY` on the topic's meta hash), keeps
//! the topic's epoch (a random id, new whenever the meta hash is gone: the
//! topic's history was lost), appends the message to the topic's stream
//! (`XADD … MAXLEN <--history-size>`, entry id `<offset>-1`), refreshes
//! the stream's TTL (`--history-ttl`) and the meta hash's (much longer,
//! [`meta_ttl`]), and publishes the envelope with `"offset"` and `"epoch"`
//! added. One atomic step: no reader can see a message in the stream that
//! was not published, or the reverse.
//!
//! A quiet topic's messages expire; its offsets do not: the next message
//! continues them in the same epoch, so expiry is never taken for a loss.
//!
//! A message with a publisher `id` that the topic's recent ids already
//! hold (the ids set: the last `--history-size` ids, for `--history-ttl`)
//! is not published again: a publisher may retry a publish whose outcome it
//! does not know (a timeout) without delivering it twice.
//!
//! Keys: `<prefix>m:<topic>`, `<prefix>h:<topic>` and `<prefix>i:<topic>`;
//! on a cluster, `<prefix>{p<k>}:m:<topic>` and so on, with the topic
//! channel's hash tag, so the script's keys and channel share a slot.
//!
//! Each node remembers, per subscribed topic, the epoch and offset it last
//! dispatched. A message with the next offset is dispatched; one already
//! seen is dropped (a duplicate); a jump is filled from the stream first
//! (`XRANGE`), in order; another message at an offset already dispatched
//! (a failover reused it) is signalled, not dropped. After a subscriber
//! link reconnects, every topic on
//! it is caught up the same way before live messages resume. A gap the
//! stream cannot fill (trimmed, expired, or a new epoch) is counted
//! (`fanout_history_gaps_total`), logged, and, with `--on-gap close` (the
//! default), the topic's local streams are closed: the SDKs reconnect and
//! apps re-fetch their state, as after any missed message.

use std::{collections::VecDeque, sync::Arc, time::Duration};

use redis::Value;

use super::{Shared, topology::Commands};
use crate::{
    client::{Client, CloseReason},
    error::ApiError,
    metrics as m,
    protocol::SubKey,
    relay::{PendingReplay, RelayError},
};

/// How long a topic's meta hash (epoch and offset counter) outlives its
/// last publish, at least: [`meta_ttl`] takes the longer of this and twice
/// `--history-ttl`. The messages expire after `--history-ttl`; the meta
/// hash must outlive them by far, or a quiet topic's next message would
/// start a new epoch and every node would take the expiry for a loss. Its
/// cost: one hash of ~100 bytes per topic published in the last day.
pub(super) const META_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// The meta hash's TTL for a given `--history-ttl`.
pub(super) fn meta_ttl(history_ttl: Duration) -> Duration {
    META_TTL.max(history_ttl * 2)
}

/// The publish script. KEYS: meta hash, stream, ids (a sorted set: the
/// publisher ids of the last messages, scored by offset). ARGV: channel,
/// envelope without its closing brace, history size, history TTL (ms), a
/// fresh epoch, the publish command (`publish` or `spublish`), the meta
/// TTL (ms), and the message's publisher id (empty: none). Returns
/// `{offset, epoch, receivers}`; receivers is -1 for a message whose id
/// the topic's history already holds (a retry): it is not published again.
///
/// Expiry is not a loss: the meta hash lives [`meta_ttl`], so when the
/// stream expires, offsets go on from where they were. The meta keeps the
/// id of the last message (`i`); when the stream was gone, the script
/// first writes a cursor entry (`<last offset>-1`, field `c`: that id), so
/// a resume from the last message before the expiry still finds its
/// cursor and replays what came after.
///
/// First it checks (`redis.acl_check_cmd`, Redis 7) that the user may run
/// each command it calls, so that a refused one fails the script before it
/// took an offset or wrote the stream.
const PUBLISH_SCRIPT: &str = r#"
if redis.acl_check_cmd then
  for _, c in ipairs({{'hget', KEYS[1], 'e'}, {'zscore', KEYS[3], ''}, {'del', KEYS[2], KEYS[3]},
      {'hset', KEYS[1], 'e', ''}, {'exists', KEYS[2]}, {'hmget', KEYS[1], 's', 'i'},
      {'hincrby', KEYS[1], 's', '1'}, {'xadd', KEYS[2], '*', 'm', ''},
      {'pexpire', KEYS[2], '1'}, {'pexpire', KEYS[1], '1'}, {'zadd', KEYS[3], '1', ''},
      {'zremrangebyrank', KEYS[3], '0', '1'}, {'pexpire', KEYS[3], '1'},
      {ARGV[6], ARGV[1], ''}}) do
    if not redis.acl_check_cmd(unpack(c)) then
      return redis.error_reply('NOPERM the Redis user may not run ' .. c[1] .. ' on ' .. c[2] .. ' in the publish script')
    end
  end
end
local id = ARGV[8]
local e = redis.call('hget', KEYS[1], 'e')
if e and id ~= '' then
  local o = redis.call('zscore', KEYS[3], id)
  if o then return {tonumber(o), e, -1} end
end
if not e then
  e = ARGV[5]
  redis.call('del', KEYS[2], KEYS[3])
  redis.call('hset', KEYS[1], 'e', e)
elseif redis.call('exists', KEYS[2]) == 0 then
  local last = redis.call('hmget', KEYS[1], 's', 'i')
  if last[1] and last[2] and last[2] ~= '' then
    redis.call('xadd', KEYS[2], last[1] .. '-1', 'c', last[2])
  end
end
local s = redis.call('hincrby', KEYS[1], 's', 1)
local msg = ARGV[2] .. ',"offset":' .. s .. ',"epoch":"' .. e .. '"}'
redis.call('xadd', KEYS[2], 'MAXLEN', ARGV[3], s .. '-1', 'm', msg)
redis.call('hset', KEYS[1], 'i', id)
redis.call('pexpire', KEYS[2], ARGV[4])
redis.call('pexpire', KEYS[1], ARGV[7])
if id ~= '' then
  redis.call('zadd', KEYS[3], s, id)
  redis.call('zremrangebyrank', KEYS[3], 0, -1 - tonumber(ARGV[3]))
  redis.call('pexpire', KEYS[3], ARGV[4])
end
local n = redis.call(ARGV[6], ARGV[1], msg)
return {s, e, n}
"#;

/// Topics read per pipeline when a link catches up.
const CATCH_UP_BATCH: usize = 500;

/// Messages a resume reads per `XRANGE` page, at most.
const REPLAY_PAGE: usize = 32;

/// Messages of a resume's first page, read while its POST is answered
/// (the sizes of later pages follow the messages' sizes).
const REPLAY_FIRST_PAGE: usize = 8;

/// About the bytes of one resume's page: after its first page, a resume
/// reads as many messages as fit this at their average size (1 to
/// [`REPLAY_PAGE`]), so what it holds while its client drains stays
/// about this size, well under a client queue's default 4 MiB.
const REPLAY_PAGE_BYTES: usize = 1024 * 1024;

/// Resume pages read at once on a node; more wait their turn.
pub(super) const REPLAY_READS: usize = 4;

/// A resume's pause before it looks again (its node has not dispatched
/// the cursor yet, or the history cannot be read now).
const REPLAY_RETRY: Duration = Duration::from_millis(20);

/// One entry of a resume's page.
enum Replayed {
    Message {
        offset: u64,
        payload: Vec<u8>,
    },
    /// A cursor entry: the message at its offset expired.
    Expired,
}

/// The offset of a stream entry id (`<offset>-1`).
fn entry_offset(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}

/// One `XRANGE` entry: its id and its field/value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// Where a topic's history stands on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Position {
    pub epoch: String,
    pub offset: u64,
    /// Hashes of the last messages dispatched, by offset (at most
    /// [`RECENT`]). After a failover the new primary may lack the old
    /// one's last writes and reuse their offsets for new messages: these
    /// tell which offsets this node really delivered.
    pub recent: VecDeque<(u64, u64)>,
}

/// Dispatched messages remembered per topic to recognise a rollback.
const RECENT: usize = 32;

/// A hash of a message as kept in the history.
fn digest(payload: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish() | 1
}

/// How a catch-up ended.
enum Resync {
    Done,
    Gap,
    RolledBack,
    /// The history ends below the node's position (position moved back).
    ShortHistory,
}

/// What to do with a message that carries an offset.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// The next one, or the first seen: dispatch it.
    Next,
    /// At an offset already dispatched: a duplicate if it is the same
    /// message, a rollback if not (see [`Shared::admit_offset`]).
    Duplicate,
    /// Offsets after `after` and before this one are missing.
    Gap { after: u64 },
    /// The topic's history was reset.
    NewEpoch,
}

fn step(known: Option<&Position>, epoch: &str, offset: u64) -> Step {
    match known {
        None => Step::Next,
        // Subscribed before the topic had any history: from its start.
        Some(p) if p.epoch.is_empty() && offset > p.offset + 1 => Step::Gap { after: p.offset },
        Some(p) if p.epoch.is_empty() => Step::Next,
        Some(p) if p.epoch != epoch => Step::NewEpoch,
        Some(p) if offset <= p.offset => Step::Duplicate,
        Some(p) if offset == p.offset + 1 => Step::Next,
        Some(p) => Step::Gap { after: p.offset },
    }
}

impl Shared {
    pub(super) fn history_on(&self) -> bool {
        self.config.history_size > 0
    }

    fn history_key(&self, kind: &str, base: &str) -> String {
        match self.partitions() {
            Some(_) => format!("{}:{kind}:{base}", self.partition_tag(self.link_of(base))),
            None => format!("{}{kind}:{base}", self.config.prefix),
        }
    }

    /// The publish script for one message: `envelope` is the JSON envelope.
    /// `id` is the publisher's id of the message, if any: a retry with the
    /// same id is answered without publishing again.
    pub(super) fn history_cmd(
        &self,
        base: &str,
        mut envelope: Vec<u8>,
        id: Option<&str>,
    ) -> redis::Cmd {
        envelope.pop(); // the closing brace; the script adds offset and epoch
        let verb = if self.partitions().is_some() {
            "spublish"
        } else {
            "publish"
        };
        let mut c = redis::cmd("EVAL");
        c.arg(PUBLISH_SCRIPT)
            .arg(3)
            .arg(self.history_key("m", base))
            .arg(self.history_key("h", base))
            .arg(self.history_key("i", base))
            .arg(self.topic_channel(base))
            .arg(envelope)
            .arg(self.config.history_size)
            .arg(self.config.history_ttl.as_millis() as u64)
            .arg(crate::protocol::random_alphanumeric(12))
            .arg(verb)
            .arg(meta_ttl(self.config.history_ttl).as_millis() as u64)
            .arg(id.unwrap_or(""));
        c
    }

    /// Whether to dispatch a message of `base` at `epoch:offset`, after
    /// filling any gap before it. False for a duplicate.
    pub(super) async fn admit_offset(
        &self,
        base: &str,
        epoch: &str,
        offset: u64,
        payload: &[u8],
    ) -> bool {
        let known = self.positions.lock().get(base).cloned();
        match step(known.as_ref(), epoch, offset) {
            Step::Duplicate => {
                let seen = known
                    .as_ref()
                    .and_then(|p| p.recent.iter().find(|(o, _)| *o == offset))
                    .map(|(_, d)| *d);
                match seen {
                    // Another message at an offset this node delivered: a
                    // failover promoted a replica without the old primary's
                    // last writes, and new messages took their offsets.
                    // What the old primary had after them is unknowable
                    // here: signal, and follow the new history from this
                    // message on.
                    Some(d) if d != digest(payload) => {
                        metrics::counter!(m::HISTORY_ROLLBACKS).increment(1);
                        self.lost(
                            base,
                            "the topic's history was rolled back by a failover (an offset this node delivered holds another message)",
                        );
                    }
                    // The same message again, or one older than what this
                    // node remembers (catch-up and live overlap).
                    _ => {
                        metrics::counter!(m::HISTORY_DUPLICATES).increment(1);
                        return false;
                    }
                }
            }
            Step::Next => {}
            Step::NewEpoch => self.lost(base, "the topic's history was reset (new epoch)"),
            Step::Gap { after } => {
                metrics::counter!(m::HISTORY_CATCH_UPS).increment(1);
                match self.fill(base, epoch, after, Some(offset - 1)).await {
                    Ok(true) => {}
                    Ok(false) => self.lost(base, "the gap is no longer in the topic's history"),
                    Err(()) => {
                        // History cannot be read now: reconnect the link,
                        // which catches up from the last position, this
                        // message included.
                        self.links[self.link_of(base)].reconnect.lock().cancel();
                        return false;
                    }
                }
            }
        }
        self.set_position(base, epoch, offset, digest(payload));
        true
    }

    /// Note that `base` was dispatched up to `epoch:offset`. A topic this
    /// node has no position for gets one only while it is confirmed
    /// subscribed: a message still in flight after the last local
    /// subscriber left must not re-create a position, or the next
    /// subscriber would start from that stale offset (replayed messages
    /// from before it subscribed, or a gap closing its stream at once)
    /// instead of at its subscription ([`Shared::snapshot_positions`]).
    fn set_position(&self, base: &str, epoch: &str, offset: u64, digest: u64) {
        let mut positions = self.positions.lock();
        if !positions.contains_key(base) {
            // The unsubscribe path removes a topic from `confirmed` and
            // forgets its position under the `confirmed` lock: take it
            // first (same order), so the check and the insert are atomic
            // against it.
            drop(positions);
            let confirmed = self.confirmed.lock();
            positions = self.positions.lock();
            if !positions.contains_key(base) && !confirmed.contains(base) {
                return;
            }
        }
        let p = positions
            .entry(Arc::from(base))
            .or_insert_with(|| Position {
                epoch: String::new(),
                offset: 0,
                recent: VecDeque::new(),
            });
        if p.epoch != epoch {
            p.epoch.clear();
            p.epoch.push_str(epoch);
            p.recent.clear();
        }
        p.offset = offset;
        p.recent.retain(|(o, _)| *o < offset);
        p.recent.push_back((offset, digest));
        while p.recent.len() > RECENT {
            p.recent.pop_front();
        }
    }

    /// Before subscribing `topics` (all on one link, so one slot): note
    /// where each one's history stands, for those this node has no
    /// position for. Whatever is published from then on reaches the node,
    /// through the subscription or, if it came before the subscription
    /// took effect, through a catch-up. `Err` when history cannot be read.
    pub(super) async fn snapshot_positions(&self, topics: &[Arc<str>]) -> Result<(), String> {
        let missing: Vec<&Arc<str>> = {
            let positions = self.positions.lock();
            topics
                .iter()
                .filter(|t| !positions.contains_key(&***t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let k = self.link_of(&missing[0][..]);
        for chunk in missing.chunks(CATCH_UP_BATCH) {
            let mut pipe = redis::pipe();
            for t in chunk {
                pipe.cmd("HMGET")
                    .arg(self.history_key("m", t))
                    .arg("e")
                    .arg("s");
            }
            let values = self
                .read_history(k, "HMGET", pipe, chunk.len())
                .await
                .map_err(|e| e.to_string())?;
            let replies: Vec<(Option<String>, Option<u64>)> = values
                .into_iter()
                .map(|v| redis::from_redis_value(v).unwrap_or((None, None)))
                .collect();
            let mut positions = self.positions.lock();
            for (t, (epoch, offset)) in chunk.iter().zip(replies) {
                positions.entry((*t).clone()).or_insert(Position {
                    epoch: epoch.unwrap_or_default(),
                    offset: offset.unwrap_or(0),
                    recent: VecDeque::new(),
                });
            }
        }
        Ok(())
    }

    /// A pipeline of `count` history reads for link `k`'s topics. On a
    /// cluster it goes to the primary the link follows, whose channels the
    /// live messages come from, never to a node the cluster connection's
    /// slot map may still name: after a failover the former primary holds a
    /// history the new one does not, and catching up from it would take the
    /// new primary's messages at reused offsets for duplicates. `Err` when
    /// it cannot be read there now (a node that no longer owns the slot
    /// refuses: the link is moving too).
    async fn read_history(
        &self,
        k: usize,
        what: &str,
        pipe: redis::Pipeline,
        count: usize,
    ) -> Result<Vec<Value>, crate::relay::RelayError> {
        let mut conn = self.reads()?;
        let primary = self
            .partitions()
            .and_then(|_| self.links[k].primary.lock().clone());
        let values: Vec<Value> = match (
            &mut conn,
            primary.as_deref().and_then(super::topology::route_to),
        ) {
            (Commands::Cluster(c), Some(route)) => {
                self.command(what, c.route_pipeline(pipe, 0, count, route))
                    .await?
            }
            _ => self.command(what, pipe.query_async(&mut conn)).await?,
        };
        if let Some(e) = values.iter().find(|v| matches!(v, Value::ServerError(_))) {
            return Err(crate::relay::RelayError::Unavailable(format!(
                "Redis {what} refused: {e:?}"
            )));
        }
        Ok(values)
    }

    /// Forget a topic this node no longer subscribes to.
    pub(super) fn forget_position(&self, base: &str) {
        self.positions.lock().remove(base);
    }

    /// Dispatch, from the stream, the messages of `base` after offset
    /// `after` (up to `until`, or all), in order. `Ok(false)` when the
    /// stream cannot fill the range (trimmed or expired, or another
    /// epoch); `Err` when it cannot be read now.
    async fn fill(
        &self,
        base: &str,
        epoch: &str,
        after: u64,
        until: Option<u64>,
    ) -> Result<bool, ()> {
        let end = until.map_or_else(|| "+".to_owned(), |u| format!("{u}-1"));
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.history_key("h", base))
            .arg(format!("{}-1", after + 1))
            .arg(end);
        let values = self
            .read_history(self.link_of(base), "XRANGE", pipe, 1)
            .await
            .map_err(|_| ())?;
        let entries: Vec<StreamEntry> = values
            .into_iter()
            .next()
            .map(redis::from_redis_value)
            .transpose()
            .map_err(|_| ())?
            .unwrap_or_default();
        if !self.replay(base, epoch, after, entries) {
            return Ok(false);
        }
        let reached = self.positions.lock().get(base).map_or(after, |p| p.offset);
        Ok(until.is_none_or(|u| reached >= u))
    }

    /// After link `k` reconnected: catch every topic on it up from its
    /// history, before live messages resume. Topics are read in pipelines
    /// of [`CATCH_UP_BATCH`] (all of a link's keys share its slot), so
    /// 10,000 topics cost 20 round trips, not 20,000. If history cannot be
    /// read, the link reconnects and tries again.
    pub(super) async fn catch_up_link(&self, k: usize) {
        let known: Vec<(Arc<str>, Position)> = self
            .positions
            .lock()
            .iter()
            .filter(|(t, _)| self.link_of(t) == k)
            .map(|(t, p)| (t.clone(), p.clone()))
            .collect();
        let known: Vec<(Arc<str>, Position)> = known
            .into_iter()
            .filter(|(t, _)| {
                let wanted = self.hub.has_topic(t);
                if !wanted {
                    self.forget_position(t);
                }
                wanted
            })
            .collect();
        if known.is_empty() {
            return;
        }
        let started = std::time::Instant::now();
        for chunk in known.chunks(CATCH_UP_BATCH) {
            let mut pipe = redis::pipe();
            for (topic, p) in chunk {
                pipe.cmd("HMGET")
                    .arg(self.history_key("m", topic))
                    .arg("e")
                    .arg("s");
                // From the oldest remembered offset: what this node
                // delivered, as the history holds it now, and what follows.
                let from = p.recent.front().map_or(p.offset + 1, |(o, _)| *o);
                pipe.cmd("XRANGE")
                    .arg(self.history_key("h", topic))
                    .arg(format!("{from}-1"))
                    .arg("+");
            }
            let replies = self.read_history(k, "XRANGE", pipe, chunk.len() * 2).await;
            let Ok(replies) = replies else {
                self.links[k].reconnect.lock().cancel();
                return;
            };
            for ((topic, p), pair) in chunk.iter().zip(replies.chunks(2)) {
                let (epoch, top): (Option<String>, Option<u64>) =
                    redis::from_redis_value(pair[0].clone()).unwrap_or((None, None));
                if !p.epoch.is_empty() && epoch.as_deref().is_some_and(|e| e != p.epoch) {
                    self.lost(topic, "the topic's history was reset (new epoch)");
                    self.forget_position(topic);
                    continue;
                }
                let entries: Vec<StreamEntry> =
                    redis::from_redis_value(pair[1].clone()).unwrap_or_default();
                match self.resync(topic, p, top.unwrap_or(0), entries) {
                    Resync::Done => {}
                    Resync::Gap => self.lost(topic, "the gap is no longer in the topic's history"),
                    Resync::ShortHistory => self.lost(
                        topic,
                        "the topic's history ends below what this node delivered (rolled back by a failover); what the former primary acknowledged after it is unknown",
                    ),
                    Resync::RolledBack => {
                        // A failover promoted a replica without some of the
                        // old primary's writes, and other messages took
                        // their offsets.
                        self.lost(topic, "the topic's history was rolled back by a failover");
                        self.forget_position(topic);
                    }
                }
            }
        }
        metrics::histogram!(m::HISTORY_CATCH_UP_SECONDS).record(started.elapsed().as_secs_f64());
        tracing::info!(
            link = k,
            topics = known.len(),
            ms = started.elapsed().as_millis() as u64,
            "caught up from history after reconnecting"
        );
    }

    /// Bring `topic` from position `p` to what its history holds now:
    /// entries this node delivered (same offset, same hash) are skipped,
    /// and what follows the position is dispatched in order. History that
    /// ends below the position (a failover lost the last writes, and
    /// nothing new came yet) moves the position back, so new messages are
    /// not taken for duplicates, and is signalled (`ShortHistory`): the
    /// former primary may have acknowledged messages this node never got.
    /// Another message at an offset this node delivered means offsets
    /// were reused: that is a gap it cannot resolve (`RolledBack`).
    fn resync(&self, topic: &str, p: &Position, top: u64, entries: Vec<StreamEntry>) -> Resync {
        let delivered = |offset: u64, msg: &[u8]| {
            p.recent
                .iter()
                .find(|(o, _)| *o == offset)
                .map(|(_, d)| *d == digest(msg))
        };
        let after = p.offset;
        let mut fresh = Vec::new();
        for entry in entries {
            let Some(msg) = entry.1.into_iter().find(|(f, _)| f == "m").map(|(_, m)| m) else {
                continue;
            };
            let Some((_, offset)) = self.peek_envelope(&msg) else {
                continue;
            };
            if offset <= p.offset {
                match delivered(offset, &msg) {
                    Some(true) => continue,
                    // Another message at an offset this node delivered: a
                    // failover reused it. Whether it is new, or an old one
                    // that came back with a former primary, cannot be told.
                    Some(false) | None => return Resync::RolledBack,
                }
            }
            fresh.push(msg);
        }
        if fresh.is_empty() && top < p.offset {
            // The history ends below this node's position: a failover lost
            // the last writes. This node delivered those up to its
            // position, but whether the former primary acknowledged more
            // after them, which never reached this node, cannot be told:
            // signal, then continue from the new history's end, so new
            // messages are not taken for duplicates.
            tracing::warn!(
                topic,
                from = p.offset,
                to = top,
                "the topic's history was rolled back by a failover"
            );
            metrics::counter!(m::HISTORY_ROLLBACKS).increment(1);
            {
                let mut positions = self.positions.lock();
                if let Some(pos) = positions.get_mut(topic) {
                    pos.offset = top;
                    pos.recent.retain(|(o, _)| *o <= top);
                }
            }
            return Resync::ShortHistory;
        }
        let entries = fresh
            .into_iter()
            .map(|m| (String::new(), vec![("m".to_owned(), m)]))
            .collect();
        if self.replay(topic, &p.epoch, after, entries) {
            Resync::Done
        } else {
            Resync::Gap
        }
    }

    /// Dispatch stream entries that follow offset `after`, in order; false
    /// when they do not follow on (trimmed, or another epoch). An empty
    /// `epoch` (subscribed before the topic had history) takes the first
    /// entry's.
    fn replay(&self, base: &str, epoch: &str, after: u64, entries: Vec<StreamEntry>) -> bool {
        let mut epoch = epoch.to_owned();
        let mut expected = after + 1;
        for (_, fields) in entries {
            let Some((_, msg)) = fields.into_iter().find(|(f, _)| f == "m") else {
                continue;
            };
            let Some((e, offset)) = self.peek_envelope(&msg) else {
                continue;
            };
            if epoch.is_empty() {
                epoch = e.clone();
            }
            if e != epoch || offset != expected {
                return false;
            }
            self.dispatch_envelope(base, &msg);
            self.set_position(base, &epoch, offset, digest(&msg));
            expected += 1;
        }
        true
    }

    /// Prepare a resume of `client`'s held `key` after the message whose
    /// id is `since` (the subscription request is being answered): find
    /// the cursor's offset without reading the history (the ids set
    /// holds each id's offset; the meta hash and the stream's first entry
    /// hold the cursor of a topic whose messages expired), and read the
    /// first page after it, up to what this node has dispatched. Nothing
    /// is delivered until the answer is 204 and the replay is started.
    pub(super) async fn prepare_replay(
        self: Arc<Self>,
        client: Arc<Client>,
        key: SubKey,
        since: String,
    ) -> Result<Result<PendingReplay, ApiError>, RelayError> {
        let release = |s: &Arc<Self>, client: Arc<Client>, key: SubKey| {
            let hub = s.hub.clone();
            Ok(Ok(PendingReplay::new(move || hub.release(&client, &key))))
        };
        if !self.history_on() {
            return release(&self, client, key);
        }
        let base = crate::protocol::base_topic(&key).to_owned();
        let k = self.link_of(&base);
        let mut pipe = redis::pipe();
        pipe.cmd("ZSCORE")
            .arg(self.history_key("i", &base))
            .arg(&since);
        pipe.cmd("HMGET")
            .arg(self.history_key("m", &base))
            .arg("s")
            .arg("i");
        let values = self.read_history(k, "ZSCORE", pipe, 2).await?;
        let score: Option<f64> = values
            .first()
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .flatten();
        let (top, last_id): (Option<u64>, Option<String>) = values
            .get(1)
            .and_then(|v| redis::from_redis_value(v.clone()).ok())
            .unwrap_or((None, None));
        let mut cursor = score.map(|o| o as u64);
        if cursor.is_none() && last_id.as_deref() == Some(since.as_str()) {
            // The last message's id (its message may have expired).
            cursor = top;
        }
        if cursor.is_none() {
            // The cursor entry the publish script wrote after an expiry:
            // the stream's first entry.
            let mut pipe = redis::pipe();
            pipe.cmd("XRANGE")
                .arg(self.history_key("h", &base))
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1);
            let first: Vec<StreamEntry> = self
                .read_history(k, "XRANGE", pipe, 1)
                .await?
                .into_iter()
                .next()
                .and_then(|v| redis::from_redis_value(v).ok())
                .unwrap_or_default();
            cursor = first.first().and_then(|(id, fields)| {
                fields
                    .iter()
                    .any(|(f, v)| f == "c" && v == since.as_bytes())
                    .then(|| entry_offset(id))
                    .flatten()
            });
        }
        let Some(cursor) = cursor else {
            metrics::counter!(m::RESUME_UNKNOWN_CURSOR).increment(1);
            return release(&self, client, key);
        };
        let upto = self.position_of(&base);
        let page = if cursor < upto {
            let page = self
                .replay_page(&base, cursor, upto, REPLAY_FIRST_PAGE)
                .await?;
            // The cursor's successor is gone (trimmed or expired): as a
            // cursor no longer in the history, nothing is replayed.
            if !matches!(page.first(), Some(Replayed::Message { offset, .. }) if *offset == cursor + 1)
            {
                metrics::counter!(m::RESUME_UNKNOWN_CURSOR).increment(1);
                return release(&self, client, key);
            }
            let too_large = page.iter().any(|r| match r {
                Replayed::Message { payload, .. } => Self::data_len(payload)
                    .is_some_and(|n| crate::relay::too_large_for(&client, &key, n)),
                Replayed::Expired => false,
            });
            if too_large {
                return Ok(Err(crate::relay::undeliverable_replay(&client)));
            }
            page
        } else {
            Vec::new()
        };
        let s = self.clone();
        Ok(Ok(PendingReplay::new(move || {
            tokio::spawn(s.run_replay(client, key, base, cursor, page));
        })))
    }

    /// The offset this node has dispatched `base` up to (0: none).
    fn position_of(&self, base: &str) -> u64 {
        self.positions.lock().get(base).map_or(0, |p| p.offset)
    }

    /// One page of `base`'s history after offset `after`, up to offset
    /// `upto`: at most `count` entries, read on the history reads
    /// connection ([`REPLAY_READS`] at a time).
    async fn replay_page(
        &self,
        base: &str,
        after: u64,
        upto: u64,
        count: usize,
    ) -> Result<Vec<Replayed>, RelayError> {
        let _permit = self
            .replay_reads
            .acquire()
            .await
            .map_err(|_| RelayError::Unavailable("stopping".into()))?;
        let mut pipe = redis::pipe();
        pipe.cmd("XRANGE")
            .arg(self.history_key("h", base))
            .arg(format!("{}-0", after + 1))
            .arg(format!("{upto}-1"))
            .arg("COUNT")
            .arg(count);
        let values = self
            .read_history(self.link_of(base), "XRANGE", pipe, 1)
            .await?;
        let entries: Vec<StreamEntry> = values
            .into_iter()
            .next()
            .and_then(|v| redis::from_redis_value(v).ok())
            .unwrap_or_default();
        Ok(entries
            .into_iter()
            .filter_map(|(id, fields)| {
                let (f, v) = fields.into_iter().find(|(f, _)| f == "m" || f == "c")?;
                Some(if f == "m" {
                    Replayed::Message {
                        offset: self.peek_envelope(&v).map(|(_, o)| o)?,
                        payload: v,
                    }
                } else {
                    let _ = entry_offset(&id)?;
                    Replayed::Expired
                })
            })
            .collect())
    }

    /// Deliver a started resume: push `page`, then the pages that follow,
    /// each as the client's stream drains it, from the reads connection
    /// (never the dispatcher: live messages of other topics do not wait
    /// for it), until it reaches this node's position; then the link's
    /// dispatcher releases the key between two live messages
    /// ([`Shared::finish_replay`]). Live messages of the key wait (held)
    /// meanwhile, in Redis and not in memory. Messages the history lost
    /// before they were replayed (trimmed, expired) close the client's
    /// stream, as any missed message does.
    async fn run_replay(
        self: Arc<Self>,
        client: Arc<Client>,
        key: SubKey,
        base: String,
        mut after: u64,
        mut page: Vec<Replayed>,
    ) {
        let mut waited = Duration::ZERO;
        let mut count = REPLAY_PAGE;
        loop {
            if !self.hub.is_held(&client, &key) {
                return; // unsubscribed or gone meanwhile
            }
            let bytes: usize = page
                .iter()
                .map(|r| match r {
                    Replayed::Message { payload, .. } => payload.len(),
                    Replayed::Expired => 0,
                })
                .sum();
            if !page.is_empty() {
                count = (REPLAY_PAGE_BYTES * page.len() / bytes.max(1)).clamp(1, REPLAY_PAGE);
            }
            for r in std::mem::take(&mut page) {
                match r {
                    Replayed::Message { offset, payload } if offset == after + 1 => {
                        // Unsubscribed meanwhile (or gone): stop.
                        if !self.hub.is_held(&client, &key)
                            || self
                                .replay_to_paced(&client, &key, &base, &payload)
                                .await
                                .is_err()
                        {
                            return;
                        }
                        metrics::counter!(m::RESUME_REPLAYED).increment(1);
                        after = offset;
                    }
                    _ => return self.replay_lost(&client, &base),
                }
            }
            let upto = self.position_of(&base);
            if after < upto {
                match self.replay_page(&base, after, upto, count).await {
                    Ok(p) if p.is_empty() => return self.replay_lost(&client, &base),
                    Ok(p) => page = p,
                    Err(e) => {
                        if waited >= super::COMMAND_TIMEOUT * 10 {
                            tracing::warn!(topic = %base, error = %e, "a replay could not read the history");
                            return self.replay_lost(&client, &base);
                        }
                        tokio::time::sleep(REPLAY_RETRY).await;
                        waited += REPLAY_RETRY;
                    }
                }
                continue;
            }
            // Caught up with what this node dispatched: hand over to live
            // delivery on the dispatcher, between two live messages.
            let force = waited >= super::COMMAND_TIMEOUT * 2;
            let (done, rx) = tokio::sync::oneshot::channel();
            let sent = self.links[self.link_of(&base)]
                .replays
                .send(super::ReplayRequest {
                    client: client.clone(),
                    key: key.clone(),
                    after,
                    force,
                    done,
                });
            match (sent, rx.await) {
                (Ok(()), Ok(true)) => return,
                // More was dispatched meanwhile: read it, then try again.
                (Ok(()), Ok(false)) if self.position_of(&base) > after => {}
                // The node has not reached the cursor yet (or its link is
                // reconnecting): wait for it.
                _ => {
                    tokio::time::sleep(REPLAY_RETRY).await;
                    waited += REPLAY_RETRY;
                }
            }
        }
    }

    /// On the link's dispatcher, between two live messages: release a
    /// replay's key if the replay reached this node's position (live
    /// delivery continues with the next offset, no gap and no duplicate).
    pub(super) fn finish_replay(&self, req: super::ReplayRequest) {
        let at = self.position_of(crate::protocol::base_topic(&req.key));
        let done = at == req.after || (req.force && at < req.after);
        if done {
            self.hub.release(&req.client, &req.key);
        }
        let _ = req.done.send(done);
    }

    /// A replay missed messages the history no longer holds: close the
    /// client's stream (it reconnects and re-fetches).
    fn replay_lost(&self, client: &Client, base: &str) {
        metrics::counter!(m::HISTORY_GAPS).increment(1);
        tracing::warn!(
            topic = base,
            client = client.id(),
            "a replay missed messages the history no longer holds"
        );
        self.hub.close_lost(client);
    }

    /// A gap history cannot fill: count it, log it, and (with `--on-gap
    /// close`) close the topic's local streams.
    fn lost(&self, base: &str, why: &str) {
        metrics::counter!(m::HISTORY_GAPS).increment(1);
        let closed = if self.config.close_on_gap {
            self.hub.close_topic(base, CloseReason::Gap)
        } else {
            0
        };
        tracing::warn!(topic = base, closed, "messages missed: {why}");
    }
}

/// The offset, epoch and receiver count a publish script returned.
pub(super) fn script_receivers(v: &Value) -> Option<i64> {
    match v {
        Value::Array(items) => match items.get(2) {
            Some(Value::Int(n)) => Some(*n),
            _ => None,
        },
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// Pings the history reads connection every heartbeat interval. It may sit
/// idle through a Redis restart, and a dead one must show in health (and be
/// replaced, see `Backend::renew`), not fail the first catch-up or resume
/// after. A task of its own, so that a slow answer never holds up the
/// membership heartbeat, whose key lives only three intervals.
pub(super) async fn run_reads_check(shared: Arc<Shared>) {
    let every = shared
        .config
        .heartbeat_interval
        .max(Duration::from_millis(100));
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shared.stop.cancelled() => return,
        }
        let Ok(mut reads) = shared.reads() else {
            continue;
        };
        let ping = redis::cmd("PING");
        let state = shared
            .bounded("PING (reads)", ping.query_async::<()>(&mut reads))
            .await;
        shared.set_reads(state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_topic_subscribed_before_any_history_starts_from_offset_one() {
        let p = Position {
            epoch: String::new(),
            offset: 0,
            recent: VecDeque::new(),
        };
        assert_eq!(step(Some(&p), "e1", 1), Step::Next);
        assert_eq!(step(Some(&p), "e1", 4), Step::Gap { after: 0 });
    }

    #[test]
    fn the_meta_hash_outlives_the_messages_by_far() {
        assert_eq!(meta_ttl(Duration::from_secs(300)), META_TTL);
        assert_eq!(
            meta_ttl(Duration::from_secs(48 * 3600)),
            Duration::from_secs(96 * 3600)
        );
    }

    #[test]
    fn offsets_decide_dispatch() {
        let p = Position {
            epoch: "e1".into(),
            offset: 5,
            recent: VecDeque::new(),
        };
        assert_eq!(step(None, "e1", 9), Step::Next);
        assert_eq!(step(Some(&p), "e1", 6), Step::Next);
        assert_eq!(step(Some(&p), "e1", 5), Step::Duplicate);
        assert_eq!(step(Some(&p), "e1", 2), Step::Duplicate);
        assert_eq!(step(Some(&p), "e1", 9), Step::Gap { after: 5 });
        assert_eq!(step(Some(&p), "e2", 1), Step::NewEpoch);
    }
}
