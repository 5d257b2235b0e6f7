//! The PocketBase realtime wire protocol: client ids, SSE framing, topic keys
//! and their `?options=` suffix.
//!
//! Everything that decides which bytes go on the wire lives here, so that the
//! compatibility rules of `shared/spec/pocketbase-realtime.md` are checked in
//! one place. The rest of the broker only moves the [`Bytes`] this module makes.

use std::{borrow::Cow, collections::BTreeMap};

use bytes::{BufMut, Bytes, BytesMut};
use rand::Rng;
use serde::Serialize;

/// Length of a client id, as PocketBase makes them.
pub const CLIENT_ID_LEN: usize = 40;
/// Characters at the start of a client id that name the node holding its stream.
///
/// The remaining 32 characters are random: 62^32 ≈ 2^190, far beyond guessing.
pub const NODE_TAG_LEN: usize = 8;
/// The event PocketBase sends first on every stream.
pub const CONNECT_EVENT: &str = "PB_CONNECT";
/// The key the SDKs' OAuth2 all-in-one flow subscribes, whose event carries
/// the provider's answer (PocketBase `apis/record_auth_with_oauth2_redirect.go`).
pub const OAUTH2_TOPIC: &str = "@oauth2";
/// PocketBase's limit on a subscription set.
pub const MAX_SUBSCRIPTIONS: usize = 1000;
/// PocketBase's limit on one topic, in bytes.
pub const MAX_TOPIC_LEN: usize = 2500;
/// PocketBase's limit on a client id, in bytes.
pub const MAX_CLIENT_ID_LEN: usize = 255;
/// Most bytes an event adds around its data on one of our streams: the
/// `id:<client id>\n` line, `event:<key>\ndata:` with the longest key, and
/// the closing `\n\n`.
pub const MAX_EVENT_OVERHEAD: usize =
    "id:\n".len() + CLIENT_ID_LEN + "event:\ndata:".len() + MAX_TOPIC_LEN + "\n\n".len();

const ALPHANUMERIC: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A random string of `[A-Za-z0-9]`, from the thread-local CSPRNG.
pub fn random_alphanumeric(len: usize) -> String {
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHANUMERIC[rng.random_range(0..ALPHANUMERIC.len())] as char)
        .collect()
}

/// Makes client ids that carry the owning node's tag.
///
/// A client id is `<node tag: 8 chars><random: 32 chars>`, all `[A-Za-z0-9]`,
/// so it looks exactly like a PocketBase id to SDKs while any node can tell,
/// without a lookup, which node holds the stream.
#[derive(Debug, Clone)]
pub struct ClientIdGen {
    node_tag: String,
}

impl ClientIdGen {
    /// A generator for the node with this tag (exactly [`NODE_TAG_LEN`] alphanumerics).
    pub fn new(node_tag: &str) -> Self {
        assert!(is_node_tag(node_tag), "invalid node tag {node_tag:?}");
        Self {
            node_tag: node_tag.to_owned(),
        }
    }

    /// The tag this generator puts in front of every id.
    pub fn node_tag(&self) -> &str {
        &self.node_tag
    }

    /// A fresh, unguessable client id.
    pub fn next_id(&self) -> String {
        let mut id = String::with_capacity(CLIENT_ID_LEN);
        id.push_str(&self.node_tag);
        id.push_str(&random_alphanumeric(CLIENT_ID_LEN - NODE_TAG_LEN));
        id
    }
}

