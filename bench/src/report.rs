//! `fanout-bench report`: turn result lines into docs/benchmarks.md and a
//! PNG chart comparing a baseline (PocketBase) with Fanout, side by side.

use std::{collections::BTreeMap, fmt::Write as _, path::PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use crate::run::Report;

/// Options of `fanout-bench report`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReportArgs {
    /// JSON result lines (from `run --json-out`).
    #[arg(long)]
    pub results: PathBuf,
    /// Markdown file to write.
    #[arg(long)]
    pub out: PathBuf,
    /// PNG chart to write (linked from the markdown by file name).
    #[arg(long)]
    pub chart: PathBuf,
    /// Label of the baseline system.
    #[arg(long, default_value = "pocketbase")]
    pub baseline: String,
    /// Label of the system compared with it.
    #[arg(long, default_value = "fanout")]
    pub contender: String,
    /// The command that produced the results, quoted in the document.
    #[arg(long)]
    pub command: String,
    /// Free text placed after the tables (e.g. notes on a scenario).
    #[arg(long)]
    pub notes: Option<PathBuf>,
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or_else(String::new, |kb| {
            format!(", {:.0} GiB RAM", kb as f64 / 1048576.0)
        });
    format!("{cores} cores ({cpu}){mem}, Linux")
}

fn ratio(num: f64, den: f64) -> String {
    if den > 0.0 && num.is_finite() {
        format!("{:.1}×", num / den)
    } else {
        "–".into()
    }
}

/// The contender against the baseline, in the direction it really goes:
/// `up` when the contender's value is the larger ("3.1× higher"), `down`
/// when it is the smaller ("3.1× lower"), never a ratio below 1.
fn compare(contender: f64, baseline: f64, up: &str, down: &str) -> String {
    if contender >= baseline {
        format!("{} {up}", ratio(contender, baseline))
    } else {
        format!("{} {down}", ratio(baseline, contender))
    }
}

pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("reading {}", args.results.display()))?;
    // scenario → label → last result
    let mut by: BTreeMap<String, BTreeMap<String, Report>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let r: Report = serde_json::from_str(line).context("result line")?;
        if !order.contains(&r.scenario) {
            order.push(r.scenario.clone());
        }
        by.entry(r.scenario.clone())
            .or_default()
            .insert(r.label.clone(), r);
    }
    let (b, c) = (&args.baseline, &args.contender);
    let mut md = String::new();
    writeln!(md, "# Benchmarks\n")?;
    writeln!(
        md,
        "Fanout and PocketBase measured side by side, in the same run, on the same machine: **{}**. \
         Each system ran as a fresh process per scenario, pinned to core 0 with `taskset` while the load \
         generator (`fanout-bench`) ran on core 1. This machine is shared and noisy, so compare the \
         ratios in the same run rather than absolute figures across runs.\n",
        machine()
    )?;
    writeln!(md, "Produced by:\n\n```sh\n{}\n```\n", args.command)?;
    writeln!(
        md,
        "![throughput, latency and memory]({})\n",
        args.chart
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    )?;
    writeln!(md, "| scenario | metric | {b} | {c} | {c} vs {b} |")?;
    writeln!(md, "|---|---|---:|---:|---:|")?;
    for scenario in &order {
        let runs = &by[scenario];
        let (Some(rb), Some(rc)) = (runs.get(b), runs.get(c)) else {
            continue;
        };
        let desc = format!(
            "**{scenario}**<br>{} clients, {} topic(s), {} messages",
            rc.clients, rc.topics, rc.messages
        );
        let mut row = |metric: &str, vb: String, vc: String, cmp: String| {
            let _ = writeln!(md, "| {desc} | {metric} | {vb} | {vc} | {cmp} |");
        };
        if rc.messages > 0 {
            row(
                "deliveries/s",
                format!("{:.0}", rb.deliveries_per_sec),
                format!("{:.0}", rc.deliveries_per_sec),
                compare(
                    rc.deliveries_per_sec,
                    rb.deliveries_per_sec,
                    "more",
                    "fewer",
                ),
            );
            for (name, vb, vc) in [
                ("latency p50 (ms)", rb.latency_ms.p50, rc.latency_ms.p50),
                ("latency p99 (ms)", rb.latency_ms.p99, rc.latency_ms.p99),
                ("latency max (ms)", rb.latency_ms.max, rc.latency_ms.max),
            ] {
                row(
                    name,
                    format!("{vb:.1}"),
                    format!("{vc:.1}"),
                    compare(vc, vb, "higher", "lower"),
                );
            }
            row(
                "delivered / expected",
                format!("{}/{}", rb.received, rb.expected),
                format!("{}/{}", rc.received, rc.expected),
                String::new(),
            );
            row(
                "missing, duplicated, out of order",
                format!("{}, {}, {}", rb.missing, rb.duplicated, rb.out_of_order),
                format!("{}, {}, {}", rc.missing, rc.duplicated, rc.out_of_order),
                String::new(),
            );
            row(
                "peak memory (MiB)",
                format!("{:.0}", rb.rss_kib.peak as f64 / 1024.0),
                format!("{:.0}", rc.rss_kib.peak as f64 / 1024.0),
                compare(
                    rc.rss_kib.peak as f64,
                    rb.rss_kib.peak as f64,
                    "more",
                    "less",
                ),
            );
        } else {
            row(
                "memory per connection (KiB)",
                format!("{:.1}", rb.rss_kib.per_connection_bytes as f64 / 1024.0),
                format!("{:.1}", rc.rss_kib.per_connection_bytes as f64 / 1024.0),
                compare(
                    rc.rss_kib.per_connection_bytes as f64,
                    rb.rss_kib.per_connection_bytes as f64,
                    "more",
                    "less",
                ),
            );
            row(
                "resident memory, empty → connected (MiB)",
                format!(
                    "{:.0} → {:.0}",
                    rb.rss_kib.baseline as f64 / 1024.0,
                    rb.rss_kib.connected as f64 / 1024.0
                ),
                format!(
                    "{:.0} → {:.0}",
                    rc.rss_kib.baseline as f64 / 1024.0,
                    rc.rss_kib.connected as f64 / 1024.0
                ),
                String::new(),
            );
        }
        row(
            "connects/s",
            format!("{:.0}", rb.connect_per_sec),
            format!("{:.0}", rc.connect_per_sec),
            compare(rc.connect_per_sec, rb.connect_per_sec, "more", "fewer"),
        );
    }
    // Scenarios run for one system only (cluster, slow consumers).
    let single: Vec<&Report> = order
        .iter()
        .flat_map(|s| by[s].values())
        .filter(|r| !(by[&r.scenario].contains_key(b) && by[&r.scenario].contains_key(c)))
        .collect();
    if !single.is_empty() {
        writeln!(md, "\n## Fanout-only scenarios\n")?;
        writeln!(
            md,
            "| scenario | system | nodes | clients | slow | delivered/expected | missing, dup, out of order | deliveries/s | p50 / p99 / max (ms) | slow clients dropped |"
        )?;
        writeln!(md, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")?;
        for r in single {
            writeln!(
                md,
                "| {} | {} | {} | {} | {} | {}/{} | {}, {}, {} | {:.0} | {:.1} / {:.1} / {:.1} | {} |",
                r.scenario,
                r.label,
                r.nodes,
                r.clients,
                r.slow_clients,
                r.received,
                r.expected,
                r.missing,
                r.duplicated,
                r.out_of_order,
                r.deliveries_per_sec,
                r.latency_ms.p50,
                r.latency_ms.p99,
                r.latency_ms.max,
                dropped(r)
            )?;
        }
    }
    if let Some(notes) = &args.notes {
        md.push('\n');
        md.push_str(&std::fs::read_to_string(notes)?);
    }
    std::fs::write(&args.out, md)?;
    chart(&args, &order, &by)?;
    Ok(())
}

/// Slow clients the server dropped (queue full or write timeout).
fn dropped(r: &Report) -> String {
    let c = &r.server_counters;
    let full = c
        .get("fanout_slow_client_disconnects_total")
        .copied()
        .unwrap_or(0.0);
    let timeout = c
        .get("fanout_connections_closed_total{reason=\"write_timeout\"}")
        .copied()
        .unwrap_or(0.0);
    format!("{full:.0} queue full, {timeout:.0} write timeout")
}

