//! The message on a topic channel: the JSON of one `POST /api/publish`
//! message, so any backend can publish to Redis directly.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::Shared;
use crate::{hub::Audience, metrics as m, protocol, relay::Publication};

/// A topic-channel envelope, as decoded.
#[derive(Deserialize)]
pub(super) struct Envelope<'a> {
    #[serde(default, borrow)]
    topic: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, rename = "clientId")]
    client_id: Option<String>,
    #[serde(default, rename = "userId")]
    user_id: Option<String>,
    /// Set by the publish script when history is on.
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default, borrow)]
    epoch: Option<std::borrow::Cow<'a, str>>,
}

/// The envelope of a publication: the HTTP publish JSON.
pub(super) fn envelope(p: &Publication) -> Vec<u8> {
    let mut v = Vec::with_capacity(p.data.len() + p.topic.len() + 64);
    v.extend_from_slice(b"{\"topic\":");
    serde_json::to_writer(&mut v, &p.topic).expect("string serialises");
    v.extend_from_slice(b",\"data\":");
    v.extend_from_slice(&p.data);
    match &p.audience {
        Audience::All => {}
        Audience::Client(c) => {
            v.extend_from_slice(b",\"clientId\":");
            serde_json::to_writer(&mut v, c).expect("string serialises");
        }
        Audience::User(u) => {
            v.extend_from_slice(b",\"userId\":");
            serde_json::to_writer(&mut v, u).expect("string serialises");
        }
    }
    if let Some(id) = &p.id {
        v.extend_from_slice(b",\"id\":");
        serde_json::to_writer(&mut v, id).expect("string serialises");
    }
    v.push(b'}');
    v
}

impl Shared {
    /// A message from a topic channel: dispatched unless its offset shows
    /// it was seen already; a gap before it is filled first.
    pub(super) async fn deliver(&self, base: &str, payload: &[u8]) {
        let Ok(env) = serde_json::from_slice::<Envelope>(payload) else {
            metrics::counter!(m::RELAY_BAD_MESSAGES).increment(1);
            tracing::warn!(topic = base, "undecodable message on topic channel");
            return;
        };
        if self.history_on()
            && let (Some(offset), Some(epoch)) = (env.offset, env.epoch.as_deref())
            && !self.admit_offset(base, epoch, offset, payload).await
        {
            return;
        }
        self.dispatch_decoded(base, env);
    }

    /// The epoch and offset of a message read from history.
    pub(super) fn peek_envelope(&self, payload: &[u8]) -> Option<(String, u64)> {
        let env = serde_json::from_slice::<Envelope>(payload).ok()?;
        Some((env.epoch.as_deref()?.to_owned(), env.offset?))
    }

    /// Dispatch a message read from history; its epoch and offset.
    pub(super) fn dispatch_envelope(&self, base: &str, payload: &[u8]) -> Option<(String, u64)> {
        let env = serde_json::from_slice::<Envelope>(payload).ok()?;
        let at = (env.epoch.as_deref()?.to_owned(), env.offset?);
        self.dispatch_decoded(base, env);
        Some(at)
    }

    /// Push a message read from history to one client for one key (if it
    /// matches the key and its audience), paced by the client's stream
    /// (waits for room in its queue). `Err` when the client is closed.
    pub(super) async fn replay_to_paced(
        &self,
        client: &std::sync::Arc<crate::client::Client>,
        key: &crate::protocol::SubKey,
        base: &str,
        payload: &[u8],
    ) -> Result<(), crate::client::SendError> {
        let Ok(env) = serde_json::from_slice::<Envelope>(payload) else {
            return Ok(());
        };
        let topic = env.topic.as_deref().unwrap_or(base);
        let audience = match (&env.client_id, &env.user_id) {
            (Some(c), _) => Audience::Client(c.clone()),
            (None, Some(u)) => Audience::User(u.clone()),
            (None, None) => Audience::All,
        };
        let data = protocol::one_line_json(env.data.get());
        self.hub
            .push_replay_paced(
                client,
                key,
                topic,
                &data,
                &audience,
                crate::relay::REPLAY_STALL,
            )
            .await
    }

    /// The data's length of a message read from history.
    pub(super) fn data_len(payload: &[u8]) -> Option<usize> {
        let env = serde_json::from_slice::<Envelope>(payload).ok()?;
        Some(env.data.get().len())
    }

    fn dispatch_decoded(&self, base: &str, env: Envelope<'_>) {
        let topic = env.topic.as_deref().unwrap_or(base);
        let audience = match (env.client_id, env.user_id) {
            (Some(c), _) => Audience::Client(c),
            (None, Some(u)) => Audience::User(u),
            (None, None) => Audience::All,
        };
        let data = protocol::one_line_json(env.data.get());
        self.hub.dispatch(topic, &data, &audience);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn envelope_is_the_publish_json() {
        let p = Publication {
            topic: "a\"b".into(),
            data: bytes::Bytes::from_static(br#"{"x":[1,2]}"#),
            audience: Audience::User("u1".into()),
            id: Some("m1".into()),
        };
        let v: serde_json::Value = serde_json::from_slice(&envelope(&p)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"topic":"a\"b","data":{"x":[1,2]},"userId":"u1","id":"m1"})
        );
        let env: Envelope = serde_json::from_slice(br#"{"data":  [1, 2]}"#).unwrap();
        assert!(env.topic.is_none());
        assert_eq!(env.data.get(), "[1, 2]");
    }
}
