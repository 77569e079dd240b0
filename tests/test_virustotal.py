"""VirusTotal checks against a real HTTP server on 127.0.0.1 playing VirusTotal's API v3, with
the real VT worker (root side + checker running as nobody) fed through real pipes."""

import hashlib
import json
import multiprocessing
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("requests")
from picosnitch import channels  # noqa: E402
from picosnitch import config as config_module  # noqa: E402
from picosnitch.alerts import virustotal, vt_worker  # noqa: E402
from picosnitch.alerts.record_keeper import SHA256_BY_EXE, RecordKeeper, record_result  # noqa: E402
from picosnitch.alerts.vt_worker import UPLOADED  # noqa: E402
from picosnitch.messages import ErrorReport, Stop, VtRequest, VtResult  # noqa: E402

try:  # the private session bus and notification server, for the test through the daemon
    from test_notifications import desktop_user, server  # noqa: E402,F401 - fixtures
except pytest.skip.Exception:  # no jeepney
    @pytest.fixture
    def desktop_user():
        pytest.skip("needs jeepney")
    server = desktop_user

LIMIT = 0.4  # "VT request limit (seconds)" in these tests
NOBODY = 65534
_ctx = multiprocessing.get_context("fork")


def stats(malicious=0, suspicious=0, undetected=60):
    return {"data": {"type": "file", "attributes": {"last_analysis_stats": {
        "malicious": malicious, "suspicious": suspicious, "undetected": undetected,
        "harmless": 0, "timeout": 0}}}}


def test_statuses_from_analysis_stats():
    assert virustotal.status_from_stats(stats()["data"]["attributes"]["last_analysis_stats"]) \
        == "clean: 0 malicious and 0 suspicious of 60 engines"
    assert virustotal.status_from_stats({"malicious": 0, "suspicious": 2, "undetected": 3}) \
        == "suspicious: 0 malicious and 2 suspicious of 5 engines"
    assert virustotal.status_from_stats({}) == virustotal.PENDING
    assert virustotal.is_flagged("malicious: 1 malicious and 0 suspicious of 9 engines")
    assert not virustotal.is_flagged("clean: 0 malicious and 0 suspicious of 9 engines")
    with pytest.raises(virustotal.VtError):
        virustotal.status_from_stats({"malicious": "many"})


def uid_of_client(client_port, server_port):
    """The uid owning the client end of a loopback TCP connection, from /proc/net/tcp."""
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            local, remote = fields[1].split(":")[1], fields[2].split(":")[1]
            if int(local, 16) == client_port and int(remote, 16) == server_port:
                return int(fields[7])
    return None


class FakeVirusTotal:
    """Answers /files/<sha256> from a script: per hash, a list of (status, json, delay) used
    in turn (the last one repeats). Uploads are POSTs to /files. Every request is logged."""

    def __init__(self):
        self.script = {}
        self.requests = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body, delay=0.0):
                time.sleep(delay)
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client gave up waiting
                    pass

            def _log(self, body=b""):
                fake.requests.append({
                    "at": time.monotonic(), "method": self.command, "path": self.path,
                    "key": self.headers.get("x-apikey"), "body": body,
                    "uid": uid_of_client(self.client_address[1], self.server.server_port)})

            def do_GET(self):
                self._log()
                sha256 = self.path.rsplit("/", 1)[1]
                answers = fake.script.get(sha256, [(404, {"error": {"code": "NotFoundError"}})])
                self._answer(*(answers.pop(0) if len(answers) > 1 else answers[0]))

            def do_POST(self):
                self._log(self.rfile.read(int(self.headers["Content-Length"])))
                self._answer(200, {"data": {"type": "analysis", "id": "x"}})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/api/v3" % self.server.server_port
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_vt():
    if os.geteuid() != 0:
        pytest.skip("needs root: the checker drops to nobody")
    fake = FakeVirusTotal()
    yield fake
    fake.close()


