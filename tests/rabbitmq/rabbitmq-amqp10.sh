#!/usr/bin/env bash
# rabbitmq-amqp10.sh: Debian 12's RabbitMQ (3.10.8) as a throwaway AMQP 1.0 broker over TLS on
# loopback, for iot-sub's interop tests (tests/interop.rs) and CI (.ci/run).
#
# A trimmed copy of the project's tested recipe (research note "rabbitmq-amqp10.md" and its
# script "rabbitmq-amqp10.sh"): install, start, ctl, declare-queue, stop and clean are unchanged;
# the self-test and the pip fallback are left out, and `send` runs tests/rabbitmq/send.py (an
# independent python-qpid-proton sender with several message shapes).
#
# Use it as a command:
#   rabbitmq-amqp10.sh install                    # idempotent: apt-get update + install if missing
#   rabbitmq-amqp10.sh start [DIR]                # start a node. DIR defaults to a fresh mktemp -d.
#                                                 # Prints KEY=VALUE lines; DIR/broker.env has them too.
#   rabbitmq-amqp10.sh declare-queue DIR NAME [true|false]   # create a queue (durable by default)
#   rabbitmq-amqp10.sh ctl DIR ARGS...            # rabbitmqctl against the private node
#   rabbitmq-amqp10.sh send DIR ADDRESS N [SHAPE] # send N messages (python3-qpid-proton; see send.py)
#   rabbitmq-amqp10.sh counts DIR QUEUE           # "READY UNACKED" of a queue (rabbitmqctl list_queues)
#   rabbitmq-amqp10.sh stop DIR                   # stop the node and its epmd; DIR is kept
#   rabbitmq-amqp10.sh clean DIR                  # stop, then rm -rf DIR
#
# Knobs (environment, defaults in brackets):
#   RMQ_PORT_BASE [16670]: TLS = base+1, plain TCP = base+2, Erlang distribution = base+3,
#                 epmd = base+4, CLI distribution = base+10..base+19. All ports are below the
#                 Linux ephemeral range (32768+). Each port can be overridden with
#                 RMQ_TLS_PORT, RMQ_TCP_PORT, RMQ_DIST_PORT, RMQ_EPMD_PORT, RMQ_CTL_PORT.
#                 Set RMQ_TCP_PORT=none to have no plain listener.
#   RMQ_USER [rmqtest]  RMQ_PASS [rmqtest-secret]: the broker's only user, created on first
#                 boot with full rights on vhost "/". guest is not created.
#   RMQ_HEARTBEAT [60]: seconds. The broker advertises idle-time-out = RMQ_HEARTBEAT*1000 ms.
#   RMQ_START_TIMEOUT [60]: seconds to wait for the node to come up.
#   RMQ_NODE [rmqamqp10@localhost]: Erlang node name (a private epmd, so no clash).
#
# Facts this recipe relies on (checked against 3.10.8 from the Debian 12 package):
#   * AMQP 1.0 shares the AMQP 0-9-1 listeners once the rabbitmq_amqp1_0 plugin is enabled.
#   * TLS starts at once on the TLS port (no AMQP TLS-upgrade header), as iot-sub does it.
#   * SASL mechanisms offered: PLAIN, AMQPLAIN. ANONYMOUS is off (amqp1_0.default_user = none).
#   * Source "/amq/queue/Q" consumes from an existing queue Q and declares nothing; a missing Q
#     ends the session with amqp:not-found.

# ---------------------------------------------------------------------------------------------
# settings

RMQ_LIBDIR=/usr/lib/rabbitmq/bin        # Debian's real scripts. /usr/sbin/* su to user rabbitmq.

_rmq_settings() {
    local base=${RMQ_PORT_BASE:-16670}
    RMQ_TLS_PORT=${RMQ_TLS_PORT:-$((base + 1))}
    RMQ_TCP_PORT=${RMQ_TCP_PORT:-$((base + 2))}
    RMQ_DIST_PORT=${RMQ_DIST_PORT:-$((base + 3))}
    RMQ_EPMD_PORT=${RMQ_EPMD_PORT:-$((base + 4))}
    RMQ_CTL_PORT=${RMQ_CTL_PORT:-$((base + 10))}
    RMQ_USER=${RMQ_USER:-rmqtest}
    RMQ_PASS=${RMQ_PASS:-rmqtest-secret}
    RMQ_HEARTBEAT=${RMQ_HEARTBEAT:-60}
    RMQ_START_TIMEOUT=${RMQ_START_TIMEOUT:-60}
    RMQ_NODE=${RMQ_NODE:-rmqamqp10@localhost}
}

