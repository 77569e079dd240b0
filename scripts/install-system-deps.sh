#!/usr/bin/env bash
# Debian/Ubuntu packages picosnitch needs.
#   run:  to build picosnitch (pip) and run it
#   deb:  to build the Debian package (scripts/build-deb.sh)
#   test: everything the tests use, including building the .deb and the qemu guests that boot stock
#         kernels and install the .deb under systemd (tests/guests.py)
set -euo pipefail
want=(libbpf1 python3 python3-venv python3-pip clang llvm libbpf-dev make
      publicsuffix  # the list "new domain" alerts need
      iptables)  # guard mode (the NFQUEUE target); the monitor alone does not need it
deb=(debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel python3-build
     dpkg-dev fakeroot git
     python3-jeepney python3-requests)  # the .deb's own Depends, so the tests can install it offline
case "${1:-run}" in
    deb) want+=("${deb[@]}") ;;
    test) want+=("${deb[@]}" iproute2 tmux procps psmisc gcc liburing-dev dbus-daemon libnotify-bin passwd
                 util-linux postgresql mariadb-server man-db groff-base python3-psycopg chromium chromium-driver nethogs busybox-static
                 musl-tools dnsmasq-base qemu-system-x86 kmod file debootstrap e2fsprogs
                 perl ruby nodejs php-cli zsh default-jdk-headless) ;;
esac
missing=()
for pkg in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -o DPkg::Lock::Timeout=300 "${missing[@]}" >/dev/null
fi
