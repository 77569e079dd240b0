"""Names found per kind of resolver, and wrong names (target 0), against the real daemon.

    sudo python3 -m bench.names [--rounds 5] [--markdown]

Each round runs every kind of client of tests/name_lab.py at once (C library, curl, its own DNS
client, statically linked musl, musl in another root and network namespace, two clients resolving
different names to one address at the same moment, a local stub resolver, TLS SNI only, HTTP Host
only, and a client that names nothing), each with names of its own round, all to one address. A
connection row is right when its domain is the name that client used, wrong when it is any other
name (or any name at all, for the client that named nothing), and unnamed when empty. Prints
figures; asserts nothing.
"""

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from daemon_harness import Daemon, wait_for  # noqa: E402
from name_lab import KINDS, NameLab, available, tag  # noqa: E402
from netlab import PEER4, NetLab  # noqa: E402


def reversed_name(name: str) -> str:
    return ".".join(reversed(name.split(".")))


def score(names: NameLab, rows: list, rounds: int) -> dict:
    """kind -> Counter of right / wrong / unnamed rows, and the sources seen."""
    results = {}
    for kind in KINDS:
        counts: Counter = Counter()
        sources: Counter = Counter()
        for r in range(rounds):
            for row in names.rows_of(rows, kind, r):
                expected = "" if kind == "plain" else reversed_name(tag(kind, r))
                verdict = "unnamed" if not row["domain"] else "right" if row["domain"] == expected else "wrong"
                counts[verdict] += 1
                sources[row["domain_source"] or "-"] += 1
            if kind == "plain":
                break  # the same command line every round: its rows were all read at once
        results[kind] = (counts, sources)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.names", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root: the benchmark runs the daemon and a network namespace")
    if not available():
        sys.exit("needs dnsmasq-base and musl-tools: apt-get install dnsmasq-base musl-tools")
    with tempfile.TemporaryDirectory(prefix="picosnitch-names-") as tmp, NetLab() as lab:
        names = NameLab(lab, Path(tmp), args.rounds).start()
        daemon = Daemon(Path(tmp) / "prefix").start()
        try:
            for r in range(args.rounds):
                names.run(r)
                print(f"  round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
            wait_for(lambda: len({row["cmdline"] for row in daemon.rows("raddr = ? AND rport = ?",
                                                                       (PEER4, names.port))})
                     >= (len(KINDS) - 1) * args.rounds + 1, timeout=60, what="every client's rows")
            time.sleep(1.5)
        finally:
            daemon.stop()
            names.stop()
        results = score(names, daemon.rows("raddr = ? AND rport = ?", (PEER4, names.port)), args.rounds)
    header = ["client", "rows", "named right", "named wrong", "unnamed", "domain_source"]
    table = [[kind, str(sum(c.values())), str(c["right"]), str(c["wrong"]), str(c["unnamed"]),
              ", ".join(f"{s} {n}" for s, n in s_.most_common())] for kind, (c, s_) in results.items()]
    wrong = sum(c["wrong"] for c, _ in results.values())
    print(f"\nNames per kind of resolver: {args.rounds} rounds, every client at once, all to one address; "
          f"wrong names: {wrong} (target 0)")
    widths = [max(len(x) for x in col) for col in zip(header, *table)]
    for row in [header, ["-" * w for w in widths]] + table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    if args.markdown:
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for row in table:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
