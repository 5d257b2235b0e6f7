//! `fanout-bench floor`: what the kernel alone costs for one broadcast.
//!
//! Fanout's latency at N subscribers can never beat one thread writing one
//! frame to each of N sockets. This opens N loopback connections, then, for
//! each sweep, one thread (pinned where the server runs) writes one frame to
//! every socket with plain blocking `write` calls: no framework, no
//! allocation, no queue. A reader thread (pinned where the load generator
//! runs) timestamps every frame's arrival. The arrival times, measured from
//! the sweep's start, are the floor's latency distribution, to be set
//! against Fanout's paced p50/p99 for the same N in the same run.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, atomic::AtomicU64, atomic::Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;
use tokio::io::AsyncReadExt;

#[derive(Args, Debug, Clone)]
pub struct FloorArgs {
    /// Loopback connections (each needs two open files).
    #[arg(long, default_value_t = 5000)]
    pub connections: usize,
    /// Bytes per frame (an SSE event of a small publication is about 150).
    #[arg(long, default_value_t = 150, value_parser = clap::value_parser!(u64).range(20..))]
    pub bytes: u64,
    /// Sweeps to run; figures are over all of them.
    #[arg(long, default_value_t = 20)]
    pub sweeps: usize,
    /// Core for the writing thread (where the server runs in the scenarios).
    #[arg(long)]
    pub writer_cpu: Option<usize>,
    /// Core for the reading thread (where the load generator runs).
    #[arg(long)]
    pub reader_cpu: Option<usize>,
    /// Append the JSON result line to this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
}

#[derive(Debug, Serialize)]
pub struct FloorReport {
    pub connections: usize,
    pub bytes: usize,
    pub sweeps: usize,
    /// Median time for one thread to write one frame to every socket.
    pub write_sweep_ms: f64,
    /// Median time from a sweep's start to the last frame's arrival.
    pub last_read_ms: f64,
    /// Per-frame arrival time after its sweep started, over all sweeps.
    pub latency_ms: crate::run::Latency,
}

fn pin(cpu: Option<usize>) {
    if let Some(id) = cpu {
        core_affinity::set_for_current(core_affinity::CoreId { id });
    }
}

pub fn floor(args: FloorArgs) -> anyhow::Result<FloorReport> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut writers = Vec::with_capacity(args.connections);
    let mut readers = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client = TcpStream::connect(addr)?;
        let (server, _) = listener.accept()?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        client.set_nonblocking(true)?;
        readers.push(client);
        writers.push(server);
    }

    let epoch = Instant::now();
    let sweep_start = Arc::new(AtomicU64::new(0));
    let (done_tx, done_rx) = std::sync::mpsc::channel::<Vec<u64>>();
    // One more sweep than asked: the first warms the sockets and the reader
    // and is not counted.
    let (n, bytes, sweeps) = (args.connections, args.bytes as usize, args.sweeps + 1);
    let reader_cpu = args.reader_cpu;
    let start = sweep_start.clone();
    let reader = std::thread::spawn(move || -> anyhow::Result<()> {
        pin(reader_cpu);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let arrivals = Arc::new(parking_lot::Mutex::new(Vec::with_capacity(n)));
            let mut tasks = tokio::task::JoinSet::new();
            for s in readers {
                let mut s = tokio::net::TcpStream::from_std(s)?;
                let (arrivals, start, done) = (arrivals.clone(), start.clone(), done_tx.clone());
                tasks.spawn(async move {
                    let mut buf = vec![0u8; bytes];
                    for _ in 0..sweeps {
                        if s.read_exact(&mut buf).await.is_err() {
                            return;
                        }
                        let at = epoch.elapsed().as_micros() as u64;
                        let mut a = arrivals.lock();
                        a.push(at.saturating_sub(start.load(Ordering::Acquire)));
                        if a.len() == n {
                            let _ = done.send(std::mem::take(&mut *a));
                        }
                    }
                });
            }
            drop(done_tx);
            // Until every task has read every sweep.
            tasks.join_all().await;
            anyhow::Ok(())
        })
    });

    pin(args.writer_cpu);
    let frame = {
        let mut f = b"event:bench\ndata:".to_vec();
        f.resize(bytes - 2, b'x');
        f.extend_from_slice(b"\n\n");
        f
    };
    let mut hist = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut sweep_ms, mut last_ms) = (Vec::new(), Vec::new());
    for sweep in 0..sweeps {
        std::thread::sleep(Duration::from_millis(20));
        let t = epoch.elapsed().as_micros() as u64;
        sweep_start.store(t, Ordering::Release);
        for w in &mut writers {
            w.write_all(&frame)?;
        }
        sweep_ms.push((epoch.elapsed().as_micros() as u64 - t) as f64 / 1000.0);
        let arrivals = done_rx.recv_timeout(Duration::from_secs(30))?;
        if sweep == 0 {
            sweep_ms.clear();
            continue;
        }
        last_ms.push(*arrivals.iter().max().unwrap_or(&0) as f64 / 1000.0);
        for a in arrivals {
            hist.record(a.max(1))?;
        }
    }
    reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    Ok(FloorReport {
        connections: n,
        bytes,
        sweeps: sweeps - 1,
        write_sweep_ms: median(&mut sweep_ms),
        last_read_ms: median(&mut last_ms),
        latency_ms: crate::run::Latency {
            p50: ms(0.5),
            p90: ms(0.9),
            p99: ms(0.99),
            p999: ms(0.999),
            max: hist.max() as f64 / 1000.0,
        },
    })
}
