//! Subscription requests for a client held by another node: sent on that
//! node's channel with a deadline, answered on the sender's channel.
//!
//! The deadline is on Redis's clock (`clock.rs`), never on a node's wall
//! clock: the sender writes the time it gives up, less its own error; the
//! owner turns it into an instant on its monotonic clock, less its own
//! error and one of its round trips to Redis (time for its answer to get
//! back), and past it drops the request, or rolls back a change it made.
//! So the owner stops before the sender answers 503, however far either
//! node's wall clock is off.
//!
//! An answer can still be late: Redis may hold it up for longer than that
//! round trip. So one atomic `SET NX` decides each forwarded request: the
//! owner, once a change is confirmed, claims the request `applied` before
//! it answers, and rolls the change back if the sender claimed it first;
//! the sender, when its time is up, claims it `expired` and answers 503,
//! or 204 if the owner's claim won. The owner and the sender agree
//! whatever the delays. A side whose claim gets no answer (Redis went
//! away) assumes it lost: the owner rolls back, the sender answers 503.
//! Only a claim that Redis executed but whose answer was lost can leave
//! them disagreeing. The claim costs the owner one more round trip per
//! forwarded request; requests to the local node do not make one.
//!
//! The request also carries the stamp the receiving node gave it
//! (`SubscribeRequest::stamp`), which orders it against the client's
//! other requests (`Broker::subscribe_local_until`).

use std::sync::{Arc, atomic::Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::Shared;
use crate::{
    error::ApiError,
    metrics as m,
    relay::{Forwarded, Incoming, OAuth2Redirect, RelayError, SubscribeRequest, missing_client},
};

/// Messages on a node channel.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum NodeMessage {
    Subscribe {
        id: u64,
        from: String,
        /// Time on Redis's clock (Unix ms) after which the sender may have
        /// given up: the owner must not apply the request any more. (Older
        /// versions wrote their wall clock here, which is close to Redis's
        /// where clocks agree, so a rolling upgrade keeps forwarding.)
        deadline: u64,
        request: SubscribeRequest,
    },
    /// An OAuth2 redirect for a client of the receiving node (answered
    /// like a subscription: 204, or the failure). Older nodes do not know
    /// it; the sender then gets no answer and redirects to the failure
    /// page.
    Oauth2 {
        id: u64,
        from: String,
        deadline: u64,
        redirect: OAuth2Redirect,
    },
    Reply {
        id: u64,
        status: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<ErrorBody>,
    },
}

/// An [`ApiError`] on the wire.
#[derive(Debug, Serialize, Deserialize)]
struct ErrorBody {
    message: String,
    #[serde(default)]
    data: serde_json::Map<String, serde_json::Value>,
}

impl Shared {
    /// A message on this node's own channel.
    pub(super) fn on_node_message(self: &Arc<Self>, payload: &[u8]) {
        match serde_json::from_slice::<NodeMessage>(payload) {
            Ok(NodeMessage::Reply { id, status, error }) => {
                let answer = match error {
                    None => Ok(()),
                    Some(e) => Err(ApiError {
                        status: axum::http::StatusCode::from_u16(status)
                            .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                        message: e.message,
                        data: e.data,
                    }),
                };
                if let Some(waiter) = self.pending.lock().remove(&id) {
                    let _ = waiter.send(answer);
                }
            }
            Ok(NodeMessage::Oauth2 {
                id,
                from,
                deadline,
                redirect,
            }) => self.on_forwarded(id, from, deadline, Forwarded::OAuth2(redirect), false),
            Ok(NodeMessage::Subscribe {
                id,
                from,
                deadline,
                request,
            }) => self.on_forwarded(id, from, deadline, Forwarded::Subscribe(request), true),
            Err(e) => {
                metrics::counter!(m::RELAY_BAD_MESSAGES).increment(1);
                tracing::warn!(error = %e, "undecodable message on node channel");
            }
        }
    }

    /// A request for one of this node's clients: queued for the broker, in
    /// the order the channel delivered them (so one client's requests are
    /// applied in order), and answered on the sender's channel. With
    /// `claim`, a change stands only if the owner claims it before the
    /// sender gives up (see [`Shared::claim`]).
    fn on_forwarded(
        self: &Arc<Self>,
        id: u64,
        from: String,
        deadline: u64,
        request: Forwarded,
        claim: bool,
    ) {
        let Some(deadline) = self.clock.local_deadline(deadline) else {
            // The sender may have answered 503 already (or this
            // node has not read Redis's clock yet, and cannot
            // tell): never applied.
            metrics::counter!(m::FORWARDS_EXPIRED).increment(1);
            return;
        };
        // Queued here, in the order the channel delivered them, so
        // one client's requests are applied in order.
        let (reply, answer) = oneshot::channel();
        let commit = claim.then(|| {
            let shared = self.clone();
            let key = self.claim_key(&from, id);
            Box::pin(async move { shared.claim(key, "applied").await == Some(true) })
                as futures_util::future::BoxFuture<'static, bool>
        });
        let queued = self.incoming.try_send(Incoming {
            request,
            deadline,
            commit,
            reply,
        });
        let shared = self.clone();
        tokio::spawn(async move {
            let result = match queued {
                Ok(()) => match answer.await {
                    Ok(r) => r,
                    // Dropped past its deadline: nobody waits.
                    Err(_) => return,
                },
                Err(_) => Err(ApiError::unavailable("The node is overloaded.")),
            };
            let msg = match result {
                Ok(()) => NodeMessage::Reply {
                    id,
                    status: 204,
                    error: None,
                },
                Err(e) => NodeMessage::Reply {
                    id,
                    status: e.status.as_u16(),
                    error: Some(ErrorBody {
                        message: e.message,
                        data: e.data,
                    }),
                },
            };
            let body = serde_json::to_vec(&msg).expect("node message serialises");
            let channel = shared.node_channel_of(&from);
            let answer = async {
                let mut conn = shared.commands()?;
                shared
                    .command(
                        "PUBLISH",
                        shared
                            .publish_cmd(channel, body)
                            .query_async::<i64>(&mut conn),
                    )
                    .await
            };
            if let Err(e) = answer.await {
                tracing::warn!(error = %e, "could not answer a forwarded request");
            }
        });
    }

