//! Prometheus metrics: the names in one place, and the process-wide recorder.
//!
//! Counters are recorded where things happen. Gauges that describe current
//! state (connections, topics, subscriptions) are read from the hub when
//! `/metrics` is scraped, so they can never drift from the truth.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// SSE streams opened.
pub const CONNECTIONS_OPENED: &str = "fanout_connections_opened_total";
/// SSE streams closed, by `reason` (see [`CLOSE_REASONS`]).
pub const CONNECTIONS_CLOSED: &str = "fanout_connections_closed_total";
/// Clients disconnected because their outbound queue was full.
pub const SLOW_CLIENT_DISCONNECTS: &str = "fanout_slow_client_disconnects_total";
/// Messages accepted for publishing (HTTP or library).
pub const PUBLISHED: &str = "fanout_messages_published_total";
/// Messages this node received from its relay and fanned out.
pub const DISPATCHED: &str = "fanout_messages_dispatched_total";
/// Events written to client streams.
pub const DELIVERED: &str = "fanout_events_delivered_total";
/// Requests answered with an error, by `status`.
pub const REJECTED: &str = "fanout_requests_rejected_total";
/// Subscription requests forwarded to the node holding the client.
pub const FORWARDED: &str = "fanout_requests_forwarded_total";
/// Times the Redis subscriber connection was lost and re-established.
pub const RELAY_RECONNECTS: &str = "fanout_relay_reconnects_total";
/// How long the last Redis outage lasted, until every topic was
/// re-subscribed (seconds).
pub const RELAY_RECOVERY_SECONDS: &str = "fanout_relay_recovery_seconds";
/// Messages from Redis that could not be decoded.
pub const RELAY_BAD_MESSAGES: &str = "fanout_relay_bad_messages_total";
/// Gauge: 1 while the relay is healthy.
pub const RELAY_UP: &str = "fanout_relay_up";
/// Time to fan one message out to this node's subscribers (seconds).
pub const FANOUT_SECONDS: &str = "fanout_fanout_duration_seconds";

/// Publishes refused (503) because the fan-out backlog stayed full for the
/// whole publish wait.
pub const PUBLISH_BACKPRESSURE_REFUSED: &str = "fanout_publish_overloaded_total";
/// Relayed publications shed because the fan-out backlog held twice its
/// byte bound (their local recipients were disconnected).
pub const BACKLOG_SHED: &str = "fanout_backlog_shed_total";
/// Gauge: deliveries dispatched but not yet pushed into client queues.
pub const BACKLOG_DELIVERIES: &str = "fanout_backlog_deliveries";
/// Gauge: bytes of publications held by the fan-out.
pub const BACKLOG_BYTES: &str = "fanout_backlog_bytes";

/// Streams made guests because PocketBase no longer accepts the token they
/// were bound through (companion mode).
pub const POCKETBASE_REVOKED: &str = "fanout_pocketbase_revoked_total";

/// Request bodies that did not arrive within the body timeout (408).
pub const BODY_TIMEOUTS: &str = "fanout_body_timeouts_total";

/// Non-stream connections closed to make room for a new connection (the
/// one waiting longest on its client).
pub const CONNECTIONS_EVICTED: &str = "fanout_connections_evicted_total";
/// Connections closed at once for lack of room: one kept alive after its
/// stream, at a cap with no connection that may make room. New connections
/// are not refused: they wait in the listen backlog.
pub const CONNECTIONS_REFUSED: &str = "fanout_connections_refused_total";
/// Gauge: open connections that are not SSE streams.
pub const HTTP_CONNECTIONS: &str = "fanout_http_connections";

