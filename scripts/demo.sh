#!/usr/bin/env bash
# The main job, end to end, on embedded defaults: builds the three programs,
# starts a relay (redb store, self-signed certificate, mails to an outbox
# folder) and two agents, alice and bob, in a temporary directory; registers
# and logs in both, exchanges messages (one while alice is offline), prints
# each step and cleans up. Everything it types is what a user would type.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
show() { # print the command as typed (quoting arguments with spaces), then run it
  local arg line='$'
  for arg in "$@"; do
    if [[ "$arg" == *[[:space:]]* ]]; then line+=" \"$arg\""; else line+=" $arg"; fi
  done
  printf '%s\n' "$line"
  "$@"
}

step "Building relay, agentd and chat-cli (first build takes a few minutes)"
cargo build --locked --bins --quiet
BIN="$(pwd)/target/debug"
export PATH="$BIN:$PATH"

WORK="$(mktemp -d -t securechat-demo.XXXXXX)"
PIDS=()
cleanup() {
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

step "Starting the relay (data in $WORK/relay)"
relay --data-dir "$WORK/relay" --listen 127.0.0.1:0 --status-listen 127.0.0.1:0 \
  >"$WORK/relay.out" 2>"$WORK/relay.log" &
PIDS+=($!)
wait_for 30 grep -q '^relay: certificate sha256:' "$WORK/relay.out"
wait_for 30 grep -q '^relay: listening on ' "$WORK/relay.out"
cat "$WORK/relay.out"
RELAY_ADDR="$(sed -n 's/^relay: listening on //p' "$WORK/relay.out")"
RELAY_FP="$(sed -n 's/^relay: certificate //p' "$WORK/relay.out")"
STATUS_URL="$(sed -n 's/^relay: status page //p' "$WORK/relay.out")"

start_agent() { # start_agent NAME
  agentd --home "$WORK/$1" --relay "$RELAY_ADDR" --relay-fingerprint "$RELAY_FP" \
    >>"$WORK/$1.log" 2>&1 &
  PIDS+=($!)
  eval "AGENT_PID_$1=$!"
  wait_for 30 chat-cli --home "$WORK/$1" status
}

totp() { # totp BASE32SECRET: the current RFC 6238 code, as an authenticator app shows it
  python3 - "$1" <<'PY'
import base64, hashlib, hmac, struct, sys, time
secret = sys.argv[1].upper()
key = base64.b32decode(secret + "=" * (-len(secret) % 8))
mac = hmac.new(key, struct.pack(">Q", int(time.time()) // 30), hashlib.sha1).digest()
off = mac[-1] & 15
print("%06d" % ((struct.unpack(">I", mac[off:off + 4])[0] & 0x7FFFFFFF) % 1000000))
PY
}

mail_code() { # mail_code EMAIL: the verification code from the newest mail to EMAIL
  local file
  file="$(grep -l "$1" "$WORK"/relay/outbox/*.eml | tail -n 1)"
  sed -n 's/^Verification code: \([0-9]\{6\}\).*/\1/p' "$file" | head -n 1
}

onboard() { # onboard NAME: register, verify with the mailed code, log in with TOTP
  local name=$1 password="demo password for $1"
  step "$name registers (a key pair is made inside $name's agentd)"
  printf '%s\n' "$password" |
    show chat-cli --home "$WORK/$name" register "$name" --email "$name@example.org" --password-stdin
  local code; code="$(mail_code "$name@example.org")"
  step "$name verifies with the code from the mail ($code)"
  show chat-cli --home "$WORK/$name" verify "$code" | tee "$WORK/$name.verify"
  local secret
  secret="$(grep -o 'otpauth://[^ ]*' "$WORK/$name.verify" | sed -n 's/.*[?&]secret=\([A-Z2-7]*\).*/\1/p' | head -n 1)"
  step "$name logs in: password + TOTP code + signature by the private key"
  printf '%s\n' "$password" |
    show chat-cli --home "$WORK/$name" login "$name" --password-stdin --totp "$(totp "$secret")"
}

step "Starting agentd for alice and bob"
start_agent alice
start_agent bob
onboard alice
onboard bob

step "alice sends bob a message (returns once the relay has it on disk)"
show chat-cli --home "$WORK/alice" send bob "Hi Bob, this is end-to-end encrypted."
wait_for 30 sh -c "chat-cli --home '$WORK/bob' inbox --all | grep -q 'end-to-end'"
step "bob reads his inbox"
show chat-cli --home "$WORK/bob" inbox --all

step "alice's history with bob: bob's agentd sent back a signed receipt, so it says delivered"
wait_for 30 sh -c "chat-cli --home '$WORK/alice' history bob | grep -q delivered"
show chat-cli --home "$WORK/alice" history bob

step "alice's agentd stops; bob replies while she is offline"
kill "$AGENT_PID_alice"; wait "$AGENT_PID_alice" 2>/dev/null || true
show chat-cli --home "$WORK/bob" send alice "Hi Alice, you will read this when you are back."

step "alice's agentd starts again and resumes its session without a new login"
start_agent alice
wait_for 30 sh -c "chat-cli --home '$WORK/alice' inbox --all | grep -q 'when you are back'"
show chat-cli --home "$WORK/alice" inbox --all

step "bob writes to the room: a broadcast reaches every registered user"
show chat-cli --home "$WORK/bob" broadcast "Hello everyone."
wait_for 30 sh -c "chat-cli --home '$WORK/alice' history | grep -q 'Hello everyone'"
show chat-cli --home "$WORK/alice" history

step "Fingerprints to compare out of band"
show chat-cli --home "$WORK/alice" fingerprint
show chat-cli --home "$WORK/alice" fingerprint bob

step "The operator's status page ($STATUS_URL) shows live counts, never names or content"
python3 -c 'import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1] + "status.json").read().decode())' "$STATUS_URL"

step "Done: the relay only ever held ciphertext. Cleaning up $WORK"
