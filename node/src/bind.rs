//! Request bodies bound exactly as PocketBase binds them, so that a
//! hand-built client PocketBase accepts is accepted here too.
//!
//! PocketBase (`tools/router/event.go`, `Event.BindBody`) picks the binding
//! by a case-sensitive prefix of the `Content-Type` header, and Go's
//! libraries decide the rest. What that means, rule by rule:
//!
//! * A request whose `Content-Length` is 0 binds as an empty form whatever
//!   its type. A chunked request has no length, so an empty chunked body is
//!   parsed by its type (and empty JSON is an error).
//! * `application/json…`: `json.Decoder.Decode` into the form struct, as
//!   the PocketBase 0.40 release binaries behave (measured against one by
//!   `node/tests/binding.rs`; stricter than Go's classic `encoding/json`).
//!   Field names match without regard to case, `_` or `-` (`CLIENT_ID`
//!   sets `clientId`; case folds as Go folds it, so `ſ` matches `s`). A
//!   member name repeated in any object, or two names for one field, is
//!   an error; so are bytes that are not UTF-8 and lone surrogate escapes.
//!   `null` is the zero value (an empty string, an empty list; a `null`
//!   topic is `""`, which subscribes to nothing); a top-level `null` binds
//!   nothing; any other wrong type is an error; unknown fields are
//!   ignored. Only the first JSON value is read: whatever follows it is
//!   ignored. One deliberate difference: nesting deeper than 128 levels is
//!   refused (serde_json's recursion limit, which bounds the stack).
//! * `application/x-www-form-urlencoded…`: Go's `Request.ParseForm`: the
//!   body's pairs, then the URL query's. A `;` in a pair or a bad `%`
//!   escape is an error; `+` is a space. Field names match exactly;
//!   `clientId` is the first value, `subscriptions` all of them. A value
//!   that is not UTF-8 once unescaped gets U+FFFD where Go keeps the raw
//!   bytes (a documented difference: keys are UTF-8 here).
//! * `multipart/form-data…`: Go's `Request.ParseMultipartForm`: the URL
//!   query's pairs, then the body's non-file parts. The boundary is
//!   required, the media type's parameters must parse; file parts and
//!   parts without a name are ignored; lines may end in a bare LF.
//! * Any other type (including `Application/JSON`: the prefix is matched
//!   case-sensitively) is an error, except XML, which PocketBase would
//!   decode with Go's XML package: Fanout refuses it (400), a documented
//!   difference.
//!
//! Every error here is answered as PocketBase answers a bind error: 400
//! with its default message and `data:{}`.

use std::{borrow::Cow, collections::HashSet};

use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};

/// The body of `POST /api/realtime`, as bound (before validation).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SubscribeForm {
    pub client_id: String,
    pub subscriptions: Vec<String>,
}

/// The body could not be bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the request body could not be bound: {0}")]
pub struct BindError(pub String);

fn err(e: impl std::fmt::Display) -> BindError {
    BindError(e.to_string())
}

/// Bind a subscription request from its headers, URL query and body.
pub async fn subscribe_form(
    headers: &HeaderMap,
    query: Option<&str>,
    body: Bytes,
) -> Result<SubscribeForm, BindError> {
    let chunked = headers.contains_key(header::TRANSFER_ENCODING);
    if body.is_empty() && !chunked {
        return Ok(SubscribeForm::default());
    }
    let ct = content_type(headers);
    if ct.starts_with("application/json") {
        json_form(&body)
    } else {
        Ok(form_from_values(form_values(ct, query, body).await?))
    }
}

/// The `Content-Type` as PocketBase matches it: trimmed, case kept (its
/// prefixes are matched case-sensitively); empty when absent.
pub fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim()
}

/// The name/value pairs of a form body and the URL query, in Go's order:
/// `multipart/form-data` (`Request.ParseMultipartForm`: the query's pairs,
/// then the body's non-file parts) or `application/x-www-form-urlencoded`
/// (`Request.ParseForm`: the body's pairs, then the query's). Any other
/// content type `ct` is an error.
pub async fn form_values(
    ct: &str,
    query: Option<&str>,
    body: Bytes,
) -> Result<Vec<(String, String)>, BindError> {
    let mut values = Vec::new();
    if ct.starts_with("multipart/form-data") {
        parse_query(query.unwrap_or(""), &mut values)?;
        multipart_values(ct, body, &mut values).await?;
    } else if ct.starts_with("application/x-www-form-urlencoded") {
        // Go parses the media type again, strictly, and reports its error
        // after reading the form.
        let media = parse_media_type(ct);
        parse_query(&String::from_utf8_lossy(&body), &mut values)?;
        media?;
        parse_query(query.unwrap_or(""), &mut values)?;
    } else {
        return Err(BindError("unsupported content type".into()));
    }
    Ok(values)
}

