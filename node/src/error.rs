//! PocketBase's error JSON: `{"data":{…},"message":"…","status":N}`.
//!
//! Every rejected request, whatever the route, answers with this shape so that
//! the SDKs' `ClientResponseError` carries a useful status, message and data.

use axum::{
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Serialize;
use serde_json::{Map, Value, json};

/// PocketBase's default 400 message.
pub const DEFAULT_BAD_REQUEST: &str = "Something went wrong while processing your request.";

/// An error answer.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub data: Map<String, Value>,
}

#[derive(Serialize)]
struct Body<'a> {
    data: &'a Map<String, Value>,
    message: &'a str,
    status: u16,
}

impl ApiError {
    /// An error with empty `data`. The message is "sentenized" as PocketBase
    /// does: first letter upper-cased and a final period added.
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: sentenize(&message.into()),
            data: Map::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    /// A 400 with the default message and per-field errors.
    pub fn validation(fields: Map<String, Value>) -> Self {
        Self {
            data: fields,
            ..Self::bad_request(DEFAULT_BAD_REQUEST)
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }

    /// The JSON body, as bytes.
    pub fn body(&self) -> Vec<u8> {
        serde_json::to_vec(&Body {
            data: &self.data,
            message: &self.message,
            status: self.status.as_u16(),
        })
        .expect("error JSON always serialises")
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status.as_u16(), self.message)
    }
}

impl std::error::Error for ApiError {}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        metrics::counter!(crate::metrics::REJECTED, "status" => self.status.as_str().to_owned())
            .increment(1);
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response()
    }
}

/// One field error, as ozzo-validation reports it.
pub fn field_error(code: &str, message: &str, params: Option<Value>) -> Value {
    let mut e = json!({ "code": code, "message": sentenize(message) });
    if let Some(p) = params.filter(|p| p.as_object().is_some_and(|o| !o.is_empty())) {
        e["params"] = p;
    }
    e
}

fn sentenize(s: &str) -> String {
    let s = s.trim();
    if s.is_empty() {
        return String::new();
    }
    let mut chars = s.chars();
    let first = chars.next().expect("non-empty");
    let mut out: String = first.to_uppercase().chain(chars).collect();
    if !out.ends_with(['.', '!', '?']) {
        out.push('.');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_has_pocketbase_shape() {
        let e = ApiError::not_found("missing or invalid client id");
        let v: Value = serde_json::from_slice(&e.body()).unwrap();
        assert_eq!(
            v,
            json!({"data":{},"message":"Missing or invalid client id.","status":404})
        );
    }

    #[test]
    fn field_errors_omit_empty_params() {
        assert_eq!(
            field_error("validation_required", "cannot be blank", Some(json!({}))),
            json!({"code":"validation_required","message":"Cannot be blank."})
        );
        assert_eq!(
            field_error(
                "validation_length_too_long",
                "the length must be no more than 1000",
                Some(json!({"max":1000,"min":0}))
            )["params"],
            json!({"max":1000,"min":0})
        );
    }
}
