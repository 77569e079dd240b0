"""Which container, or else which systemd unit, a process runs in, from its cgroup path.

`/proc/PID/cgroup` has one `hierarchy:controllers:path` line per hierarchy: a single `0::/path` on
cgroup v2, one line per controller on v1, both on hybrid systems. Container runtimes name the
cgroup of each container after its id, so the id can be read from the path:

    docker      /system.slice/docker-<64 hex>.scope, /docker/<64 hex>   -> docker:<12 hex>
    podman      /machine.slice/libpod-<64 hex>.scope                     -> podman:<12 hex>
    containerd  .../cri-containerd-<64 hex>.scope                        -> containerd:<12 hex>
    CRI-O       .../crio-<64 hex>.scope                                  -> crio:<12 hex>
    kubernetes  /kubepods/<qos>/pod<uid>/<64 hex> (cgroupfs driver)      -> k8s:<12 hex>
    nspawn      /machine.slice/machine-<name>.scope                      -> nspawn:<name>
                (libvirt registers its VMs the same way: nspawn:qemu-1-<vm>)
    LXC, LXD    /lxc/<name>, /lxc.payload.<name>                         -> lxc:<name>

The outermost container in the path wins: that is the one the host's runtime knows. Outside any
container the result is the innermost systemd unit, `unit:ssh.service` or `unit:app-x.scope`
(so a user's unit, not `user@1000.service`), and "" when there is none. Runtime helpers on the
host (`libpod-conmon-*.scope`, `lxc.monitor.*`) are not containers.
"""

import re

from picosnitch.sanitize import from_bytes

_HEX64 = "[0-9a-f]{64}"
# (pattern for one path component, runtime); group 1 is the id or name.
_SCOPES = [
    (re.compile(rf"docker-({_HEX64})\.scope"), "docker"),
    (re.compile(rf"libpod-({_HEX64})\.scope"), "podman"),
    (re.compile(rf"cri-containerd-({_HEX64})\.scope"), "containerd"),
    (re.compile(rf"crio-({_HEX64})\.scope"), "crio"),
    (re.compile(r"machine-(.+)\.scope"), "nspawn"),
    (re.compile(r"lxc\.payload\.(.+)"), "lxc"),
]
# (parent component, pattern for the component after it, runtime): cgroupfs-style layouts.
_CHILDREN = [
    (re.compile(r"docker"), re.compile(f"({_HEX64})"), "docker"),
    (re.compile(r"pod[0-9a-f_-]+"), re.compile(f"({_HEX64})"), "k8s"),
    (re.compile(r"lxc"), re.compile(r"(.+)"), "lxc"),
]
_UNIT = re.compile(r".+\.(service|scope)")
_ESCAPED = re.compile(r"\\x([0-9a-fA-F]{2})")


def _unescape(name: str) -> str:
    """systemd escapes `-` and other bytes in unit names as `\\xNN` (machine-foo\\x2dbar)."""
    return _ESCAPED.sub(lambda m: chr(int(m.group(1), 16)), name)


def _paths(cgroup_text: str) -> list:
    """The cgroup paths in the file, the v2 and the name=systemd hierarchies first."""
    first: list[str] = []
    rest: list[str] = []
    for line in cgroup_text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        (first if controllers in ("", "name=systemd") else rest).append(path)
    return first + rest


def _container(path: str) -> str:
    parts = [p for p in path.split("/") if p]
    for i, part in enumerate(parts):
        for pattern, runtime in _SCOPES:
            m = pattern.fullmatch(part)
            if m:
                return _label(runtime, m.group(1))
        if i > 0:
            for parent, pattern, runtime in _CHILDREN:
                m = pattern.fullmatch(part)
                if m and parent.fullmatch(parts[i - 1]):
                    return _label(runtime, m.group(1))
    return ""


def _label(runtime: str, ident: str) -> str:
    if re.fullmatch(_HEX64, ident):
        return f"{runtime}:{ident[:12]}"
    return f"{runtime}:{_unescape(ident)}"


def _unit(path: str) -> str:
    units = [p for p in path.split("/") if _UNIT.fullmatch(p)]
    return f"unit:{units[-1]}" if units else ""


def container_of(cgroup_text: str) -> str:
    """Container id (`docker:0123456789ab`), else systemd unit (`unit:ssh.service`), else ""."""
    paths = _paths(cgroup_text)
    for path in paths:
        container = _container(path)
        if container:
            return container
    for path in paths:
        unit = _unit(path)
        if unit:
            return unit
    return ""


def container_of_pid(pid: int) -> str:
    """container_of for a running process; "" if it has exited."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            return container_of(from_bytes(f.read()))
    except OSError:
        return ""
