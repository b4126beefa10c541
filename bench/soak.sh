#!/usr/bin/env bash
# bench/soak.sh: a long run of the release binary against the standalone emulator at a steady
# rate with periodic connection drops; samples the client's memory, file descriptors, threads
# and tokio tasks, checks that no message was lost, says whether the resources stay flat, and
# writes a markdown report. Not part of CI.
#
#   bash bench/soak.sh [SECONDS]          # default 600 (10 minutes); 60 for a smoke run
#
# Environment knobs: SOAK_RATE (1000 msgs/s), SOAK_DROP_EVERY (40 s; SIGUSR1 and SIGUSR2 to the
# emulator in turn; above the client's 30 s healthy period, so each drop meets a reset backoff:
# shorter intervals make the backoff grow towards backoff_max, by design), SOAK_SAMPLE_EVERY (5 s), SOAK_DRAIN (240 s: how long the client may take to
# write the last messages after the emulator stops generating), SOAK_PORT (45691),
# SOAK_METRICS_PORT (45692), SOAK_REPORT (target/soak/soak.md), SOAK_KEEP=1 keeps the work
# directory (logs, samples, output), CARGO_TARGET_DIR. Loopback only; every process runs under
# `timeout`. Exit status: 0 when nothing was lost and every resource stayed flat, 1 otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

DURATION=${1:-600}
RATE=${SOAK_RATE:-1000}
DROP_EVERY=${SOAK_DROP_EVERY:-40}
SAMPLE_EVERY=${SOAK_SAMPLE_EVERY:-5}
DRAIN=${SOAK_DRAIN:-240}
PORT=${SOAK_PORT:-45691}
METRICS_PORT=${SOAK_METRICS_PORT:-45692}
REPORT=${SOAK_REPORT:-$ROOT/target/soak/soak.md}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

step() { printf '\n== %s\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }
die() { echo "soak: $*" >&2; exit 2; }

for v in DURATION RATE DROP_EVERY SAMPLE_EVERY DRAIN PORT METRICS_PORT; do
  case "${!v}" in '' | *[!0-9]*) die "$v must be a whole number, got '${!v}'" ;; esac
done
[ "$DURATION" -ge 30 ] || die "the run needs at least 30 seconds"
[ "$RATE" -ge 1 ] || die "SOAK_RATE must be at least 1"
TOTAL=$((RATE * DURATION)) # messages the emulator generates (its --count)
LIMIT=$((DURATION + DRAIN + 120)) # hard bound on each process

step "tools"
for tool in cargo curl python3 timeout; do
  command -v "$tool" >/dev/null || die "$tool is required"
done

step "build (release, default features)"
cargo build --release --locked --bin iot-sub
IOT=$TARGET_DIR/release/iot-sub