    /// Apply a request on the node with tag `node` (see
    /// [`Relay::forward`]).
    pub(super) async fn forward(
        &self,
        node: String,
        request: Forwarded,
    ) -> Result<Result<(), ApiError>, RelayError> {
        let s = self;
        // Given up at this node's monotonic `start + timeout`; the deadline
        // on Redis's clock is no later, whatever the clock error.
        let start = tokio::time::Instant::now();
        let now = s
            .clock
            .now()
            .ok_or_else(|| RelayError::Unavailable("Redis's clock has not been read yet".into()))?;
        let deadline = (now.us.saturating_sub(now.err_us) / 1000)
            + s.config.forward_timeout.as_millis() as u64;
        let id = s.next_request.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        s.pending.lock().insert(id, tx);
        // Removes the waiter however this ends, the HTTP request being
        // dropped mid-forward included.
        let _waiter = Waiter { shared: s, id };
        let from = s.hub.node_tag().to_owned();
        let claimed = matches!(request, Forwarded::Subscribe(_));
        let msg = match request {
            Forwarded::Subscribe(request) => NodeMessage::Subscribe {
                id,
                from,
                deadline,
                request,
            },
            Forwarded::OAuth2(redirect) => NodeMessage::Oauth2 {
                id,
                from,
                deadline,
                redirect,
            },
        };
        let body = serde_json::to_vec(&msg).expect("node message serialises");
        let mut conn = s.commands()?;
        let receivers = s
            .command(
                "PUBLISH",
                s.publish_cmd(s.node_channel_of(&node), body)
                    .query_async::<i64>(&mut conn),
            )
            .await;
        let listened = match receivers {
            Err(e) => return Err(e),
            Ok(n) => n > 0,
        };
        if listened
            && let Ok(Ok(answer)) =
                tokio::time::timeout_at(start + s.config.forward_timeout, rx).await
        {
            return Ok(answer);
        }
        // No answer in time. Give the request up, unless the owner has
        // already claimed it as applied: then its 204 is on the way (or
        // the owner died after the change), and the change stands.
        if listened
            && claimed
            && s.claim(s.claim_key(s.hub.node_tag(), id), "expired")
                .await
                .is_some_and(|given_up| !given_up)
        {
            return Ok(Ok(()));
        }
        // A node whose channel has a listener is connected (frozen or
        // overloaded), and one still in the membership may be
        // reconnecting: 503, try again. Otherwise no live node holds the
        // client: 404.
        if listened || s.is_alive(&node).await? {
            tracing::warn!(node, "forwarded request got no answer in time");
            Err(RelayError::Unavailable(format!(
                "node {node} did not answer in time"
            )))
        } else {
            Ok(Err(missing_client()))
        }
    }
}

/// How long a forwarded request's claim key lives: far longer than any
/// forward timeout, only so that it is cleaned up.
const CLAIM_TTL_MS: u64 = 60_000;

impl Shared {
    /// The key that decides a forwarded request's fate: request `id` of
    /// node `from`, on the partition of `from`'s channel.
    fn claim_key(&self, from: &str, id: u64) -> String {
        match self.partitions() {
            Some(_) => format!("{}:fw:{from}:{id}", self.partition_tag(self.link_of(from))),
            None => format!("{}fw:{from}:{id}", self.config.prefix),
        }
    }

    /// Claim a forwarded request as `applied` (the owner) or `expired`
    /// (the sender): `Some(true)` if this claim won, `Some(false)` if the
    /// other side's did, `None` if Redis did not say.
    async fn claim(&self, key: String, what: &str) -> Option<bool> {
        let mut conn = self.commands().ok()?;
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(what).arg("NX").arg("PX").arg(CLAIM_TTL_MS);
        let set: Option<String> = self.command("SET", cmd.query_async(&mut conn)).await.ok()?;
        Some(set.is_some())
    }
}

/// Removes a forwarded request's waiter when the forward ends, however.
struct Waiter<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.shared.pending.lock().remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_messages_round_trip() {
        let m = NodeMessage::Subscribe {
            id: 7,
            from: "AbCdEfGh".into(),
            deadline: 1,
            request: SubscribeRequest {
                client_id: "c".into(),
                subscriptions: vec!["t".into()],
                ip: "127.0.0.1".parse().unwrap(),
                authorization: None,
                stamp: Some(42),
            },
        };
        let back: NodeMessage = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert!(matches!(back, NodeMessage::Subscribe { id: 7, .. }));
        let NodeMessage::Subscribe { request, .. } = back else {
            unreachable!()
        };
        assert_eq!(request.stamp, Some(42));
    }
}
