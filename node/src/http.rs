//! HTTP routes: the PocketBase realtime endpoints, publishing, health and
//! metrics. Handlers translate between HTTP and [`crate::Broker`] calls; the rules
//! of the protocol live in [`crate::protocol`], [`crate::broker`] and the
//! validation below, which mirrors PocketBase's form validation.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    body::{Body, Bytes},
    extract::{ConnectInfo, Request, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Map, Value, json, value::RawValue};
use tower_http::{
    catch_panic::CatchPanicLayer,
    cors::{AllowOrigin, CorsLayer},
};

use crate::{
    admission::Tracker,
    broker::{PublishError, SubscribeRequest},
    config::Config,
    conn::ConnHandle,
    error::{ApiError, field_error},
    hub::Audience,
    metrics as m,
    protocol::{self, MAX_CLIENT_ID_LEN, MAX_SUBSCRIPTIONS, MAX_TOPIC_LEN},
    realip::RealIp,
    relay::{Publication, RelayError},
    sse,
};

impl From<crate::realip::BadForwardedFor> for ApiError {
    fn from(e: crate::realip::BadForwardedFor) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

/// The direct peer of a connection (the TCP remote address).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub SocketAddr);

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    config: Config,
    real_ip: RealIp,
    /// Also the node's broker and shutdown signal.
    streams: sse::Streams,
    tracker: Arc<Tracker>,
    started: Instant,
}

impl AppState {
    pub(crate) fn new(
        config: Config,
        real_ip: RealIp,
        streams: sse::Streams,
        tracker: Arc<Tracker>,
    ) -> Self {
        Self {
            inner: Arc::new(Shared {
                real_ip,
                streams,
                config,
                tracker,
                started: Instant::now(),
            }),
        }
    }
}

/// The application's routes.
///
/// The realtime routes answer CORS from any origin, as PocketBase does.
/// Publishing answers CORS only for `--publish-cors-origins`: otherwise a
/// page open in any browser could publish.
pub fn router(state: AppState) -> Router {
    // Each part gets its 405 before its CORS layer, so that preflights
    // (OPTIONS) pass through the layer.
    let not_allowed =
        || async { ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed.") };
    let public = Router::new()
        .route(
            "/api/realtime",
            get(realtime_connect).post(realtime_subscribe),
        )
        .route("/api/health", get(health))
        .route(
            "/api/oauth2-redirect",
            get(oauth2_redirect).post(oauth2_redirect),
        )
        .method_not_allowed_fallback(not_allowed)
        .layer(CorsLayer::permissive());
    let mut publish_route = Router::new()
        .route("/api/publish", post(publish))
        .method_not_allowed_fallback(not_allowed);
    if let Some(cors) = publish_cors(&state.inner.config.publish_cors_origins) {
        publish_route = publish_route.layer(cors);
    }
    Router::new()
        .merge(public)
        .merge(publish_route)
        .route("/api/cluster", get(cluster))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::not_found("The requested resource wasn't found.") })
        .method_not_allowed_fallback(not_allowed)
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error.")
                .into_response()
        }))
        .with_state(state)
}

/// The CORS policy of `/api/publish`, if any origin is allowed.
fn publish_cors(origins: &[String]) -> Option<CorsLayer> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty())
        .collect();
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::POST])
            .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
    )
}

/// Read a request body within `limit` bytes and `timeout`.
///
/// * A declared `Content-Length` over the limit is refused (413) before a
///   byte of the body is read.
/// * Each piece is copied out of the connection's read buffer as it
///   arrives and the piece dropped, so memory follows the bytes received:
///   a body dribbled one byte per packet costs one byte per byte, not a
///   read buffer per byte (which is what collecting the pieces did).
/// * The whole body must arrive within `timeout` (408); hyper then closes
///   the connection, since the rest of the body was not read.
async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "Request body too large.");
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.map_or(0, |n| n as usize).min(64 * 1024));
    let mut stream = body.into_data_stream();
    let read = async {
        while let Some(piece) = stream.next().await {
            let piece = piece.map_err(|_| ApiError::bad_request("Invalid request body."))?;
            if buf.len() + piece.len() > limit {
                return Err(too_large());
            }
            buf.extend_from_slice(&piece);
        }
        Ok(())
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(())) => Ok(Bytes::from(buf)),
        Ok(Err(e)) => Err(e),
        Err(_) => {
            metrics::counter!(m::BODY_TIMEOUTS).increment(1);
            Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "The request body did not arrive in time.",
            ))
        }
    }
}

