//! Auth tokens verified by PocketBase itself.
//!
//! PocketBase signs each user's token with that user's own key (the record's
//! `tokenKey` plus the collection's secret, PocketBase
//! `core/record_tokens.go`), so no shared secret can verify it. Instead the
//! companion hooks file (`deploy/pocketbase/pb_hooks/fanout.pb.js`) adds
//! `POST /api/fanout/verify`, which runs `$app.findAuthRecordByToken(token,
//! "auth")`: the same function PocketBase's realtime POST runs
//! (`apis/middlewares.go`, `loadAuthToken`). Fanout therefore accepts exactly
//! the tokens PocketBase accepts, and as in PocketBase an invalid or expired
//! token is a guest, never an error.
//!
//! Each distinct token costs one call, then its answer is cached:
//! * a valid token until the earlier of its `exp` and the recheck bound
//!   ([`VerifierConfig::recheck`]), so a revoked token (password change,
//!   deleted record, rotated collection secret) is trusted at most that long;
//! * an invalid one for [`NEGATIVE_TTL`].
//!
//! What a flood of garbage cannot do:
//! * a token that is not a well-formed, unexpired PocketBase auth JWT (claims
//!   `id`, `collectionId`, `type:"auth"`, `exp`) is a guest without any call;
//! * calls run at most [`VerifierConfig::concurrency`] at a time and at most
//!   [`VerifierConfig::per_ip`] per client address, so one address's flood of
//!   forged tokens answers *its own* requests 503 and leaves room for others;
//! * concurrent requests with the same token share one call;
//! * the cache holds at most [`VerifierConfig::cache_entries`] tokens, the
//!   least recently used leaving first.
//!
//! Tokens live only in this node's memory: they are sent to PocketBase and
//! nowhere else, and no log line or metric carries one.

use std::{
    collections::HashMap,
    net::IpAddr,
    num::NonZeroUsize,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use futures_util::{
    FutureExt,
    future::{BoxFuture, Shared},
};
use lru::LruCache;
use parking_lot::Mutex;
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::auth::AuthRecord;

/// How long "this token is invalid" is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);

/// The header that carries the shared secret to PocketBase's hooks.
pub const SECRET_HEADER: &str = "X-Fanout-Secret";

/// The verification route the hooks file adds.
pub const VERIFY_PATH: &str = "/api/fanout/verify";

/// Limits of a [`TokenVerifier`].
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// PocketBase's base URL (`http://host:port`), without a trailing `/`.
    pub url: String,
    /// The shared secret (PocketBase's `FANOUT_SECRET`).
    pub secret: String,
    /// How long one call to PocketBase may take, waiting for a free slot
    /// included. Default 5 s.
    pub timeout: Duration,
    /// Most tokens remembered. Default 100,000 (about 300 bytes each).
    pub cache_entries: usize,
    /// How long a valid token is trusted before it is asked again: the bound
    /// on how long a revoked token still counts. Default 60 s.
    pub recheck: Duration,
    /// Most calls to PocketBase at once. Default 32.
    pub concurrency: usize,
    /// Most calls at once on behalf of one client address. Default 4.
    pub per_ip: usize,
}

/// Why a token could not be judged. Either way nothing should change: the
/// caller answers 503 ("try again").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// PocketBase did not answer, answered an error, or refused the secret.
    #[error("PocketBase could not verify the token: {0}")]
    Unavailable(String),
    /// This address has too many verifications under way, or every slot
    /// stayed busy for the whole timeout.
    #[error("too many token verifications under way; try again")]
    Busy,
}

/// A token's verdict, as cached.
#[derive(Debug, Clone)]
enum Verdict {
    /// Valid until `exp` (Unix seconds).
    Valid {
        record: AuthRecord,
        exp: u64,
    },
    Invalid,
}

#[derive(Debug, Clone)]
struct Cached {
    verdict: Verdict,
    checked: Instant,
}

type Call = Shared<BoxFuture<'static, Result<Verdict, VerifyError>>>;

/// Verifies PocketBase auth tokens through the companion hooks route, with a
/// bounded cache. Cheap to share (`Arc`).
pub struct TokenVerifier {
    config: VerifierConfig,
    http: reqwest::Client,
    cache: Mutex<LruCache<Arc<str>, Cached>>,
    inflight: Mutex<HashMap<Arc<str>, Call>>,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    slots: Arc<Semaphore>,
    health: Mutex<Result<(), String>>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier")
            .field("url", &self.config.url)
            .field("cached", &self.cache.lock().len())
            .finish()
    }
}

/// The answer of the verification route.
#[derive(Deserialize)]
struct Verified {
    id: String,
    #[serde(rename = "collectionId")]
    collection_id: String,
    #[serde(rename = "collectionName", default)]
    collection_name: String,
    exp: f64,
}

