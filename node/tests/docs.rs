//! The binary, the README and the docs say the same thing.
//!
//! * Every flag of `fanout --help` (clap's `Command`, which the binary
//!   parses with) has a row in the README's configuration table with the
//!   same flag, variable and default, and whose meaning starts with the
//!   help's first sentence; every row is a flag. On a mismatch the test
//!   prints the row to paste.
//! * Every flag is mentioned in docs/operations.md, and every default given
//!   there (`FANOUT_X` (value), or `FANOUT_X`, default value) is the
//!   flag's default. Every `FANOUT_*` name in README.md and docs/ is a flag.
//! * A freshly started node exports exactly the metrics docs/operations.md
//!   lists (both directions), with every close reason, before any event;
//!   with Redis, also the Redis ones.
//! * A node started against an unreachable Redis warns, again later, and
//!   reports when it finally connects; one whose heartbeat does not
//!   outlast the forward timeout three times over refuses to start.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use clap::CommandFactory;
use fanout::Config;
use fanout_testkit::{NodeProcess, RedisServer, free_port, wait_until};

const README: &str = include_str!("../../README.md");
const OPERATIONS: &str = include_str!("../../docs/operations.md");
const DOCS: &[(&str, &str)] = &[
    ("README.md", README),
    ("docs/operations.md", OPERATIONS),
    (
        "docs/architecture.md",
        include_str!("../../docs/architecture.md"),
    ),
    ("docs/protocol.md", include_str!("../../docs/protocol.md")),
];

#[derive(Debug)]
struct Flag {
    long: String,
    env: String,
    default: Option<String>,
    help: String,
}

