#!/usr/bin/env bash
# bench/run.sh: the one command that builds and runs the iot-sub benchmark and writes
# bench/REPORT.md (see bench/README.md for what is measured and how).
#
#   bash bench/run.sh [N]          # N messages per run, default 200000
#
# Environment knobs: BENCH_REPS (3), BENCH_PORT (45671), BENCH_TTFL_RUNS (9),
# BENCH_C64_SECONDS (10), CARGO_TARGET_DIR (target). Loopback only; every run is bounded by
# `timeout`.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

N=${1:-200000}
REPS=${BENCH_REPS:-3}
PORT=${BENCH_PORT:-45671}
TTFL_RUNS=${BENCH_TTFL_RUNS:-9}
C64_SECONDS=${BENCH_C64_SECONDS:-10}
C64_CONNECTIONS=64
C64_RATE=1000 # msgs/s per connection: 64 x 1000 = 64 000 msgs/s
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RUN_TIMEOUT=300

step() { printf '\n== %s\n' "$*" >&2; }
note() { printf '   %s\n' "$*" >&2; }

case "$N" in '' | *[!0-9]*) echo "usage: bash bench/run.sh [N]" >&2; exit 2 ;; esac

step "tools"
if [ ! -x /usr/bin/time ]; then
  apt-get update -qq && apt-get install -y -qq time
fi
for tool in cargo node npm timeout; do
  command -v "$tool" >/dev/null || { echo "bench: $tool is required" >&2; exit 1; }
done

step "build (release, default features)"
cargo build --release --locked --bin iot-sub --example bench_source
IOT=$TARGET_DIR/release/iot-sub
SRC=$TARGET_DIR/release/examples/bench_source

step "rhea receiver (npm)"
if [ ! -f bench/rhea/node_modules/rhea/package.json ]; then
  (cd bench/rhea && npm ci --no-audit --no-fund --loglevel=error)
fi

WORK=$(mktemp -d /tmp/iot-sub-bench.XXXXXX)
RESULTS=$WORK/results.jsonl
: >"$RESULTS"
SRC_PID=
cleanup() {
  if [ -n "$SRC_PID" ]; then kill "$SRC_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# A normal profile pointing at the local source (inline secret: the file is private).
profile() { # profile FILE [extra toml lines...]
  local file=$1
  shift
  {
    echo "[profiles.bench]"
    echo 'host = "localhost"'
    echo "port = $PORT"
    echo "ca_file = \"$WORK/ca.pem\""
    echo 'consumer_group_id = "DEFAULT_GROUP"'
    echo 'access_key_id = "bench-id"'
    echo 'access_key_secret = "bench-secret"'
    echo 'credit = 1000'
    for line in "$@"; do echo "$line"; done
  } >"$file"
  chmod 600 "$file"
}
profile "$WORK/bench.toml"

# start_source [serve options...]: starts the source; returns once its port is bound.
start_source() {
  rm -f "$WORK/ca.pem"
  timeout "$RUN_TIMEOUT" "$SRC" serve --listen "127.0.0.1:$PORT" --ca-out "$WORK/ca.pem" \
    --secret bench-secret "$@" >"$WORK/source.json" 2>"$WORK/source.err" &
  SRC_PID=$!
  for _ in $(seq 100); do
    [ -f "$WORK/ca.pem" ] && return 0
    kill -0 "$SRC_PID" 2>/dev/null || break
    sleep 0.1
  done
  echo "bench: the source did not start:" >&2
  cat "$WORK/source.err" >&2
  exit 1
}

# stop_source: waits for the source to finish its rounds (it exits by itself).
stop_source() {
  local rc=0
  for _ in $(seq 150); do
    kill -0 "$SRC_PID" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$SRC_PID" 2>/dev/null; then
    note "source still running; stopping it"
    kill "$SRC_PID" 2>/dev/null || true
  fi
  wait "$SRC_PID" || rc=$?
  SRC_PID=
  return "$rc"
}

# busy_ticks: machine-wide busy CPU ticks (user nice system irq softirq steal; 100 per second),
# to see how much else ran during a measurement.
busy_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8 + $9}' /proc/stat; }

# json_or_null FILE: the file's last line if it is a JSON object, else null.
json_or_null() {
  local line
  line=$(tail -n 1 "$1" 2>/dev/null || true)
  case "$line" in "{"*"}") echo "$line" ;; *) echo null ;; esac
}