impl TokenVerifier {
    /// A verifier for the PocketBase at `config.url`.
    pub fn new(config: VerifierConfig) -> Arc<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .pool_max_idle_per_host(config.concurrency)
            .build()
            .expect("a plain HTTP client builds");
        let entries = NonZeroUsize::new(config.cache_entries.max(1)).expect("max(1) is non-zero");
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(config.concurrency.max(1))),
            http,
            cache: Mutex::new(LruCache::new(entries)),
            inflight: Mutex::new(HashMap::new()),
            per_ip: Mutex::new(HashMap::new()),
            health: Mutex::new(Err("not checked yet".to_owned())),
            config,
        })
    }

    /// The identity of an `Authorization` value (`<token>` or `Bearer
    /// <token>`) sent from `ip`: `Ok(None)` for a guest (no token, or one
    /// PocketBase does not accept), or why it could not be judged.
    pub async fn verify_header(
        self: &Arc<Self>,
        header: Option<&str>,
        ip: IpAddr,
    ) -> Result<Option<AuthRecord>, VerifyError> {
        match header {
            Some(h) => self.verify(crate::auth::bearer_token(h), ip).await,
            None => Ok(None),
        }
    }

    /// The identity of a raw token; see [`TokenVerifier::verify_header`].
    pub async fn verify(
        self: &Arc<Self>,
        token: &str,
        ip: IpAddr,
    ) -> Result<Option<AuthRecord>, VerifyError> {
        if !plausible(token) {
            return Ok(None);
        }
        if let Some(verdict) = self.cached(token) {
            return Ok(usable(verdict));
        }
        let key: Arc<str> = Arc::from(token);
        let call = {
            let mut inflight = self.inflight.lock();
            match inflight.get(&key) {
                Some(call) => call.clone(),
                None => {
                    // A task of its own, so that it finishes (within its
                    // timeouts) and gives its slots back even when every
                    // request waiting on it is dropped; it leaves the
                    // in-flight map when done.
                    let this = self.clone();
                    let k = key.clone();
                    let task = tokio::spawn(async move {
                        let verdict = this.clone().call(k.clone(), ip).await;
                        this.inflight.lock().remove(&k);
                        verdict
                    });
                    let call = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(VerifyError::Unavailable(format!(
                                "verification failed: {e}"
                            )))
                        })
                    }
                    .boxed()
                    .shared();
                    inflight.insert(key, call.clone());
                    call
                }
            }
        };
        call.await.map(usable)
    }

    /// Whether the last call to PocketBase (or the last probe) reached it
    /// and was accepted; the reason otherwise.
    pub fn health(&self) -> Result<(), String> {
        self.health.lock().clone()
    }

    /// Ask PocketBase whether it is reachable, has the hooks file and takes
    /// the secret: an empty token must come back 401.
    pub async fn probe(&self) -> Result<(), String> {
        let outcome = match self.post("").await {
            Ok((reqwest::StatusCode::UNAUTHORIZED, _)) => Ok(()),
            Ok((status, _)) => Err(refusal(status)),
            Err(e) => Err(e),
        };
        *self.health.lock() = outcome.clone();
        outcome
    }

    /// Tokens cached right now (for tests and `/api/health`).
    pub fn cached_tokens(&self) -> usize {
        self.cache.lock().len()
    }

    fn cached(&self, token: &str) -> Option<Verdict> {
        let mut cache = self.cache.lock();
        let entry = cache.get(token)?;
        let fresh = match entry.verdict {
            Verdict::Valid { .. } => entry.checked.elapsed() < self.config.recheck,
            Verdict::Invalid => entry.checked.elapsed() < NEGATIVE_TTL,
        };
        fresh.then(|| entry.verdict.clone())
    }

    /// One call to PocketBase for `token` on behalf of `ip`, within the
    /// per-address and global bounds; its verdict is cached.
    async fn call(self: Arc<Self>, token: Arc<str>, ip: IpAddr) -> Result<Verdict, VerifyError> {
        let _ip_slot = IpSlot::take(&self, ip)?;
        let _slot = tokio::time::timeout(self.config.timeout, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| VerifyError::Busy)?
            .expect("the semaphore is never closed");
        let outcome = match self.post(&token).await {
            Ok((reqwest::StatusCode::OK, body)) => {
                match serde_json::from_slice::<Verified>(&body) {
                    Ok(v) => Ok(Verdict::Valid {
                        exp: v.exp.max(0.0) as u64,
                        record: record_of(v),
                    }),
                    Err(e) => Err(VerifyError::Unavailable(format!(
                        "unexpected answer from {VERIFY_PATH}: {e}"
                    ))),
                }
            }
            Ok((reqwest::StatusCode::UNAUTHORIZED, _)) => Ok(Verdict::Invalid),
            Ok((status, _)) => Err(VerifyError::Unavailable(refusal(status))),
            Err(e) => Err(VerifyError::Unavailable(e)),
        };
        *self.health.lock() = match &outcome {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        };
        if let Ok(verdict) = &outcome {
            self.cache.lock().put(
                token,
                Cached {
                    verdict: verdict.clone(),
                    checked: Instant::now(),
                },
            );
        }
        outcome
    }

    async fn post(&self, token: &str) -> Result<(reqwest::StatusCode, bytes::Bytes), String> {
        let res = self
            .http
            .post(format!("{}{VERIFY_PATH}", self.config.url))
            .header(SECRET_HEADER, &self.config.secret)
            .json(&serde_json::json!({ "token": token }))
            .send()
            .await
            .map_err(|e| format!("cannot reach PocketBase: {}", describe(e)))?;
        let status = res.status();
        let body = res
            .bytes()
            .await
            .map_err(|e| format!("PocketBase's answer broke off: {}", describe(e)))?;
        Ok((status, body))
    }
}

