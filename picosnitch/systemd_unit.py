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
Type=notify
ExecStart=picosnitch start-no-daemon
Restart=on-failure
RestartSec=5
# 78 (EX_CONFIG) is a configuration error: restarting would only repeat it.
RestartPreventExitStatus=78
KillMode=mixed
TimeoutStopSec=90

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