WORK=$(mktemp -d /tmp/iot-sub-soak.XXXXXX)
EMU_TIMEOUT_PID= CLIENT_TIMEOUT_PID=
cleanup() {
  for pid in $CLIENT_TIMEOUT_PID $EMU_TIMEOUT_PID; do kill "$pid" 2>/dev/null || true; done
  if [ "${SOAK_KEEP:-0}" = 1 ]; then note "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

# child_of PID: the one child of PID (the real process under `timeout`).
child_of() {
  local pid=$1 child=
  for _ in $(seq 100); do
    child=$(cat "/proc/$pid/task/$pid/children" 2>/dev/null || true)
    child=${child%% *}
    if [ -n "$child" ]; then echo "$child"; return 0; fi
    sleep 0.05
  done
  return 1
}

# metrics: one scrape of the client's Prometheus text (empty if it does not answer in 5 s).
metrics() { curl -fsS --max-time 5 "http://127.0.0.1:$METRICS_PORT/metrics" 2>/dev/null || true; }

# metric TEXT NAME: the sum of NAME's samples (all label sets), or NA.
metric() {
  awk -v name="$2" '
    $1 == name || index($1, name "{") == 1 { sum += $NF; seen = 1 }
    END { if (seen) printf "%d\n", sum; else print "NA" }' <<<"$1"
}

export ALIBABA_CLOUD_ACCESS_KEY_ID=soak-id ALIBABA_CLOUD_ACCESS_KEY_SECRET=soak-secret
cat >"$WORK/soak.toml" <<EOF
# Defaults for everything else (credit, idle_timeout, backoff 1s..60s).
[profiles.soak]
host = "localhost"
port = $PORT
ca_file = "$WORK/ca.pem"
consumer_group_id = "DEFAULT_GROUP"
client_id = "soak"
EOF

step "emulator: $RATE msgs/s for ${DURATION}s ($TOTAL messages), port $PORT"
timeout "$LIMIT" "$IOT" --log-format json emulate --listen "127.0.0.1:$PORT" \
  --ca-out "$WORK/ca.pem" --rate "$RATE" --count "$TOTAL" 2>"$WORK/emulator.log" &
EMU_TIMEOUT_PID=$!
EMU_PID=$(child_of "$EMU_TIMEOUT_PID") || die "the emulator did not start: $(cat "$WORK/emulator.log")"
for _ in $(seq 200); do
  [ -s "$WORK/ca.pem" ] && break
  kill -0 "$EMU_PID" 2>/dev/null || die "the emulator exited: $(cat "$WORK/emulator.log")"
  sleep 0.05
done
[ -s "$WORK/ca.pem" ] || die "the emulator wrote no CA certificate"
START=$(date +%s.%N)

step "client: iot-sub listen, metrics on 127.0.0.1:$METRICS_PORT"
timeout "$LIMIT" "$IOT" listen --config "$WORK/soak.toml" --profile soak \
  --metrics-listen "127.0.0.1:$METRICS_PORT" >"$WORK/out.jsonl" 2>"$WORK/client.log" &
CLIENT_TIMEOUT_PID=$!
CLIENT_PID=$(child_of "$CLIENT_TIMEOUT_PID") || die "the client did not start: $(cat "$WORK/client.log")"
for _ in $(seq 300); do
  curl -fsS --max-time 2 "http://127.0.0.1:$METRICS_PORT/readyz" >/dev/null 2>&1 && break
  kill -0 "$CLIENT_PID" 2>/dev/null || die "the client exited: $(cat "$WORK/client.log")"
  sleep 0.1
done
note "emulator pid $EMU_PID, client pid $CLIENT_PID"

# busy_ticks: machine-wide busy CPU ticks (user nice system irq softirq steal), to show how much
# else ran on the machine during the soak.
busy_ticks() { awk '/^cpu / { print $2 + $3 + $4 + $7 + $8 + $9 }' /proc/stat; }
BUSY0=$(busy_ticks)
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)

elapsed() { awk -v s="$START" -v n="$(date +%s.%N)" 'BEGIN { printf "%.1f\n", n - s }'; }

