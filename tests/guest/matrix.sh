#!/bin/sh
# Runs inside a kernel-matrix guest (tests/guests.py boots it): the host's root is shared read-only
# over 9p, RESULTS read-write. Everything this guest has to say goes into RESULTS as files, since
# vng's exit status says nothing; "done" is written last, so its absence means the guest died.
#
#   matrix.sh tests RESULTS   the kernel-monitor tests (junit XML) and the quick accuracy suite
#   matrix.sh bench RESULTS   the full accuracy scorecard and bench.overhead (docs/BENCHMARKS.md)
#
# On a 9p root SQLite's WAL fails (no shared mmap) and so do fanotify marks: every test and daemon
# keeps its files under TMPDIR, on the guest's /run (a tmpfs). Not a tmpfs over /tmp: the tree
# under test may itself live below /tmp (a CI clone), and would vanish.
set -u
mode=$1
results=$2
repo=$(cd "$(dirname "$0")/../.." && pwd)
python=$repo/.venv/bin/python

mkdir -p -m 1777 /run/psn-tmp
# PICOSNITCH_IN_GUEST: tests/host_guard.py stands down, the host's root being shared live and read-only.
export TMPDIR=/run/psn-tmp PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$repo PICOSNITCH_IN_GUEST=1
cd "$repo" || exit 1

uname -r >"$results/uname"
"$python" - >"$results/features.txt" 2>&1 <<'EOF'
import os
print("sock tracepoints:", os.path.isdir("/sys/kernel/tracing/events/sock")
      and sorted(e for e in os.listdir("/sys/kernel/tracing/events/sock") if "length" in e))
print("btf:", os.path.exists("/sys/kernel/btf/vmlinux"))
EOF

# step NAME COMMAND...: runs one step, keeps its output and exit status, times it.
step() {
    name=$1
    shift
    start=$(date +%s)
    "$@" >"$results/$name.log" 2>&1
    echo $? >"$results/$name.rc"
    echo $(($(date +%s) - start)) >"$results/$name.seconds"
}

# What the monitor leaves out on this kernel and why, with libbpf's last words (the verifier's
# log of a refused program): the first thing to read when a guest fails.
step load "$python" - <<'EOF'
from picosnitch.kernel.monitor import KernelMonitor
refused = getattr(KernelMonitor, "_refused", None)
if refused:  # libbpf's whole message for a refused program: the verifier's log
    def tell(self, log, disabled):
        print("refused:", log[-30000:])
        return refused(self, log, disabled)
    KernelMonitor._refused = tell
monitor = KernelMonitor()
for d in monitor.start():
    print(f"degraded: {d.hook}: {d.consequence} ({d.reason})")
print(f"loaded in {monitor.load_seconds:.2f} s")
monitor.close()
EOF

case $mode in
tests)
    step kernel_monitor "$python" -m pytest -p no:cacheprovider -rA --junitxml="$results/kernel_monitor.xml" \
        tests/test_kernel_monitor.py tests/test_guard_owners.py
    step accuracy "$python" -m bench.accuracy --quick --markdown --json "$results/accuracy.json"
    ;;
bench)
    step accuracy "$python" -m bench.accuracy --no-install --no-nethogs --repeats 1 --markdown \
        --json "$results/accuracy.json"
    step overhead "$python" -m bench.overhead --markdown --rounds 3 --seconds 2
    ;;
*)
    echo "unknown mode $mode" >"$results/error"
    ;;
esac
date -u +%FT%TZ >"$results/done"