impl Shared {
    async fn body(&self, req: Request) -> Result<(HeaderMap, Bytes), ApiError> {
        let (parts, body) = req.into_parts();
        // While the body trickles in, the connection waits on its client:
        // it may be closed to make room (see `admission`).
        let conn = parts.extensions.get::<ConnHandle>().cloned();
        if let Some(c) = &conn {
            c.waiting();
        }
        let bytes = read_body(
            body,
            &parts.headers,
            self.config.max_body_bytes,
            self.config.body_timeout,
        )
        .await;
        if let Some(c) = &conn {
            c.busy();
        }
        Ok((parts.headers, bytes?))
    }
}

// ---------------------------------------------------------------------------
// GET /api/realtime

async fn realtime_connect(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let s = &state.inner;
    if let Some(refused) = s.streams.refusal() {
        return Err(refused);
    }
    let body = s.streams.open(s.real_ip.resolve(peer.ip(), &headers)?);
    let mut res = Body::from_stream(body).into_response();
    for (name, value) in sse::HEADERS {
        res.headers_mut()
            .insert(*name, HeaderValue::from_static(value));
    }
    Ok(res)
}

// ---------------------------------------------------------------------------
// POST /api/realtime

async fn realtime_subscribe(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    req: Request,
) -> Result<StatusCode, ApiError> {
    let s = &state.inner;
    let query = req.uri().query().map(str::to_owned);
    let (headers, body) = s.body(req).await?;
    let crate::bind::SubscribeForm {
        client_id,
        subscriptions,
    } = crate::bind::subscribe_form(&headers, query.as_deref(), body)
        .await
        .map_err(|_| bind_error())?;
    validate_subscribe_form(&client_id, &subscriptions)?;
    s.streams
        .broker
        .subscribe(SubscribeRequest {
            client_id,
            subscriptions,
            ip: s.real_ip.resolve(peer.ip(), &headers)?,
            authorization: headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            stamp: None,
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---------------------------------------------------------------------------
// GET and POST /api/oauth2-redirect (companion mode)

/// Where PocketBase sends the browser after an OAuth2 redirect: its own
/// admin UI's pages, relative to `/api/oauth2-redirect`
/// (`apis/record_auth_with_oauth2_redirect.go`).
const OAUTH2_SUCCESS: &str = "../_/#/auth/oauth2-redirect-success";
const OAUTH2_FAILURE: &str = "../_/#/auth/oauth2-redirect-failure";

/// The OAuth2 all-in-one flow's redirect, served as PocketBase serves it:
/// `state` (the client id), `code` and `error` from the query (GET) or the
/// body (POST, `response_mode=form_post`); the client may be on any node.
/// Answers 307 (GET) or 303 (POST) to PocketBase's success or failure
/// page. Without companion mode there is no PocketBase to finish the
/// flow: 404.
async fn oauth2_redirect(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    req: Request,
) -> Result<Response, ApiError> {
    let s = &state.inner;
    if s.streams.broker.companion().is_none() {
        return Err(ApiError::not_found("The requested resource wasn't found."));
    }
    let post = req.method() == axum::http::Method::POST;
    let query = req.uri().query().map(str::to_owned);
    let (headers, body) = s.body(req).await?;
    let ip = s.real_ip.resolve(peer.ip(), &headers)?;
    let fields = if post {
        oauth2_body(&headers, query.as_deref(), body).await
    } else {
        form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .into_owned()
            .collect()
    };
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let redirect = crate::relay::OAuth2Redirect {
        state: field("state"),
        code: field("code"),
        error: field("error"),
        ip,
    };
    let ok = !redirect.state.is_empty() && s.streams.broker.oauth2_redirect(redirect).await.is_ok();
    let status = if post {
        StatusCode::SEE_OTHER
    } else {
        StatusCode::TEMPORARY_REDIRECT
    };
    let to = if ok { OAUTH2_SUCCESS } else { OAUTH2_FAILURE };
    Ok((status, [(header::LOCATION, to)]).into_response())
}

/// The fields of a POSTed redirect, bound as PocketBase's `BindBody` binds
/// them: a form (the `form_post` response mode), or JSON whose member names
/// match without regard to case. A body that does not bind has none (the
/// failure page).
async fn oauth2_body(
    headers: &HeaderMap,
    query: Option<&str>,
    body: bytes::Bytes,
) -> Vec<(String, String)> {
    let ct = crate::bind::content_type(headers);
    if ct.starts_with("application/json") {
        let Ok(serde_json::Value::Object(map)) = serde_json::from_slice(&body) else {
            return Vec::new();
        };
        return map
            .into_iter()
            .filter_map(|(k, v)| Some((k.to_ascii_lowercase(), v.as_str()?.to_owned())))
            .collect();
    }
    crate::bind::form_values(ct, query, body)
        .await
        .unwrap_or_default()
}

fn bind_error() -> ApiError {
    ApiError::bad_request(crate::error::DEFAULT_BAD_REQUEST)
}

fn content_type(headers: &HeaderMap) -> String {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// PocketBase's rules, with ozzo's codes and messages: clientId required and
/// 1..255 bytes; at most 1000 subscriptions; each at most 2500 bytes. Added
/// here: a topic with CR or LF is refused, since it would become an SSE
/// `event:` line.
fn validate_subscribe_form(client_id: &str, subscriptions: &[String]) -> Result<(), ApiError> {
    let mut fields = Map::new();
    if client_id.is_empty() {
        fields.insert(
            "clientId".into(),
            field_error("validation_required", "cannot be blank", None),
        );
    } else if client_id.len() > MAX_CLIENT_ID_LEN {
        fields.insert(
            "clientId".into(),
            field_error(
                "validation_length_out_of_range",
                &format!("the length must be between 1 and {MAX_CLIENT_ID_LEN}"),
                Some(json!({"min": 1, "max": MAX_CLIENT_ID_LEN})),
            ),
        );
    }
    if subscriptions.len() > MAX_SUBSCRIPTIONS {
        fields.insert("subscriptions".into(), too_long(MAX_SUBSCRIPTIONS));
    } else {
        let per_topic: Map<String, Value> = subscriptions
            .iter()
            .enumerate()
            .filter_map(|(i, t)| topic_error(t).map(|e| (i.to_string(), e)))
            .collect();
        if !per_topic.is_empty() {
            fields.insert("subscriptions".into(), Value::Object(per_topic));
        }
    }
    if fields.is_empty() {
        Ok(())
    } else {
        Err(ApiError::validation(fields))
    }
}

fn too_long(max: usize) -> Value {
    field_error(
        "validation_length_too_long",
        &format!("the length must be no more than {max}"),
        Some(json!({"min": 0, "max": max})),
    )
}

/// The field error of a topic string, if it is not acceptable.
fn topic_error(topic: &str) -> Option<Value> {
    if topic.len() > MAX_TOPIC_LEN {
        Some(too_long(MAX_TOPIC_LEN))
    } else if !protocol::is_line_safe(topic.as_bytes()) {
        Some(field_error(
            "validation_match_invalid",
            "must not contain CR or LF characters",
            None,
        ))
    } else {
        None
    }
}

// ---------------------------------------------------------------------------
// POST /api/publish

/// One message: `{"topic", "data", "clientId"?, "userId"?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishItem {
    topic: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    /// The publisher's id of the message (unique per topic): kept in the
    /// history, so `since=<id>` resumes after it.
    id: Option<String>,
    #[serde(rename = "clientId")]
    client_id: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

/// A publish body: one message, or `{"messages": [...]}`.
///
/// One struct rather than an untagged enum: serde buffers untagged input,
/// and `RawValue` (which keeps `data` as the publisher sent it, unparsed)
/// cannot be read from a buffer.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    messages: Option<Vec<PublishItem>>,
    topic: Option<String>,
    #[serde(default, deserialize_with = "present")]
    data: Option<Box<RawValue>>,
    id: Option<String>,
    #[serde(rename = "clientId")]
    client_id: Option<String>,
    #[serde(rename = "userId")]
    user_id: Option<String>,
}

/// Distinguishes `"data": null` (a value) from a missing `data`.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Box<RawValue>>, D::Error> {
    Box::<RawValue>::deserialize(d).map(Some)
}

async fn publish(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    req: Request,
) -> Result<Response, ApiError> {
    let s = &state.inner;
    // Who may publish is decided from the head alone: an unauthorised
    // client never gets to send a body.
    authorize_publisher(&s.config, peer.ip(), req.headers())?;
    if !content_type(req.headers()).starts_with("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Publish bodies must be application/json.",
        ));
    }
    let (_, body) = s.body(req).await?;
    let parsed: PublishBody = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid publish body: {e}")))?;
    let (items, batch) = match parsed {
        PublishBody {
            messages: Some(messages),
            topic: None,
            data: None,
            id: None,
            client_id: None,
            user_id: None,
        } => (messages, true),
        PublishBody {
            messages: Some(_), ..
        } => {
            return Err(ApiError::bad_request(
                "Give either one message or \"messages\", not both.",
            ));
        }
        PublishBody {
            messages: None,
            topic,
            data,
            id,
            client_id,
            user_id,
        } => (
            vec![PublishItem {
                topic,
                data,
                id,
                client_id,
                user_id,
            }],
            false,
        ),
    };
    if items.is_empty() {
        return Err(ApiError::bad_request("No messages to publish."));
    }
    if items.len() > s.config.max_batch {
        return Err(ApiError::bad_request(format!(
            "A batch holds at most {} messages.",
            s.config.max_batch
        )));
    }
    let mut publications = Vec::with_capacity(items.len());
    let mut errors = Map::new();
    let mut too_large = false;
    for (i, item) in items.into_iter().enumerate() {
        match check_item(item, s.config.max_payload_bytes) {
            Ok(p) => publications.push(p),
            Err((fields, large)) => {
                too_large |= large;
                errors.insert(i.to_string(), Value::Object(fields));
            }
        }
    }
    if !errors.is_empty() {
        let data = if batch {
            Map::from_iter([("messages".to_owned(), Value::Object(errors))])
        } else {
            match errors.into_iter().next() {
                Some((_, Value::Object(fields))) => fields,
                _ => Map::new(),
            }
        };
        let mut e = ApiError::validation(data);
        if too_large {
            e.status = StatusCode::PAYLOAD_TOO_LARGE;
            e.message = "Message data too large.".into();
        }
        return Err(e);
    }
    check_batch_fits_a_queue(&publications, s.config.client_queue_bytes)?;
    let n = publications.len();
    s.streams
        .broker
        .publish(publications)
        .await
        .map_err(|e| match e {
            PublishError::NotLineSafe { .. } => ApiError::bad_request(e.to_string()),
            PublishError::Overloaded => {
                ApiError::unavailable("The node is overloaded (fan-out backlog full); retry later.")
            }
            PublishError::Relay(RelayError::Incomplete {
                reason,
                published,
                unknown,
                not_published,
            }) => {
                // Not 503 ("nothing changed"): some messages may be out.
                tracing::warn!(%reason, ?published, ?unknown, ?not_published, "publish incomplete");
                let what = if unknown.is_empty() {
                    "some messages were published and others were not"
                } else {
                    "the outcome of some messages is unknown"
                };
                let mut e = ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "The publish did not complete ({reason}): {what}; retry with the same message ids to publish each at most once"
                    ),
                );
                e.data = Map::from_iter([
                    ("published".to_owned(), json!(published)),
                    ("unknown".to_owned(), json!(unknown)),
                    ("notPublished".to_owned(), json!(not_published)),
                ]);
                e
            }
            PublishError::Relay(e) => {
                tracing::warn!(error = %e, "publish refused");
                ApiError::unavailable(format!("Publishing is unavailable: {e}"))
            }
        })?;
    Ok(Json(json!({ "published": n })).into_response())
}

