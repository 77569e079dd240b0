"""Runs every benchmark and writes the scorecard into docs/BENCHMARKS.md.

    sudo python3 -m bench [--quick] [--no-write] [--skip accuracy,overhead,daemon_load,view_queries,dash]

1. installs what is missing (scripts/install-system-deps.sh test; nethogs, busybox-static) and
   builds the BPF object;
2. accuracy (bench/accuracy.py: 24 scenarios × 3, nethogs side by side), kernel overhead
   (bench/overhead.py), the daemon under a storm and short-lived processes
   (bench/daemon_load.py), UI queries on a 10-million-row snitch.db (bench/view_queries.py; and
   bench/dash.py when present), each as its own process, one after the other;
3. prints the scorecard and writes, in docs/BENCHMARKS.md, the sections `## Accuracy scorecard`,
   `## Summary` and `## Latest full output` (replaced on every run; every other section is kept).

`--quick` is the CI variant: accuracy scenarios 1, 4, 11, 16 once, the short daemon load, a short
overhead run; it exits 1 when a detection FAILs and does not touch docs/BENCHMARKS.md unless
`--write` is given.
"""

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from bench import accuracy

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "BENCHMARKS.md"
OWN_SECTIONS = ("## Accuracy scorecard", "## Summary", "## Latest full output")


def machine() -> str:
    distro = ""
    try:
        distro = re.search(r'PRETTY_NAME="([^"]+)"', Path("/etc/os-release").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    model = ""
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()} CPUs ({model}), {mem:.0f} GiB, kernel {platform.release()}, {distro}, "
            f"Python {platform.python_version()}; {time.strftime('%Y-%m-%d %H:%M %Z')}")


def run_module(module: str, args: List[str], log) -> str:
    """Runs `python3 -m bench.MODULE ARGS` and returns its stdout (echoed as it comes)."""
    log(f"\n=== python3 -m bench.{module} {' '.join(args)}")
    began = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log(line.rstrip("\n"))
    proc.wait()
    log(f"=== bench.{module}: exit {proc.returncode} after {time.monotonic() - began:.0f} s")
    return "".join(lines) + ("" if proc.returncode == 0 else f"\n(exit status {proc.returncode})\n")


