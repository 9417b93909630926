#!/usr/bin/env bash
# Wall-clock latency of `chat-cli send` and `chat-cli inbox` as a user sees
# it: the release binaries, a relay and two agentd on loopback in a temporary
# directory, N runs of each command timed around each one (bash's
# $EPOCHREALTIME, else `date +%s%N`, whose own two process starts then count
# too). Prints the median and p90 in milliseconds, and the same for
# /bin/true: the floor any command pays on this machine to be started.
# Needs only bash, python3 (the TOTP code) and coreutils; no hyperfine.
#
#   scripts/latency.sh [N]          # N defaults to 200
#   NO_BUILD=1 scripts/latency.sh   # use target/release as it is
#   BIN=/some/dir scripts/latency.sh  # relay, agentd, chat-cli from there
#                                   # (implies NO_BUILD), e.g. to compare builds
#   KEEP=1 scripts/latency.sh       # leave the processes up, print their pids
#                                   # and the work dir (for strace/perf)
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-200}"

if [[ -z "${BIN:-}" ]]; then
  if [[ -z "${NO_BUILD:-}" ]]; then
    cargo build --locked --release --bins --quiet
  fi
  BIN="$(pwd)/target/release"
fi

WORK="$(mktemp -d -t securechat-latency.XXXXXX)"
PIDS=()
cleanup() {
  if [[ -n "${KEEP:-}" ]]; then return; fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

wait_for() { # wait_for SECONDS COMMAND...: retry until it succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then echo "timed out waiting for: $*" >&2; return 1; fi
    sleep 0.2
  done
}

"$BIN/relay" --data-dir "$WORK/relay" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 \
  >"$WORK/relay.out" 2>"$WORK/relay.log" &
PIDS+=($!)
wait_for 30 grep -q '^relay: listening on ' "$WORK/relay.out"
RELAY_ADDR="$(sed -n 's/^relay: listening on //p' "$WORK/relay.out")"
RELAY_FP="$(sed -n 's/^relay: certificate //p' "$WORK/relay.out")"

cli() { "$BIN/chat-cli" "$@"; }

start_agent() { # start_agent NAME
  "$BIN/agentd" --home "$WORK/$1" --relay "$RELAY_ADDR" --relay-fingerprint "$RELAY_FP" \
    >>"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  eval "AGENT_PID_$1=$!"
  wait_for 30 cli --home "$WORK/$1" status
}

totp() { # totp BASE32SECRET: the current RFC 6238 code
  python3 - "$1" <<'PY'
import base64, hashlib, hmac, struct, sys, time
secret = sys.argv[1].upper()
key = base64.b32decode(secret + "=" * (-len(secret) % 8))
mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), hashlib.sha1).digest()
off = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1000000))
PY
}

onboard() { # onboard NAME: register, verify with the mailed code, log in with TOTP
  local name=$1 password="latency password for $1" file code secret
  printf '%s\n' "$password" |
    cli --home "$WORK/$name" register "$name" --email "$name@example.org" --password-stdin >/dev/null
  file="$(grep -l "$name@example.org" "$WORK"/relay/outbox/*.eml | tail -n 1)"
  code="$(sed -n 's/^Verification code: \([0-9]\{6\}\).*/\1/p' "$file" | head -n 1)"
  cli --home "$WORK/$name" verify "$code" >"$WORK/$name.verify"
  secret="$(grep -o 'otpauth://[^ ]*' "$WORK/$name.verify" |
    sed -n 's/.*[?&]secret=\([A-Z2-7]*\).*/\1/p' | head -n 1)"
  printf '%s\n' "$password" |
    cli --home "$WORK/$name" login "$name" --password-stdin --totp "$(totp "$secret")" >/dev/null
}

start_agent alice
start_agent bob
onboard alice
onboard bob
# First send pins bob's key; not part of the measurement.
cli --home "$WORK/alice" send bob "warm up" >/dev/null

# time_runs NAME COMMAND...: N runs, one duration (ns) per line in $WORK/NAME.ns.
# $EPOCHREALTIME is read without a subshell, so nothing but the command is
# inside the interval.
time_runs() {
  local name=$1 i t0 t1; shift
  : >"$WORK/$name.ns"
  for ((i = 0; i < N; i++)); do
    if [[ -n "${EPOCHREALTIME:-}" ]]; then
      t0=${EPOCHREALTIME/[.,]/}
      "$@" >/dev/null
      t1=${EPOCHREALTIME/[.,]/}
      echo $(((10#$t1 - 10#$t0) * 1000)) >>"$WORK/$name.ns"
    else
      t0=$(date +%s%N)
      "$@" >/dev/null
      t1=$(date +%s%N)
      echo $((t1 - t0)) >>"$WORK/$name.ns"
    fi
  done
}

summary() { # summary NAME: "NAME median X ms p90 Y ms (n=N)"
  sort -n "$WORK/$1.ns" | awk -v name="$1" '
    { v[NR] = $1 }
    END {
      med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
      p90 = v[int(NR * 0.9 + 0.999999)]
      printf "%-6s median %6.2f ms  p90 %6.2f ms  min %6.2f ms  (n=%d)\n",
        name, med / 1e6, p90 / 1e6, v[1] / 1e6, NR
    }'
}

time_runs send cli --home "$WORK/alice" send bob "hi"
# bob's inbox now holds N+1 unread messages; the first `inbox` shows and marks
# them all, the rest time an inbox with nothing new (what a user polling
# sees), next to N+1 read messages in the store.
time_runs inbox cli --home "$WORK/bob" inbox
time_runs true /bin/true
summary send
summary inbox
summary true

if [[ -n "${KEEP:-}" ]]; then
  echo "work dir: $WORK"
  echo "relay pid: ${PIDS[0]}  alice agentd: $AGENT_PID_alice  bob agentd: $AGENT_PID_bob"
  echo "stop with: kill ${PIDS[*]}"
fi
