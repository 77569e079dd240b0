#!/usr/bin/env bash
# Installs picosnitch on Debian/Ubuntu (as root) and starts the daemon.
# Usage: sudo scripts/install.sh [--no-start]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "installing picosnitch needs root: sudo $0" >&2
    exit 1
fi

scripts/install-system-deps.sh run

# A virtual environment of its own: no clash with the system's Python packages (PEP 668).
prefix=/opt/picosnitch
python3 -m venv "$prefix"
"$prefix/bin/pip" install --quiet --upgrade pip
"$prefix/bin/pip" install --quiet ".[notify,virustotal]"
ln -sf "$prefix/bin/picosnitch" /usr/local/bin/picosnitch

if [ "${1:-}" = --no-start ]; then
    exit 0
fi
if [ -d /run/systemd/system ]; then
    picosnitch systemd
    systemctl enable --now picosnitch
    systemctl --no-pager status picosnitch | head -3
else
    picosnitch start
fi
