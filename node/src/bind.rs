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
//! * `application/json…`: Go's `json.Decoder.Decode` into the form struct.
//!   Field names match case-insensitively (Unicode simple folding, so `ſ`
//!   matches `s`); a repeated field is set again (the last one wins); `null`
//!   leaves a string as it was and empties a list; a `null` in a list is an
//!   empty string; a top-level `null` binds nothing; any other type is an
//!   error; unknown fields are ignored. Only the first JSON value is read:
//!   whatever follows it is ignored. Bytes that are not UTF-8 inside a
//!   string become U+FFFD, one per byte, and so does a lone surrogate
//!   escape (`\ud800`).
//! * `application/x-www-form-urlencoded…`: Go's `Request.ParseForm`: the
//!   body's pairs, then the URL query's. A `;` in a pair or a bad `%`
//!   escape is an error; `+` is a space. Field names match exactly;
//!   `clientId` is the first value, `subscriptions` all of them.
//! * `multipart/form-data…`: Go's `Request.ParseMultipartForm`: the URL
//!   query's pairs, then the body's non-file parts. The boundary is
//!   required; file parts are ignored.
//! * Any other type (including `Application/JSON`: the prefix is matched
//!   case-sensitively) is an error, except XML, which PocketBase would
//!   decode with Go's XML package: Fanout refuses it (400), a documented
//!   difference.
//!
//! Every error here is answered as PocketBase answers a bind error: 400
//! with its default message and `data:{}`.

use std::borrow::Cow;

use axum::http::{HeaderMap, header};
use bytes::Bytes;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};

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
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .trim();
    if ct.starts_with("application/json") {
        json_form(&body)
    } else if ct.starts_with("multipart/form-data") {
        let mut values = Vec::new();
        parse_query(query.unwrap_or(""), &mut values)?;
        multipart_values(ct, body, &mut values).await?;
        Ok(form_from_values(values))
    } else if ct.starts_with("application/x-www-form-urlencoded") {
        let mut values = Vec::new();
        // Go parses the media type again, strictly, and reports its error
        // after reading the form.
        let media = parse_media_type(ct);
        parse_query(&String::from_utf8_lossy(&body), &mut values)?;
        media?;
        parse_query(query.unwrap_or(""), &mut values)?;
        Ok(form_from_values(values))
    } else {
        Err(BindError("unsupported content type".into()))
    }
}

// ---------------------------------------------------------------------------
// JSON

/// Go's `json.Decoder.Decode` of the first JSON value of `body`.
pub fn json_form(body: &[u8]) -> Result<SubscribeForm, BindError> {
    let text = go_json_text(body);
    let mut de = serde_json::Deserializer::from_str(&text);
    // No `de.end()`: Go's decoder stops after the first value.
    let form = de.deserialize_any(FormVisitor).map_err(err)?;
    Ok(form)
}

/// `body` with what Go's decoder replaces by U+FFFD already replaced: each
/// byte of an invalid UTF-8 sequence, and lone surrogate escapes.
fn go_json_text(body: &[u8]) -> Cow<'_, str> {
    let text = match std::str::from_utf8(body) {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => {
            let mut out = String::with_capacity(body.len() + 8);
            let mut rest = body;
            while !rest.is_empty() {
                match std::str::from_utf8(rest) {
                    Ok(s) => {
                        out.push_str(s);
                        break;
                    }
                    Err(e) => {
                        let (ok, bad) = rest.split_at(e.valid_up_to());
                        out.push_str(std::str::from_utf8(ok).unwrap_or_default());
                        let n = e.error_len().unwrap_or(bad.len());
                        out.extend(std::iter::repeat_n('\u{FFFD}', n));
                        rest = &bad[n..];
                    }
                }
            }
            Cow::Owned(out)
        }
    };
    if !text.contains("\\u") {
        return text;
    }
    match replace_lone_surrogates(&text) {
        Some(fixed) => Cow::Owned(fixed),
        None => text,
    }
}