/// The flags as `fanout --help` shows them.
fn flags() -> Vec<Flag> {
    Config::command()
        .get_arguments()
        .filter_map(|a| {
            let long = a.get_long()?;
            if matches!(long, "help" | "version") {
                return None;
            }
            let default = a
                .get_default_values()
                .iter()
                .map(|v| v.to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            let help = a.get_long_help().or(a.get_help()).map(|h| h.to_string());
            Some(Flag {
                long: format!("--{long}"),
                env: a
                    .get_env()
                    .unwrap_or_else(|| panic!("--{long} has no FANOUT_* variable"))
                    .to_string_lossy()
                    .into_owned(),
                default: (!default.is_empty()).then(|| default.join(",")),
                help: help.unwrap_or_else(|| panic!("--{long} has no help")),
            })
        })
        .collect()
}

/// Backticks dropped, whitespace collapsed.
fn normalize(s: &str) -> String {
    s.replace('`', "")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Up to the first full stop followed by a space (or the end).
fn first_sentence(s: &str) -> String {
    let s = normalize(s);
    match s.find(". ") {
        Some(i) => s[..=i].to_owned(),
        None => s,
    }
}

/// The cells of a Markdown table row.
fn cells(line: &str) -> Vec<String> {
    line.trim()
        .trim_matches('|')
        .split(" | ")
        .map(|c| c.trim().to_owned())
        .collect()
}

/// The first `code` span of a cell.
fn code(cell: &str) -> Option<&str> {
    cell.split('`').nth(1)
}

/// The README's configuration table, by flag: (env, default, meaning).
fn readme_rows() -> BTreeMap<String, (String, Option<String>, String)> {
    let section = README
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a Configuration section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter(|l| l.starts_with("| `--"))
        .map(|l| {
            let c = cells(l);
            assert_eq!(c.len(), 4, "README row with 4 cells: {l}");
            let default = match c[2].as_str() {
                "none" => None,
                d => Some(code(d).unwrap_or(d).to_owned()),
            };
            (
                code(&c[0]).unwrap().to_owned(),
                (
                    code(&c[1]).unwrap_or(&c[1]).to_owned(),
                    default,
                    c[3].clone(),
                ),
            )
        })
        .collect()
}

fn readme_row(f: &Flag) -> String {
    let default = match &f.default {
        None => "none".to_owned(),
        Some(d) => format!("`{d}`"),
    };
    format!(
        "| `{}` | `{}` | {} | {} |",
        f.long,
        f.env,
        default,
        normalize(&f.help)
    )
}

#[test]
fn every_flag_of_help_has_a_matching_readme_row_and_every_row_is_a_flag() {
    let rows = readme_rows();
    let flags = flags();
    let mut wrong = Vec::new();
    for f in &flags {
        let ok = rows.get(&f.long).is_some_and(|(env, default, meaning)| {
            *env == f.env
                && *default == f.default
                && normalize(meaning).starts_with(&first_sentence(&f.help))
        });
        if !ok {
            wrong.push(format!(
                "README has:  {}\n--help says: {}",
                rows.get(&f.long).map_or("(no row)".to_owned(), |r| format!(
                    "env {} default {:?} meaning {:?}",
                    r.0, r.1, r.2
                )),
                readme_row(f)
            ));
        }
    }
    for long in rows.keys() {
        if !flags.iter().any(|f| f.long == *long) {
            wrong.push(format!("README row {long} is not a flag of --help"));
        }
    }
    assert!(
        wrong.is_empty(),
        "the README's configuration table disagrees with --help (a row's \
         meaning must start with the help's first sentence):\n\n{}",
        wrong.join("\n\n")
    );
}

/// Whether `text` names `name` (not only a longer name it starts).
fn mentions(text: &str, name: &str) -> bool {
    text.match_indices(name).any(|(i, _)| {
        !text[i + name.len()..]
            .starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    })
}

/// Numbers as written in the docs: `1,000,000`, `4 MiB`, `10s`, `5 minutes`.
#[derive(Debug, PartialEq)]
enum Amount {
    Count(u128),
    Millis(u128),
    Text(String),
}

fn amount(s: &str) -> Amount {
    let s = s.trim().trim_matches('`');
    let digits: String = s
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == ',')
        .filter(char::is_ascii_digit)
        .collect();
    if digits.is_empty() {
        return Amount::Text(s.to_owned());
    }
    let n: u128 = digits.parse().unwrap();
    let rest = s.trim_start_matches(|c: char| c.is_ascii_digit() || c == ',');
    let unit = rest
        .trim_start()
        .split([' ', ',', ';', ')'])
        .next()
        .unwrap_or("");
    match unit {
        "KiB" => Amount::Count(n << 10),
        "MiB" => Amount::Count(n << 20),
        "GiB" => Amount::Count(n << 30),
        u => match humantime::parse_duration(&format!("{n}{u}")) {
            Ok(d) if !u.is_empty() => Amount::Millis(d.as_millis()),
            _ => Amount::Count(n),
        },
    }
}

#[test]
fn operations_md_mentions_every_flag_with_its_default_and_the_docs_name_only_real_variables() {
    let flags = flags();
    let mut wrong = Vec::new();
    for f in &flags {
        if !mentions(OPERATIONS, &f.env) && !mentions(OPERATIONS, &f.long) {
            wrong.push(format!(
                "docs/operations.md never mentions {} / {}",
                f.long, f.env
            ));
        }
    }
    // In the Limits table `FANOUT_X` (default …); anywhere `FANOUT_X`, default …
    let limits = OPERATIONS
        .split("\n## Limits")
        .nth(1)
        .expect("operations.md has a Limits section")
        .split("\n## ")
        .next()
        .unwrap();
    for (i, _) in OPERATIONS.match_indices("`FANOUT_") {
        let in_limits = limits.as_ptr() as usize <= OPERATIONS[i..].as_ptr() as usize
            && (OPERATIONS[i..].as_ptr() as usize) < limits.as_ptr() as usize + limits.len();
        let rest = &OPERATIONS[i + 1..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || *c == '_')
            .collect();
        let after = &rest[name.len() + 1..];
        let stated = if let Some(v) = after.strip_prefix(" (").filter(|_| in_limits) {
            v.split(')').next().unwrap()
        } else if let Some(v) = after.strip_prefix(", default ") {
            v
        } else {
            continue;
        };
        let Some(f) = flags.iter().find(|f| f.env == name) else {
            continue;
        };
        let stated_amount = amount(stated);
        if let Amount::Text(t) = &stated_amount
            && !t.starts_with("none")
        {
            continue; // prose, not a default
        }
        let expected = f
            .default
            .as_deref()
            .map_or(Amount::Text("none".into()), amount);
        let agrees = match (&stated_amount, &expected) {
            (Amount::Text(t), Amount::Text(e)) => t.starts_with(e.as_str()),
            (a, e) => a == e,
        };
        if !agrees {
            wrong.push(format!(
                "docs/operations.md gives {name} as ({stated:.40}…), --help's default is {:?}",
                f.default
            ));
        }
    }
    for (doc, text) in DOCS {
        for (i, _) in text.match_indices("FANOUT_") {
            if text[..i].ends_with(|c: char| c.is_ascii_uppercase() || c == '_') {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || *c == '_')
                .collect();
            // FANOUT_SECRET is PocketBase's variable in companion mode
            // (deploy/pocketbase/pb_hooks/fanout.pb.js), not a node flag's.
            // FANOUT_BIN names the binary the bench and e2e scripts run.
            if !["FANOUT_SECRET", "FANOUT_BIN"].contains(&name.as_str())
                && !flags.iter().any(|f| f.env == name)
            {
                wrong.push(format!("{doc} names {name}, which is no flag's variable"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn help_text_is_what_the_binary_prints() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for f in flags() {
        assert!(help.contains(&f.long), "{} missing from --help", f.long);
        assert!(
            help.contains(&format!("[env: {}", f.env)),
            "{} missing from --help",
            f.env
        );
    }
}

/// The metrics docs/operations.md lists: (every node, Redis only).
fn documented_metrics() -> (BTreeSet<String>, BTreeSet<String>) {
    let section = OPERATIONS
        .split("\n## Metrics")
        .nth(1)
        .expect("operations.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    let (every, redis) = section
        .split_once("\n### With Redis")
        .expect("the Metrics section has a `### With Redis` part");
    let names = |text: &str| {
        text.lines()
            .filter(|l| l.starts_with("| `fanout_"))
            .flat_map(|l| {
                cells(l)[0]
                    .split('`')
                    .skip(1)
                    .step_by(2)
                    .map(|n| n.split('{').next().unwrap().to_owned())
                    .collect::<Vec<_>>()
            })
            .collect::<BTreeSet<_>>()
    };
    (names(every), names(redis))
}

/// The close reasons docs/operations.md lists for
/// `fanout_connections_closed_total`.
fn documented_close_reasons() -> BTreeSet<String> {
    let row = OPERATIONS
        .lines()
        .find(|l| l.starts_with("| `fanout_") && l.contains("`fanout_connections_closed_total"))
        .expect("a row for fanout_connections_closed_total");
    let reasons = row
        .split("`reason` is ")
        .nth(1)
        .expect("the row says: `reason` is …");
    let reasons = reasons.split('.').next().unwrap();
    reasons
        .split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_owned)
        .collect()
}

/// (metric names, close reasons) of a `/metrics` page.
fn exported(page: &str) -> (BTreeSet<String>, BTreeSet<String>) {
    let names = page
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let reasons = page
        .lines()
        .filter_map(|l| l.strip_prefix("fanout_connections_closed_total{reason=\""))
        .map(|l| l.split('"').next().unwrap().to_owned())
        .collect();
    (names, reasons)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_node_exports_exactly_the_documented_metrics_from_the_start() {
    let (every, redis_only) = documented_metrics();
    let reasons = documented_close_reasons();
    assert!(!every.is_empty() && !redis_only.is_empty());

    let node = NodeProcess::start(&[]).await;
    let page = node.metrics().await;
    let (names, closed) = exported(&page);
    assert_eq!(
        names, every,
        "a node without Redis exports (left) other metrics than \
         docs/operations.md lists for every node (right)"
    );
    assert_eq!(
        closed, reasons,
        "close reasons: exported (left), documented (right)"
    );
    assert!(
        page.contains("# HELP fanout_connections_opened_total"),
        "metrics carry help text:\n{page}"
    );

    let redis = RedisServer::start().await;
    let node = NodeProcess::start(&[
        ("FANOUT_REDIS_URL", &redis.url()),
        ("FANOUT_REDIS_PREFIX", "docs-metrics:"),
    ])
    .await;
    let (names, _) = exported(&node.metrics().await);
    let all: BTreeSet<_> = every.union(&redis_only).cloned().collect();
    assert_eq!(
        names, all,
        "a node with Redis exports (left) other metrics than \
         docs/operations.md lists (right)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_is_warned_about_until_it_connects() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}");
    let node = NodeProcess::start_unchecked(&[("FANOUT_REDIS_URL", &url)]).await;
    let warnings = || {
        node.logs()
            .lines()
            .filter(|l| l.contains("WARN") && l.contains("cannot reach Redis"))
            .count()
    };
    wait_until("a first warning", || warnings() >= 1).await;
    // Repeated: the second one comes about 2 s later.
    wait_until("a repeated warning", || warnings() >= 2).await;
    let (status, _) = node.get_json("/api/health").await;
    assert_eq!(status, 503);
    let _redis = RedisServer::start_on(port).await;
    node.wait_healthy().await;
    wait_until("connected is logged", || {
        node.logs().contains("connected to Redis")
    })
    .await;
    let before = warnings();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(warnings(), before, "no warning once connected");
}

#[test]
fn a_heartbeat_that_does_not_outlast_the_forward_timeout_three_times_is_refused() {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fanout"))
        .env("FANOUT_LISTEN", "127.0.0.1:0")
        .env("FANOUT_REDIS_URL", "redis://127.0.0.1:1")
        .env("FANOUT_HEARTBEAT_INTERVAL", "1s")
        .env("FANOUT_FORWARD_TIMEOUT", "3s")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the node started instead of refusing the settings");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "exits as on a bad flag: {err}");
    assert!(
        err.contains("--heartbeat-interval (1s) times three must exceed --forward-timeout (3s)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_max_connections_above_the_open_files_budget_is_warned_about_at_start() {
    let warned = |logs: String| {
        logs.lines()
            .any(|l| l.contains("WARN") && l.contains("exceeds the open-files budget"))
    };
    let over = NodeProcess::start_with_nofile(1024, &[]).await;
    wait_until("the connection budget is logged", || {
        over.logs().contains("connection budget")
    })
    .await;
    assert!(warned(over.logs()), "{}", over.logs());
    let within = NodeProcess::start_with_nofile(1024, &[("FANOUT_MAX_CONNECTIONS", "900")]).await;
    wait_until("the connection budget is logged", || {
        within.logs().contains("connection budget")
    })
    .await;
    assert!(!warned(within.logs()), "{}", within.logs());
}
