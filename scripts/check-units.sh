#!/usr/bin/env bash
# Check the systemd units in systemd/ with `systemd-analyze verify`: the
# agentd service and socket as user units, the relay as a system unit. Any
# warning fails the check, and so does a user unit that uses sandboxing a
# user manager cannot apply (it would be ignored or refuse to start).
#
# The units name installed binaries (%h/.cargo/bin/agentd,
# /usr/local/bin/relay); verify checks that ExecStart exists, so temporary
# copies pointing at freshly built binaries in target/ are verified instead.
#
#   scripts/check-units.sh          # builds agentd and relay first (debug)
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# systemd-analyze verify, and man(1) for the Documentation=man: links.
missing=()
command -v systemd-analyze >/dev/null 2>&1 || missing+=(systemd)
command -v man >/dev/null 2>&1 || missing+=(man-db)
if ((${#missing[@]} > 0)); then
    echo "check-units: installing Debian's ${missing[*]} (needed to check the units)" >&2
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq && sudo apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "check-units: cannot install ${missing[*]} (not root, no sudo); install it: apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

cargo build --locked --quiet -p securechat-agentd -p securechat-relay -p securechat-cli --bins
target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
agentd="$target/debug/agentd"
relay="$target/debug/relay"
for bin in "$agentd" "$relay"; do
    [ -x "$bin" ] || { echo "check-units: $bin was not built" >&2; exit 1; }
done

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -m 0700 "$tmp/user" "$tmp/system" "$tmp/run"

# Copy $1 to $2 with ExecStart's binary $3 replaced by $4; fail if the
# unit's ExecStart no longer names $3 (the check would not test it).
retarget() {
    grep -q "^ExecStart=$3\( \|\$\)" "$1" || {
        echo "check-units: $1: ExecStart does not start with $3 any more; update this script" >&2
        exit 1
    }
    sed "s|^ExecStart=$3|ExecStart=$4|" "$1" >"$2"
}
retarget systemd/securechat-agentd.service "$tmp/user/securechat-agentd.service" '%h/.cargo/bin/agentd' "$agentd"
cp systemd/securechat-agentd.socket "$tmp/user/"
retarget systemd/securechat-relay.service "$tmp/system/securechat-relay.service" /usr/local/bin/relay "$relay"

# Documentation=man:agentd(1) man:chat-cli(1) must name pages that exist:
# generate them from the built binaries, as README's install steps do, and
# let verify look them up (it runs man(1) with this MANPATH).
mkdir -p "$tmp/man/man1"
"$agentd" man >"$tmp/man/man1/agentd.1"
"$target/debug/chat-cli" man >"$tmp/man/man1/chat-cli.1"
"$relay" man >"$tmp/man/man1/relay.1"
export MANPATH="$tmp/man"
man_opt=--man=yes

failed=0
check() {
    local out
    if ! out="$("$@" 2>&1)" || [ -n "$out" ]; then
        echo "check-units: FAILED: $*" >&2
        echo "$out" >&2
        failed=1
    fi
}
# A user manager needs a runtime directory (%t); CI and `su -` have none.
check env XDG_RUNTIME_DIR="$tmp/run" systemd-analyze verify "$man_opt" --user \
    "$tmp/user/securechat-agentd.service" "$tmp/user/securechat-agentd.socket"
check systemd-analyze verify "$man_opt" "$tmp/system/securechat-relay.service"

# Options a user manager cannot apply without privileges: ignored or refused.
privileged='^(ProtectSystem|ProtectHome|PrivateTmp|PrivateDevices|PrivateNetwork|PrivateMounts|ProtectKernelTunables|ProtectKernelModules|ProtectKernelLogs|ProtectControlGroups|ProtectClock|ProtectHostname|ProtectProc|ReadWritePaths|ReadOnlyPaths|InaccessiblePaths|TemporaryFileSystem|BindPaths|BindReadOnlyPaths|CapabilityBoundingSet|AmbientCapabilities|DeviceAllow|DevicePolicy|User|Group|DynamicUser)='
for unit in systemd/securechat-agentd.service systemd/securechat-agentd.socket; do
    if grep -En "$privileged" "$unit" >&2; then
        echo "check-units: FAILED: $unit uses options a user manager cannot apply (above)" >&2
        failed=1
    fi
done

if [ "$failed" != 0 ]; then
    exit 1
fi
echo "check-units: securechat-agentd.service, securechat-agentd.socket (user) and securechat-relay.service (system) verified"
