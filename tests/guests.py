"""Stock Debian kernels booted in qemu guests, so the tests run on the kernels users have.

This machine's kernel is unusual (no kprobes, no BPF trampolines, no iterators); users run stock
distribution kernels, and kernel drift is what breaks every tool of this kind. So the tests ask the
Debian archive which kernels it offers today (never a hard-coded ABI number: it changes with every
update), download and unpack them into a cache (never installed on the host), and boot each with
virtme-ng under TCG (KVM here is paravirtual and cannot run a guest kernel).

A guest reports only through files it writes into a directory shared with the host: vng's exit
status means nothing (without --verbose it exits 255 on a run that went well).

The cache lives in $PICOSNITCH_GUEST_CACHE (default /var/cache/picosnitch-tests); anything in it
can be deleted and is fetched again from the archive.
"""

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
ARCH = "amd64"


def cache_dir() -> Path:
    return Path(os.environ.get("PICOSNITCH_GUEST_CACHE", "/var/cache/picosnitch-tests"))


def run(*args: str, cwd=None) -> str:
    """A command's stdout; a failure raises with its stderr."""
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {done.stderr.strip()[-800:]}")
    return done.stdout


# --- which kernels ------------------------------------------------------------------------------

LISTS = Path("/var/lib/apt/lists")


def fresh_package_lists(max_age: float = 86400) -> None:
    """apt-get update, unless apt's package lists are less than a day old: a stale list names
    kernel packages the archive no longer has (every update changes the ABI number)."""
    newest = max((p.stat().st_mtime for p in LISTS.glob("*_Packages*")), default=0) if LISTS.is_dir() else 0
    if newest < time.time() - max_age:
        run("apt-get", "update", "-qq")

def default_kernel_package() -> str:
    """The image the distribution installs by default (what linux-image-amd64 depends on)."""
    found = re.search(rf"Depends: (linux-image-\S+-{ARCH})\b", run("apt-cache", "depends", f"linux-image-{ARCH}"))
    if not found:
        raise RuntimeError(f"apt-cache knows no dependency of linux-image-{ARCH}: run apt-get update")
    return found.group(1)


def kernel_packages() -> List[str]:
    """Every concrete kernel image the archive offers (no meta-packages, no cloud or rt flavours),
    oldest first."""
    names = []
    for line in run("apt-cache", "search", "--names-only", rf"^linux-image-[0-9].*-{ARCH}$").splitlines():
        name, _, description = line.partition(" - ")
        flavoured = re.search(rf"-(cloud|rt)-{ARCH}$", name)
        if re.fullmatch(rf"linux-image-\d+\.\d+\.\d+[-.+~\w]*-{ARCH}", name) and not flavoured \
                and "meta-package" not in description:
            names.append(name)
    return sorted(names, key=version_key)


def version_key(package: str):
    return [int(n) if n.isdigit() else n for n in re.split(r"(\d+)", package)]


def resolve(wanted: List[str]) -> List[str]:
    """Package names for what was asked: 'default', 'newest', a version prefix ('6.1', '6.12'),
    or a package name. Nothing asked: the default and the newest."""
    wanted = wanted or ["default", "newest"]
    fresh_package_lists()
    offered = kernel_packages()
    chosen = []
    for want in wanted:
        if want == "default":
            name = default_kernel_package()
        elif want == "newest":
            if not offered:
                raise RuntimeError("apt-cache offers no kernel image: run apt-get update")
            name = offered[-1]
        elif want.startswith("linux-image-"):
            name = want
        else:
            matching = [p for p in offered if re.match(rf"linux-image-{re.escape(want)}[.+-]", p)]
            if not matching:
                raise RuntimeError(f"the archive offers no kernel image matching {want!r}")
            name = max(matching, key=version_key)
        if name not in chosen:
            chosen.append(name)
    return chosen


# --- fetching -----------------------------------------------------------------------------------

@dataclass
class Kernel:
    package: str
    root: Path      # the unpacked package: boot/vmlinuz-RELEASE, lib/modules/RELEASE

    @property
    def release(self) -> str:
        return self.package.removeprefix("linux-image-")

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"


def fetch(package: str) -> Kernel:
    """The package downloaded and unpacked into the cache, once; a half-done earlier try is redone."""
    kernels = cache_dir() / "kernels"
    kernel = Kernel(package, kernels / package)
    if (kernel.root / ".complete").exists():
        return kernel
    kernels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=kernels, prefix=".fetch-") as work:
        os.chmod(work, 0o755)  # apt's download user must be able to write here
        run("apt-get", "download", "-q", package, cwd=work)
        deb, = Path(work).glob("*.deb")
        unpacked = Path(work) / "root"
        run("dpkg-deb", "-x", str(deb), str(unpacked))
        if not (unpacked / "boot" / f"vmlinuz-{kernel.release}").is_file():
            raise RuntimeError(f"{package} holds no boot/vmlinuz-{kernel.release}")
        (unpacked / ".complete").write_text(package + "\n")
        shutil.rmtree(kernel.root, ignore_errors=True)
        unpacked.rename(kernel.root)
    return kernel


