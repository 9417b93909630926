#!/usr/bin/env bash
# README's one test command: installs the system programs the tests need
# when they are missing, then runs every test of the workspace. Arguments go
# to cargo test (e.g. `scripts/test.sh -p securechat-relay --test mail_tls`).
#
# Everything else the tests use (the SMTP server, the test CAs) is Rust and
# comes with cargo. A test never skips itself because a program is missing:
# it fails and points here.
set -euo pipefail
cd "$(dirname "$0")/.."

# Programs no crate provides, as "command Debian-package" pairs: the
# command is looked for first, the package installed when it is missing.
# Add a line for each new one.
NEEDED=(
  "/usr/bin/chromium chromium"              # the status page's browser test
  "systemd-socket-activate systemd"         # agentd's socket-activation test
  "script util-linux"                       # chat-cli on a real terminal (a pty)
  "tmux tmux"                               # `chat-cli chat` typed into and read back
  "redis-server redis-server"               # securechat-bench --compare-redis (the yardstick)
  "redis-benchmark redis-tools"             # the same
)

missing=()
for entry in "${NEEDED[@]}"; do
  read -r cmd pkg <<<"$entry"
  if ! command -v "$cmd" >/dev/null 2>&1; then
    missing+=("$pkg")
  fi
done

if ((${#missing[@]} > 0)); then
  echo "test.sh: installing ${missing[*]} (needed by the tests)" >&2
  if [ "$(id -u)" -eq 0 ]; then
    as_root=()
  elif command -v sudo >/dev/null 2>&1 && { sudo -n true 2>/dev/null || [ -t 0 ]; }; then
    # Passwordless sudo, or a terminal to ask for the password on.
    as_root=(sudo)
  else
    echo "test.sh: ${missing[*]} missing, and neither root nor sudo is available to install it." >&2
    echo "         Install it yourself (apt-get install ${missing[*]}) or run this script as root." >&2
    exit 1
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test.sh: ${missing[*]} missing and there is no apt-get here; install it with your package manager." >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if ! "${as_root[@]}" apt-get update -qq ||
    ! "${as_root[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null; then
    echo "test.sh: installing ${missing[*]} failed (see above); install it and run this again." >&2
    exit 1
  fi
fi

# The whole workspace, unless the arguments pick packages themselves.
scope=(--workspace)
for arg in "$@"; do
  case "$arg" in
    -p | -p* | --package | --package=* | --workspace) scope=() ;;
    --) break ;;
  esac
done
exec cargo test "${scope[@]}" --locked "$@"
