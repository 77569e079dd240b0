"""The dashboard's Guard tab: pending prompts answered over HTTP and in headless Chromium,
verdicts listed; POST is refused everywhere else and without the answer header."""

import json
import time

import pytest
from dash_harness import DashServer
from guard_harness import PYTHON, GuardRun, client, peer_lab
from netlab import PEER4
from test_dash_browser import browser, shot  # noqa: F401  (a fixture)

pytest.importorskip("starlette")


@pytest.fixture(scope="module")
def lab(lab):
    yield from peer_lab(lab, [PEER4])


def post(dash, body, headers=None):
    import http.client
    conn = http.client.HTTPConnection(dash.host, dash.port, timeout=30)
    conn.request("POST", "/api/guard/answer", body=json.dumps(body),
                 headers={"Host": f"{dash.host}:{dash.port}", "Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    result = response.status, json.loads(response.read() or b"{}") if response.status != 405 else {}
    conn.close()
    return result


def wait_pending(dash, count, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = dash.api("guard")
        if len(result["pending"]) == count:
            return result
        time.sleep(0.1)
    raise AssertionError(result)


def test_pending_prompts_are_listed_and_answered_over_http(lab, tmp_path):
    port = lab.peer.ports[PEER4]
    with GuardRun(tmp_path, lab, ""):
        dash = DashServer(tmp_path)
        try:
            assert dash.api("guard")["pending"] == []
            proc = client("tcp", PEER4, port, timeout=30, wait=False)
            prompt = wait_pending(dash, 1)["pending"][0]
            assert (prompt["exe"], prompt["raddr"], prompt["rport"]) == (PYTHON, PEER4, port)
            assert post(dash, {"id": prompt["id"], "action": "allow"})[0] == 405  # no answer header
            status, reply = post(dash, {"id": prompt["id"], "action": "allow", "duration": "once"},
                                 {"X-Picosnitch-Answer": "1"})
            assert (status, reply) == (200, {"type": "answered", "id": prompt["id"]})
            assert proc.communicate(timeout=20)[0].strip() == "ok hi"
            status, reply = post(dash, {"id": prompt["id"], "action": "allow"}, {"X-Picosnitch-Answer": "1"})
            assert status == 409 and "no longer open" in reply["error"]
            time.sleep(1.5)
            rows = dash.api("guard")["verdicts"]
            assert [(r["exe"], r["verdict"], r["reason"]) for r in rows] == [(PYTHON, "allowed", "user")]
        finally:
            dash.close()


def test_the_guard_tab_answers_in_the_browser(lab, tmp_path, browser):  # noqa: F811
    port = lab.peer.ports[PEER4]
    with GuardRun(tmp_path, lab, ""):
        dash = DashServer(tmp_path)
        try:
            browser.get(dash.url)
            browser.find_element("id", "tab-guard").click()
            proc = client("udp", PEER4, port, timeout=30, wait=False)
            deadline = time.monotonic() + 15
            while not browser.find_elements("css selector", "#guard-pending tbody tr"):
                assert time.monotonic() < deadline, browser.find_element("id", "guard-note").text
                time.sleep(0.2)
            row = browser.find_element("css selector", "#guard-pending tbody tr")
            assert PYTHON in row.text and PEER4 in row.text and "udp" in row.text
            shot(browser, "guard-tab.png")
            row.find_element("xpath", ".//button[text()='Deny']").click()
            assert proc.communicate(timeout=20)[0].strip() == "refused"
            deadline = time.monotonic() + 15
            while "denied" not in browser.find_element("id", "guard-verdicts").text:
                assert time.monotonic() < deadline
                time.sleep(0.2)
        finally:
            dash.close()
