#!/usr/bin/env python3
"""The table of bench/compare-companion.sh.

    companion_report.py RESULTS.jsonl HEADER            # markdown on stdout
    companion_report.py --update-docs TABLE.md DOC...   # put it in the docs

RESULTS.jsonl holds fanout-bench's result lines, labelled `pocketbase`
(PocketBase alone) and `companion` (PocketBase + Fanout), one pair per
scenario. --update-docs replaces what lies between the markers
<!-- companion-bench:start --> and <!-- companion-bench:end --> in each DOC
(and appends the markers with the table when a DOC has none).
"""

import json
import sys

START, END = "<!-- companion-bench:start -->", "<!-- companion-bench:end -->"
GOAL_SCENARIO = "public-max"


def ratio(a, b):
    return a / b if b else float("inf")


def fmt(x, digits=1):
    if isinstance(x, str):
        return x
    if x == float("inf"):
        return "∞"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}f}"


def rows(pb, co):
    """(metric, PocketBase alone, companion, companion against alone)."""
    out = []

    def more(name, f, digits=1):
        a, b = f(pb), f(co)
        out.append((name, fmt(a, digits), fmt(b, digits), f"{fmt(ratio(b, a))}× more"))

    def less(name, f, digits=1):
        a, b = f(pb), f(co)
        out.append((name, fmt(a, digits), fmt(b, digits), f"{fmt(ratio(a, b))}× lower"))

    more("deliveries/s", lambda r: r["deliveries_per_sec"], 0)
    less("write→delivery p50 (ms)", lambda r: r["latency_ms"]["p50"])
    less("write→delivery p99 (ms)", lambda r: r["latency_ms"]["p99"])
    less("create request p50 (ms)", lambda r: r["create_ms"]["p50"], 2)
    less("create request p99 (ms)", lambda r: r["create_ms"]["p99"], 2)
    less("PocketBase CPU per record event (ms)", lambda r: r["pocketbase"]["cpu_ms_per_record"], 3)
    less("PocketBase peak RSS (MiB)", lambda r: r["pocketbase"]["rss_kib_peak"] / 1024)
    less("PocketBase open sockets", lambda r: r["pocketbase"]["sockets_connected"], 0)
    out.append(("Fanout + Redis CPU s, peak RSS MiB", "–",
                f"{co['cpu_secs']['server']:.2f} s, {co['rss_kib']['peak'] / 1024:.0f} MiB", ""))
    for name, f in [("delivered / expected", lambda r: f"{r['received']}/{r['expected']}"),
                    ("missing, duplicated, out of order",
                     lambda r: f"{r['missing']}, {r['duplicated']}, {r['out_of_order']}"),
                    ("create errors", lambda r: str(r["publish_errors"])),
                    ("clients connected", lambda r: f"{r['connected']}/{r['clients']}")]:
        out.append((name, f(pb), f(co), ""))
    return out


def goals(pb, co):
    cpu = ratio(pb["pocketbase"]["cpu_ms_per_record"], co["pocketbase"]["cpu_ms_per_record"])
    dps = ratio(co["deliveries_per_sec"], pb["deliveries_per_sec"])
    c50, c99 = (co["create_ms"][q] <= pb["create_ms"][q] for q in ("p50", "p99"))
    missing = co["missing"]
    yes = lambda ok: "**met**" if ok else "**not met**"
    return [
        f"* PocketBase's CPU per record event at least 100× lower: {fmt(cpu)}× — {yes(cpu >= 100)}",
        f"* deliveries/s at least 10× higher: {fmt(dps)}× — {yes(dps >= 10)}",
        f"* the create request no slower: p50 {pb['create_ms']['p50']:.2f} → {co['create_ms']['p50']:.2f} ms, "
        f"p99 {pb['create_ms']['p99']:.2f} → {co['create_ms']['p99']:.2f} ms — {yes(c50 and c99)}",
        f"* nothing missing: {missing} missing of {co['expected']} — {yes(missing == 0 and co['expected'] > 0)}",
    ]


def table(results, header):
    by = {}
    for r in results:
        by.setdefault(r["scenario"], {})[r["label"]] = r
    md = [f"Produced by {header}.", ""]
    for scenario, pair in by.items():
        pb, co = pair.get("pocketbase"), pair.get("companion")
        if not (pb and co):
            continue
        desc = (f"{pb['clients']} clients, {pb['messages']} records, {pb['publishers']} publishers"
                + (", paced" if "paced" in scenario else ", as fast as accepted"))
        md += [f"**{scenario}** ({desc}; companion: {co['nodes']} Fanout node(s) + Redis)", "",
               "| metric | PocketBase alone | PocketBase + Fanout | companion against alone |",
               "|---|---:|---:|---:|"]
        md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(pb, co)]
        md.append("")
        if scenario == GOAL_SCENARIO:
            md += [f"Goals (issue 20), at {pb['clients']} guests, from this run:", ""]
            md += goals(pb, co)
            md.append("")
    return "\n".join(md)


def update_docs(table_md, docs):
    block = f"{START}\n{table_md.rstrip()}\n{END}"
    for doc in docs:
        text = open(doc).read()
        if START in text and END in text:
            head, rest = text.split(START, 1)
            text = head + block + rest.split(END, 1)[1]
        else:
            text = text.rstrip() + "\n\n## Companion mode against PocketBase alone\n\n" + block + "\n"
        open(doc, "w").write(text)


def main():
    if sys.argv[1] == "--update-docs":
        update_docs(open(sys.argv[2]).read(), sys.argv[3:])
        return
    results = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    print(table(results, sys.argv[2]))


if __name__ == "__main__":
    main()
