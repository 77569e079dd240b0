#!/usr/bin/env bash
# Debian/Ubuntu packages picosnitch needs. "run": to build and run; "test": also what the tests use.
set -euo pipefail
want=(libbpf1 python3 python3-venv python3-pip clang llvm libbpf-dev make)
if [ "${1:-run}" = test ]; then
    want+=(iproute2 tmux procps psmisc gcc liburing-dev dbus-daemon libnotify-bin passwd util-linux postgresql mariadb-server)
fi
missing=()
for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