# --- booting ------------------------------------------------------------------------------------

def vng() -> Optional[str]:
    """The vng command: the one next to this Python (the tests' venv) or on PATH."""
    beside = Path(sys.executable).parent / "vng"
    return str(beside) if beside.exists() else shutil.which("vng")


def missing_tools() -> List[str]:
    """What booting a guest needs and this machine lacks ([] when it can boot one)."""
    missing = []
    if not vng():
        missing.append("vng (pip install virtme-ng)")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("depmod", "kmod"), ("file", "file")):
        if not shutil.which(tool):
            missing.append(f"{tool} (apt-get install {package})")
    return missing


def run_dir(name: str) -> Path:
    """A fresh directory the guest can write its results into; runs older than two days go."""
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    for old in runs.iterdir():
        if old.stat().st_mtime < time.time() - 2 * 86400:
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(dir=runs, prefix=f"{name}-{time.strftime('%Y%m%d-%H%M%S')}-"))
    path.chmod(0o755)
    return path


def precompile() -> None:
    """Byte-compiles this tree's Python on the host. A guest sees the tree read-only, so without
    this every process there compiles every module it imports, at TCG's speed (a 30 s timeout of
    `python3 -m picosnitch` ran out that way)."""
    run(sys.executable, "-m", "compileall", "-q", str(REPO / "picosnitch"), str(REPO / "tests"),
        str(REPO / "bench"))


@dataclass
class Boot:
    seconds: float
    console: Path       # everything the guest printed (kernel log included)
    timed_out: bool

    def tail(self, lines: int = 40) -> str:
        text = self.console.read_text(errors="replace") if self.console.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def boot(kernel: Kernel, command: str, results: Path, timeout: float, *extra: str,
         memory: str = "2G") -> Boot:
    """Boots the kernel with `command` as the guest's job (the host's root read-only over 9p unless
    `extra` says otherwise); `results` is shared read-write at the same path."""
    # The kernel's own tree is shared too: vng links /lib/modules to it, and the guest's tmpfs on
    # /var/cache would hide it when the cache lives there. So is this tree, wherever it lives.
    shared = [f"--rodir={kernel.root}", f"--rwdir={results}"]
    if "--root-disk" not in extra:
        shared.append(f"--rodir={REPO}")
    argv = [vng(), "--run", str(kernel.vmlinuz), "--disable-kvm", "--cpus", "2", "--memory", memory,
            "--verbose", *shared, *extra, "--exec", command]
    console = results / "console.log"
    precompile()
    start = time.monotonic()
    with open(console, "wb") as out:
        # vng runs virtme-run by name: the directory it lives in must be on PATH.
        env = dict(os.environ, PATH=f"{Path(argv[0]).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                cwd=REPO, env=env, start_new_session=True)
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            timed_out = True
    seconds = time.monotonic() - start
    (results / "seconds").write_text(f"{seconds:.0f}\n")
    return Boot(seconds, console, timed_out)


def boot_systemd(kernel: Kernel, image: Path, command: str, results: Path, timeout: float) -> Boot:
    """Boots a copy of the root image with systemd as PID 1; vng runs `command` once it is up.
    The cached image itself stays as debootstrap left it."""
    disk = results / "root.img"
    run("cp", "--sparse=always", str(image), str(disk))
    try:
        return boot(kernel, command, results, timeout, "--root-disk", str(disk), "--root-fstype", "ext4",
                    "--rw", "--systemd")
    finally:
        disk.unlink()


# --- results -----------------------------------------------------------------------------------

class GuestsNotRun(UserWarning):
    """Shown in pytest's warnings summary: a guest test that could not run is no pass."""


def require_guests(problem: Optional[str] = None) -> None:
    """Skips (loudly) or, under CI, fails a guest test on a machine that cannot boot guests."""
    import warnings

    import pytest
    problem = problem or ("missing " + ", ".join(missing_tools()) if missing_tools() else None)
    if problem is None and os.geteuid() != 0:
        problem = "needs root (the guests load BPF programs and the tests read their results)"
    if problem is None:
        return
    message = f"GUEST TESTS NOT RUN: {problem}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI installs what guests need: scripts/install-system-deps.sh test)", pytrace=False)
    warnings.warn(GuestsNotRun(message))
    pytest.skip(message)


