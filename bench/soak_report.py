#!/usr/bin/env python3
"""bench/soak_report.py: the soak's arithmetic and its markdown report (see bench/soak.sh).

  soak_report.py distinct OUT.jsonl      # prints how many distinct messageIds OUT has
  soak_report.py report --work DIR ...   # writes the report; exit 0 = no loss and flat
"""

import argparse
import json
import os
import platform
import re
import statistics
import sys
from datetime import datetime, timezone

MESSAGE_ID = re.compile(rb'"messageId":"([^"]+)"')

# Growth from the baseline window to the last window that still counts as flat.
# (name, column, unit, allowed growth as (fraction of baseline, absolute floor))
RESOURCES = [
    ("RSS", "rss_kib", "KiB", (0.10, 1024)),
    ("open fds", "fds", "", (0.0, 2)),
    ("threads", "threads", "", (0.0, 2)),
    ("tokio tasks", "tasks", "", (0.0, 3)),
]


def output_ids(path):
    """(distinct ids, lines, lines without a messageId)."""
    ids, lines, unparsed = set(), 0, 0
    with open(path, "rb") as f:
        for line in f:
            lines += 1
            m = MESSAGE_ID.search(line)
            if m:
                ids.add(m.group(1))
            else:
                unparsed += 1
    return ids, lines, unparsed


def read_tsv(path):
    with open(path) as f:
        head = f.readline().rstrip("\n").split("\t")
        rows = []
        for line in f:
            cells = line.rstrip("\n").split("\t")
            row = {}
            for k, v in zip(head, cells):
                try:
                    row[k] = float(v)
                except ValueError:
                    row[k] = v
            rows.append(row)
    return rows


def emulator_events(path):
    """The emulator's JSON log lines, as (message, fields)."""
    events = []
    with open(path) as f:
        for line in f:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            fields = e.get("fields", {})
            events.append((fields.get("message", ""), fields))
    return events


def prometheus(path):
    """{series: value} from a Prometheus text scrape."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("#") or not line.strip():
                    continue
                name, _, value = line.rstrip("\n").rpartition(" ")
                try:
                    out[name] = float(value)
                except ValueError:
                    pass
    except FileNotFoundError:
        pass
    return out


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z")


def reattach_seconds(client_log):
    """For each lost connection in the client's text log, seconds until the next link attached."""
    gaps, lost_at = [], None
    for line in client_log.splitlines():
        m = LOG_TIME.match(line)
        if not m:
            continue
        t = datetime.fromisoformat(m.group(1)[:26]).timestamp()
        if "connection failed; reconnecting" in line and lost_at is None:
            lost_at = t
        elif "receiver link attached" in line and lost_at is not None:
            gaps.append(t - lost_at)
            lost_at = None
    return gaps


def median(rows, col):
    vals = [r[col] for r in rows if isinstance(r.get(col), float)]
    return statistics.median(vals) if vals else None


def fmt(v, unit=""):
    if v is None or not isinstance(v, float):
        return "n/a" if v in (None, "NA") else str(v)
    if unit == "KiB":
        return f"{v / 1024:.1f} MiB"
    return f"{v:g}"


def machine():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except OSError:
        mem_kib = 0
    return f"{os.cpu_count()} cores ({model}), {mem_kib / 1024 / 1024:.0f} GiB, Linux {platform.release()}"