/// Refuse (413) a batch that no subscriber could receive: a client holding
/// just its topics would be charged more than `--client-queue-bytes` for
/// it (each message's data, `id:` line and `event:<topic>` head), so it
/// would be disconnected as slow by this one request. One message always
/// fits: `--max-payload-bytes` is checked against the queue at start.
fn check_batch_fits_a_queue(
    publications: &[Publication],
    queue_bytes: u64,
) -> Result<(), ApiError> {
    if publications.len() < 2 {
        return Ok(());
    }
    let least: u64 = publications
        .iter()
        .map(|p| {
            (p.data.len() + p.topic.len() + protocol::MAX_EVENT_OVERHEAD - MAX_TOPIC_LEN) as u64
        })
        .sum();
    if least > queue_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "The batch takes at least {least} bytes as events, more than a client queue holds ({queue_bytes} bytes, --client-queue-bytes); send it in smaller batches."
            ),
        ));
    }
    Ok(())
}

/// A validated publication, or its field errors and whether one of them is
/// an oversized payload.
fn check_item(
    item: PublishItem,
    max_payload: usize,
) -> Result<Publication, (Map<String, Value>, bool)> {
    let mut fields = Map::new();
    let mut large = false;
    match item.topic.as_deref() {
        None | Some("") => {
            fields.insert(
                "topic".into(),
                field_error("validation_required", "cannot be blank", None),
            );
        }
        Some(t) => {
            if let Some(e) = topic_error(t) {
                fields.insert("topic".into(), e);
            }
        }
    }
    match &item.data {
        None => {
            fields.insert(
                "data".into(),
                field_error("validation_required", "cannot be blank", None),
            );
        }
        Some(d) if d.get().len() > max_payload => {
            large = true;
            fields.insert(
                "data".into(),
                field_error(
                    "validation_length_too_long",
                    &format!("the data must be no more than {max_payload} bytes"),
                    Some(json!({"max": max_payload})),
                ),
            );
        }
        Some(_) => {}
    }
    if let Some(id) = &item.id
        && (id.is_empty()
            || id.len() > MAX_MESSAGE_ID_LEN
            || !protocol::is_line_safe(id.as_bytes()))
    {
        fields.insert(
            "id".into(),
            field_error(
                "validation_length_out_of_range",
                &format!("the id must be 1 to {MAX_MESSAGE_ID_LEN} bytes, without CR or LF"),
                Some(json!({"min": 1, "max": MAX_MESSAGE_ID_LEN})),
            ),
        );
    }
    let audience = match (item.client_id, item.user_id) {
        (Some(_), Some(_)) => {
            fields.insert(
                "userId".into(),
                field_error(
                    "validation_conflict",
                    "give clientId or userId, not both",
                    None,
                ),
            );
            Audience::All
        }
        (Some(c), None) => Audience::Client(c),
        (None, Some(u)) => Audience::User(u),
        (None, None) => Audience::All,
    };
    if !fields.is_empty() {
        return Err((fields, large));
    }
    Ok(Publication {
        topic: item.topic.unwrap_or_default(),
        data: Bytes::copy_from_slice(&protocol::one_line_json(
            item.data.as_deref().map_or("null", RawValue::get),
        )),
        audience,
        id: item.id,
    })
}