type Results = BTreeMap<String, BTreeMap<String, Report>>;

fn chart(args: &ReportArgs, order: &[String], by: &Results) -> anyhow::Result<()> {
    let pairs: Vec<(&String, &Report, &Report)> = order
        .iter()
        .filter_map(|s| Some((s, by[s].get(&args.baseline)?, by[s].get(&args.contender)?)))
        .collect();
    let busy: Vec<_> = pairs.iter().filter(|p| p.2.messages > 0).collect();
    let idle: Vec<_> = pairs.iter().filter(|p| p.2.messages == 0).collect();
    let root = BitMapBackend::new(&args.chart, (1500, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((1, 3));
    let colors = [RGBColor(120, 120, 120), RGBColor(30, 110, 200)];
    type Metric = fn(&Report) -> f64;
    let specs: [(&str, Vec<_>, Metric); 3] = [
        ("deliveries/s (log)", busy.clone(), |r| r.deliveries_per_sec),
        ("p99 latency, ms (log)", busy, |r| r.latency_ms.p99),
        ("memory per idle connection, KiB", idle, |r| {
            r.rss_kib.per_connection_bytes as f64 / 1024.0
        }),
    ];
    for (panel, (title, rows, metric)) in panels.iter().zip(specs) {
        let max = rows
            .iter()
            .flat_map(|(_, b, c)| [metric(b), metric(c)])
            .fold(1.0f64, f64::max);
        let names: Vec<String> = rows.iter().map(|(s, _, _)| (*s).clone()).collect();
        let log = title.contains("log");
        let mut builder = ChartBuilder::on(panel);
        builder
            .caption(title, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(70);
        let x_range = -0.5f64..(rows.len().max(1) as f64 - 0.5);
        let label = |x: &f64| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        if log {
            let mut ch = builder.build_cartesian_2d(x_range, (0.1f64..max * 3.0).log_scale())?;
            ch.configure_mesh()
                .x_labels(rows.len().max(1) * 2 + 1)
                .x_label_formatter(&label)
                .disable_x_mesh()
                .draw()?;
            draw_bars(&mut ch, &rows, metric, &colors, 0.1, args)?;
        } else {
            let mut ch = builder.build_cartesian_2d(x_range, 0f64..max * 1.2)?;
            ch.configure_mesh()
                .x_labels(rows.len().max(1) * 2 + 1)
                .x_label_formatter(&label)
                .disable_x_mesh()
                .draw()?;
            draw_bars(&mut ch, &rows, metric, &colors, 0.0, args)?;
        }
    }
    root.present()?;
    Ok(())
}

fn draw_bars<'a, DB: DrawingBackend + 'a, Y>(
    ch: &mut ChartContext<'a, DB, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>,
    rows: &[&(&String, &Report, &Report)],
    metric: fn(&Report) -> f64,
    colors: &[RGBColor; 2],
    floor: f64,
    args: &ReportArgs,
) -> anyhow::Result<()>
where
    Y: Ranged<ValueType = f64>,
    DB::ErrorType: 'static,
{
    for (k, label) in [&args.baseline, &args.contender].into_iter().enumerate() {
        let color = colors[k];
        ch.draw_series(rows.iter().enumerate().map(|(i, (_, b, c))| {
            let r = if k == 0 { b } else { c };
            let x0 = i as f64 - 0.38 + k as f64 * 0.38;
            Rectangle::new(
                [(x0, floor), (x0 + 0.36, metric(r).max(floor))],
                color.filled(),
            )
        }))?
        .label(label.as_str())
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    ch.configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::compare;

    #[test]
    fn comparisons_read_in_the_direction_they_go() {
        // PocketBase 254.8 ms, Fanout 789.5 ms: Fanout's latency is higher.
        assert_eq!(compare(789.5, 254.8, "higher", "lower"), "3.1× higher");
        assert_eq!(compare(20.7, 69.1, "higher", "lower"), "3.3× lower");
        assert_eq!(compare(5.0, 5.0, "more", "fewer"), "1.0× more");
    }
}