/// Forwarded subscription requests dropped unapplied because they arrived
/// after their deadline.
pub const FORWARDS_EXPIRED: &str = "fanout_forwards_expired_total";
/// Subscription requests answered 204 without being applied, because a
/// newer request of the same client had been applied already.
pub const SUBSCRIPTIONS_SUPERSEDED: &str = "fanout_subscriptions_superseded_total";
/// Publishes that Redis delivered to no subscriber of a topic this node had
/// confirmed subscribed (its local subscribers were disconnected).
pub const RELAY_LOST_PUBLISHES: &str = "fanout_relay_lost_publishes_total";
/// How long each loss of the Redis subscriber lasted, until every topic was
/// re-subscribed (seconds). While it lasts, publishes here answer 503;
/// other nodes' publishes are lost for this node's clients.
pub const RELAY_OUTAGE_SECONDS: &str = "fanout_relay_outage_seconds";

/// Messages received from Redis, by subscriber link (`partition`; 0 on a
/// standalone Redis).
pub const RELAY_MESSAGES_IN: &str = "fanout_relay_messages_in_total";
/// Reconnects of each subscriber link, by `partition`.
pub const RELAY_LINK_RECONNECTS: &str = "fanout_relay_link_reconnects_total";
/// Gauge: how long each link took, the last time, to connect and
/// re-subscribe everything, by `partition` (seconds).
pub const RELAY_RESUBSCRIBE_SECONDS: &str = "fanout_relay_resubscribe_seconds";

/// Messages that arrived again (by offset) and were dropped.
pub const HISTORY_DUPLICATES: &str = "fanout_history_duplicates_total";
/// Jumps in a topic's offsets filled from its history.
pub const HISTORY_CATCH_UPS: &str = "fanout_history_catch_ups_total";
/// Gaps history could not fill (trimmed, expired, new epoch).
pub const HISTORY_GAPS: &str = "fanout_history_gaps_total";
/// Topic histories found rolled back after a failover (the new primary
/// lacked some of the old one's writes).
pub const HISTORY_ROLLBACKS: &str = "fanout_history_rollbacks_total";
/// Time to catch a link's topics up from history after a reconnect.
pub const HISTORY_CATCH_UP_SECONDS: &str = "fanout_history_catch_up_seconds";

/// Resumed subscriptions whose `since` cursor was not in the history (no
/// replay; live from then on).
pub const RESUME_UNKNOWN_CURSOR: &str = "fanout_resume_unknown_cursor_total";
/// Messages replayed to resumed subscriptions.
pub const RESUME_REPLAYED: &str = "fanout_resume_replayed_total";

/// Gauge: open SSE streams.
pub const CONNECTIONS: &str = "fanout_connections";
/// Gauge: distinct topics with at least one local subscriber.
pub const TOPICS: &str = "fanout_topics";
/// Gauge: subscription keys held by local clients.
pub const SUBSCRIPTIONS: &str = "fanout_subscriptions";

/// What kind of series a metric is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Where a metric exists: on every node, or only on one with Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Every,
    Redis,
}