/// Longest publisher id of a message.
const MAX_MESSAGE_ID_LEN: usize = 200;

/// Headers that show a request was made by a browser page or passed
/// through a proxy: without a publish key, such a request is refused even
/// from loopback, since the page or the proxy's client is not local.
const NOT_LOCAL_HEADERS: &[&str] = &["origin", "x-forwarded-for", "forwarded", "x-real-ip"];

/// With a publish key: `Authorization: Bearer <key>` (401 when missing, 403
/// when wrong). Without one: loopback peers only (the direct peer, never a
/// forwarded address), and never a browser page or a proxied request.
fn authorize_publisher(config: &Config, peer: IpAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = config.publish_key.as_deref() else {
        let loopback = match peer {
            IpAddr::V4(v4) => v4.is_loopback(),
            IpAddr::V6(v6) => {
                v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v| v.is_loopback())
            }
        };
        if !loopback {
            return Err(ApiError::forbidden(
                "Publishing without a publish key is allowed from loopback only.",
            ));
        }
        if let Some(h) = NOT_LOCAL_HEADERS.iter().find(|h| headers.contains_key(**h)) {
            return Err(ApiError::forbidden(format!(
                "Publishing without a publish key is refused for requests with a {h} header (browser pages and proxied requests)."
            )));
        }
        return Ok(());
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(crate::auth::bearer_token);
    match given {
        None | Some("") => Err(ApiError::unauthorized(
            "The request requires a valid publish key.",
        )),
        Some(g) if constant_time_eq(g.as_bytes(), key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::forbidden("Invalid publish key.")),
    }
}