# measure ROW REP COUNT OUTFILE [serve options...] -- RECEIVER COMMAND...
# Runs the receiver under /usr/bin/time against a fresh source and appends one result line.
measure() {
  local row=$1 rep=$2 count=$3 out=$4
  shift 4
  local serve=()
  while [ "$1" != "--" ]; do
    serve+=("$1")
    shift
  done
  shift
  start_source "${serve[@]}"
  local rc=0 busy0 busy1
  busy0=$(busy_ticks)
  timeout "$RUN_TIMEOUT" /usr/bin/time -o "$WORK/time.txt" -f '%e %U %S %M' "$@" \
    >"$out" 2>"$WORK/receiver.err" || rc=$?
  busy1=$(busy_ticks)
  stop_source || true
  local wall=0 user=0 sys=0 rss=0
  if [ -s "$WORK/time.txt" ]; then read -r wall user sys rss < <(tail -n 1 "$WORK/time.txt"); fi
  local receiver=null
  if [ "$out" != /dev/null ]; then receiver=$(json_or_null "$out"); fi
  printf '{"row":"%s","rep":%s,"n":%s,"rc":%s,"wall_s":%s,"user_s":%s,"sys_s":%s,"maxrss_kib":%s,"busy_ticks":%s,"source":%s,"receiver":%s}\n' \
    "$row" "$rep" "$count" "$rc" "$wall" "$user" "$sys" "$rss" "$((busy1 - busy0))" "$(json_or_null "$WORK/source.json")" "$receiver" \
    >>"$RESULTS"
  if [ "$rc" -ne 0 ]; then
    note "$row run $rep FAILED (exit $rc):"
    tail -n 5 "$WORK/receiver.err" | sed 's/^/     /' >&2
  else
    note "$row run $rep: $(tail -n 1 "$WORK/source.json")"
  fi
  sleep 0.5
}

IOT_CMD=("$IOT" listen --config "$WORK/bench.toml" --profile bench --count "$N")
RHEA_CMD=(node "$ROOT/bench/rhea/receiver.js" --host localhost --port "$PORT" --ca "$WORK/ca.pem" --count "$N")
SINK_CMD=("$SRC" sink --connect "localhost:$PORT" --ca "$WORK/ca.pem" --count "$N")

step "throughput: $N messages x 256 B, $REPS runs per row, rows interleaved"
for rep in $(seq "$REPS"); do
  measure ceiling "$rep" "$N" "$WORK/sink.json" --count "$N" -- "${SINK_CMD[@]}"
  measure iot-sub "$rep" "$N" /dev/null --count "$N" -- "${IOT_CMD[@]}"
  measure rhea "$rep" "$N" /dev/null --count "$N" -- "${RHEA_CMD[@]}"
done

step "delays: generateTime to the line's arrival at a reader on the receiver's stdout"
# delays_run ROW REP RECEIVER...: the receiver's stdout goes to `bench_source delays`.
delays_run() {
  local row=$1 rep=$2
  shift 2
  start_source --count "$N"
  rm -f "$WORK/delays.json"
  local rc=0
  timeout "$RUN_TIMEOUT" "$@" 2>"$WORK/receiver.err" | "$SRC" delays --out "$WORK/delays.json" || rc=$?
  stop_source || true
  printf '{"row":"%s","rep":%s,"n":%s,"rc":%s,"source":%s,"delays":%s}\n' \
    "$row" "$rep" "$N" "$rc" "$(json_or_null "$WORK/source.json")" "$(json_or_null "$WORK/delays.json")" >>"$RESULTS"
  note "$row run $rep: $(cat "$WORK/delays.json" 2>/dev/null || echo FAILED)"
  sleep 0.5
}
for rep in $(seq "$REPS"); do
  delays_run delays-iot-sub "$rep" "${IOT_CMD[@]}"
  delays_run delays-rhea "$rep" "${RHEA_CMD[@]}"
done

