#!/usr/bin/env bash
# Installs what the tests need (Debian/Ubuntu, as root) and runs them.
# Usage: sudo scripts/test.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "the tests load BPF programs and create network namespaces: run as root (sudo $0)" >&2
    exit 1
fi

scripts/install-system-deps.sh test

python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
make -s -C picosnitch/kernel/bpf

# Lint (pyflakes and import order) and types, settings in pyproject.toml.
.venv/bin/ruff check --quiet .
.venv/bin/mypy

# The Debian package, built the way Debian builds it; tests/test_systemd_guest.py installs and runs it
# in a guest under systemd (never on this machine).
PICOSNITCH_DEB=$(scripts/build-deb.sh dist)
export PICOSNITCH_DEB

exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
