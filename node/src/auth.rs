//! Verifying the `Authorization` token of a subscription request.
//!
//! As in PocketBase, a token is optional and an invalid or expired one is
//! treated as "guest", never as an error: the SDKs send whatever token they
//! hold, and the realtime POST must not fail just because it has expired.
//! What a valid token yields is an [`AuthRecord`]: the identity that the
//! stream is then bound to, and that directed sends address.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// The credential of an `Authorization` value: `<token>` or
/// `Bearer <token>` (any case), trimmed.
pub fn bearer_token(value: &str) -> &str {
    let value = value.trim();
    match value.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("bearer ") => value[7..].trim_start(),
        _ => value,
    }
}

/// The identity bound to a realtime client.
///
/// Two records are "the same auth" when both ids match (PocketBase compares
/// the record id and the collection id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRecord {
    /// The user (record) id: the token's `id` claim, or `sub`.
    pub id: String,
    /// The auth collection: the token's `collectionId` claim, or empty.
    #[serde(rename = "collectionId")]
    pub collection_id: String,
    /// All claims of the token, for library users.
    #[serde(skip)]
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl AuthRecord {
    /// PocketBase's "same auth" test.
    pub fn same_as(&self, other: &AuthRecord) -> bool {
        self.id == other.id && self.collection_id == other.collection_id
    }
}

/// How tokens are verified.
///
/// Only HMAC secrets exist today; public keys (RS256, JWKS) become further
/// variants without changing callers.
#[derive(Clone)]
pub enum KeySource {
    /// No verification possible: every request is a guest.
    None,
    /// HS256 with a shared secret.
    Hs256(Vec<u8>),
}

/// Verifies tokens into [`AuthRecord`]s.
#[derive(Clone)]
pub struct Authenticator {
    key: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("enabled", &self.key.is_some())
            .finish()
    }
}

impl Authenticator {
    pub fn new(source: KeySource) -> Self {
        let key = match source {
            KeySource::None => None,
            KeySource::Hs256(secret) => {
                let mut v = Validation::new(Algorithm::HS256);
                v.leeway = 0;
                v.validate_aud = false;
                v.required_spec_claims = ["exp".to_owned()].into();
                // A token that is not valid yet is not valid.
                v.validate_nbf = true;
                Some((DecodingKey::from_secret(&secret), v))
            }
        };
        Self { key }
    }

    /// Whether any token can be accepted at all.
    pub fn enabled(&self) -> bool {
        self.key.is_some()
    }

    /// The auth record of an `Authorization` header value (`<token>` or
    /// `Bearer <token>`), or `None` for a guest.
    pub fn verify_header(&self, header: Option<&str>) -> Option<AuthRecord> {
        self.verify(bearer_token(header?))
    }

    /// The auth record of a raw token, or `None` when it is not valid.
    pub fn verify(&self, token: &str) -> Option<AuthRecord> {
        let (key, validation) = self.key.as_ref()?;
        if token.is_empty() {
            return None;
        }
        // RFC 7515 §4.1.11: a `crit` header names extensions the verifier
        // must understand; we understand none, so such a token is refused.
        if jsonwebtoken::decode_header(token).ok()?.crit.is_some() {
            return None;
        }
        let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
            token, key, validation,
        )
        .ok()?;
        let claims = data.claims;
        // PocketBase marks its auth tokens with type "auth"; other token
        // types (file, password reset, …) must not authenticate.
        if let Some(t) = claims.get("type")
            && t.as_str() != Some("auth")
        {
            return None;
        }
        let id = claims
            .get("id")
            .or_else(|| claims.get("sub"))
            .and_then(|v| v.as_str())
            .filter(|s| !s.is_empty())?
            .to_owned();
        let collection_id = claims
            .get("collectionId")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned();
        Some(AuthRecord {
            id,
            collection_id,
            claims,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    /// An HS256 token for tests and examples.
    pub fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    /// A token whose header carries `crit`.
    fn crit_token(secret: &str, claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::HS256);
        h.crit = Some(vec!["exp".into()]);
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
    }

    fn exp(offset: i64) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + offset
    }

    #[test]
    fn valid_tokens_yield_a_record() {
        let a = Authenticator::new(KeySource::Hs256(b"s3cret".to_vec()));
        let t = token(
            "s3cret",
            json!({"id":"u1","collectionId":"users","type":"auth","exp":exp(60)}),
        );
        let r = a.verify_header(Some(&t)).unwrap();
        assert_eq!((r.id.as_str(), r.collection_id.as_str()), ("u1", "users"));
        assert!(a.verify_header(Some(&format!("Bearer {t}"))).is_some());
        assert!(a.verify_header(Some(&format!("bearer  {t}"))).is_some());
        let sub = token("s3cret", json!({"sub":"u2","exp":exp(60)}));
        assert_eq!(a.verify(&sub).unwrap().id, "u2");
    }

    #[test]
    fn bad_tokens_are_guests() {
        let a = Authenticator::new(KeySource::Hs256(b"s3cret".to_vec()));
        for t in [
            token("other", json!({"id":"u1","exp":exp(60)})),
            token("s3cret", json!({"id":"u1","exp":exp(-10)})),
            token("s3cret", json!({"id":"u1"})),
            token("s3cret", json!({"id":"u1","type":"file","exp":exp(60)})),
            token("s3cret", json!({"exp":exp(60)})),
            // Not valid before a minute from now.
            token("s3cret", json!({"id":"u1","exp":exp(120),"nbf":exp(60)})),
            crit_token("s3cret", json!({"id":"u1","exp":exp(60)})),
            "garbage".to_owned(),
            String::new(),
        ] {
            assert!(a.verify(&t).is_none(), "{t}");
        }
        assert!(a.verify_header(None).is_none());
        let none = Authenticator::new(KeySource::None);
        assert!(
            none.verify(&token("s3cret", json!({"id":"u1","exp":exp(60)})))
                .is_none()
        );
    }
}