def table_rows(text: str, after: str) -> List[List[str]]:
    """Cells of the first markdown table following the line that contains `after`."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if after in line:
            rows = []
            for row in lines[i + 1:]:
                if row.startswith("|"):
                    if not set(row) <= set("|-: "):
                        rows.append([c.strip() for c in row.strip("|").split("|")])
                elif rows:
                    break
            return rows[1:]  # without the header
    return []


def summary(acc: Optional[dict], outputs: Dict[str, str]) -> str:
    rows = []
    if acc:
        runs = [(s, r) for s in acc["scenarios"] for r in s["runs"]]
        na = [s["number"] for s in acc["scenarios"] if "na" in s and not s["runs"]]
        scen = [s for s in acc["scenarios"] if s["runs"]]

        def count(key, grade):
            return sum(all(r[key] == grade for r in s["runs"]) for s in scen)
        rows.append(("Accuracy: detection", f"{count('detection', 'PASS')} of {len(scen)} scenarios PASS in every "
                     f"repeat ({len(runs)} runs; N/A: {na or 'none'})", "all PASS"))
        rows.append(("Accuracy: bytes", f"{count('bytes', 'PASS')} of {len(scen)} scenarios within ±1 % in every "
                     "repeat", "all PASS"))
        if acc.get("nethogs"):
            nh = sum(all(r.get("nethogs", {}).get("detection") == "PASS" for r in s["runs"]) for s in scen)
            nb = sum(all(r.get("nethogs", {}).get("bytes") == "PASS" for r in s["runs"]) for s in scen)
            rows.append((f"nethogs {acc['nethogs']}, same scenarios", f"detection PASS in {nh}, bytes PASS in {nb} "
                         f"of {len(scen)}", "–"))
    over = outputs.get("overhead", "")
    for cells in table_rows(over, "**Throughput"):
        if len(cells) >= 8:
            rows.append((f"Throughput ratio, {cells[0]}", f"{cells[3]} (per round {cells[4]})",
                         f"{cells[6]}: {cells[7]}"))
        if len(cells) >= 10:
            rows.append((f"nethogs on the same workload, {cells[0]}", f"{cells[8]} (per round {cells[9]})",
                         "picosnitch ≥ nethogs: " + ("yes" if float(cells[3]) >= float(cells[8]) else "no")))
    for cells in table_rows(over, "**Load time"):
        if len(cells) >= 6:
            rows.append(("BPF load time (max of runs)", cells[3], f"{cells[4]}: {cells[5]}"))
    load = outputs.get("daemon_load", "")
    wanted = {"Daemon CPU idle": "< 0.5 %", "Daemon PSS idle": "< 40 MB", "Daemon CPU during storm": "–",
              "Daemon PSS storm (max / end / after catch-up)": "< 40 MB", "Storm rate with daemon": "–",
              "Daemon PSS settled (30 s after catch-up)": "< 40 MB",
              "Storm connections accounted (by local port)": "100 %", "Storm bytes accounted (client send)": "100 %",
              "Short-lived: attributed with verified sha256": "100 %"}
    for cells in table_rows(load, "| Figure | Result"):
        if cells and cells[0] in wanted:
            rows.append((cells[0], cells[1], wanted[cells[0]]))
    view = outputs.get("view_queries", "")
    m = re.findall(r"^(\S+)\s+(\d+)\s+(\d+),\s+(\d+)\s+(\d+)$", view, re.M)
    if m:
        worst_first = max(int(x[1]) for x in m)
        worst_switch = max(int(x[3]) for x in m)
        rows.append(("UI (`view`) on 10 M rows: first screen, worst range", f"{worst_first} ms", "< 200 ms"))
        rows.append(("UI (`view`) on 10 M rows: tab switch, worst", f"{worst_switch} ms", "< 200 ms"))
    if not rows:
        return "(nothing measured)\n"
    return "| figure | result | target |\n|---|---|---|\n" + "".join(f"| {a} | {b} | {c} |\n" for a, b, c in rows)


def replace_sections(doc: str, sections: Dict[str, str]) -> str:
    """Replaces (or adds) each `## Title` section, keeping every other one. Order: the
    introduction, the summary and scorecard, the hand-written sections about accuracy (their
    explanations), every other kept section, and the raw output last."""
    parts = re.split(r"(?m)^(?=## )", doc)
    head, body = parts[0], parts[1:]
    kept = [p.rstrip() + "\n\n" for p in body if not any(p.startswith(t + "\n") or p.rstrip() == t
                                                         for t in sections)]
    new = {title: f"{title}\n\n{text.strip()}\n\n" for title, text in sections.items()}
    first = [new[t] for t in ("## Summary", "## Accuracy scorecard") if t in new]
    last = [text for t, text in new.items() if t not in ("## Summary", "## Accuracy scorecard")]
    about = [p for p in kept if p.startswith("## Accuracy")]
    rest = [p for p in kept if not p.startswith("## Accuracy")]
    return head + "".join(first + about + rest + last).rstrip() + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--write", action="store_true", help="with --quick, still write docs/BENCHMARKS.md")
    p.add_argument("--no-write", action="store_true", help="do not write docs/BENCHMARKS.md")
    p.add_argument("--no-install", action="store_true")
    p.add_argument("--skip", default="", help="comma-separated: accuracy,overhead,daemon_load,view_queries,dash")
    p.add_argument("--repeats", type=int, help="accuracy repeats (default 3; 1 with --quick)")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("the benchmarks load BPF programs and create namespaces: run as root (sudo python3 -m bench)",
              file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    log = lambda text: print(text, flush=True)  # noqa: E731
    if not args.no_install:
        subprocess.run([str(REPO / "scripts" / "install-system-deps.sh"), "test"], check=True)
        missing = accuracy.ensure_packages(["nethogs", "busybox-static"])
        if missing:
            log(f"could not install {missing}: the nethogs column / container scenario will say so")
    subprocess.run(["make", "-s", "-C", str(REPO / "picosnitch" / "kernel" / "bpf")], check=True)
    header = machine()
    log(f"machine: {header}")

    outputs: Dict[str, str] = {}
    acc = None
    if "accuracy" not in skip:
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            acc_args = ["--no-install", "--json", out.name]
            acc_args += ["--quick"] if args.quick else []
            acc_args += ["--repeats", str(args.repeats)] if args.repeats else []
            outputs["accuracy"] = run_module("accuracy", acc_args, log)
            try:
                acc = json.loads(Path(out.name).read_text())
            except (OSError, ValueError):
                acc = None
    if "overhead" not in skip:
        peer = ["--peer", "nethogs"] if shutil.which("nethogs") else []
        outputs["overhead"] = run_module("overhead", ["--markdown", *peer] + (["--rounds", "2", "--seconds", "2"]
                                                                              if args.quick else []), log)
    if "daemon_load" not in skip:
        outputs["daemon_load"] = run_module("daemon_load", ["--quick"] if args.quick else [], log)
    if "view_queries" not in skip and not args.quick:
        outputs["view_queries"] = run_module("view_queries", [], log)
    if "dash" not in skip and (REPO / "bench" / "dash.py").exists() and not args.quick:
        outputs["dash"] = run_module("dash", [], log)

    scorecard = f"Measured {header}. Command: `sudo python3 -m bench{' --quick' if args.quick else ''}`.\n\n"
    scorecard += accuracy.markdown(acc) if acc else "(accuracy not run)\n"
    summ = summary(acc, outputs)
    log("\n## Summary\n\n" + summ + "\n## Accuracy scorecard\n\n" + scorecard)

    if not args.no_write and (not args.quick or args.write):
        raw = "\n".join(f"### python3 -m bench.{name}\n\n```\n{text.strip()}\n```\n" for name, text in outputs.items()
                        if name != "accuracy")
        doc = DOC.read_text() if DOC.exists() else "# Benchmarks\n\n"
        DOC.write_text(replace_sections(doc, {
            "## Summary": f"Latest `python3 -m bench` run: {header}.\n\n" + summ,
            "## Accuracy scorecard": scorecard,
            "## Latest full output": raw or "(only accuracy was run)",
        }))
        log(f"wrote {DOC}")
    failed = acc and any(r["detection"] in ("FAIL", "ERROR") for s in acc["scenarios"] for r in s["runs"])
    return 1 if args.quick and failed else 0


if __name__ == "__main__":
    sys.exit(main())