/// Every metric: name, kind, where it exists, and its `# HELP` text.
/// [`register`] exports each at start; docs/operations.md lists the same
/// names (checked by `node/tests/docs.rs`).
pub const ALL: &[(&str, Kind, Scope, &str)] = &[
    (CONNECTIONS, Kind::Gauge, Scope::Every, "Open SSE streams."),
    (
        TOPICS,
        Kind::Gauge,
        Scope::Every,
        "Distinct topics with at least one local subscriber.",
    ),
    (
        SUBSCRIPTIONS,
        Kind::Gauge,
        Scope::Every,
        "Subscription keys held by local clients.",
    ),
    (
        CONNECTIONS_OPENED,
        Kind::Counter,
        Scope::Every,
        "SSE streams opened.",
    ),
    (
        CONNECTIONS_CLOSED,
        Kind::Counter,
        Scope::Every,
        "SSE streams closed, by reason.",
    ),
    (
        SLOW_CLIENT_DISCONNECTS,
        Kind::Counter,
        Scope::Every,
        "Clients disconnected because their queue was full.",
    ),
    (
        PUBLISHED,
        Kind::Counter,
        Scope::Every,
        "Messages accepted for publishing (HTTP or library).",
    ),
    (
        DISPATCHED,
        Kind::Counter,
        Scope::Every,
        "Messages this node received from its relay and fanned out.",
    ),
    (
        DELIVERED,
        Kind::Counter,
        Scope::Every,
        "Events written to client streams.",
    ),
    (
        FANOUT_SECONDS,
        Kind::Histogram,
        Scope::Every,
        "Time for one fan-out worker to push one message into its clients' queues (seconds).",
    ),
    (
        REJECTED,
        Kind::Counter,
        Scope::Every,
        "Requests answered with an error, by status.",
    ),
    (
        PUBLISH_BACKPRESSURE_REFUSED,
        Kind::Counter,
        Scope::Every,
        "Publishes refused (503) because the fan-out backlog stayed full for the whole publish wait.",
    ),
    (
        BACKLOG_SHED,
        Kind::Counter,
        Scope::Every,
        "Relayed publications shed at twice the backlog byte bound (their local recipients were disconnected).",
    ),
    (
        BACKLOG_DELIVERIES,
        Kind::Gauge,
        Scope::Every,
        "Deliveries dispatched but not yet pushed into client queues.",
    ),
    (
        BACKLOG_BYTES,
        Kind::Gauge,
        Scope::Every,
        "Bytes of publications held by the fan-out.",
    ),
    (
        BODY_TIMEOUTS,
        Kind::Counter,
        Scope::Every,
        "Request bodies that did not arrive within the body timeout (408).",
    ),
    (
        CONNECTIONS_EVICTED,
        Kind::Counter,
        Scope::Every,
        "Non-stream connections closed to make room for a new connection.",
    ),
    (
        CONNECTIONS_REFUSED,
        Kind::Counter,
        Scope::Every,
        "New connections closed at once: no room, and none waiting to evict.",
    ),
    (
        HTTP_CONNECTIONS,
        Kind::Gauge,
        Scope::Every,
        "Open connections that are not SSE streams.",
    ),
    (
        RESUME_REPLAYED,
        Kind::Counter,
        Scope::Every,
        "Messages replayed to resumed subscriptions.",
    ),
    (
        RESUME_UNKNOWN_CURSOR,
        Kind::Counter,
        Scope::Every,
        "Resumed subscriptions whose since cursor was not in the history.",
    ),
    (
        SUBSCRIPTIONS_SUPERSEDED,
        Kind::Counter,
        Scope::Every,
        "Subscription requests answered 204 unapplied because a newer request of the same client was applied first.",
    ),
    (
        POCKETBASE_REVOKED,
        Kind::Counter,
        Scope::Every,
        "Streams made guests because PocketBase no longer accepts the token they were bound through (companion mode).",
    ),
    (
        FORWARDED,
        Kind::Counter,
        Scope::Redis,
        "Subscription requests forwarded to the node holding the client.",
    ),
    (
        FORWARDS_EXPIRED,
        Kind::Counter,
        Scope::Redis,
        "Forwarded subscription requests dropped unapplied because they arrived after their deadline.",
    ),
    (
        RELAY_UP,
        Kind::Gauge,
        Scope::Redis,
        "1 while the Redis relay is healthy.",
    ),
    (
        RELAY_RECONNECTS,
        Kind::Counter,
        Scope::Redis,
        "Times a Redis subscriber connection was lost and re-established.",
    ),
    (
        RELAY_RECOVERY_SECONDS,
        Kind::Gauge,
        Scope::Redis,
        "How long the last Redis outage lasted, until every topic was re-subscribed (seconds).",
    ),
    (
        RELAY_OUTAGE_SECONDS,
        Kind::Histogram,
        Scope::Redis,
        "How long each loss of the Redis subscriber lasted, until every topic was re-subscribed (seconds).",
    ),
    (
        RELAY_BAD_MESSAGES,
        Kind::Counter,
        Scope::Redis,
        "Messages from Redis that could not be decoded.",
    ),
    (
        RELAY_LOST_PUBLISHES,
        Kind::Counter,
        Scope::Redis,
        "Publishes Redis delivered to no subscriber of a topic this node had confirmed (its local subscribers were disconnected).",
    ),
    (
        RELAY_MESSAGES_IN,
        Kind::Counter,
        Scope::Redis,
        "Messages received from Redis, by partition.",
    ),
    (
        RELAY_LINK_RECONNECTS,
        Kind::Counter,
        Scope::Redis,
        "Reconnects of each subscriber link, by partition.",
    ),
    (
        RELAY_RESUBSCRIBE_SECONDS,
        Kind::Gauge,
        Scope::Redis,
        "How long each link last took to connect and re-subscribe everything, by partition (seconds).",
    ),
    (
        HISTORY_DUPLICATES,
        Kind::Counter,
        Scope::Redis,
        "Messages that arrived again (by offset) and were dropped.",
    ),
    (
        HISTORY_CATCH_UPS,
        Kind::Counter,
        Scope::Redis,
        "Jumps in a topic's offsets filled from its history.",
    ),
    (
        HISTORY_GAPS,
        Kind::Counter,
        Scope::Redis,
        "Gaps history could not fill (trimmed, expired, new epoch).",
    ),
    (
        HISTORY_ROLLBACKS,
        Kind::Counter,
        Scope::Redis,
        "Topic histories found rolled back after a failover.",
    ),
    (
        HISTORY_CATCH_UP_SECONDS,
        Kind::Histogram,
        Scope::Redis,
        "Time to catch a link's topics up from history after a reconnect (seconds).",
    ),
];