# sample PHASE: one line of samples.tsv.
SAMPLES=$WORK/samples.tsv
printf 't\tphase\trss_kib\tfds\tthreads\ttasks\twritten\treconnects\tin_flight\tcpu_ticks\n' >"$SAMPLES"
sample() {
  local t rss fds threads cpu text reconnects
  t=$(elapsed)
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$CLIENT_PID/status" 2>/dev/null || echo NA)
  threads=$(awk '/^Threads:/ { print $2 }' "/proc/$CLIENT_PID/status" 2>/dev/null || echo NA)
  fds=$(find "/proc/$CLIENT_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  # utime + stime (fields 14 and 15 after the command name), in clock ticks.
  cpu=$(awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$CLIENT_PID/stat" 2>/dev/null || echo NA)
  text=$(metrics)
  reconnects=$(metric "$text" iot_sub_reconnects_total)
  # The counter appears with the first reconnect.
  if [ -n "$text" ] && [ "$reconnects" = NA ]; then reconnects=0; fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$t" "$1" "${rss:-NA}" "$fds" "${threads:-NA}" \
    "$(metric "$text" iot_sub_tokio_alive_tasks)" "$(metric "$text" iot_sub_messages_written_total)" \
    "$reconnects" "$(metric "$text" iot_sub_in_flight)" "${cpu:-NA}" >>"$SAMPLES"
}

step "soak: ${DURATION}s, a sample every ${SAMPLE_EVERY}s, a drop every ${DROP_EVERY}s"
DROPS=$WORK/drops.tsv
printf 't\tsignal\n' >"$DROPS"
next_sample=0 next_drop=$DROP_EVERY drop_n=0 last_note=-60
while :; do
  now=$(elapsed)
  now_s=${now%.*}
  [ "$now_s" -ge "$DURATION" ] && break
  kill -0 "$CLIENT_PID" 2>/dev/null || die "the client exited during the run: $(tail -n 20 "$WORK/client.log")"
  kill -0 "$EMU_PID" 2>/dev/null || die "the emulator exited during the run: $(tail -n 20 "$WORK/emulator.log")"
  if [ "$now_s" -ge "$next_drop" ] && [ $((next_drop + 5)) -lt "$DURATION" ]; then
    drop_n=$((drop_n + 1))
    if [ $((drop_n % 2)) -eq 1 ]; then sig=USR1; else sig=USR2; fi
    kill -s "$sig" "$EMU_PID"
    printf '%s\t%s\n' "$now" "$sig" >>"$DROPS"
    next_drop=$((next_drop + DROP_EVERY))
  fi
  if [ "$now_s" -ge "$next_sample" ]; then
    sample run
    next_sample=$((next_sample + SAMPLE_EVERY))
    if [ $((now_s - last_note)) -ge 60 ]; then
      last_note=$now_s
      note "$(tail -n 1 "$SAMPLES" | awk -F'\t' '{ printf "t=%ss rss=%s KiB fds=%s threads=%s tasks=%s written=%s reconnects=%s", $1, $3, $4, $5, $6, $7, $8 }')"
    fi
  fi
  sleep 0.2
done
sample end
BUSY1=$(busy_ticks)
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

step "drain: until the client has written all $TOTAL messages (at most ${DRAIN}s)"
drain_start=$(date +%s)
distinct=0
while :; do
  written=$(metric "$(metrics)" iot_sub_messages_written_total)
  if [ "$written" != NA ] && [ "$written" -ge "$TOTAL" ]; then
    distinct=$(python3 "$ROOT/bench/soak_report.py" distinct "$WORK/out.jsonl")
    [ "$distinct" -ge "$TOTAL" ] && break
  fi
  if [ $(($(date +%s) - drain_start)) -ge "$DRAIN" ]; then
    note "drain limit reached: written=$written"
    break
  fi
  sleep 2
done
DRAIN_S=$(($(date +%s) - drain_start))
sample drained
metrics >"$WORK/final_metrics.txt"

step "stop"
kill -TERM "$CLIENT_PID" 2>/dev/null || true
client_rc=0
wait "$CLIENT_TIMEOUT_PID" || client_rc=$?
CLIENT_TIMEOUT_PID=
kill -TERM "$EMU_PID" 2>/dev/null || true
emu_rc=0
wait "$EMU_TIMEOUT_PID" || emu_rc=$?
EMU_TIMEOUT_PID=

step "report"
mkdir -p "$(dirname "$REPORT")"
verdict_rc=0
python3 "$ROOT/bench/soak_report.py" report \
  --work "$WORK" --out "$REPORT" --duration "$DURATION" --rate "$RATE" --total "$TOTAL" \
  --drop-every "$DROP_EVERY" --sample-every "$SAMPLE_EVERY" --drain-s "$DRAIN_S" \
  --client-rc "$client_rc" --emulator-rc "$emu_rc" --busy-ticks "$((BUSY1 - BUSY0))" \
  --load "$LOAD0" "$LOAD1" \
  --command "$(env | grep '^SOAK_' | sort | tr '\n' ' ')bash bench/soak.sh $*" --commit "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  --rustc "$(rustc --version)" || verdict_rc=$?
note "report: $REPORT"
exit "$verdict_rc"