class Worker:
    """The real VT worker in its own process; results are applied as the keeper will."""

    def __init__(self, tmp_path, url, upload=False):
        cfg = config_module.parse(json.dumps({
            "VT API key": "test-key", "VT API URL": url, "VT file upload": upload,
            "VT request limit (seconds)": LIMIT}))
        self.keeper = RecordKeeper(tmp_path / "record.json", tmp_path / "exe.log")
        inbox, self.to_worker = channels.pair(sender_waits=True)
        self.from_worker, outbox = channels.pair()
        self.process = _ctx.Process(target=vt_worker.run, args=(cfg, inbox, outbox), kwargs={
            "timeout": (2.0, 0.5), "retry_base": 0.5, "analysis_wait": 0.3})
        self.process.start()
        self.results, self.errors = [], []

    def ask(self, exe, sha256, name="prog"):
        self.keeper.observe(str(exe), name, sha256)
        self.to_worker.send(VtRequest(str(exe), name, sha256))

    def collect(self, results, timeout=15.0):
        """Read from the worker until `results` VtResults have arrived (or `timeout`)."""
        deadline = time.monotonic() + timeout
        while len(self.results) < results and self.from_worker.poll(
                max(deadline - time.monotonic(), 0)):
            message = self.from_worker.recv()
            if isinstance(message, VtResult):
                record_result(self.keeper, message)
                self.results.append(message)
            else:
                self.errors.append(message)
        return self.results

    def stop(self):
        self.to_worker.send(Stop("keeper"))
        self.process.join(20)
        assert self.process.exitcode == 0
        self.keeper.save()


@pytest.fixture
def start_worker(tmp_path, fake_vt):
    made = []

    def start(upload=False):
        made.append(Worker(tmp_path, fake_vt.url, upload))
        return made[-1]
    yield start
    for worker in made:
        if worker.process.is_alive():
            worker.stop()


def program(tmp_path, name, content):
    """A file only root can read (tmp_path is 0700), and its sha256."""
    path = tmp_path / name
    path.write_bytes(content)
    return path, hashlib.sha256(content).hexdigest()


def test_clean_and_malicious_verdicts_land_in_record_and_exe_log(tmp_path, fake_vt,
                                                                start_worker):
    clean_exe, clean_sha = program(tmp_path, "clean", b"clean program")
    bad_exe, bad_sha = program(tmp_path, "bad", b"bad program")
    fake_vt.script = {clean_sha: [(200, stats())], bad_sha: [(200, stats(malicious=7))]}
    worker = start_worker()
    worker.ask(clean_exe, clean_sha, "cleanprog")
    worker.ask(bad_exe, bad_sha, "badprog")
    worker.ask(tmp_path / "copy-of-bad", bad_sha, "copy")  # same hash: asked once, told twice
    results = worker.collect(3)
    worker.stop()

    clean_status = "clean: 0 malicious and 0 suspicious of 60 engines"
    bad_status = "malicious: 7 malicious and 0 suspicious of 67 engines"
    assert sorted((r.exe, r.status) for r in results) == sorted([
        (str(clean_exe), clean_status), (str(bad_exe), bad_status),
        (str(tmp_path / "copy-of-bad"), bad_status)])
    assert [r["path"] for r in fake_vt.requests] == [
        "/api/v3/files/" + clean_sha, "/api/v3/files/" + bad_sha]
    assert {r["key"] for r in fake_vt.requests} == {"test-key"}
    assert {r["uid"] for r in fake_vt.requests} == {NOBODY}  # never root on the network
    assert fake_vt.requests[1]["at"] - fake_vt.requests[0]["at"] >= LIMIT - 0.01

    record = json.loads((tmp_path / "record.json").read_text())[SHA256_BY_EXE]
    assert record[str(clean_exe)] == {clean_sha: clean_status}
    assert record[str(bad_exe)] == {bad_sha: bad_status}
    log = (tmp_path / "exe.log").read_text()
    assert ", virustotal, badprog, %s, %s, malicious: 7 malicious and 0 suspicious of 67 " \
           "engines\n" % (bad_exe, bad_sha) in log
    assert worker.errors == []


def test_unknown_hash_is_not_uploaded_when_upload_is_off(tmp_path, fake_vt, start_worker):
    exe, sha = program(tmp_path, "new", b"never seen by VirusTotal")
    worker = start_worker(upload=False)
    worker.ask(exe, sha)
    result, = worker.collect(1)
    worker.stop()
    assert result.status == virustotal.UNKNOWN
    assert [r["method"] for r in fake_vt.requests] == ["GET"]