/// Every `reason` of [`CONNECTIONS_CLOSED`].
pub const CLOSE_REASONS: &[&str] = &[
    "client",
    "idle",
    "max_lifetime",
    "slow",
    "overloaded",
    "gap",
    "discarded",
    "shutdown",
    "write_timeout",
    "write_failed",
];

/// Every `status` of [`REJECTED`] that Fanout answers with.
pub const REJECTED_STATUSES: &[&str] = &[
    "400", "401", "403", "404", "405", "408", "413", "415", "500", "502", "503",
];

/// Describe every metric of this node and export it at zero, so that a
/// series exists (and alerts on it work) before its first event.
/// Labelled series are created for each known label value; those labelled
/// by `partition` are created by the relay when it learns the partitions.
/// `redis`: whether the node relays through Redis (the [`Scope::Redis`]
/// metrics exist only then). Idempotent.
pub fn register(redis: bool) {
    handle();
    for &(name, kind, scope, help) in ALL {
        if scope == Scope::Redis && !redis {
            continue;
        }
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
        if [
            CONNECTIONS_CLOSED,
            REJECTED,
            RELAY_MESSAGES_IN,
            RELAY_LINK_RECONNECTS,
            RELAY_RESUBSCRIBE_SECONDS,
        ]
        .contains(&name)
        {
            continue;
        }
        match kind {
            Kind::Counter => metrics::counter!(name).increment(0),
            // Registering a gauge exports it at 0; set() would overwrite a
            // value another in-process node set already.
            Kind::Gauge => drop(metrics::gauge!(name)),
            Kind::Histogram => drop(metrics::histogram!(name)),
        }
    }
    for &reason in CLOSE_REASONS {
        metrics::counter!(CONNECTIONS_CLOSED, "reason" => reason).increment(0);
    }
    for &status in REJECTED_STATUSES {
        metrics::counter!(REJECTED, "status" => status).increment(0);
    }
}

/// The events-delivered counter, resolved once: it is bumped on every
/// write, and the `counter!` macro would look it up each time.
pub fn delivered() -> &'static metrics::Counter {
    static C: OnceLock<metrics::Counter> = OnceLock::new();
    C.get_or_init(|| {
        handle();
        metrics::counter!(DELIVERED)
    })
}

/// The process-wide Prometheus recorder, installed on first use.
///
/// `metrics` has one global recorder per process; several in-process servers
/// (as in tests) share it.
pub fn handle() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets(&[
                0.000_1, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            ])
            .expect("static buckets are valid")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then ours is
        // simply not the global one and renders nothing, which tests notice.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed");
        }
        handle
    })
}