/// `text` with every `\uXXXX` escape of a surrogate that is not part of a
/// valid pair replaced by `\ufffd`, if there is one.
fn replace_lone_surrogates(text: &str) -> Option<String> {
    let b = text.as_bytes();
    let hex = |i: usize| -> Option<u16> {
        let s = text.get(i..i + 4)?;
        u16::from_str_radix(s, 16).ok()
    };
    // `\u` escapes of surrogates in strings: (start, code unit).
    let mut escapes = Vec::new();
    let (mut i, mut in_string) = (0, false);
    while i < b.len() {
        match b[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if b.get(i + 1) == Some(&b'u')
                    && let Some(u) = hex(i + 2)
                    && (0xD800..0xE000).contains(&u)
                {
                    escapes.push((i, u));
                }
                i += 2;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let mut lone = Vec::new();
    let mut k = 0;
    while k < escapes.len() {
        let (at, u) = escapes[k];
        let paired = (0xD800..0xDC00).contains(&u)
            && escapes
                .get(k + 1)
                .is_some_and(|&(next, v)| next == at + 6 && (0xDC00..0xE000).contains(&v));
        if paired {
            k += 2;
        } else {
            lone.push(at);
            k += 1;
        }
    }
    if lone.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut last = 0;
    for at in lone {
        out.push_str(&text[last..at]);
        out.push_str("\\ufffd");
        last = at + 6;
    }
    out.push_str(&text[last..]);
    Some(out)
}

/// Which field a JSON object key sets, as Go's `encoding/json` matches
/// names: exactly, or else under Unicode simple case folding.
#[derive(Debug, PartialEq, Eq)]
enum Field {
    ClientId,
    Subscriptions,
    Other,
}

fn field_of(key: &str) -> Field {
    // The smallest rune of each fold set, as Go's `foldName`: for ASCII
    // letters the upper case; `ſ` (U+017F) folds with `s`, the Kelvin sign
    // (U+212A) with `k`.
    let folded = key.chars().map(|c| match c {
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
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            match field_of(&key) {
                Field::ClientId => {
                    if let Some(v) = map.next_value::<GoString>()?.0 {
                        form.client_id = v;
                    }
                }
                Field::Subscriptions => {
                    form.subscriptions = map.next_value::<GoStrings>()?.0;
                }
                Field::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(form)
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
    let boundary = multer::parse_boundary(ct).map_err(err)?;
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
    fn json_binds_like_go_encoding_json() {
        assert_eq!(
            json(r#"{"CLIENTID":"a","Subscriptions":["x"]}"#).unwrap(),
            form("a", &["x"])
        );
        assert_eq!(json(r#"{"ſubſcriptionſ":["x"]}"#).unwrap(), form("", &["x"]));
        assert_eq!(
            json(r#"{"clientId":"a","clientid":null}"#).unwrap(),
            form("a", &[])
        );
        assert_eq!(
            json(r#"{"clientId":"a","clientId":"b"}"#).unwrap(),
            form("b", &[])
        );
        assert_eq!(
            json(r#"{"subscriptions":["x"],"subscriptions":null}"#).unwrap(),
            form("", &[])
        );
        assert_eq!(
            json(r#"{"subscriptions":[null,"x"]}"#).unwrap(),
            form("", &["", "x"])
        );
        assert_eq!(json("null").unwrap(), form("", &[]));
        assert_eq!(json(r#"{"clientId":"a"} trailing"#).unwrap(), form("a", &[]));
        assert_eq!(json(r#"{"clientId":"\ud800x"}"#).unwrap(), form("\u{FFFD}x", &[]));
        assert_eq!(
            json(r#"{"clientId":"\ud83d\ude00"}"#).unwrap(),
            form("\u{1F600}", &[])
        );
        assert_eq!(
            json_form(b"{\"clientId\":\"a\xe2\x82b\"}").unwrap(),
            form("a\u{FFFD}\u{FFFD}b", &[])
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
        ] {
            assert!(json(bad).is_err(), "{bad}");
        }
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