def record_wall_time(what: str, seconds: float) -> None:
    """Appends to <cache>/wall-times.txt, the figures the CI budget is planned with."""
    with open(cache_dir() / "wall-times.txt", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {what}: {seconds:.0f} s\n")


class Results:
    """What a guest left in its results directory."""

    def __init__(self, path: Path, boot: Boot):
        self.path = path
        self.boot = boot

    @classmethod
    def finished(cls, path: Path) -> "Results":
        """The results of a guest run that is over (its wall time as boot() wrote it down)."""
        seconds = path / "seconds"
        return cls(path, Boot(float(seconds.read_text()) if seconds.exists() else 0, path / "console.log", False))

    def file(self, name: str) -> str:
        path = self.path / name
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, name: str, lines: int = 30) -> str:
        text = self.file(name)
        return f"{self.path / name}:\n" + "\n".join(text.splitlines()[-lines:])

    def why_unfinished(self) -> str:
        how = f"timed out after {self.boot.seconds:.0f} s" if self.boot.timed_out else \
            f"stopped after {self.boot.seconds:.0f} s without finishing"
        return f"the guest {how}; the end of its console ({self.boot.console}):\n{self.boot.tail()}"

    def junit(self, name: str) -> dict:
        """{test id: (outcome, message)} from a junit XML file; outcome is passed, failure, error
        or skipped."""
        path = self.path / name
        assert path.exists(), f"the guest wrote no {name}: {self.why_unfinished()}"
        outcomes = {}
        for case in ET.parse(path).iter("testcase"):
            test_id = case.get("name")
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome, message = child.tag, (child.get("message") or "")[:300]
                    break
            # a teardown error adds a second element: a failure outranks a pass
            if outcomes.get(test_id, ("passed",))[0] == "passed":
                outcomes[test_id] = (outcome, message)
        return outcomes


# --- a Debian root with systemd ------------------------------------------------------------------

# What the systemd guest needs besides the .deb's own dependencies: systemd as PID 1, and the tools
# its checks use. minbase already has apt and dpkg.
ROOT_PACKAGES = ["systemd-sysv", "udev", "kmod", "python3", "iproute2", "procps"]
ROOT_RECIPE = "1"  # bump when the image is made differently: cached images are then rebuilt


def host_codename() -> str:
    for line in Path("/etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            return line.split("=", 1)[1].strip('"')
    raise RuntimeError("/etc/os-release names no VERSION_CODENAME")


def mirror(codename: str) -> str:
    """The mirror apt is configured with for the distribution's main suite (one-line or deb822
    sources alike: apt itself reads them)."""
    targets = run("apt-get", "indextargets", "--format", "$(REPO_URI) $(RELEASE) $(TARGET_OF)")
    for line in targets.splitlines():
        uri, release, target_of = line.split()
        if release == codename and target_of == "deb":
            return uri
    raise RuntimeError(f"apt is configured with no mirror for {codename}: see /etc/apt/sources.list*")


def deb_depends(deb: Path) -> List[str]:
    """The package names the .deb depends on (first of each alternative, versions left out)."""
    field = run("dpkg-deb", "-f", str(deb), "Depends")
    return sorted({re.split(r"[\s(:]", part.split("|")[0].strip())[0] for part in field.split(",") if part.strip()})


def root_image(deb: Path) -> Path:
    """A Debian root (debootstrap from apt's mirror, the host's release) holding systemd and the
    .deb's dependencies, as an ext4 image; made once per package list, always remakeable."""
    codename = host_codename()
    source = mirror(codename)
    include = sorted(set(ROOT_PACKAGES) | set(deb_depends(deb)))
    key = hashlib.sha256(" ".join([ROOT_RECIPE, codename, source, *include]).encode()).hexdigest()[:12]
    roots = cache_dir() / "roots"
    image = roots / f"{codename}-{key}.img"
    if image.exists():
        return image
    roots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=roots, prefix=".build-") as work:
        tree = Path(work) / "root"
        run("debootstrap", "--variant=minbase", "--include=" + ",".join(include), codename, str(tree), source)
        # getty-static fails in a guest without VTs and makes the system "degraded": not ours to judge.
        (tree / "etc/systemd/system/getty-static.service").symlink_to("/dev/null")
        (tree / "etc/hostname").write_text("picosnitch-guest\n")
        shutil.rmtree(tree / "var/cache/apt/archives", ignore_errors=True)
        (tree / "var/cache/apt/archives/partial").mkdir(parents=True)
        partial = Path(work) / "root.img"
        run("mkfs.ext4", "-q", "-F", "-L", "root", "-d", str(tree), str(partial), "2G")
        partial.rename(image)
    for old in roots.glob("*.img"):
        if old != image and old.stat().st_mtime < time.time() - 7 * 86400:
            old.unlink()
    return image