def test_unknown_hash_is_uploaded_when_allowed_and_checked_again(tmp_path, fake_vt,
                                                                start_worker):
    exe, sha = program(tmp_path, "new", b"\x7fELF uploaded content")
    fake_vt.script = {sha: [(404, {}), (200, stats(suspicious=1))]}
    worker = start_worker(upload=True)
    worker.ask(exe, sha)
    first, second = worker.collect(2)
    worker.stop()
    assert (first.status, second.status) == (
        UPLOADED, "suspicious: 0 malicious and 1 suspicious of 61 engines")
    get, post, recheck = fake_vt.requests
    assert (get["method"], post["method"], recheck["method"]) == ("GET", "POST", "GET")
    assert post["path"] == "/api/v3/files" and b"\x7fELF uploaded content" in post["body"]
    assert post["uid"] == NOBODY  # the file was opened by root and handed over
    assert post["at"] - get["at"] >= LIMIT - 0.01 and recheck["at"] - post["at"] >= LIMIT - 0.01
    record = json.loads((tmp_path / "record.json").read_text())[SHA256_BY_EXE]
    assert record[str(exe)][sha].startswith("suspicious")


def test_a_file_changed_since_hashing_is_not_uploaded(tmp_path, fake_vt, start_worker):
    exe, sha = program(tmp_path, "changed", b"original")
    exe.write_bytes(b"replaced")
    worker = start_worker(upload=True)
    worker.ask(exe, sha)
    result, = worker.collect(1)
    worker.stop()
    assert result.status == "not checked: cannot upload: the executable changed since it was " \
                            "hashed"
    assert [r["method"] for r in fake_vt.requests] == ["GET"]


def test_a_refused_key_is_reported_once_and_nothing_more_is_sent(tmp_path, fake_vt,
                                                                start_worker):
    exe, sha = program(tmp_path, "a", b"a")
    other, other_sha = program(tmp_path, "b", b"b")
    fake_vt.script = {sha: [(401, {"error": {"code": "WrongCredentialsError"}})]}
    worker = start_worker(upload=True)
    worker.ask(exe, sha)
    worker.ask(other, other_sha)
    assert worker.collect(1, timeout=3) == []
    worker.stop()
    assert worker.errors == [ErrorReport(
        "VirusTotal answered 401: it refused the API key; no more VirusTotal lookups until "
        "picosnitch restarts", "virustotal")]
    assert len(fake_vt.requests) == 1  # no upload on 401, and no further lookups


@pytest.mark.parametrize("failure", [(429, {"error": {"code": "QuotaExceededError"}}),
                                     (503, {}), (200, stats(), 1.5)], ids=["429", "503", "timeout"])
def test_transient_failures_are_retried_later_never_uploaded(tmp_path, fake_vt, start_worker,
                                                             failure):
    exe, sha = program(tmp_path, "a", b"a")
    fake_vt.script = {sha: [failure, (200, stats())]}
    worker = start_worker(upload=True)
    worker.ask(exe, sha)
    result, = worker.collect(1)
    worker.stop()
    assert result.status.startswith("clean")
    first, retry = fake_vt.requests
    assert first["method"] == retry["method"] == "GET"
    assert retry["at"] - first["at"] >= 0.5  # retry_base
    report, = worker.errors
    assert report.key == "virustotal: retry"
    assert report.message.startswith("VirusTotal lookup of %s failed (" % sha)


