"""How fast `picosnitch dash` answers on a large snitch.db.

Uses the 10-million-row database of bench/view_queries.py (generated once, cached under
/var/tmp), starts the real `picosnitch dash` on it (127.0.0.1, a free port), and measures:

- API latency over HTTP (a new connection per request, as a page's fetch may make): the 7-day
  breakdown by executable (`/api/series?dim=exe&range=week`, the target) and, for comparison,
  other ranges and dimensions and the value table (`/api/values`);
- time until the page shows its charts: headless Chromium opens the page afresh (from
  about:blank), and the page records performance.now() (milliseconds since navigation start)
  when both charts are drawn; for the default range (hour) and for a week.

    python3 -m bench.dash [--rows N] [--db PATH] [--requests N] [--loads N]
"""

import argparse
import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import view_queries as bench_view

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-quic", "--window-size=1400,1200")


def percentile(values: list, p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_dash(db: str):
    prefix = Path(tempfile.mkdtemp(prefix="psdash-bench-"))
    data = prefix / "var" / "lib" / "picosnitch"
    data.mkdir(parents=True)
    os.symlink(os.path.abspath(db), data / "snitch.db")
    port = free_port()
    env = dict(os.environ, PICOSNITCH_PREFIX=str(prefix), HOST="127.0.0.1", PORT=str(port),
               PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "picosnitch", "dash"], env=env,
                            stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    for _ in range(200):
        try:
            get(port, "/api/meta")
            break
        except OSError:
            time.sleep(0.05)
    return proc, port, prefix


def get(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path, headers={"Host": f"127.0.0.1:{port}"})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    if response.status != 200:
        raise RuntimeError(f"{path}: {response.status} {body[:200]!r}")
    return body


def time_api(port: int, path: str, n: int) -> list:
    get(port, path)  # warm: the first request also warms SQLite's page cache
    times = []
    for _ in range(n):
        start = time.perf_counter()
        get(port, path)
        times.append((time.perf_counter() - start) * 1000)
    return times


def time_page(port: int, fragments: list, loads: int) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="psdash-bench-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in CHROMIUM_FLAGS + (f"--user-data-dir={profile}",):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    results = {}
    try:
        for fragment in fragments:
            times = []
            for i in range(loads + 1):
                driver.get("about:blank")
                driver.get(f"http://127.0.0.1:{port}/#{fragment}")
                deadline = time.monotonic() + 60
                while True:
                    charted = driver.execute_script(
                        "return document.body && document.body.dataset.charted ? "
                        "window.picosnitchDash.chartedAt : null")
                    if charted is not None:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("the page never drew its charts")
                    time.sleep(0.01)
                if i:  # the first load warms the browser and the server
                    times.append(charted)
            results[fragment] = times
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--db")
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    path = args.db or bench_view.DEFAULT_DB.format(rows=args.rows)
    if not os.path.exists(path):
        print(f"generating {args.rows} rows into {path} (once; cached) ...", flush=True)
        bench_view.generate(path, args.rows)
    print(f"database: {path} ({os.path.getsize(path) / 1e9:.2f} GB)")
    proc, port, prefix = start_dash(path)
    try:
        print(f"\nAPI latency, ms over HTTP ({args.requests} requests each after one warm-up)")
        print("| request | p50 | p95 | max |\n| --- | ---: | ---: | ---: |")
        cases = [("series", "exe", "week", args.requests)]
        cases += [("series", "exe", r, max(args.requests // 5, 5))
                  for r in ("hour", "day", "month", "all")]
        cases += [("series", d, "week", max(args.requests // 5, 5))
                  for d in ("pexe", "uid", "raddr", "domain", "rport")]
        cases += [("values", "exe", r, max(args.requests // 5, 5)) for r in ("hour", "week")]
        for endpoint, dim, range_name, n in cases:
            query = f"/api/{endpoint}?dim={dim}&range={range_name.replace(' ', '%20')}"
            times = time_api(port, query, n)
            print(f"| `{query}` | {statistics.median(times):.0f} | {percentile(times, 95):.0f} "
                  f"| {max(times):.0f} |", flush=True)
        fragments = ["dim=exe&range=hour", "dim=exe&range=week"]
        print(f"\ntime until the page shows both charts, ms since navigation start "
              f"({args.loads} fresh loads each after one warm-up)")
        print("| page | p50 | p95 | max |\n| --- | ---: | ---: | ---: |")
        for fragment, times in time_page(port, fragments, args.loads).items():
            print(f"| `/#{fragment}` | {statistics.median(times):.0f} | "
                  f"{percentile(times, 95):.0f} | {max(times):.0f} |", flush=True)
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(prefix, ignore_errors=True)


if __name__ == "__main__":
    main()