/// Whether `s` is a valid node tag.
pub fn is_node_tag(s: &str) -> bool {
    s.len() == NODE_TAG_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// The node tag inside a client id, if the id has our shape.
pub fn node_tag_of(client_id: &str) -> Option<&str> {
    (client_id.len() == CLIENT_ID_LEN && client_id.bytes().all(|b| b.is_ascii_alphanumeric()))
        .then(|| &client_id[..NODE_TAG_LEN])
}

/// Whether a string may be written into an SSE field line.
///
/// A CR or LF would end the line and let the rest inject fields or events.
pub fn is_line_safe(s: &[u8]) -> bool {
    !s.iter().any(|&b| b == b'\n' || b == b'\r')
}

/// The `id:` line written in front of every event of one stream.
///
/// PocketBase repeats the stream's client id on every event, and the SDKs read
/// the id of `PB_CONNECT` from this line, so it is kept byte for byte.
pub fn id_line(client_id: &str) -> Bytes {
    let mut b = BytesMut::with_capacity(client_id.len() + 4);
    b.put_slice(b"id:");
    b.put_slice(client_id.as_bytes());
    b.put_u8(b'\n');
    b.freeze()
}

/// A subscription key, stored once.
///
/// The bytes are `event:<key>\ndata:`, the head of every event sent for
/// this key, so the key itself and its event head are one allocation.
/// Every client holding the key and the topic index share it by refcount:
/// 1,000 clients subscribed to the same 2,500-byte key cost one copy.
#[derive(Clone)]
pub struct SubKey(Bytes);

const HEAD_PREFIX: &[u8] = b"event:";
const HEAD_SUFFIX: &[u8] = b"\ndata:";

impl SubKey {
    /// The key `key`, which must be [`is_line_safe`] (checked: a CR or LF
    /// would let the key inject SSE fields).
    pub fn new(key: &str) -> Result<Self, LineBreak> {
        if !is_line_safe(key.as_bytes()) {
            return Err(LineBreak);
        }
        let mut b = BytesMut::with_capacity(key.len() + HEAD_PREFIX.len() + HEAD_SUFFIX.len());
        b.put_slice(HEAD_PREFIX);
        b.put_slice(key.as_bytes());
        b.put_slice(HEAD_SUFFIX);
        Ok(Self(b.freeze()))
    }

    pub fn as_str(&self) -> &str {
        let key = &self.0[HEAD_PREFIX.len()..self.0.len() - HEAD_SUFFIX.len()];
        // Built from a `&str` in `new`.
        std::str::from_utf8(key).expect("a key is UTF-8")
    }

    /// `event:<key>\ndata:`.
    pub fn head(&self) -> &Bytes {
        &self.0
    }
}

impl std::ops::Deref for SubKey {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::borrow::Borrow<str> for SubKey {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl PartialEq for SubKey {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for SubKey {}

impl std::hash::Hash for SubKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so lookups by `&str` find it (`Borrow<str>`).
        self.as_str().hash(state)
    }
}

impl std::fmt::Debug for SubKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_str().fmt(f)
    }
}

/// A string with a CR or LF where an SSE field line was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("must not contain CR or LF characters")]
pub struct LineBreak;

/// The data part of an event: `<one line of JSON>\n\n`, made once per
/// publication and shared by every key and every client it goes to.
pub fn event_data(data: &[u8]) -> Result<Bytes, LineBreak> {
    if !is_line_safe(data) {
        return Err(LineBreak);
    }
    let mut b = BytesMut::with_capacity(data.len() + 2);
    b.put_slice(data);
    b.put_slice(b"\n\n");
    Ok(b.freeze())
}

/// One event, without the stream's `id:` line: the key's head
/// (`event:<key>\ndata:`) and the publication's data (`<json>\n\n`).
///
/// Both parts are shared by refcount, so queueing an event for a client
/// costs two pointers, whatever the size of the data.
#[derive(Debug, Clone)]
pub struct Frame {
    pub head: Bytes,
    pub data: Bytes,
}

impl Frame {
    pub fn new(key: &SubKey, data: &Bytes) -> Self {
        Self {
            head: key.head().clone(),
            data: data.clone(),
        }
    }

    /// Bytes on the wire, without the `id:` line.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// The event as one buffer (tests and diagnostics).
    pub fn to_vec(&self) -> Vec<u8> {
        [&self.head[..], &self.data[..]].concat()
    }
}

/// An event `event:<name>\ndata:<data>\n\n`, for names and data that are
/// already known to be line-safe (checked again here, in release builds
/// too: a line break would inject SSE fields).
pub fn event_frame(name: &str, data: &[u8]) -> Result<Frame, LineBreak> {
    let key = SubKey::new(name)?;
    Ok(Frame::new(&key, &event_data(data)?))
}