def test_a_checker_that_keeps_failing_turns_lookups_off_but_the_worker_stays(tmp_path, fake_vt):
    """Exiting would make the supervisor restart the worker into the same crash loop (and, after
    a few, stop the whole daemon): it reports once and keeps draining its inbox until Stop."""
    cfg = config_module.parse(json.dumps({"VT API key": "k", "VT API URL": fake_vt.url}))
    inbox, to_worker = channels.pair(sender_waits=True)
    from_worker, outbox = channels.pair()
    process = _ctx.Process(target=vt_worker.run, args=(cfg, inbox, outbox),
                           kwargs={"user": "no-such-user-psn"})  # every checker fails at once
    process.start()
    try:
        reports = []
        while from_worker.poll(10):
            reports.append(from_worker.recv().message)
            if "VirusTotal lookups are off" in reports[-1]:
                break
        assert reports == ["the VirusTotal checker stopped (status 1); restarting it"] * 3 + [
            "the VirusTotal checker keeps stopping (status 1); VirusTotal lookups are off"]
        for i in range(3):
            to_worker.send(VtRequest("/opt/x%d" % i, "x", "%064x" % i))
        time.sleep(0.5)
        assert process.is_alive() and not from_worker.poll(0)
        to_worker.send(Stop("keeper"))
        process.join(10)
        assert process.exitcode == 0
        assert fake_vt.requests == []
    finally:
        process.kill()  # (ignores SIGTERM, like every worker)
        process.join()


# ---------------------------------------------------------------- through the real daemon

def test_daemon_looks_up_new_programs_and_warns_of_a_malicious_one(tmp_path, fake_vt, netops,
                                                                   desktop_user, server):
    """The real daemon with "VT API key" set and "VT API URL" pointing at the fake: two never-seen
    programs connect; each hash is looked up once, as nobody; the verdicts land in record.json
    and exe.log; the malicious one is a desktop notification, the clean one is not."""
    from daemon_harness import Daemon
    from test_daemon_lifecycle import Sink, wait_for
    from test_notifications import drain, install, talk
    programs = tmp_path / "programs"
    programs.mkdir()
    bad = install(netops, programs, "psn-vt-bad", b"\0bad")
    clean = install(netops, programs, "psn-vt-clean", b"\0clean")
    bad_sha, clean_sha = (hashlib.sha256(open(p, "rb").read()).hexdigest() for p in (bad, clean))
    fake_vt.script = {bad_sha: [(200, stats(malicious=7))], clean_sha: [(200, stats())]}
    bad_status = "malicious: 7 malicious and 0 suspicious of 67 engines"
    clean_status = "clean: 0 malicious and 0 suspicious of 60 engines"
    sink = Sink()
    daemon = Daemon(tmp_path / "prefix", **{
        "VT API key": "test-key", "VT API URL": fake_vt.url, "VT request limit (seconds)": 0,
        "Desktop notification users": [desktop_user.name], "DB write limit (seconds)": 60})
    drain(server)
    try:
        with daemon:
            talk(bad, sink.port)
            talk(clean, sink.port)
            lines = {sha: ", virustotal, %s, %s, %s, %s" % (os.path.basename(exe), exe, sha, status)
                     for exe, sha, status in ((bad, bad_sha, bad_status),
                                              (clean, clean_sha, clean_status))}
            wait_for(lambda: daemon.paths.exe_log.exists() and all(
                line in daemon.paths.exe_log.read_text() for line in lines.values()),
                what="both verdicts in exe.log")
            warnings = wait_for(lambda: [c for c in drain(server)
                                         if c["summary"] == "picosnitch: VirusTotal warning"],
                                what="the VirusTotal warning")
            assert daemon.stop() == 0
    finally:
        sink.sock.close()
    warnings += [c for c in drain(server) if c["summary"] == "picosnitch: VirusTotal warning"]
    ours = [c for c in warnings if str(programs) in c["body"]]
    assert len(ours) == 1, warnings
    warning, = ours
    assert warning["body"] == "psn-vt-bad\n%s\n%s\nsha256 %s…" % (bad, bad_status, bad_sha[:15])
    assert warning["bus_uid"] == desktop_user.uid

    record = json.loads(daemon.paths.record.read_text())[SHA256_BY_EXE]
    assert record[bad] == {bad_sha: bad_status}
    assert record[clean] == {clean_sha: clean_status}
    asked = [r for r in fake_vt.requests if r["path"].endswith((bad_sha, clean_sha))]
    assert sorted(r["path"] for r in asked) == sorted(
        "/api/v3/files/" + sha for sha in (bad_sha, clean_sha))  # once each
    assert {(r["method"], r["key"], r["uid"]) for r in asked} == {("GET", "test-key", NOBODY)}
    assert "virustotal" not in daemon.error_log()
