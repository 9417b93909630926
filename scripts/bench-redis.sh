#!/usr/bin/env bash
# The load tool against relays on Redis: a redis-server with `appendonly yes`
# and `appendfsync always` on a free loopback port, RELAYS relay processes
# (default 1) started with --redis on it, and securechat-bench loading them
# round-robin. Any further arguments go to securechat-bench, e.g.
#
#   scripts/bench-redis.sh 1 --connections 16 --only send --compare-redis --json
#   scripts/bench-redis.sh 2 --connections 16 --only send,e2e,drain --json
#   NO_BUILD=1 scripts/bench-redis.sh 2 ...     # use target/release as it is
#
# At the end it prints on stderr the CPU seconds redis-server and each relay
# used (logins included), to see which one bounds the run.
#
# The relays share one data directory (one self-signed certificate and one
# mail outbox for the bench to read codes from); their state is in Redis.
set -euo pipefail
cd "$(dirname "$0")/.."
RELAYS="${1:-1}"
shift || true

if [[ -z "${NO_BUILD:-}" ]]; then
  cargo build --locked --release --bins --quiet
fi
BIN="$(pwd)/target/release"
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }

WORK="$(mktemp -d -t securechat-bench-redis.XXXXXX)"
PIDS=()
cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

PORT="$(free_port)"
redis-server --port "$PORT" --bind 127.0.0.1 --dir "$WORK" --appendonly yes \
  --appendfsync always --save "" --daemonize no --loglevel warning >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do
  redis-cli -p "$PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done

ARGS=()
for i in $(seq "$RELAYS"); do
  "$BIN/relay" --data-dir "$WORK/relay" --redis "redis://127.0.0.1:$PORT" \
    --listen 127.0.0.1:0 --status-listen off --log-level warn \
    --quota-messages 100000000 --quota-bytes 1099511627776 --sender-share-percent 100 \
    --sends-per-minute 1000000000 --attempts-per-minute 1000000000 \
    --max-connections 1000000 --max-connections-per-source 1000000 \
    --argon2-queue 100000 --unauthenticated-timeout 10m \
    >"$WORK/relay$i.out" 2>"$WORK/relay$i.log" &
  PIDS+=($!)
  for _ in $(seq 300); do
    grep -q "^relay: certificate" "$WORK/relay$i.out" 2>/dev/null && break
    sleep 0.1
  done
  ADDR="$(sed -n 's/^relay: listening on //p' "$WORK/relay$i.out")"
  FP="$(sed -n 's/^relay: certificate //p' "$WORK/relay$i.out")"
  [[ -n "$ADDR" ]] || { echo "relay $i did not start:" >&2; cat "$WORK/relay$i.log" >&2; exit 1; }
  ARGS+=(--relay "$ADDR")
done

cpu_secs() { # user+system CPU seconds of a process so far
  awk -v hz="$(getconf CLK_TCK)" '{ printf "%.1f", ($14 + $15) / hz }' "/proc/$1/stat"
}

# The first relay's memory is reported (idle sessions): with two relays it
# holds half of them.
"$BIN/securechat-bench" "${ARGS[@]}" --relay-fingerprint "$FP" \
  --relay-outbox "$WORK/relay/outbox" --relay-pid "${PIDS[1]}" "$@"

# Where the CPU went (to stderr, so --json output stays one object).
{
  echo -n "cpu seconds: redis-server $(cpu_secs "${PIDS[0]}")"
  for i in $(seq "$RELAYS"); do echo -n ", relay$i $(cpu_secs "${PIDS[$i]}")"; done
  echo
} >&2