/// The `data:` of `PB_CONNECT`: `{"clientId":"<id>"}`, no spaces, as Go writes it.
pub fn connect_data(client_id: &str) -> Vec<u8> {
    format!(r#"{{"clientId":"{client_id}"}}"#).into_bytes()
}

/// Compact JSON on one line.
///
/// JSON can hold a CR or LF only as whitespace between tokens (inside strings
/// they must be escaped), so removing them keeps the value and guarantees a
/// single `data:` line, which the Dart SDK needs (it keeps only the last one).
pub fn one_line_json(raw: &str) -> Cow<'_, [u8]> {
    if is_line_safe(raw.as_bytes()) {
        Cow::Borrowed(raw.as_bytes())
    } else {
        Cow::Owned(raw.bytes().filter(|&b| b != b'\n' && b != b'\r').collect())
    }
}

/// The topic part of a subscription key: everything before the first `?`.
///
/// The topic index and the relay channels are keyed by it, so that one lookup
/// finds every key a publish can match.
pub fn base_topic(key: &str) -> &str {
    key.split_once('?').map_or(key, |(t, _)| t)
}

/// Whether a publish to `topic` reaches the subscription `key`.
///
/// The key is the topic itself or the topic followed by `?…` (the SDKs'
/// `?options=` form). This is PocketBase's `Subscriptions(topic + "?")` rule.
pub fn key_matches(key: &str, topic: &str) -> bool {
    key.len() >= topic.len()
        && key.as_bytes().starts_with(topic.as_bytes())
        && (key.len() == topic.len() || key.as_bytes()[topic.len()] == b'?')
}

/// The options a subscription key carries, normalised as PocketBase does.
///
/// `query` values and `headers` values are strings; header names are
/// snake_cased (`X-Token` → `x_token`). Parse errors leave both empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SubscriptionOptions {
    pub query: BTreeMap<String, String>,
    pub headers: BTreeMap<String, String>,
}

impl SubscriptionOptions {
    /// Parse the `options` query value of a raw subscription key.
    pub fn parse(key: &str) -> Self {
        let Some((_, query)) = key.split_once('?') else {
            return Self::default();
        };
        // Like Go's url.Parse, a fragment is not part of the query.
        let query = query.split_once('#').map_or(query, |(q, _)| q);
        let Some(raw) = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "options")
            .map(|(_, v)| v)
        else {
            return Self::default();
        };
        #[derive(serde::Deserialize)]
        struct Raw {
            #[serde(default)]
            query: serde_json::Map<String, serde_json::Value>,
            #[serde(default)]
            headers: serde_json::Map<String, serde_json::Value>,
        }
        let Ok(parsed) = serde_json::from_str::<Raw>(&raw) else {
            return Self::default();
        };
        Self {
            query: parsed
                .query
                .into_iter()
                .map(|(k, v)| (k, stringify(&v)))
                .collect(),
            headers: parsed
                .headers
                .into_iter()
                .map(|(k, v)| (snake_case(&k), stringify(&v)))
                .collect(),
        }
    }
}

/// The resume cursor of a subscription key: its `since` query option
/// (`subscribe(topic, cb, {since: "…"})` in the SDKs).
pub fn since_of(key: &str) -> Option<String> {
    if !key.contains('?') {
        return None;
    }
    SubscriptionOptions::parse(key)
        .query
        .remove("since")
        .filter(|s| !s.is_empty())
}

