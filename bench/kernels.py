"""Benchmarks on the kernels users run: the accuracy scorecard and bench.overhead's tables for each
stock Debian kernel, measured inside a qemu guest booted with it (tests/guests.py).

    sudo python3 -m bench.kernels [KERNEL...] [--no-write]     (KERNEL as for scripts/kernel-matrix.sh)

Guests run under TCG, about ten times slower than this machine and unevenly so: an overhead ratio
compares the attached and detached runs of one guest, never figures of two guests, or of a guest
and the host. Writes the section "## Stock kernels (qemu guests)" of docs/BENCHMARKS.md.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import guests  # noqa: E402

from bench import accuracy  # noqa: E402
from bench.__main__ import DOC  # noqa: E402

TITLE = "## Stock kernels (qemu guests)"
GUEST_TIMEOUT = 4 * 3600


def overhead_tables(log: str) -> str:
    """bench.overhead's heading lines and its markdown tables, from its output."""
    lines = log.splitlines()
    heading = [line for line in lines if line.startswith(("Kernel monitor overhead", "degraded hooks",
                                                          "kernel losses", "warning:"))]
    start = next((i for i, line in enumerate(lines) if line.startswith("**")), len(lines))
    return "\n".join(heading) + "\n\n" + "\n".join(lines[start:]).strip() + "\n"


def commit() -> str:
    return guests.run("git", "-C", str(REPO), "rev-parse", "--short", "HEAD").strip()


def one_kernel(package: str) -> str:
    kernel = guests.fetch(package)
    results = guests.run_dir(f"bench-{kernel.release}")
    boot = guests.boot(kernel, f"{guests.REPO}/tests/guest/matrix.sh bench {results}", results, GUEST_TIMEOUT)
    guests.record_wall_time(f"bench {kernel.release}", boot.seconds)
    return described(guests.Results(results, boot))


def described(found: guests.Results) -> str:
    """A kernel's part of the section, from what its guest left in its results directory."""
    release = found.file("uname").strip() or "(the guest never said)"
    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(found.path.stat().st_mtime))
    text = f"### {release}\n\n"
    text += f"Measured {measured} on commit {commit()}, host kernel {platform.release()} ({os.cpu_count()} CPUs). "
    if not found.file("done"):
        return text + f"Not measured: {found.why_unfinished()}\n"
    lines = found.file("load.log").splitlines()
    degraded = [line.removeprefix("degraded: ") for line in lines if line.startswith("degraded:")]
    load = next((line for line in lines if line.startswith("loaded in")), "did not load")
    text += f"Guest: 2 vCPUs (TCG), 2 GiB; {found.boot.seconds / 60:.0f} min in all. " \
            f"Features: {found.file('features.txt').strip().replace(chr(10), '; ')}. " \
            f"The monitor {load}; degraded: {'; '.join(degraded) or 'nothing'}.\n\n"
    scorecard = found.file("accuracy.json")
    text += "**Accuracy** (`python3 -m bench.accuracy --repeats 1 --no-nethogs`)\n\n"
    text += accuracy.markdown(json.loads(scorecard)) if scorecard else \
        "not measured:\n\n```\n" + found.log_tail("accuracy.log") + "\n```\n"
    text += "\n**Overhead** (`python3 -m bench.overhead --rounds 3 --seconds 2`)\n\n"
    text += overhead_tables(found.file("overhead.log")) if found.file("overhead.rc").strip() == "0" else \
        "not measured:\n\n```\n" + found.log_tail("overhead.log") + "\n```\n"
    return text


def merged(old_section: str, measured: List[str]) -> str:
    """The kernels measured now, and those of the section as it was that were not re-measured."""
    now = {part.split("\n", 1)[0] for part in measured}
    kept = [("### " + part).rstrip() + "\n" for part in old_section.split("\n### ")[1:]
            if ("### " + part).split("\n", 1)[0] not in now]
    return "\n".join(sorted(measured + kept, key=guests.version_key))


def current_section() -> str:
    doc = DOC.read_text() if DOC.exists() else ""
    start = doc.find(TITLE + "\n")
    if start < 0:
        return ""
    end = doc.find("\n## ", start + len(TITLE))
    return doc[start:end if end >= 0 else len(doc)]


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("kernels", nargs="*", help="default, newest, a version (6.1, 6.12) or a package name")
    p.add_argument("--no-write", action="store_true", help=f"print the section, do not write {DOC.name}")
    p.add_argument("--results", action="append", default=[], metavar="DIR",
                   help="describe a finished guest run from its results directory instead of booting one")
    args = p.parse_args(argv)
    if args.results:
        return write([described(guests.Results.finished(Path(d))) for d in args.results], args.no_write)
    missing = guests.missing_tools()
    if missing:
        print("cannot boot guests: missing " + ", ".join(missing), file=sys.stderr)
        return 2
    return write([one_kernel(package) for package in guests.resolve(args.kernels)], args.no_write)


def with_section(doc: str, text: str) -> str:
    """The document with this section replaced where it stands, or added before the raw output
    (bench.__main__'s rewrite moves sections about; this one moves nothing)."""
    section = f"{TITLE}\n\n{text.strip()}\n\n"
    start = doc.find(TITLE + "\n")
    if start >= 0:
        end = doc.find("\n## ", start + len(TITLE))
        return doc[:start] + section + (doc[end + 1:] if end >= 0 else "")
    raw = doc.find("\n## Latest full output")
    at = raw + 1 if raw >= 0 else len(doc)
    return doc[:at] + section + doc[at:]


def write(parts: List[str], dry: bool) -> int:
    section = ("`sudo python3 -m bench.kernels [KERNEL...]` boots each kernel, Debian's own package, in a qemu "
               "guest (TCG, virtme-ng) and runs the benchmarks there; figures compare runs within one guest "
               "only. Each kernel's part says when it was measured; a run re-measures only the kernels it "
               "is given.\n\nRead the overhead tables with care: under TCG every instruction is emulated, "
               "so throughput swings widely from round to round (each table gives the per-round range) and "
               "the targets, set for this machine's own kernel, do not apply; the programs' own cost per "
               "run (ns/run) is the steadier figure. Load times run about ten times the host's.\n\n"
               + merged(current_section(), parts))
    print(section)
    if not dry:
        DOC.write_text(with_section(DOC.read_text(), section).rstrip() + "\n")
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
