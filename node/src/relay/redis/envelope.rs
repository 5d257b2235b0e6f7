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
    v.push(b'}');
    v
}

impl Shared {
    /// A message from a topic channel.
    pub(super) fn deliver(&self, base: &str, payload: &[u8]) {
        let Ok(env) = serde_json::from_slice::<Envelope>(payload) else {
            metrics::counter!(m::RELAY_BAD_MESSAGES).increment(1);
            tracing::warn!(topic = base, "undecodable message on topic channel");
            return;
        };
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
        };
        let v: serde_json::Value = serde_json::from_slice(&envelope(&p)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"topic":"a\"b","data":{"x":[1,2]},"userId":"u1"})
        );
        let env: Envelope = serde_json::from_slice(br#"{"data":  [1, 2]}"#).unwrap();
        assert!(env.topic.is_none());
        assert_eq!(env.data.get(), "[1, 2]");
    }
}