/// PocketBase's value normalisation: numbers and bools as text, strings as
/// they are, anything else empty.
fn stringify(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// PocketBase's `inflector.Snakecase`: split on runs of non-word characters
/// and underscores, split camel humps, join with `_`, lower-case.
pub fn snake_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for word in s
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        if !out.is_empty() {
            out.push('_');
        }
        let mut prev_upper = false;
        for (i, c) in word.chars().enumerate() {
            let upper = c.is_uppercase();
            if upper && i > 0 && !prev_upper {
                out.push('_');
            }
            prev_upper = upper;
            out.extend(c.to_lowercase());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_bytes_match_pocketbase() {
        // PocketBase's message_test expects exactly these bytes.
        let mut all = id_line("test_id").to_vec();
        all.extend_from_slice(&event_frame("test_name", b"test_data").unwrap().to_vec());
        assert_eq!(all, b"id:test_id\nevent:test_name\ndata:test_data\n\n");
    }

    #[test]
    fn keys_and_data_refuse_line_breaks_in_every_build() {
        assert_eq!(SubKey::new("a\nb").unwrap_err(), LineBreak);
        assert_eq!(SubKey::new("a\rb").unwrap_err(), LineBreak);
        assert_eq!(event_data(b"{}\n").unwrap_err(), LineBreak);
        let k = SubKey::new("chat?x=1").unwrap();
        assert_eq!(&*k, "chat?x=1");
        assert_eq!(&k.head()[..], b"event:chat?x=1\ndata:");
        let mut set = std::collections::HashSet::new();
        set.insert(k);
        assert!(set.contains("chat?x=1"));
    }

    #[test]
    fn connect_data_is_compact() {
        assert_eq!(connect_data("abc"), br#"{"clientId":"abc"}"#);
    }

    #[test]
    fn ids_are_unique_40_alphanumerics_with_node_tag() {
        let g = ClientIdGen::new("Node0001");
        let a = g.next_id();
        let b = g.next_id();
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), 40);
            assert!(id.bytes().all(|c| c.is_ascii_alphanumeric()));
            assert_eq!(node_tag_of(id), Some("Node0001"));
        }
        assert_eq!(node_tag_of("short"), None);
        assert_eq!(node_tag_of(&"-".repeat(40)), None);
    }

    #[test]
    fn topic_matching_follows_the_question_mark_rule() {
        assert!(key_matches("example", "example"));
        assert!(key_matches("example?options=x", "example"));
        assert!(!key_matches("example2", "example"));
        assert!(!key_matches("exampl", "example"));
        assert!(key_matches("a?b", "a?b"));
        assert!(key_matches("a?b?c", "a?b"));
        assert!(!key_matches("a?bc", "a?b"));
        assert_eq!(base_topic("posts/*?options=%7B%7D"), "posts/*");
        assert_eq!(base_topic("plain"), "plain");
    }

    #[test]
    fn options_are_normalised_like_pocketbase() {
        // From PocketBase's client_test: unencoded JSON in the query is accepted.
        let o = SubscriptionOptions::parse(
            r#"test2?options={"query":{"name":123},"headers":{"X-Token":456}}"#,
        );
        assert_eq!(o.query.get("name").map(String::as_str), Some("123"));
        assert_eq!(o.headers.get("x_token").map(String::as_str), Some("456"));

        // The JS SDK's encodeURIComponent form.
        let o = SubscriptionOptions::parse(
            "topic?options=%7B%22query%22%3A%7B%22filter%22%3A%22a%3D1%22%2C%22flag%22%3Atrue%2C%22obj%22%3A%7B%7D%7D%7D",
        );
        assert_eq!(o.query.get("filter").map(String::as_str), Some("a=1"));
        assert_eq!(o.query.get("flag").map(String::as_str), Some("true"));
        assert_eq!(o.query.get("obj").map(String::as_str), Some(""));

        // Dart's encodeQueryComponent form: spaces become '+'.
        let o = SubscriptionOptions::parse(
            "t?options=%7B%22query%22%3A%7B%22filter%22%3A%22a+b%22%7D%7D",
        );
        assert_eq!(o.query.get("filter").map(String::as_str), Some("a b"));

        assert_eq!(
            SubscriptionOptions::parse("test1"),
            SubscriptionOptions::default()
        );
        assert_eq!(
            SubscriptionOptions::parse("x?options=not-json"),
            SubscriptionOptions::default()
        );
    }

    #[test]
    fn the_resume_cursor_is_the_since_query_option() {
        assert_eq!(
            since_of("chat?options=%7B%22query%22%3A%7B%22since%22%3A%22m4%22%7D%7D").as_deref(),
            Some("m4")
        );
        assert_eq!(since_of("chat"), None);
        assert_eq!(since_of(r#"chat?options={"query":{"since":""}}"#), None);
    }

    #[test]
    fn snake_case_matches_inflector() {
        assert_eq!(snake_case("X-Token"), "x_token");
        assert_eq!(snake_case("authorization"), "authorization");
        assert_eq!(snake_case("myHeaderName"), "my_header_name");
        assert_eq!(snake_case("HTTPCode"), "httpcode");
        assert_eq!(snake_case("__a__b"), "a_b");
    }

    #[test]
    fn one_line_json_strips_only_whitespace_newlines() {
        assert_eq!(
            &one_line_json("{\n \"a\": \"x\\ny\"\r\n}")[..],
            b"{ \"a\": \"x\\ny\"}"
        );
        assert_eq!(&one_line_json("[1,2]")[..], b"[1,2]");
    }
}