/// Comparison whose time does not depend on where the inputs differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------------------
// Operations

async fn health(State(state): State<AppState>) -> Response {
    let s = &state.inner;
    let relay = s.streams.broker.relay_health();
    let hub = s.streams.broker.hub();
    let backlog = hub.backlog();
    let data = json!({
        "node": hub.node_tag(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptimeSeconds": s.started.elapsed().as_secs(),
        "connections": hub.total_clients(),
        "httpConnections": s.tracker.http_connections(),
        "topics": hub.total_topics(),
        "subscriptions": hub.total_subscriptions(),
        "backlog": backlog,
        "relay": relay,
        "pocketbase": s.streams.broker.companion().map(|c| c.health()),
        "shuttingDown": s.streams.shutdown.is_cancelled(),
    });
    let (status, message) = if !relay.healthy {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "API is unhealthy: {}.",
                relay.reason.as_deref().unwrap_or("relay unavailable")
            ),
        )
    } else if backlog.saturated {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "API is unhealthy: the fan-out backlog is full, every publish is held back.".to_owned(),
        )
    } else if s.streams.shutdown.is_cancelled() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "API is shutting down.".to_owned(),
        )
    } else if hub.total_clients() >= s.streams.max_connections {
        // A balancer that reads this stops sending new clients here, where
        // their first connect would get 503.
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "API is at its realtime connection cap ({} streams); new streams are refused.",
                s.streams.max_connections
            ),
        )
    } else {
        (StatusCode::OK, "API is healthy.".to_owned())
    };
    let code = status.as_u16();
    (
        status,
        Json(json!({ "code": code, "status": code, "message": message, "data": data })),
    )
        .into_response()
}

