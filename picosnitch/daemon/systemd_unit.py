"""picosnitch.service: the unit `picosnitch systemd` installs (the repository ships the same text)."""

import shutil
import subprocess
from pathlib import Path

UNIT_NAME = "picosnitch.service"

# ExecStart names the command without a directory: systemd looks it up in its own fixed PATH
# (/usr/local/bin, /usr/bin, ...), so the same unit serves pip, pipx and Debian installs.
UNIT = """\
[Unit]
Description=picosnitch: notifies you of programs new to the network and keeps their traffic history
Documentation=man:picosnitch(1)
After=local-fs.target

[Service]
# READY=1 once the BPF programs are attached.
Type=notify
ExecStart=picosnitch start-no-daemon
Restart=on-failure
RestartSec=5
# 78 (EX_CONFIG) is a configuration error: restarting would only repeat it.
RestartPreventExitStatus=78
KillMode=mixed
TimeoutStopSec=90

# The only places it writes: /etc/picosnitch, /var/lib/picosnitch, /var/log/picosnitch,
# /run/picosnitch (created root-owned, mode 0755: the unprivileged readers need them).
ConfigurationDirectory=picosnitch
StateDirectory=picosnitch
LogsDirectory=picosnitch
RuntimeDirectory=picosnitch
UMask=0022
ProtectSystem=strict
# Where node_exporter's textfile collector reads on Debian ("Metrics textfile"), if it exists;
# another directory needs a drop-in with a ReadWritePaths= line of its own.
ReadWritePaths=-/var/lib/prometheus/node-exporter
# Read-only, not hidden: executables under /home are hashed, the desktop buses in /run/user reached.
ProtectHome=read-only
# Not private: a program run from /tmp that exits before it is hashed is hashed by its path,
# which a private /tmp would hide (its sha256 would be "!missing").
PrivateTmp=no

# Capabilities, each found needed by running the daemon without it:
#   CAP_SYS_ADMIN        the getaddrinfo uprobes (domain names); it also covers CAP_BPF,
#                        CAP_PERFMON and CAP_NET_ADMIN (BPF loading, tracepoints, cgroup hooks),
#                        and fanotify on kernels before 5.13
#   CAP_SYS_PTRACE       /proc/PID/exe of other users' processes and of more privileged ones
#   CAP_DAC_READ_SEARCH  hashing executables root may not read by their permissions
#   CAP_SETUID/SETGID    workers that become `nobody` or the desktop user
#   CAP_CHOWN, CAP_FOWNER  the SQL backlog handed to its unprivileged writer; the live socket's group
#   CAP_KILL             stopping those workers once they run as another user
CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_PTRACE CAP_DAC_READ_SEARCH CAP_SETUID CAP_SETGID CAP_CHOWN CAP_FOWNER CAP_KILL
NoNewPrivileges=yes
PrivateDevices=yes
PrivateIPC=yes
PrivateMounts=yes
ProtectClock=yes
ProtectControlGroups=yes
ProtectHostname=yes
ProtectKernelLogs=yes
ProtectKernelModules=yes
ProtectKernelTunables=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service bpf perf_event_open fanotify_init fanotify_mark
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def install(root: Path) -> str:
    """Writes the unit into root's etc/systemd/system; returns what was done. When root is "/" and
    systemd runs, it is reloaded (a unit written below a PICOSNITCH_PREFIX is not systemd's)."""
    unit_dir = root / "etc/systemd/system"
    unit_dir.mkdir(parents=True, exist_ok=True)
    path = unit_dir / UNIT_NAME
    path.write_text(UNIT)
    done = f"wrote {path}"
    if root == Path("/") and Path("/run/systemd/system").is_dir() and shutil.which("systemctl"):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        done += "; systemd reloaded: enable it with `systemctl enable --now picosnitch`"
    return done