// ---------------------------------------------------------------------------
// JSON

/// The first JSON value of `body`, bound as PocketBase 0.40's
/// `json.Decoder.Decode` binds it (see the module documentation).
pub fn json_form(body: &[u8]) -> Result<SubscribeForm, BindError> {
    // `from_slice` refuses bytes that are not UTF-8 and lone surrogate
    // escapes, as PocketBase does. No `de.end()`: PocketBase reads one
    // value and ignores what follows it.
    let mut de = serde_json::Deserializer::from_slice(body);
    de.deserialize_any(FormVisitor).map_err(err)
}

/// Which field a JSON object key sets. PocketBase matches names without
/// regard to case, `_` or `-` (`client_id` is `clientId`), folding case
/// as Go does: ASCII letters, and `ſ` (U+017F) with `s`, the Kelvin sign
/// (U+212A) with `k`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    ClientId,
    Subscriptions,
    Other,
}

fn field_of(key: &str) -> Field {
    let folded = key
        .chars()
        .filter(|c| !matches!(c, '_' | '-'))
        .map(|c| match c {
            'a'..='z' => c.to_ascii_uppercase(),
            '\u{017F}' => 'S',
            '\u{212A}' => 'K',
            c => c,
        });
    if folded.clone().eq("CLIENTID".chars()) {
        Field::ClientId
    } else if folded.eq("SUBSCRIPTIONS".chars()) {
        Field::Subscriptions
    } else {
        Field::Other
    }
}

fn duplicate<E: de::Error>(key: &str) -> E {
    E::custom(format_args!("duplicate object member {key:?}"))
}

struct FormVisitor;

impl<'de> Visitor<'de> for FormVisitor {
    type Value = SubscribeForm;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    /// A top-level `null` binds nothing.
    fn visit_unit<E: de::Error>(self) -> Result<SubscribeForm, E> {
        Ok(SubscribeForm::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SubscribeForm, A::Error> {
        let mut form = SubscribeForm::default();
        let mut names = HashSet::new();
        let (mut have_id, mut have_subs) = (false, false);
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            let field = field_of(&key);
            if !names.insert(key.clone().into_owned()) {
                return Err(duplicate(&key));
            }
            match field {
                Field::ClientId => {
                    if std::mem::replace(&mut have_id, true) {
                        return Err(duplicate(&key));
                    }
                    form.client_id = map.next_value::<GoString>()?.0.unwrap_or_default();
                }
                Field::Subscriptions => {
                    if std::mem::replace(&mut have_subs, true) {
                        return Err(duplicate(&key));
                    }
                    form.subscriptions = map.next_value::<GoStrings>()?.0;
                }
                Field::Other => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(form)
    }
}

/// Any JSON value, ignored, but refused if one of its objects repeats a
/// member name (PocketBase's decoder refuses those anywhere).
struct Checked;

impl<'de> serde::Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = Checked;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        let mut names = HashSet::new();
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            map.next_value::<Checked>()?;
            if !names.insert(key.clone().into_owned()) {
                return Err(duplicate(&key));
            }
        }
        Ok(Checked)
    }
}

/// A Go `string` field: `null` leaves it unchanged (`None`).
struct GoString(Option<String>);

impl<'de> serde::Deserialize<'de> for GoString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GoString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<GoString, E> {
                Ok(GoString(None))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<GoString, E> {
                Ok(GoString(Some(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<GoString, E> {
                Ok(GoString(Some(v)))
            }
        }
        d.deserialize_any(V)
    }
}

/// A Go `[]string` field: `null` empties it, a `null` element is `""`.
struct GoStrings(Vec<String>);

impl<'de> serde::Deserialize<'de> for GoStrings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = GoStrings;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an array of strings or null")
            }
            fn visit_unit<E: de::Error>(self) -> Result<GoStrings, E> {
                Ok(GoStrings(Vec::new()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<GoStrings, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<GoString>()? {
                    out.push(s.0.unwrap_or_default());
                }
                Ok(GoStrings(out))
            }
        }
        d.deserialize_any(V)
    }
}

