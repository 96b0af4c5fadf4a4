#!/usr/bin/env python3
"""Turns bench/run's raw results (JSON lines) into markdown tables: medians over the rounds,
each figure also as a ratio to the liburing baseline in the same row (in the load generator
check, to epoll_client at the same thread count)."""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess

COLUMNS = [
    ("uring", "liburing baseline"),
    ("epoll", "epoll baseline"),
    ("rc_raw", "echo_server --raw"),
    ("uring_echo", "liburing baseline --echo"),
    ("rc_echo", "echo_server --keep-alive"),
]
BASELINE = "uring"
# The load generator check: (key, row label, the epoll_client key its ratios are to).
LOADGENS = [
    ("eb1", "echo_bench --mode raw --threads 1", "ec1"),
    ("ec1", "epoll_client --threads 1", "ec1"),
    ("eb2", "echo_bench --mode raw --threads 2", "ec2"),
    ("ec2", "epoll_client --threads 2", "ec2"),
]


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def fmt(v):
    if v is None:
        return "–"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def cell(values, base, spread=False):
    """Median of `values` (None when there is none), with the ratio to `base`."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–", None
    m = statistics.median(vals)
    text = fmt(m)
    if spread and len(vals) > 1 and m:
        text += f" ±{(max(vals) - min(vals)) / 2 / m * 100:.0f}%"
    if base is not None and base > 0:
        text += f" ({m / base:.2f}×)"
    return text, m


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass

    def run(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return "?"

    return {
        "cpu": f"{os.cpu_count()} × {model}",
        "kernel": platform.release(),
        "compiler": run("c++", "-dumpfullversion"),
        "liburing": run("pkg-config", "--modversion", "liburing"),
        "commit": run("git", "describe", "--always", "--dirty") or "(not a git checkout)",
    }


def loadgen_table(runs, rounds, problems):
    """echo_bench against the plain C epoll client: medians, each also as a ratio to
    epoll_client at the same thread count."""
    by = {}  # key -> [result dicts]
    for r in runs:
        res = r["result"]
        by.setdefault(r["key"], [])
        name = f"load generator check, {r['program']} --threads {r['threads']}, round {r['round']}"
        if res is None:
            problems.append(f"{name}: failed (exit {r['rc']})")
            continue
        by[r["key"]].append(res)
        if res["errors"] or res["wrong_replies"]:
            problems.append(f"{name}: {res['errors']} errors, {res['wrong_replies']} wrong replies")
    metrics = [("msgs/s", "msgs_per_s"), ("client CPU µs/msg", "client_cpu_us_per_msg"),
               ("server CPU µs/msg", "server_cpu_us_per_msg")]
    lines = ["### Load generator check: echo_bench against a plain C epoll client", "",
             "Both drive the liburing baseline (raw echo) with 64 connections × 64 B, pipeline 1, "
             "pinned to the same core as echo_bench above (so with --threads 2 both threads "
             "share it), in an order that rotates from round to round. epoll_client "
             "(bench/baselines/epoll_client.c) is a plain C, level-triggered epoll client. "
             "Client CPU: getrusage(RUSAGE_SELF) over the window; server CPU: utime+stime "
             "from /proc/PID/stat; both per round trip. Ratios (in parentheses) are to "
             "epoll_client at the same thread count."
             + (" ±: half the spread between rounds." if rounds > 1 else ""), ""]
    lines.append("| load generator | " + " | ".join(name for name, _ in metrics) + " |")
    lines.append("| --- |" + " ---: |" * len(metrics))
    for key, label, base_key in LOADGENS:
        row = []
        for _, field in metrics:
            base_vals = [r[field] for r in by.get(base_key, []) if r[field] is not None]
            base = statistics.median(base_vals) if base_vals else None
            text, _ = cell([r[field] for r in by.get(key, [])],
                           None if key == base_key else base, spread=rounds > 1)
            row.append(text)
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", required=True)
    ap.add_argument("--memory", required=True)
    ap.add_argument("--loadgen")  # the load generator check (JSON lines); optional
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--seconds", required=True)
    ap.add_argument("--warmup", required=True)
    ap.add_argument("--idle", type=int, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--build-dir", required=True)
    ap.add_argument("--elapsed", type=int, default=0)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    results = load(args.results)
    memory = load(args.memory)
    configs = []  # (key, label) in run order
    by = {}  # (config, column) -> [result dicts]
    problems = []
    for r in results:
        if (r["config"], r["label"]) not in configs:
            configs.append((r["config"], r["label"]))
        res = r["result"]
        by.setdefault((r["config"], r["column"]), [])
        if res is None:
            problems.append(f"{r['label']}, {r['server']}, round {r['round']}: echo_bench "
                            f"failed (exit {r['rc']})")
            continue
        by[(r["config"], r["column"])].append(res)
        if res["errors"] or res["wrong_replies"]:
            problems.append(f"{r['label']}, {r['server']}, round {r['round']}: {res['errors']} "
                            f"errors, {res['wrong_replies']} wrong replies")

    def server_cpu(key, res):
        if key == "stream":  # per MiB of echoed bytes
            mib = res["bytes"] / 2**20
            return res["server_cpu_s"] * 1e6 / mib if mib and res["server_cpu_s"] is not None else None
        return res["server_cpu_us_per_msg"]

    def client_cpu(key, res):
        if key == "stream":
            mib = res["bytes"] / 2**20
            return res["client_cpu_s"] * 1e6 / mib if mib else None
        return res["client_cpu_us_per_msg"]

    def throughput(key, res):
        return res["mib_per_s"] if key == "stream" else res["msgs_per_s"]

    def table(title, metric, note, spread=False, skip=()):
        note = note.strip()
        lines = [f"### {title}", ""] + ([note, ""] if note else [])
        lines.append("| load | " + " | ".join(name for _, name in COLUMNS) + " |")
        lines.append("| --- |" + " ---: |" * len(COLUMNS))
        for key, label in configs:
            if key in skip:
                continue
            base_vals = [metric(key, r) for r in by.get((key, BASELINE), [])]
            base_vals = [v for v in base_vals if v is not None]
            base = statistics.median(base_vals) if base_vals else None
            row = []
            for col, _ in COLUMNS:
                vals = [metric(key, r) for r in by.get((key, col), [])]
                text, _ = cell(vals, None if col == BASELINE else base, spread)
                row.append(text)
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def allocation_note():
        # Long-lived connections only: connect makes a connection (and allocates) per round.
        runs = [r for (k, _), rs in by.items() if k not in ("connect", "stream") for r in rs
                if r.get("client_allocs") is not None and r["messages"]]
        if not runs:
            return ""
        worst = max(runs, key=lambda r: r["client_allocs"] / r["messages"])
        return (f"Heap allocations by echo_bench inside the window, long-lived connections: at "
                f"most {worst['client_allocs']} in one run ({worst['client_allocs'] / worst['messages']:.3f} "
                f"per round trip).")

    m = machine()
    out = []
    out.append(f"## ringchat echo benchmarks{' (quick run)' if args.quick else ''}\n")
    out.append(f"- command: `{args.command}` ({args.elapsed} s), build `{args.build_dir}` "
               f"(release, -Db_ndebug=true), commit {m['commit']}, "
               f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}")
    out.append(f"- machine: {m['cpu']}; Linux {m['kernel']}; g++ {m['compiler']}; "
               f"liburing {m['liburing']}")
    out.append(f"- each server pinned to core 1, echo_bench (1 thread) to core 0; servers "
               f"alternate within each load; median of {args.rounds} round(s) of a "
               f"{args.seconds} s window after {args.warmup} s of warm-up")
    out.append("- raw servers get `echo_bench --mode raw`, ECHO servers `--mode echo`; in the "
               "connect row the raw servers get `--mode raw --reconnect` (client half-closes "
               "first) and the ECHO columns are the seed-mode servers (`uring_echo --echo "
               "--once`, plain `echo_server`) under `--mode connect`")
    out.append("- ratios (in parentheses) are to the liburing baseline (raw) in the same row\n")
    out.append(table(
        "Server CPU per message (µs; lower is better)", server_cpu,
        "utime+stime of the server from /proc/PID/stat over the window, divided by the round "
        "trips completed in it (per MiB echoed for the stream; per connection for connect). "
        + ("±: half the spread between rounds." if args.rounds > 1 else ""),
        spread=args.rounds > 1))
    out.append(table(
        "Throughput (higher is better)", throughput,
        "Round trips per second; MiB/s of echoed payload for the stream; connections per "
        "second for connect."))
    out.append(table(
        "Latency p50 (µs)", lambda k, r: r["lat_p50_us"],
        "Round-trip time of one request, from push to the last reply byte (connect: from "
        "connect() to the server's close).", skip=("stream",)))
    out.append(table(
        "Latency p99 (µs)", lambda k, r: r["lat_p99_us"], "", skip=("stream",)))
    out.append(table(
        "echo_bench's own CPU per message (µs)", client_cpu,
        "getrusage(RUSAGE_SELF) over the window: the load generator's cost (per MiB for the "
        "stream). " + allocation_note()))

    mem = {m_["column"]: m_["result"] for m_ in memory}
    lines = [f"### Memory with {args.idle:,} idle connections", "",
             "VmRSS of a freshly started server (/proc/PID/status) before and after "
             f"{args.idle:,} connections that send nothing (bench/idle_conns.py). User-space "
             "memory only: kernel socket and io_uring memory is not in RSS.", ""]
    lines.append("| | " + " | ".join(name for _, name in COLUMNS) + " |")
    lines.append("| --- |" + " ---: |" * len(COLUMNS))
    base = mem.get(BASELINE) or {}
    row_rss, row_per = [], []
    for col, _ in COLUMNS:
        r = mem.get(col)
        if not r:
            row_rss.append("–")
            row_per.append("–")
            continue
        row_rss.append(f"{r['rss_after_kib'] / 1024:.1f}")
        per = r["bytes_per_conn"]
        text = "–" if per is None else f"{per:,.0f}"
        bper = base.get("bytes_per_conn")
        if col != BASELINE and per is not None and bper:
            text += f" ({per / bper:.1f}×)"
        row_per.append(text)
        if r.get("error"):
            problems.append(f"memory, {col}: {r['error']}")
    lines.append("| VmRSS with the idle connections (MiB) | " + " | ".join(row_rss) + " |")
    lines.append("| per idle connection (bytes over the empty server) | "
                 + " | ".join(row_per) + " |")
    out.append("\n".join(lines) + "\n")

    if args.loadgen:
        out.append(loadgen_table(load(args.loadgen), args.rounds, problems))

    if problems:
        out.append("### Errors\n")
        out.extend(f"- {p}" for p in problems)
        out.append("")
    print("\n".join(out))


if __name__ == "__main__":
    main()