/// The reason for an unexpected status from the verification route.
fn refusal(status: reqwest::StatusCode) -> String {
    match status.as_u16() {
        403 => "PocketBase refused Fanout's secret: FANOUT_SECRET in PocketBase's environment \
                must equal FANOUT_POCKETBASE_SECRET"
            .to_owned(),
        404 => format!(
            "PocketBase has no {VERIFY_PATH}: copy deploy/pocketbase/pb_hooks/fanout.pb.js into \
             its pb_hooks/"
        ),
        s => format!("PocketBase answered {s} on {VERIFY_PATH}"),
    }
}

/// A reqwest error and its causes, without the URL (ours, and long).
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut s = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

fn record_of(v: Verified) -> AuthRecord {
    let mut claims = serde_json::Map::new();
    claims.insert("id".into(), v.id.clone().into());
    claims.insert("collectionId".into(), v.collection_id.clone().into());
    claims.insert("collectionName".into(), v.collection_name.into());
    claims.insert("exp".into(), serde_json::Value::from(v.exp as u64));
    AuthRecord {
        id: v.id,
        collection_id: v.collection_id,
        claims,
    }
}

/// The record of a verdict, while the token has not expired (PocketBase
/// checks `exp` on every request; an expired token is a guest).
fn usable(verdict: Verdict) -> Option<AuthRecord> {
    match verdict {
        Verdict::Valid { record, exp } if exp > unix_now() => Some(record),
        _ => None,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Whether `token` could be a PocketBase auth token at all: a JWT whose
/// unverified claims have a non-empty `id` and `collectionId`, `type`
/// `"auth"`, and an `exp` still ahead. PocketBase's `FindAuthRecordByToken`
/// refuses everything else before it looks anything up
/// (`core/record_query.go`), so these are guests without a call.
fn plausible(token: &str) -> bool {
    if token.is_empty() || token.len() > 8 * 1024 {
        return false;
    }
    let Ok(claims) = jsonwebtoken::dangerous::insecure_decode_claims::<
        serde_json::Map<String, serde_json::Value>,
    >(token) else {
        return false;
    };
    let text = |k: &str| {
        claims
            .get(k)
            .and_then(|v| v.as_str())
            .is_some_and(|s| !s.is_empty())
    };
    text("id")
        && text("collectionId")
        && claims.get("type").and_then(|v| v.as_str()) == Some("auth")
        && claims
            .get("exp")
            .and_then(|v| v.as_f64())
            .is_some_and(|exp| exp > unix_now() as f64)
}

/// One verification counted against its client address while it runs.
struct IpSlot {
    verifier: Arc<TokenVerifier>,
    ip: IpAddr,
}

impl IpSlot {
    fn take(verifier: &Arc<TokenVerifier>, ip: IpAddr) -> Result<Self, VerifyError> {
        let mut per_ip = verifier.per_ip.lock();
        let n = per_ip.entry(ip).or_default();
        if *n >= verifier.config.per_ip.max(1) {
            return Err(VerifyError::Busy);
        }
        *n += 1;
        Ok(Self {
            verifier: verifier.clone(),
            ip,
        })
    }
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut per_ip = self.verifier.per_ip.lock();
        if let Some(n) = per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn token(claims: serde_json::Value) -> String {
        crate::auth::tests::token("any", claims)
    }

    #[test]
    fn only_unexpired_auth_tokens_with_both_ids_are_plausible() {
        let exp = unix_now() + 60;
        assert!(plausible(&token(
            json!({"id":"u","collectionId":"c","type":"auth","exp":exp})
        )));
        for bad in [
            json!({"id":"u","collectionId":"c","type":"file","exp":exp}),
            json!({"id":"","collectionId":"c","type":"auth","exp":exp}),
            json!({"id":"u","type":"auth","exp":exp}),
            json!({"id":"u","collectionId":"c","type":"auth"}),
            json!({"id":"u","collectionId":"c","type":"auth","exp":unix_now() - 1}),
        ] {
            assert!(!plausible(&token(bad.clone())), "{bad}");
        }
        assert!(!plausible("not a token"));
        assert!(!plausible(""));
    }
}
