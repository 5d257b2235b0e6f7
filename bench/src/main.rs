//! `fanout-bench`: a load generator for PocketBase-protocol realtime
//! servers (Fanout and PocketBase itself), and the report that compares
//! them.
//!
//! ```sh
//! fanout-bench run --nodes 127.0.0.1:8090 --clients 5000 --messages 200
//! fanout-bench report --results r.jsonl --out docs/benchmarks.md --chart docs/benchmarks.png --command "…"
//! fanout-bench floor --connections 5000 --writer-cpu 0 --reader-cpu 1
//! fanout-bench storm --nodes 127.0.0.1:8090,127.0.0.1:8091 --clients 3000 --victim 0 --event "kill -9 PID"
//! ```

mod floor;
mod report;
mod run;
mod sse;
mod storm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fanout-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one scenario and print its result (a human summary on stderr,
    /// one JSON line on stdout).
    Run(Box<run::RunArgs>),
    /// Write the side-by-side markdown table and PNG chart.
    Report(report::ReportArgs),
    /// Time the kernel's floor: one thread writing one frame to each of N
    /// loopback sockets (one JSON line on stdout).
    Floor(floor::FloorArgs),
    /// A reconnect storm: SDK-like clients, one event that closes many
    /// streams (a node killed, Redis restarted), and the recovery (one
    /// JSON line on stdout).
    Storm(storm::StormArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Run(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let json_out = args.json_out.clone();
            let report = rt.block_on(run::run(*args))?;
            eprint!("{}", run::summary(&report));
            emit(&report, json_out)?;
            // Open streams and tasks are dropped with the runtime.
            rt.shutdown_background();
            Ok(())
        }
        Command::Report(args) => report::report(args),
        Command::Storm(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            let json_out = args.json_out.clone();
            let r = rt.block_on(storm::storm(args))?;
            eprint!("{}", storm::summary(&r));
            emit(&r, json_out)?;
            rt.shutdown_background();
            Ok(())
        }
        Command::Floor(args) => {
            let json_out = args.json_out.clone();
            let r = floor::floor(args)?;
            eprintln!(
                "floor: {} sockets x {} B: write sweep {:.1} ms, last read {:.1} ms; arrival p50 {:.1} ms, p99 {:.1} ms",
                r.connections,
                r.bytes,
                r.write_sweep_ms,
                r.last_read_ms,
                r.latency_ms.p50,
                r.latency_ms.p99
            );
            emit(&r, json_out)?;
            Ok(())
        }
    }
}

/// A result as one JSON line on stdout, also appended to `json_out`.
fn emit(
    result: &impl serde::Serialize,
    json_out: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    let line = serde_json::to_string(result)?;
    println!("{line}");
    if let Some(path) = json_out {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        writeln!(f, "{line}")?;
    }
    Ok(())
}