step "time to the first line: $TTFL_RUNS starts against a source with messages ready"
ttfl_run() {
  local row=$1
  shift
  start_source --count 2000 --rounds "$TTFL_RUNS" --grace-ms 1000
  local rc=0
  timeout "$RUN_TIMEOUT" "$SRC" first-byte --runs "$TTFL_RUNS" -- "$@" \
    >"$WORK/ttfl.json" 2>"$WORK/receiver.err" || rc=$?
  stop_source || true
  printf '{"row":"%s","rc":%s,"ttfl":%s}\n' "$row" "$rc" "$(json_or_null "$WORK/ttfl.json")" >>"$RESULTS"
  note "$row: $(cat "$WORK/ttfl.json" 2>/dev/null || echo FAILED)"
}
ttfl_run ttfl-iot-sub "$IOT" listen --config "$WORK/bench.toml" --profile bench --count 1
ttfl_run ttfl-rhea node "$ROOT/bench/rhea/receiver.js" --host localhost --port "$PORT" --ca "$WORK/ca.pem" --count 1

step "$C64_CONNECTIONS connections x $C64_RATE msgs/s for ${C64_SECONDS}s"
profile "$WORK/probe.toml" "connections = $C64_CONNECTIONS"
sed -i "s/^port = .*/port = 1/" "$WORK/probe.toml"
probe_rc=0
timeout 3 "$IOT" listen --config "$WORK/probe.toml" --profile bench --count 1 \
  >/dev/null 2>"$WORK/probe.err" || probe_rc=$?
if [ "$probe_rc" -eq 78 ] && grep -q connections "$WORK/probe.err"; then
  reason=$(head -n 1 "$WORK/probe.err")
  note "skipped: this iot-sub has no \`connections\` profile field ($reason)"
  printf '{"row":"c64-skipped","reason":%s}\n' "$(node -e 'console.log(JSON.stringify(process.argv[1]))' "$reason")" >>"$RESULTS"
else
  profile "$WORK/bench64.toml" "connections = $C64_CONNECTIONS"
  C64_N=$((C64_CONNECTIONS * C64_RATE * C64_SECONDS))
  for rep in $(seq "$REPS"); do
    measure c64 "$rep" "$C64_N" /dev/null --count "$C64_N" --connections "$C64_CONNECTIONS" --rate "$C64_RATE" -- \
      "$IOT" listen --config "$WORK/bench64.toml" --profile bench --count "$C64_N"
    # The floor: the minimal receiver on as many connections (TLS, sockets, no decoding).
    measure c64-floor "$rep" "$C64_N" /dev/null --count "$C64_N" --connections "$C64_CONNECTIONS" --rate "$C64_RATE" -- \
      "$SRC" sink --connect "localhost:$PORT" --ca "$WORK/ca.pem" --count "$C64_N" \
      --connections "$C64_CONNECTIONS" --credit 1000 --batch 1000 --ack-ms 50
    # One task per connection with fe2o3's decoders and iot-sub's JSON line (see README.md).
    measure c64-one-task "$rep" "$C64_N" /dev/null --count "$C64_N" --connections "$C64_CONNECTIONS" --rate "$C64_RATE" -- \
      "$SRC" sink --connect "localhost:$PORT" --ca "$WORK/ca.pem" --count "$C64_N" \
      --connections "$C64_CONNECTIONS" --credit 1000 --batch 1000 --ack-ms 50 --render
  done
fi

step "report"
dirty=$(git status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null | wc -l | tr -d ' ')
node -e '
  const [date, nproc, cpu, mem, kernel, rustc, node, commit, dirty, n, reps, ttfl, c64] = process.argv.slice(1);
  const rhea = require(process.cwd() + "/bench/rhea/node_modules/rhea/package.json").version;
  console.log(JSON.stringify({ machine: { date, nproc, cpu, mem, kernel, rustc, node, rhea, commit,
    dirty: Number(dirty), n: Number(n), reps: Number(reps), ttfl_runs: Number(ttfl), c64_seconds: Number(c64) } }));
' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(nproc)" \
  "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" \
  "$(free -g | awk '/Mem:/ {print $2 " GiB"}')" "$(uname -sr)" "$(rustc --version)" "$(node --version)" \
  "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" "$dirty" "$N" "$REPS" "$TTFL_RUNS" "$C64_SECONDS" \
  >>"$RESULTS"
cp "$RESULTS" bench/REPORT.raw.jsonl
node bench/report.js bench/REPORT.raw.jsonl >bench/REPORT.md
cat bench/REPORT.md
