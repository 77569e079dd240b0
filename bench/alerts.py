"""Alerts and their delivery: what the baseline costs per connection, and how long an event takes
from the keeper to a receiver.

    sudo python3 -m bench.alerts [--connections 200000] [--events 200]

- Baseline: Connections made in memory (200 programs, 500 registrable domains, 250 addresses,
  the system's Public Suffix List) go through alerts.baseline twice, while learning and after;
  the CPU time per connection is printed for each.
- Delivery: the real outlet worker (tests/test_outlet.py's harness) with a generic webhook and a
  syslog socket on loopback; each event is sent by the keeper's end of the pipe, and the time
  until the receiver has it is measured, one event at a time (latency) and as a burst (events a
  second).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from receivers import SyslogSocket, WebhookServer, shared_tempdir  # noqa: E402
from test_baseline import conn  # noqa: E402
from test_outlet import Outlet  # noqa: E402

from picosnitch.alerts.baseline import Baseline, Settings  # noqa: E402
from picosnitch.alerts.public_suffix import PublicSuffixList  # noqa: E402
from picosnitch.connection import ProcessInfo  # noqa: E402
from picosnitch.messages import Alert  # noqa: E402

DAY = 86400


def baseline_cost(count: int) -> tuple[float, float]:
    """CPU microseconds per connection, learning and learned."""
    psl = PublicSuffixList.load()
    baseline = Baseline(Settings(learning=DAY), psl.registrable, lambda address: "", lambda *_: False)
    programs = [ProcessInfo(f"/usr/bin/p{i}", f"p{i}", "", "a" * 64) for i in range(200)]
    connections = [conn(domain=f"com.example{j % 500}.www", raddr=f"192.0.2.{j % 250}", rport=443 + j % 3,
                        lport=40000 + j % 20000, process=programs[j % 200]) for j in range(count)]
    figures = []
    for now in (10, 2 * DAY):
        started = time.process_time()
        for connection in connections:
            baseline.observe(connection, now)
        figures.append((time.process_time() - started) / count * 1e6)
    return figures[0], figures[1]


def delivery(events: int) -> tuple[list[float], float, float]:
    """Seconds from the keeper's send to the webhook, one at a time; events a second of a burst
    to the webhook and to syslog."""
    hook, syslog = WebhookServer(), SyslogSocket()
    outlet = Outlet(shared_tempdir("picosnitch-bench-outlet-"), {
        "Webhook URL": f"http://127.0.0.1:{hook.port}/", "Syslog socket": syslog.path, "Event log": True})
    try:
        latencies = []
        for n in range(events):
            started = time.monotonic()
            outlet.send(Alert("new port", "/usr/bin/curl", "curl", "a" * 64, (f"{n}/tcp",), 1, time.time()))
            hook.wait_for(n + 1)
            latencies.append(hook.arrived[n] - started)
        started = time.monotonic()
        outlet.send(*[Alert("new port", "/usr/bin/curl", "curl", "a" * 64, (f"{n}/tcp",), 1, time.time())
                      for n in range(events)])
        hook.wait_for(2 * events, timeout=300)
        webhook_rate = events / (hook.arrived[-1] - started)
        syslog.wait_for(2 * events, timeout=300)
        syslog_rate = events / (time.monotonic() - started)
        return latencies, webhook_rate, syslog_rate
    finally:
        outlet.stop()
        hook.down()
        syslog.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python3 -m bench.alerts", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200_000)
    parser.add_argument("--events", type=int, default=200)
    args = parser.parse_args()
    learning, learned = baseline_cost(args.connections)
    print(f"baseline: {learning:.2f} µs CPU per connection while learning, {learned:.2f} µs after "
          f"({args.connections} connections, 200 programs)")
    latencies, webhook_rate, syslog_rate = delivery(args.events)
    ms = sorted(x * 1000 for x in latencies)
    print(f"delivery, keeper to webhook, one event at a time: median {statistics.median(ms):.1f} ms, "
          f"95th percentile {ms[int(len(ms) * 0.95) - 1]:.1f} ms, most {ms[-1]:.1f} ms ({len(ms)} events)")
    print(f"delivery, a burst of {args.events}: {webhook_rate:.0f} events/s to the webhook, "
          f"{syslog_rate:.0f} events/s to syslog (each stored with fsync first)")


if __name__ == "__main__":
    main()