/// The cluster's members. It names every node's address, so it takes the
/// same credentials as publishing.
async fn cluster(
    State(state): State<AppState>,
    ConnectInfo(PeerAddr(peer)): ConnectInfo<PeerAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize_publisher(&state.inner.config, peer.ip(), &headers)?;
    let nodes =
        state.inner.streams.broker.nodes().await.map_err(|e| {
            ApiError::unavailable(format!("Cluster membership is unavailable: {e}"))
        })?;
    Ok(
        Json(json!({ "node": state.inner.streams.broker.hub().node_tag(), "nodes": nodes }))
            .into_response(),
    )
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    let hub = state.inner.streams.broker.hub();
    metrics::gauge!(m::CONNECTIONS).set(hub.total_clients() as f64);
    metrics::gauge!(m::TOPICS).set(hub.total_topics() as f64);
    metrics::gauge!(m::SUBSCRIPTIONS).set(hub.total_subscriptions() as f64);
    let backlog = hub.backlog();
    metrics::gauge!(m::BACKLOG_DELIVERIES).set(backlog.deliveries as f64);
    metrics::gauge!(m::BACKLOG_BYTES).set(backlog.bytes as f64);
    metrics::gauge!(m::HTTP_CONNECTIONS).set(state.inner.tracker.http_connections() as f64);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        )],
        m::handle().render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_matches_pocketbase_cases() {
        let e = validate_subscribe_form("", &[]).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert_eq!(e.data["clientId"]["code"], "validation_required");
        assert!(!e.data.contains_key("subscriptions"));

        let many: Vec<String> = (0..1001).map(|i| format!("t{i}")).collect();
        let e = validate_subscribe_form("x", &many).unwrap_err();
        assert_eq!(
            e.data["subscriptions"]["code"],
            "validation_length_too_long"
        );
        assert_eq!(
            e.data["subscriptions"]["params"],
            json!({"max":1000,"min":0})
        );
        assert!(validate_subscribe_form("x", &many[..1000]).is_ok());

        let e = validate_subscribe_form("x", &["abc".into(), "a".repeat(2501)]).unwrap_err();
        assert_eq!(
            e.data["subscriptions"]["1"]["code"],
            "validation_length_too_long"
        );
        assert!(validate_subscribe_form("x", &["abc".into(), "a".repeat(2500)]).is_ok());

        let e = validate_subscribe_form(&"x".repeat(256), &[]).unwrap_err();
        assert_eq!(e.data["clientId"]["code"], "validation_length_out_of_range");
        assert_eq!(
            e.data["clientId"]["message"],
            "The length must be between 1 and 255."
        );

        let e = validate_subscribe_form("x", &["ok".into(), "a\r\nevent:x".into()]).unwrap_err();
        assert_eq!(
            e.data["subscriptions"]["1"]["code"],
            "validation_match_invalid"
        );
    }
}
