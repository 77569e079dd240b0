#!/usr/bin/env bash
# Runs the kernel matrix alone: the kernel-monitor tests and the quick accuracy suite on stock
# Debian kernels, each booted in a qemu guest (tests/test_kernel_matrix.py), and, with --systemd,
# the .deb under a real systemd in a guest as well (tests/test_systemd_guest.py).
# Usage: sudo scripts/kernel-matrix.sh [--systemd] [KERNEL...] [-- pytest arguments]
#   KERNEL: default (Debian's default kernel), newest (the newest the archive offers), a version
#   such as 6.1 or 6.12 (the newest package of it), or a package name; none: default and newest.
# Kernels and the guest root are cached in $PICOSNITCH_GUEST_CACHE (/var/cache/picosnitch-tests).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "the guests load BPF programs and this installs qemu: run as root (sudo $0)" >&2
    exit 1
fi

tests=(tests/test_kernel_matrix.py)
kernels=()
while [ $# -gt 0 ]; do
    case $1 in
        --systemd) tests+=(tests/test_systemd_guest.py) ;;
        --) shift; break ;;
        *) kernels+=("$1") ;;
    esac
    shift
done

scripts/install-system-deps.sh test
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
make -s -C picosnitch/kernel/bpf
if [[ " ${tests[*]} " == *systemd* ]]; then
    PICOSNITCH_DEB=$(scripts/build-deb.sh dist)
    export PICOSNITCH_DEB
fi

export PICOSNITCH_KERNELS="${kernels[*]}"
exec .venv/bin/python -m pytest -p no:cacheprovider -rs "${tests[@]}" "$@"
