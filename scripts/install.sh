#!/usr/bin/env bash
# Installs picosnitch on Debian/Ubuntu (as root), installs its systemd unit and starts the daemon.
# Usage: sudo scripts/install.sh [--deb] [--no-start]
#   default  pip: a virtual environment in /opt/picosnitch, /usr/local/bin/picosnitch,
#            the unit in /etc/systemd/system, the man page in /usr/local/share/man/man1
#   --deb    builds the Debian package (scripts/build-deb.sh) and installs it with apt, which
#            pulls its dependencies from Debian's archive; the package enables the unit itself
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "installing picosnitch needs root: sudo $0" >&2
    exit 1
fi
method=pip start=yes
for arg in "$@"; do
    case "$arg" in
        --deb) method=deb ;;
        --no-start) start=no ;;
        *) echo "usage: $0 [--deb] [--no-start]" >&2; exit 2 ;;
    esac
done

if [ "$method" = deb ]; then
    scripts/install-system-deps.sh deb
    deb=$(scripts/build-deb.sh dist)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 "$deb" >/dev/null
else
    scripts/install-system-deps.sh run
    # A virtual environment of its own: no clash with the system's Python packages (PEP 668).
    prefix=/opt/picosnitch
    python3 -m venv "$prefix"
    "$prefix/bin/pip" install --quiet --upgrade pip
    # The extras the README promises after this install: desktop notifications, VirusTotal,
    # GeoIP for view and dash, and the dashboard itself (the SQL drivers only when configured).
    "$prefix/bin/pip" install --quiet ".[notify,virustotal,geoip,dash]"
    ln -sf "$prefix/bin/picosnitch" /usr/local/bin/picosnitch
    mkdir -p /usr/local/share/man/man1
    ln -sf "$prefix/share/man/man1/picosnitch.1" /usr/local/share/man/man1/picosnitch.1
    /usr/local/bin/picosnitch systemd  # writes /etc/systemd/system/picosnitch.service (and reloads systemd, if it runs)
    if [ -d /run/systemd/system ]; then
        systemctl enable picosnitch
    fi
fi

if [ "$start" = no ]; then
    exit 0
fi
if [ -d /run/systemd/system ]; then
    systemctl start picosnitch
    systemctl --no-pager status picosnitch | head -3
else
    bin=$(command -v picosnitch || echo /usr/local/bin/picosnitch)
    "$bin" status >/dev/null || "$bin" start
fi
