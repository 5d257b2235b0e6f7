#!/usr/bin/env python3
"""Writes docs/benchmarks-cluster.md from one run of bench/compare-socketio.sh:
the result lines of both load generators (fanout-bench's `Report` format) and
the floor line of `fanout-bench floor`."""
import argparse
import json
import os
import platform


def machine():
    try:
        model = next(
            l.split(":", 1)[1].strip()
            for l in open("/proc/cpuinfo")
            if l.startswith("model name")
        )
    except (OSError, StopIteration):
        model = platform.processor()
    return f"{os.cpu_count()} cores ({model})"


def load(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def ratio(a, b):
    return f"{a / b:.1f}×" if b else "–"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--floor", required=True)
    ap.add_argument("--large", help="summary lines of bench/scenarios/large-scale.sh")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", required=True)
    a = ap.parse_args()
    runs = {(r["scenario"], r["label"]): r for r in load(a.results)}
    floor = load(a.floor)[-1]
    md = []
    w = md.append
    w("# Benchmarks: Fanout's cluster against socket.io's, and against the floor\n")
    w(
        f"Measured in one run on **{machine()}**. Both clusters are 3 servers and one Redis "
        "pinned to core 0; the load generator runs on core 1. This machine is shared and noisy: "
        "compare the ratios within this run, not absolute figures across runs.\n"
    )
    w(f"Produced by:\n\n```sh\n{a.command}\n```\n")

    w("## One room and many rooms, 3 nodes + Redis\n")
    w(
        "Fanout: SSE clients from `fanout-bench`. socket.io: the official `socket.io-client` on WebSocket "
        "(`bench/peers/socketio/loadgen.mjs`). Publishes are HTTP POSTs spread over the 3 servers; "
        "clients are spread over them too. Memory per connection is the servers' (and Redis's) resident "
        "memory growth divided by the clients.\n"
    )
    w("| scenario | metric | Fanout | socket.io | Fanout vs socket.io |")
    w("|---|---|---:|---:|---:|")
    for scenario, desc in [
        ("one-room", "6,000 clients in 1 room, 200 broadcasts"),
        ("many-rooms", "6,000 clients in 1,000 rooms, 20,000 broadcasts"),
    ]:
        f = runs.get((scenario, "fanout-3-nodes+redis"))
        s = runs.get((scenario, "socketio-3-nodes+redis"))
        if not f or not s:
            continue
        name = f"{scenario} ({desc})"
        rows = [
            ("deliveries/s", f["deliveries_per_sec"], s["deliveries_per_sec"], True),
            ("latency p50 ms", f["latency_ms"]["p50"], s["latency_ms"]["p50"], False),
            ("latency p99 ms", f["latency_ms"]["p99"], s["latency_ms"]["p99"], False),
            ("KiB per connection", f["rss_kib"]["per_connection_bytes"] / 1024, s["rss_kib"]["per_connection_bytes"] / 1024, False),
            ("connects/s", f["connect_per_sec"], s["connect_per_sec"], True),
            ("server CPU s", f["cpu_secs"]["server"], s["cpu_secs"]["server"], False),
            ("deliveries per server CPU s", f["received"] / max(f["cpu_secs"]["server"], 1e-9),
             s["received"] / max(s["cpu_secs"]["server"], 1e-9), True),
            ("generator CPU s", f["cpu_secs"]["bench"], s["cpu_secs"]["bench"], None),
        ]
        for metric, fv, sv, higher_better in rows:
            fmt = (lambda v: f"{v:,.0f}") if fv >= 100 or sv >= 100 else (lambda v: f"{v:.2f}")
            if higher_better is None:
                cmp = ""
            else:
                # In the direction it goes: never a ratio below 1.
                cmp = ratio(fv, sv) + " more" if fv >= sv else ratio(sv, fv) + " less"
            w(f"| {name} | {metric} | {fmt(fv)} | {fmt(sv)} | {cmp} |")
            name = ""
        for r, who in ((f, "Fanout"), (s, "socket.io")):
            w(
                f"| | {who}: missing / duplicated / out of order | {r['missing']} / {r['duplicated']} / {r['out_of_order']} "
                f"of {r['expected']:,} | | |"
            )
    noop = runs.get(("one-room", "socketio-generator-vs-noop"))
    sio = runs.get(("one-room", "socketio-3-nodes+redis"))
    fan = runs.get(("one-room", "fanout-3-nodes+redis"))
    if noop and sio and fan:
        busy = lambda r: r["cpu_secs"]["bench"] / max(r["deliver_secs"], 1e-9)
        w("")
        w(
            f"**How much of that the load generators decide.** `fanout-bench` was {busy(fan):.0%} busy during "
            f"Fanout's one-room run. socket.io's generator (one Node.js thread) was {busy(sio):.0%} busy during "
            f"socket.io's, and against a server that does no socket.io work (pre-encoded frames, `NOOP=1`) it "
            f"topped out at **{noop['deliveries_per_sec']:,.0f}** deliveries/s ({busy(noop):.0%} busy). So socket.io's "
            f"one-room rate is close to what its generator can take, and the deliveries/s ratio is a range: "
            f"{fan['deliveries_per_sec'] / noop['deliveries_per_sec']:.1f}× if socket.io could reach the generator's "
            f"ceiling, {fan['deliveries_per_sec'] / sio['deliveries_per_sec']:.1f}× as measured. The servers' CPU per "
            f"delivery does not depend on the generator: socket.io's servers spent "
            f"{sio['cpu_secs']['server'] * 1e6 / sio['received']:.1f} µs per delivery, Fanout's "
            f"{fan['cpu_secs']['server'] * 1e6 / fan['received']:.1f} µs.\n"
        )
        w(
            "Latency in the one-room rows is queueing: 200 broadcasts are published as fast as the servers "
            "accept them, so a delivery waits for the ones before it. The low-load table below is latency "
            "below saturation.\n"
        )

    w("## Low load through the cluster: the relay hop\n")
    w("300 clients in one room, 20 broadcasts/s for 10 s, through 1 node and through 3 nodes + Redis.\n")
    w("| system | p50 ms, 1 node | p50 ms, 3 nodes + Redis | p99 ms, 1 node | p99 ms, 3 nodes + Redis |")
    w("|---|---:|---:|---:|---:|")
    for system, who in (("fanout", "Fanout"), ("socketio", "socket.io")):
        one = runs.get(("low-load", f"{system}-1-node"))
        three = runs.get(("low-load", f"{system}-3-nodes+redis"))
        if one and three:
            w(
                f"| {who} | {one['latency_ms']['p50']:.2f} | {three['latency_ms']['p50']:.2f} | "
                f"{one['latency_ms']['p99']:.2f} | {three['latency_ms']['p99']:.2f} |"
            )
    w("")

    paced = runs.get(("broadcast-5k-paced", "fanout"))
    w("## Against the floor\n")
    w(
        f"`fanout-bench floor`: one thread (core 0) writes one {floor['bytes']}-byte frame to each of "
        f"{floor['connections']:,} loopback sockets with plain `write` calls; a reader (core 1) timestamps each "
        "arrival from the sweep's start. That is the least any server can take to broadcast one message to that "
        "many subscribers on one core. Fanout's figure is the paced broadcast (5,000 subscribers, 5 messages/s, "
        "one node), measured right after in the same run.\n"
    )
    w("| | floor | Fanout | Fanout ÷ floor |")
    w("|---|---:|---:|---:|")
    w(f"| write sweep ms (median) | {floor['write_sweep_ms']:.1f} | | |")
    w(f"| last arrival ms (median) | {floor['last_read_ms']:.1f} | | |")
    if paced:
        for q in ("p50", "p99"):
            fv, pv = floor["latency_ms"][q], paced["latency_ms"][q]
            w(f"| latency {q} ms, over all frames | {fv:.1f} | {pv:.1f} | {pv / fv:.2f} |")
        clean = 0.99 * floor["last_read_ms"]
        pv = paced["latency_ms"]["p99"]
        w(f"| latency p99 ms of an undisturbed sweep (0.99 × median last arrival) | {clean:.1f} | {pv:.1f} | {pv / clean:.2f} |")
    w("")
    w(
        "The floor's p99 over all frames includes sweeps in which the reader was held up by other work on "
        "this shared machine; its undisturbed sweeps end at the median last arrival. Read Fanout's p99 "
        "against both rows.\n"
    )
    if a.large:
        large = {r["scenario"]: r for r in load(a.large)}
        w("## The largest scale here: about 50,000 connections, 3 nodes + Redis\n")
        w(
            "`bench/scenarios/large-scale.sh`: 3 nodes and Redis on core 0; the connections come from 4 "
            "`fanout-bench` processes on core 1 (this machine allows 20,000 open files per process): 3 that "
            "only receive, 16,000 clients each, and one with 2,000 clients that also publishes. All on one "
            "topic. Each process checks its own deliveries; the figures add them up. Memory is each node's "
            "resident growth over its 16,000 listening connections, before the publishing process connects.\n"
        )
        w("| run | connections | connects/s | KiB per connection (each node) | deliveries | missing / dup / out of order | deliveries/s | p50 ms | p99 ms | server CPU s |")
        w("|---|---:|---:|---|---:|---|---:|---:|---:|---:|")
        for name, desc in (("large", "40 broadcasts as fast as accepted"), ("large-paced", "20 broadcasts at 2/s")):
            r = large.get(name)
            if not r:
                continue
            kib = " / ".join(f"{b / 1024:.2f}" for b in r["bytes_per_connection_per_node"])
            w(
                f"| {desc} | {r['connections']:,} | {r['listener_connect_per_sec']:,} | {kib} | {r['received']:,} of "
                f"{r['expected']:,} | {r['missing']} / {r['duplicated']} / {r['out_of_order']} | "
                f"{r['deliveries_per_sec']:,} | {r['latency_ms_p50_max_over_processes']:.0f} | "
                f"{r['latency_ms_p99_max_over_processes']:.0f} | {r['server_cpu_secs']:.2f} |"
            )
        w("")
        per_write_us = floor["write_sweep_ms"] * 1000 / floor["connections"]
        paced = large.get("large-paced")
        sweep_ms = per_write_us * paced["connections"] / 1000 if paced else 0
        w(
            "p50 and p99 are the highest any generator process saw. The connect rate is the three listening "
            "processes' together, opening and subscribing on one shared core. As fast as accepted, latency is "
            "queueing (see above). Paced at 2 broadcasts/s, one broadcast is a sweep over all the connections "
            f"by 3 nodes sharing one core: at the floor's {per_write_us:.1f} µs per write measured above, the "
            f"sweep alone takes about {sweep_ms:.0f} ms, so no server on this core can have a p99 much below "
            "that. "
            + (
                f"Fanout's paced p99 was {paced['latency_ms_p99_max_over_processes'] / sweep_ms:.1f}× that sweep "
                f"(an estimate from the per-write cost: the floor program itself cannot open "
                f"{paced['connections']:,} socket pairs in one process here).\n"
                if paced
                else "\n"
            )
        )
    with open(a.out, "w") as f:
        f.write("\n".join(md))


if __name__ == "__main__":
    main()