_rmq_log() { echo "rabbitmq-amqp10: $*" >&2; }

# True if PID exists and is not a zombie. On this kind of machine, PID 1 is not a normal init,
# and it reaps orphans only after a while, so `kill -0` alone can report a dead process as alive.
_rmq_alive() {
    local pid=$1 st
    [ -n "$pid" ] || return 1
    st=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    st=${st##*) }                      # the field after "(comm) " is the state letter
    [ -n "$st" ] && [ "${st%% *}" != Z ]
}

# True if PID is alive and its command name is NAME. This guards against a stale pid file whose
# PID now belongs to an unrelated process.
_rmq_ours() {
    _rmq_alive "$1" && [ "$(cat "/proc/$1/comm" 2>/dev/null)" = "$2" ]
}

# True if something accepts TCP connections on 127.0.0.1:PORT (bash /dev/tcp, no extra tools).
_rmq_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Private environment for every RabbitMQ/Erlang command. Run it in a subshell, because it changes
# HOME, which is where Erlang keeps the .erlang.cookie.
_rmq_env() {
    local dir=$1
    set -a
    . "$dir/rmq-vars.sh"
    set +a
}

# ---------------------------------------------------------------------------------------------
# install

rmq_install() {
    if dpkg-query -W -f='${Status}' rabbitmq-server 2>/dev/null | grep -q 'install ok installed'; then
        return 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update || return 1
    # The package's postinst runs `invoke-rc.d rabbitmq-server start`. Without systemd, and with
    # no known runlevel, invoke-rc.d prints "could not determine current runlevel" and starts
    # nothing. A Docker-style /usr/sbin/policy-rc.d (exit 101) also denies it. Either way, no
    # system broker is left running. The unit symlinks it creates under /etc/systemd are harmless.
    # openssl (for the test certificates) is a dependency of rabbitmq-server. Naming it here would
    # also upgrade an installed openssl/libssl3, so it is left out on purpose.
    apt-get install -y --no-install-recommends rabbitmq-server || return 1
}

# ---------------------------------------------------------------------------------------------
# start

# Throwaway CA and a server certificate for localhost/127.0.0.1, valid for 2 days. ECDSA P-256
# keys take ~0.04 s to make (RSA-2048: 0.3-0.7 s). Erlang/OTP 25 ssl, rustls, OpenSSL and
# python-qpid-proton all accept them.
_rmq_make_tls() {
    local t=$1/tls
    mkdir -p "$t" || return 1
    (
        cd "$t" || exit 1
        openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout ca.key -out ca.pem -days 2 -subj "/CN=rabbitmq-amqp10 test CA" \
            -addext "basicConstraints=critical,CA:TRUE" \
            -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null || exit 1
        openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
            -keyout server.key -out server.csr -subj "/CN=localhost" 2>/dev/null || exit 1
        printf '%s\n' 'basicConstraints=CA:FALSE' \
            'keyUsage=critical,digitalSignature' \
            'extendedKeyUsage=serverAuth' \
            'subjectAltName=DNS:localhost,IP:127.0.0.1' > server.ext
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
            -out server.pem -days 2 -extfile server.ext 2>/dev/null || exit 1
        # The node runs as the invoking user (root in CI). Keys stay owner-only.
        chmod 600 ca.key server.key
    )
}

_rmq_write_config() {
    local dir=$1 tcp_line
    if [ "$RMQ_TCP_PORT" = none ]; then
        tcp_line="listeners.tcp = none"
    else
        tcp_line="listeners.tcp.1 = 127.0.0.1:$RMQ_TCP_PORT"
    fi
    # The new-style (sysctl-like) config. Comments must be on lines of their own.
    cat > "$dir/rabbitmq.conf" <<EOF
# Listeners on loopback only. AMQP 1.0 shares them with AMQP 0-9-1.
$tcp_line
listeners.ssl.1 = 127.0.0.1:$RMQ_TLS_PORT
ssl_options.cacertfile = $dir/tls/ca.pem
ssl_options.certfile = $dir/tls/server.pem
ssl_options.keyfile = $dir/tls/server.key
# No client certificates. The client authenticates with SASL PLAIN inside TLS.
ssl_options.verify = verify_none
ssl_options.fail_if_no_peer_cert = false
# The only user. It is created on first boot, with tag administrator and full rights on "/".
default_user = $RMQ_USER
default_pass = $RMQ_PASS
default_vhost = /
loopback_users = none
# AMQP 1.0 connections must authenticate. With the plugin's default ("guest"), a client that
# skips SASL would get in as guest.
amqp1_0.default_user = none
amqp1_0.default_vhost = /
# The broker advertises idle-time-out = heartbeat * 1000 ms in its Open frame.
heartbeat = $RMQ_HEARTBEAT
log.console = false
log.file.level = info
# A test machine may have little free disk. The 50 MB default alarm would block publishers.
disk_free_limit.absolute = 1MB
EOF
    # Same content as `rabbitmq-plugins enable --offline rabbitmq_amqp1_0` (that takes ~0.7 s).
    echo '[rabbitmq_amqp1_0].' > "$dir/enabled_plugins"
    : > "$dir/rabbitmq-env.conf"     # empty, so that /etc/rabbitmq/rabbitmq-env.conf is not read

    # The variables every RabbitMQ/Erlang command needs (sourced by _rmq_env).
    cat > "$dir/rmq-vars.sh" <<EOF
HOME='$dir'
RABBITMQ_CONF_ENV_FILE='$dir/rabbitmq-env.conf'
RABBITMQ_NODENAME='$RMQ_NODE'
RABBITMQ_BASE='$dir'
RABBITMQ_CONFIG_FILE='$dir/rabbitmq.conf'
RABBITMQ_ADVANCED_CONFIG_FILE='$dir/advanced.config'
RABBITMQ_MNESIA_BASE='$dir/mnesia'
RABBITMQ_LOG_BASE='$dir/log'
RABBITMQ_ENABLED_PLUGINS_FILE='$dir/enabled_plugins'
RABBITMQ_PID_FILE='$dir/rabbitmq.pid'
RABBITMQ_DIST_PORT='$RMQ_DIST_PORT'
RABBITMQ_CTL_DIST_PORT_MIN='$RMQ_CTL_PORT'
RABBITMQ_CTL_DIST_PORT_MAX='$((RMQ_CTL_PORT + 9))'
RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
RABBITMQ_CTL_ERL_ARGS='-kernel inet_dist_use_interface {127,0,0,1}'
ERL_EPMD_PORT='$RMQ_EPMD_PORT'
ERL_EPMD_ADDRESS='127.0.0.1'
LANG='C.UTF-8'
LC_ALL='C.UTF-8'
EOF
}

# rmq_start [DIR]: start a node in DIR (created if missing; a fresh mktemp -d if not given).
# Prints KEY=VALUE lines on stdout and writes them to DIR/broker.env.
# Returns non-zero, with the end of the log, if the node is not up within RMQ_START_TIMEOUT.
rmq_start() {
    _rmq_settings
    local dir=${1:-}
    if [ -z "$dir" ]; then
        dir=$(mktemp -d "${TMPDIR:-/tmp}/rabbitmq-amqp10.XXXXXX") || return 1
    fi
    mkdir -p "$dir" || return 1
    dir=$(cd "$dir" && pwd -P) || return 1      # absolute path: it goes into the config

    if [ -f "$dir/rabbitmq.pid" ] && _rmq_ours "$(cat "$dir/rabbitmq.pid")" beam.smp; then
        _rmq_log "a node is already running from $dir (pid $(cat "$dir/rabbitmq.pid"))"
        return 1
    fi
    local p
    for p in "$RMQ_TLS_PORT" "$RMQ_TCP_PORT" "$RMQ_DIST_PORT" "$RMQ_EPMD_PORT"; do
        [ "$p" = none ] && continue
        if _rmq_port_open "$p"; then
            _rmq_log "port $p on 127.0.0.1 is already in use (set RMQ_PORT_BASE to move all ports)"
            return 1
        fi
    done
    command -v erl > /dev/null && [ -x "$RMQ_LIBDIR/rabbitmq-server" ] || {
        _rmq_log "rabbitmq-server is not installed (run: $0 install)"; return 1; }

    local t0=$SECONDS
    mkdir -p "$dir/log" "$dir/mnesia"
    [ -f "$dir/tls/server.pem" ] || _rmq_make_tls "$dir" || { _rmq_log "openssl failed"; return 1; }
    _rmq_write_config "$dir"
    # A private Erlang cookie. The CLI reads it through HOME=DIR.
    if [ ! -f "$dir/.erlang.cookie" ]; then
        (umask 077; head -c 30 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$dir/.erlang.cookie")
        chmod 400 "$dir/.erlang.cookie"
    fi

    (
        _rmq_env "$dir"
        # epmd started by us, in the foreground, so that $! is its PID and `stop` can end exactly it.
        # The node finds it on ERL_EPMD_PORT and does not spawn its own.
        nohup epmd -port "$RMQ_EPMD_PORT" -address 127.0.0.1 > "$dir/log/epmd.out" 2>&1 < /dev/null &
        echo $! > "$dir/epmd.pid"
        i=0
        until _rmq_port_open "$RMQ_EPMD_PORT" || [ $i -ge 50 ]; do sleep 0.1; i=$((i + 1)); done
        # The broker itself. The wrapper shell turns SIGTERM/SIGINT into a clean stop, execs erl, and
        # the VM writes its own OS pid to RABBITMQ_PID_FILE.
        rm -f "$RABBITMQ_PID_FILE"
        nohup "$RMQ_LIBDIR/rabbitmq-server" > "$dir/log/server.out" 2>&1 < /dev/null &
        echo $! > "$dir/wrapper.pid"
    )

    # Ready means the TLS port accepts connections and the log says the boot (plugins included) is
    # complete. Listeners are started last, so an open port already means "ready" in practice.
    local node_log="$dir/log/$RMQ_NODE.log" deadline=$((SECONDS + RMQ_START_TIMEOUT))
    while :; do
        if _rmq_port_open "$RMQ_TLS_PORT" && grep -q 'Server startup complete' "$node_log" 2>/dev/null; then
            break
        fi
        if ! _rmq_alive "$(cat "$dir/wrapper.pid")" || [ $SECONDS -ge $deadline ]; then
            _rmq_log "node did not come up; last lines of the logs:"
            tail -n 30 "$dir/log/server.out" "$node_log" >&2 2>/dev/null
            rmq_stop "$dir"
            return 1
        fi
        sleep 0.1
    done

    cat > "$dir/broker.env" <<EOF
RMQ_DIR=$dir
RMQ_HOST=localhost
RMQ_TLS_PORT=$RMQ_TLS_PORT
RMQ_TCP_PORT=$RMQ_TCP_PORT
RMQ_URL=amqps://localhost:$RMQ_TLS_PORT
RMQ_CA=$dir/tls/ca.pem
RMQ_USER=$RMQ_USER
RMQ_PASS=$RMQ_PASS
RMQ_BROKER_PID=$(cat "$dir/rabbitmq.pid" 2>/dev/null)
EOF
    cat "$dir/broker.env"
    _rmq_log "node $RMQ_NODE up in $((SECONDS - t0)) s (amqps://localhost:$RMQ_TLS_PORT, dir $dir)"
}

# ---------------------------------------------------------------------------------------------
# helpers against a running node

# rmq_ctl DIR ARGS...: rabbitmqctl for the private node (about 0.4 s per call).
rmq_ctl() {
    local dir=$1; shift
    ( _rmq_env "$dir"; "$RMQ_LIBDIR/rabbitmqctl" "$@" )
}

# rmq_declare_queue DIR NAME [DURABLE=true]: create a classic queue on vhost "/" with no AMQP
# client. 3.10's CLI has no declare command, and rabbitmqadmin needs the management plugin, so
# this calls the broker's internal API. It is fine for this pinned version, and the result is
# the same as an AMQP 0-9-1 queue.declare.
rmq_declare_queue() {
    local dir=$1 name=$2 durable=${3:-true}
    case "$name" in *[!A-Za-z0-9._-]*|'') _rmq_log "queue name must match [A-Za-z0-9._-]+"; return 1;; esac
    rmq_ctl "$dir" -q eval \
        "case rabbit_amqqueue:declare(rabbit_misc:r(<<\"/\">>, queue, <<\"$name\">>), $durable, false, [], none, <<\"rmq-test\">>) of {new, _} -> new; {existing, _} -> existing; Other -> Other end." \
        > /dev/null
}

# ---------------------------------------------------------------------------------------------
# stop

# rmq_stop DIR: SIGTERM the VM, which stops cleanly in about 1 s (the same as `rabbitmqctl stop`,
# without the CLI's VM start). SIGKILL after 30 s. Then the wrapper shell and our epmd, by PID.
rmq_stop() {
    local dir=$1 pid w e i
    [ -d "$dir" ] || return 0
    pid=$(cat "$dir/rabbitmq.pid" 2>/dev/null || true)
    w=$(cat "$dir/wrapper.pid" 2>/dev/null || true)
    e=$(cat "$dir/epmd.pid" 2>/dev/null || true)
    if _rmq_ours "$pid" beam.smp; then
        kill -TERM "$pid" 2>/dev/null
        i=0
        while _rmq_alive "$pid" && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
        _rmq_alive "$pid" && { _rmq_log "node $pid ignored SIGTERM for 30 s; SIGKILL"; kill -KILL "$pid"; }
    elif _rmq_ours "$w" rabbitmq-server; then
        # The VM never wrote its pid file (it failed early). The wrapper passes TERM on to it.
        kill -TERM "$w" 2>/dev/null
    fi
    i=0
    while _rmq_ours "$w" rabbitmq-server && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    _rmq_ours "$w" rabbitmq-server && kill -KILL "$w" 2>/dev/null
    if _rmq_ours "$e" epmd; then
        kill -TERM "$e" 2>/dev/null
        i=0
        while _rmq_alive "$e" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    fi
    rm -f "$dir/rabbitmq.pid" "$dir/wrapper.pid" "$dir/epmd.pid"
    return 0
}

rmq_clean() {
    local dir=$1
    [ -n "$dir" ] && [ -f "$dir/rmq-vars.sh" ] || { _rmq_log "not a broker dir: $dir"; return 1; }
    rmq_stop "$dir"
    rm -rf "$dir"
}

# ---------------------------------------------------------------------------------------------
# send

# Prints "messages_ready messages_unacknowledged" for queue $2.
_rmq_queue_counts() {
    rmq_ctl "$1" -q list_queues name messages_ready messages_unacknowledged |
        awk -v q="$2" -F'\t' '$1 == q { print $2, $3 }'
}

# rmq_send DIR ADDRESS N [SHAPE]: send N messages with an independent client (Debian's
# python3-qpid-proton, for /usr/bin/python3), over TLS with SASL PLAIN, checking the broker's
# certificate and host name. SHAPE (default plain) is described in send.py beside this file.
rmq_send() {
    local dir=$1 addr=$2 n=$3 shape=${4:-plain} here
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P) || return 1
    /usr/bin/python3 -c 'import proton' 2>/dev/null ||
        { _rmq_log "python3-qpid-proton is not installed (apt-get install python3-qpid-proton)"; return 1; }
    ( . "$dir/broker.env" &&
      /usr/bin/python3 "$here/send.py" "$RMQ_HOST" "$RMQ_TLS_PORT" "$RMQ_CA" "$RMQ_USER" "$RMQ_PASS" \
          "$addr" "$n" "$shape" )
}

# ---------------------------------------------------------------------------------------------
# command-line entry (skipped when sourced)

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    set -u
    cmd=${1:-}
    shift || true
    case "$cmd" in
        install)        rmq_install ;;
        start)          rmq_start "${1:-}" ;;
        stop)           rmq_stop "${1:?usage: $0 stop DIR}" ;;
        clean)          rmq_clean "${1:?usage: $0 clean DIR}" ;;
        ctl)            d=${1:?usage: $0 ctl DIR ARGS...}; shift; rmq_ctl "$d" "$@" ;;
        declare-queue)  rmq_declare_queue "${1:?usage: $0 declare-queue DIR NAME [true|false]}" "${2:?queue name}" "${3:-true}" ;;
        send)           rmq_send "${1:?usage: $0 send DIR ADDRESS N [SHAPE]}" "${2:?address}" "${3:?count}" "${4:-plain}" ;;
        counts)         _rmq_queue_counts "${1:?usage: $0 counts DIR QUEUE}" "${2:?queue}" ;;
        *)              sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
    esac
fi