// ---------------------------------------------------------------------------
// Forms

/// Bind `(name, value)` pairs in order: `clientId` takes the first value,
/// `subscriptions` all of them (Go's `router.UnmarshalRequestData`).
fn form_from_values(values: Vec<(String, String)>) -> SubscribeForm {
    let mut form = SubscribeForm::default();
    let mut have_id = false;
    for (k, v) in values {
        match k.as_str() {
            "clientId" if !have_id => {
                form.client_id = v;
                have_id = true;
            }
            "subscriptions" => form.subscriptions.push(v),
            _ => {}
        }
    }
    form
}

/// Go's `url.ParseQuery`: the pairs are kept, and the first error (a `;`
/// in a pair, a bad `%` escape) is returned after all were read.
fn parse_query(query: &str, out: &mut Vec<(String, String)>) -> Result<(), BindError> {
    let mut first_error = None;
    for pair in query.split('&') {
        if pair.contains(';') {
            first_error.get_or_insert_with(|| err("invalid semicolon separator in query"));
            continue;
        }
        if pair.is_empty() {
            continue;
        }
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match (query_unescape(k), query_unescape(v)) {
            (Some(k), Some(v)) => out.push((k, v)),
            _ => {
                first_error.get_or_insert_with(|| err("invalid URL escape"));
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Go's `url.QueryUnescape`: `%XX` and `+`; `None` on a bad escape.
fn query_unescape(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = s.get(i + 1..i + 3)?;
                if !h.bytes().all(|c| c.is_ascii_hexdigit()) {
                    return None;
                }
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Go's `mime.ParseMediaType`, reduced to whether it fails: `type/sub`
/// then `; name=value` parameters (a token or a quoted string), trailing
/// `;` allowed, no duplicate parameter.
fn parse_media_type(ct: &str) -> Result<(), BindError> {
    let bad = || err("invalid media parameter");
    let is_token = |c: char| c.is_ascii_graphic() && !"()<>@,;:\\\"/[]?=".contains(c);
    let (_, mut rest) = ct.split_once(';').unwrap_or((ct, ""));
    let mut names = std::collections::HashSet::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(());
        }
        let end = rest.find(|c| !is_token(c)).unwrap_or(rest.len());
        let name = &rest[..end];
        rest = rest[end..].trim_start();
        if name.is_empty() {
            return if rest.trim() == ";" || rest.is_empty() {
                Ok(())
            } else {
                Err(bad())
            };
        }
        rest = rest.strip_prefix('=').ok_or_else(bad)?.trim_start();
        if let Some(q) = rest.strip_prefix('"') {
            let mut escaped = false;
            let close = q
                .char_indices()
                .find(|&(_, c)| {
                    let end = c == '"' && !escaped;
                    escaped = c == '\\' && !escaped;
                    end
                })
                .map(|(i, _)| i)
                .ok_or_else(bad)?;
            rest = &q[close + 1..];
        } else {
            let end = rest.find(|c| !is_token(c)).unwrap_or(rest.len());
            if end == 0 {
                return Err(bad());
            }
            rest = &rest[end..];
        }
        if !names.insert(name.to_ascii_lowercase()) {
            return Err(err("duplicate parameter name"));
        }
        rest = rest.trim_start();
        match rest.strip_prefix(';') {
            Some(r) => rest = r,
            None if rest.is_empty() => return Ok(()),
            None => return Err(bad()),
        }
    }
}

/// A multipart body whose first boundary line ends in a bare LF, with
/// every bare LF made CRLF: Go's reader accepts such bodies (it takes the
/// line ending from the first boundary line), multer only CRLF. Only
/// values with line breaks change, and those are refused anyway (a topic
/// with CR or LF is invalid, a client id with one is unknown).
fn crlf_lines(body: Bytes, boundary: &str) -> Bytes {
    let delimiter = format!("--{boundary}");
    let Some(at) = body
        .windows(delimiter.len())
        .position(|w| w == delimiter.as_bytes())
    else {
        return body;
    };
    let after = &body[at + delimiter.len()..];
    let after = &after[after
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !after.starts_with(b"\n") {
        return body;
    }
    let mut out = Vec::with_capacity(body.len() + body.len() / 16);
    let mut prev = 0u8;
    for &b in body.iter() {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out.into()
}

/// The non-file parts of a `multipart/form-data` body, in order.
async fn multipart_values(
    ct: &str,
    body: Bytes,
    out: &mut Vec<(String, String)>,
) -> Result<(), BindError> {
    let media = ct.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("multipart/form-data") {
        return Err(err("not multipart/form-data"));
    }
    parse_media_type(ct)?;
    let boundary = multer::parse_boundary(ct).map_err(err)?;
    let body = crlf_lines(body, &boundary);
    let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
    let mut parts = multer::Multipart::new(stream, boundary);
    while let Some(field) = parts.next_field().await.map_err(err)? {
        let name = field.name().unwrap_or("").to_owned();
        let file = field.file_name().is_some();
        let value = field.bytes().await.map_err(err)?;
        if name.is_empty() || file {
            continue;
        }
        out.push((name, String::from_utf8_lossy(&value).into_owned()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(body: &str) -> Result<SubscribeForm, BindError> {
        json_form(body.as_bytes())
    }

    fn form(id: &str, subs: &[&str]) -> SubscribeForm {
        SubscribeForm {
            client_id: id.into(),
            subscriptions: subs.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn json_binds_like_pocketbase() {
        assert_eq!(
            json(r#"{"CLIENTID":"a","Subscriptions":["x"]}"#).unwrap(),
            form("a", &["x"])
        );
        assert_eq!(
            json(r#"{"ſubſcriptionſ":["x"]}"#).unwrap(),
            form("", &["x"])
        );
        assert_eq!(
            json(r#"{"client_id":"a","sub-scriptions":["x"]}"#).unwrap(),
            form("a", &["x"])
        );
        assert_eq!(
            json(r#"{"subscriptions":[null,"x"]}"#).unwrap(),
            form("", &["", "x"])
        );
        assert_eq!(json(r#"{"clientId":null}"#).unwrap(), form("", &[]));
        assert_eq!(json("null").unwrap(), form("", &[]));
        assert_eq!(
            json(r#"{"clientId":"a"} trailing"#).unwrap(),
            form("a", &[])
        );
        assert_eq!(
            json(r#"{"clientId":"\ud83d\ude00"}"#).unwrap(),
            form("\u{1F600}", &[])
        );
        for bad in [
            "",
            " ",
            "[]",
            "\"x\"",
            r#"{"clientId":1}"#,
            r#"{"subscriptions":"x"}"#,
            r#"{"subscriptions":[1]}"#,
            r#"{"clientId":"a""#,
            r#"{"clientId":"a","clientid":"b"}"#,
            r#"{"x":1,"x":1}"#,
            r#"{"x":[{"y":1,"y":2}]}"#,
            r#"{"clientId":"\ud800"}"#,
        ] {
            assert!(json(bad).is_err(), "{bad}");
        }
        assert!(json_form(b"{\"clientId\":\"a\xe2\x82b\"}").is_err());
    }

    #[test]
    fn url_encoded_pairs_parse_like_go_parse_query() {
        let mut v = Vec::new();
        parse_query("a=1&&b=x+y%3F&c", &mut v).unwrap();
        assert_eq!(
            v,
            [("a", "1"), ("b", "x y?"), ("c", "")].map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
        assert!(parse_query("a=1;b=2", &mut Vec::new()).is_err());
        assert!(parse_query("a=%zz", &mut Vec::new()).is_err());
        assert!(parse_query("a=%4", &mut Vec::new()).is_err());
        assert!(parse_media_type("application/x-www-form-urlencoded; charset=UTF-8").is_ok());
        assert!(parse_media_type("application/x-www-form-urlencoded;").is_ok());
        assert!(parse_media_type("application/x-www-form-urlencoded; q=\"a;b\"").is_ok());
        assert!(parse_media_type("application/x-www-form-urlencoded; charset").is_err());
        assert!(parse_media_type("application/x-www-form-urlencoded; a=1; a=2").is_err());
    }
}