def report(a):
    samples = read_tsv(os.path.join(a.work, "samples.tsv"))
    drops = read_tsv(os.path.join(a.work, "drops.tsv"))
    events = emulator_events(os.path.join(a.work, "emulator.log"))
    final = prometheus(os.path.join(a.work, "final_metrics.txt"))
    ids, lines, unparsed = output_ids(os.path.join(a.work, "out.jsonl"))
    with open(os.path.join(a.work, "client.log"), errors="replace") as f:
        client_log = f.read()

    generated = next((f.get("messages") for m, f in events if m.startswith("simulated traffic finished")), None)
    stopping = next((f for m, f in reversed(events) if m == "emulator stopping"), {})
    usr1 = sum(1 for m, _ in events if m.startswith("SIGUSR1"))
    usr2 = sum(1 for m, _ in events if m.startswith("SIGUSR2"))
    attached = client_log.count("receiver link attached")
    gaps = reattach_seconds(client_log)
    reconnects = {
        k.split('cause="', 1)[-1].rstrip('"}'): v
        for k, v in final.items()
        if k.startswith("iot_sub_reconnects_total{")
    }

    distinct = len(ids)
    lost = a.total - distinct
    no_loss = lost == 0 and generated == a.total and unparsed == 0

    run = [r for r in samples if r["phase"] == "run"]
    # The verdict compares the second minute (the first is warm-up: the duplicate-suppression
    # window and the allocator fill up) with the last minute; shorter runs are not judged.
    judged = a.duration >= 180
    base = [r for r in run if 60 <= r["t"] < 120]
    last = [r for r in run if r["t"] >= a.duration - 60]
    verdicts = []
    flat = True
    for name, col, unit, (frac, floor) in RESOURCES:
        b, l = median(base, col), median(last, col)
        allowed = max(frac * (b or 0), floor)
        if not judged:
            verdict, ok = "not judged (run < 3 min)", True
        elif b is None or l is None:
            verdict, ok = "no data", False
        else:
            ok = l - b <= allowed
            verdict = "flat" if ok else "GROWING"
        flat = flat and ok
        tol = (f"+{frac:.0%}, at least +{fmt(float(floor), unit)}" if frac else f"+{floor}")
        verdicts.append((name, fmt(b, unit), fmt(l, unit), tol, verdict))

    # One row per window of w seconds (a minute in a run of 5 minutes or more).
    w = min(60.0, a.duration / 5)
    rows = []
    prev = run[0] if run else None
    n_windows = int(round(a.duration / w))
    for i in range(n_windows):
        lo, hi = i * w, (i + 1) * w
        win = [r for r in run if lo <= r["t"] < hi]
        if not win:
            continue
        end = win[-1]
        rate = cpu = None
        if prev is not None and end is not prev and isinstance(end["written"], float) and isinstance(prev["written"], float):
            dt = end["t"] - prev["t"]
            rate = (end["written"] - prev["written"]) / dt
            if isinstance(end["cpu_ticks"], float) and isinstance(prev["cpu_ticks"], float):
                cpu = (end["cpu_ticks"] - prev["cpu_ticks"]) / 100 / dt
        n_drops = sum(1 for d in drops if lo <= d["t"] < hi)
        rows.append((f"{lo:g}–{hi:g}", fmt(median(win, "rss_kib"), "KiB"),
                     fmt(max(r["rss_kib"] for r in win if isinstance(r["rss_kib"], float)), "KiB"),
                     fmt(median(win, "fds")), fmt(median(win, "threads")), fmt(median(win, "tasks")),
                     fmt(end["written"]), "n/a" if rate is None else f"{rate:.0f}",
                     "n/a" if cpu is None else f"{cpu:.0%}", str(n_drops), fmt(end["reconnects"])))
        prev = end

    ok = no_loss and flat and a.client_rc == 0
    busy = a.busy_ticks / 100 / a.duration / (os.cpu_count() or 1)
    now = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = []
    p = out.append
    p("# Soak report")
    p("")
    p(f"Generated by `bench/soak.sh` on {now} (commit `{a.commit}`). "
      f"Verdict: **{'PASS' if ok else 'FAIL'}** — "
      f"{'no message lost' if no_loss else f'{lost} messages LOST'}, "
      f"resources {('flat' if flat else 'GROWING') if judged else 'not judged (run shorter than 3 minutes)'}.")
    p("")
    p("```sh")
    p(a.command.strip())
    p("```")
    p("")
    p("## Setup")
    p("")
    p(f"- Machine: {machine()}; {a.rustc}. The machine was shared with other builds and tests: "
      f"all processes together kept {busy:.0%} of its CPU busy during the run "
      f"(load average {' '.join(a.load[0].split()[:1])} at the start, {' '.join(a.load[1].split()[:1])} at the end).")
    p(f"- The release binary both ways: `iot-sub emulate --rate {a.rate} --count {a.total}` "
      f"(simulated devices, default redelivery delay) and `iot-sub listen` with a default profile "
      f"(credit, idle-time-out, reconnect backoff 1 s doubling), stdout to a file, "
      f"`--metrics-listen` on loopback.")
    p(f"- {a.duration:g} s at {a.rate} msgs/s; every {a.drop_every} s the emulator drops the "
      f"connection, SIGUSR1 (a Close with 9602, as Aliyun's maintenance) and SIGUSR2 (a TCP reset "
      f"without a Close) in turn; a sample every {a.sample_every} s of the client's VmRSS "
      f"(/proc/PID/status), open fds (/proc/PID/fd), threads, and from its /metrics "
      f"`iot_sub_tokio_alive_tasks`, `iot_sub_messages_written_total` and `iot_sub_reconnects_total`.")
    p("")
    p("## Delivery")
    p("")
    p("| | |")
    p("|---|---:|")
    p(f"| messages generated by the emulator | {generated if generated is not None else 'n/a'} |")
    p(f"| accepted, as the emulator counts them (each message once) | {stopping.get('accepted', 'n/a')} |")
    p(f"| left in the emulator's backlog / in flight at the end | {stopping.get('backlog', 'n/a')} / {stopping.get('in_flight', 'n/a')} |")
    p(f"| transfers sent (redeliveries included) | {stopping.get('transfers', 'n/a')} |")
    p(f"| output lines | {lines} |")
    p(f"| distinct messageIds in the output | {distinct} |")
    p(f"| lost (generated − distinct in the output) | {lost} |")
    p(f"| lines repeating an id already written | {lines - distinct - unparsed} |")
    p(f"| redeliveries the client dropped as duplicates (`iot_sub_messages_duplicate_total`) | "
      f"{fmt(final.get('iot_sub_messages_duplicate_total'))} |")
    p(f"| drain after the last message was generated | {a.drain_s} s |")
    p(f"| client exit status after SIGTERM | {a.client_rc} |")
    p("")
    p("## Connection drops")
    p("")
    p(f"{len(drops)} drops sent ({usr1} SIGUSR1 close, {usr2} SIGUSR2 reset, as the emulator logged "
      f"them); the client logged `receiver link attached` {attached} times (the first connection "
      f"plus one per drop). Reconnects counted by the client, by cause: "
      + (", ".join(f"`{cause}` {v:g}" for cause, v in sorted(reconnects.items())) or "none")
      + ".")
    if gaps:
        p("")
        p(f"From each lost connection to the next attached receiver link (the client's log, "
          f"reconnect backoff included): median {statistics.median(gaps) * 1000:.0f} ms, "
          f"max {max(gaps) * 1000:.0f} ms over {len(gaps)} reconnects.")
    p("")
    p(f"## Samples ({w:g} s windows)")
    p("")
    p("Medians over each window of the samples taken in it; written and reconnects are the totals "
      "at the window's last sample; msgs/s and client CPU (share of one core) since the previous "
      "window's last sample.")
    p("")
    p("| window (s) | RSS | max RSS | fds | threads | tokio tasks | written | msgs/s | client CPU | drops | reconnects |")
    p("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        p("| " + " | ".join(r) + " |")
    p("")
    p("## Flat or growing")
    p("")
    p("The median of the last minute of the run against the median of the second minute (the "
      "first is warm-up: the duplicate-suppression window and the allocator fill up); growing "
      "beyond the tolerance fails the soak. Runs shorter than 3 minutes are not judged.")
    p("")
    p("| resource | 2nd minute | last minute | tolerance | verdict |")
    p("|---|---:|---:|---|---|")
    for v in verdicts:
        p("| " + " | ".join(v) + " |")
    p("")
    text = "\n".join(out)
    with open(a.out, "w") as f:
        f.write(text)
    print(text.split("\n")[2])
    for name, b, l, tol, verdict in verdicts:
        print(f"{name}: {b} -> {l} ({verdict})")
    return 0 if ok else 1


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "distinct":
        print(len(output_ids(sys.argv[2])[0]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["report"])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--rate", type=int, required=True)
    ap.add_argument("--total", type=int, required=True)
    ap.add_argument("--drop-every", type=int, required=True)
    ap.add_argument("--sample-every", type=int, required=True)
    ap.add_argument("--drain-s", type=int, required=True)
    ap.add_argument("--client-rc", type=int, required=True)
    ap.add_argument("--emulator-rc", type=int, required=True)
    ap.add_argument("--busy-ticks", type=int, required=True)
    ap.add_argument("--load", nargs=2, required=True)
    ap.add_argument("--command", required=True)
    ap.add_argument("--commit", required=True)
    ap.add_argument("--rustc", required=True)
    return report(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
