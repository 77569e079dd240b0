"""record.json, exe.log and error.log: what users read about the executables picosnitch saw."""

import json
import os
import re
import stat

from picosnitch.alerts.packages import Origin
from picosnitch.alerts.record_keeper import (
    EXES_BY_NAME,
    NAMES_BY_EXE,
    NEW_EXE,
    NEW_NAME,
    NEW_SHA256,
    PACKAGE_BY_SHA256,
    PARENT_EXES_BY_EXE,
    PARENT_NAMES_BY_NAME,
    SCRIPT,
    SHA256_BY_EXE,
    VT_NOT_CHECKED,
    ErrorLog,
    NewThing,
    RecordKeeper,
    load_record,
    record_to_json,
)
from picosnitch.sanitize import from_bytes

SHA_A = "a" * 64
SHA_B = "b" * 64
TIMESTAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"

# Names a process can give itself: terminal escapes, newlines, commas, NUL, C1 controls and
# bytes that are not UTF-8 (kept as surrogateescape'd str, as the kernel's bytes arrive).
HOSTILE = [
    "\x1b]0;owned\x07\x1b[2J",
    "two\nlines\r",
    "comma,separated",
    "nul\x00byte",
    "c1\x9bcsi",
    from_bytes(b"latin1 caf\xe9 \xff\xfe"),
    "plain café",
]


def keeper(tmp_path):
    return RecordKeeper(tmp_path / "record.json", tmp_path / "exe.log")


def test_first_sight_of_an_executable_is_one_new_thing(tmp_path):
    record = keeper(tmp_path)
    assert record.observe("/usr/bin/curl", "curl", SHA_A, "/usr/bin/bash", "bash") == [
        NewThing(NEW_EXE, "/usr/bin/curl", "curl", SHA_A)]
    assert record.observe("/usr/bin/curl", "curl", SHA_A, "/usr/bin/bash", "bash") == []


def test_a_new_name_or_a_new_hash_of_a_known_executable_is_new(tmp_path):
    record = keeper(tmp_path)
    record.observe("/usr/bin/python3.11", "python3", SHA_A)
    assert record.observe("/usr/bin/python3.11", "pip", SHA_A) == [
        NewThing(NEW_NAME, "/usr/bin/python3.11", "pip", SHA_A)]
    assert record.observe("/usr/bin/python3.11", "pip", SHA_B) == [
        NewThing(NEW_SHA256, "/usr/bin/python3.11", "pip", SHA_B)]


def test_a_script_is_recorded_like_an_executable_with_its_interpreter_as_parent(tmp_path):
    record = keeper(tmp_path)
    assert record.observe("/home/u/sync.py", "python3", SHA_A, "/usr/bin/python3.11", "python3", role=SCRIPT) == [
        NewThing(NEW_EXE, "/home/u/sync.py", "python3", SHA_A, SCRIPT)]
    assert record.observe("/home/u/sync.py", "python3.11", SHA_A, role=SCRIPT) == []  # interpreters' names: no news
    changed = record.observe("/home/u/sync.py", "python3", SHA_B, role=SCRIPT)
    assert [(t.kind, t.logged_kind()) for t in changed] == [(NEW_SHA256, "new script sha256")]
    assert record.as_dict()[PARENT_EXES_BY_EXE]["/home/u/sync.py"] == ["/usr/bin/python3.11"]
    log = (tmp_path / "exe.log").read_text()
    assert ", new script, python3, /home/u/sync.py, " in log and ", new script sha256, " in log


def test_a_changed_hash_says_whether_its_package_manager_put_it_there(tmp_path):
    installed = {SHA_A: Origin("curl", "8.5.0", True), SHA_B: Origin("curl", "8.6.0", True),
                 "c" * 64: Origin("curl", "8.6.0", False)}
    record = RecordKeeper(tmp_path / "record.json", tmp_path / "exe.log", lambda path, sha: installed.get(sha))
    record.observe("/usr/bin/curl", "curl", SHA_A)
    upgraded, = record.observe("/usr/bin/curl", "curl", SHA_B)
    assert upgraded.note == "updated by the package manager: curl 8.5.0 → 8.6.0"
    edited, = record.observe("/usr/bin/curl", "curl", "c" * 64)
    assert edited.note == "modified outside any package"
    assert record.as_dict()[PACKAGE_BY_SHA256] == {"/usr/bin/curl": {SHA_A: "curl 8.5.0", SHA_B: "curl 8.6.0"}}
    assert (tmp_path / "exe.log").read_text().splitlines()[-1].endswith(", modified outside any package")


def test_the_version_before_an_update_survives_a_restart(tmp_path):
    installed = {SHA_A: Origin("curl", "8.5.0", True), SHA_B: Origin("curl", "8.6.0", True)}
    first = RecordKeeper(tmp_path / "record.json", tmp_path / "exe.log", lambda path, sha: installed.get(sha))
    first.observe("/usr/bin/curl", "curl", SHA_A)
    first.save()
    again = RecordKeeper(tmp_path / "record.json", tmp_path / "exe.log", lambda path, sha: installed.get(sha))
    upgraded, = again.observe("/usr/bin/curl", "curl", SHA_B)
    assert upgraded.note == "updated by the package manager: curl 8.5.0 → 8.6.0"


def test_a_file_of_no_package_that_changes_was_modified_outside_any_package(tmp_path):
    record = RecordKeeper(tmp_path / "record.json", tmp_path / "exe.log", lambda path, sha: None)
    record.observe("/opt/tool", "tool", SHA_A)
    changed, = record.observe("/opt/tool", "tool", SHA_B)
    assert changed.note == "modified outside any package"


def test_a_first_hash_after_failed_hashing_is_recorded_quietly(tmp_path):
    record = keeper(tmp_path)
    record.observe("/usr/bin/gone", "gone", "")
    assert record.observe("/usr/bin/gone", "gone", SHA_A) == []
    assert record.as_dict()[SHA256_BY_EXE] == {"/usr/bin/gone": {SHA_A: VT_NOT_CHECKED}}


def test_record_json_lists_names_executables_parents_and_hashes(tmp_path):
    record = keeper(tmp_path)
    record.observe("/usr/bin/curl", "curl", SHA_A, "/usr/bin/bash", "bash")
    record.observe("/usr/bin/curl", "curl", SHA_A, "/usr/bin/zsh", "zsh")
    record.observe("/opt/curl", "curl", SHA_B, "/usr/bin/bash", "bash")
    record.set_vt_status("/usr/bin/curl", SHA_A, "harmless (0 of 70 engines)")
    assert record.save() is True
    assert json.loads((tmp_path / "record.json").read_text()) == {
        NAMES_BY_EXE: {"/opt/curl": ["curl"], "/usr/bin/curl": ["curl"]},
        EXES_BY_NAME: {"curl": ["/opt/curl", "/usr/bin/curl"]},
        PARENT_EXES_BY_EXE: {"/opt/curl": ["/usr/bin/bash"],
                             "/usr/bin/curl": ["/usr/bin/bash", "/usr/bin/zsh"]},
        PARENT_NAMES_BY_NAME: {"curl": ["bash", "zsh"]},
        SHA256_BY_EXE: {"/opt/curl": {SHA_B: VT_NOT_CHECKED},
                        "/usr/bin/curl": {SHA_A: "harmless (0 of 70 engines)"}},
    }
    assert stat.S_IMODE(os.stat(tmp_path / "record.json").st_mode) == 0o644


def test_save_writes_only_after_a_change_and_leaves_no_temporary_file(tmp_path):
    record = keeper(tmp_path)
    assert record.save() is False
    assert not (tmp_path / "record.json").exists()
    record.observe("/usr/bin/ssh", "ssh", SHA_A)
    assert record.save() is True
    inode = os.stat(tmp_path / "record.json").st_ino
    assert record.save() is False
    record.observe("/usr/bin/ssh", "ssh", SHA_A)  # nothing new
    record.set_vt_status("/usr/bin/ssh", SHA_A, VT_NOT_CHECKED)  # unchanged status
    assert record.save() is False
    record.set_vt_status("/usr/bin/ssh", SHA_A, "malicious (3 of 70 engines)")
    assert record.save() is True
    assert os.stat(tmp_path / "record.json").st_ino != inode  # replaced, never rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["exe.log", "record.json"]


def test_hostile_names_survive_the_round_trip_exactly(tmp_path):
    record = keeper(tmp_path)
    for index, name in enumerate(HOSTILE):
        record.observe("/tmp/" + name, name, "%064x" % index, "/parent/" + name, name + "'s parent")
    record.save()
    reloaded = keeper(tmp_path)
    assert reloaded.load_problem is None
    assert reloaded.as_dict() == record.as_dict()
    assert set(reloaded.as_dict()[EXES_BY_NAME]) == set(HOSTILE)
    assert reloaded.observe("/tmp/" + HOSTILE[0], HOSTILE[0], "%064x" % 0) == []


def test_record_json_is_valid_utf8_without_raw_control_characters(tmp_path):
    data = record_to_json({EXES_BY_NAME: {name: [] for name in HOSTILE}})
    text = data.decode("utf-8")  # strict: undecodable bytes are \\udcXX escapes, not raw bytes
    assert not re.search("[\x00-\x09\x0b-\x1f\x7f-\x9f]", text)
    assert "\\udcff" in text and "plain café" in text  # readable where it is safe to be
    assert set(json.loads(text)[EXES_BY_NAME]) == set(HOSTILE)


def test_exe_log_has_one_sanitised_line_per_new_thing(tmp_path):
    record = keeper(tmp_path)
    record.observe("/usr/bin/curl", "curl", SHA_A)
    record.observe("/usr/bin/curl", "curl", SHA_B)
    for name in HOSTILE:
        record.observe("/tmp/x", name, SHA_B)
    lines = (tmp_path / "exe.log").read_text(encoding="utf-8").split("\n")
    assert lines.pop() == ""
    assert len(lines) == 2 + len(HOSTILE)
    assert re.fullmatch(TIMESTAMP + ", new executable, curl, /usr/bin/curl, " + SHA_A, lines[0])
    assert re.fullmatch(TIMESTAMP + ", new sha256, curl, /usr/bin/curl, " + SHA_B, lines[1])
    assert lines[2].endswith(", new executable, \\x1b]0;owned\\x07\\x1b[2J, /tmp/x, " + SHA_B)
    assert lines[4].endswith(", new name, commaseparated, /tmp/x, " + SHA_B)
    assert lines[7].endswith(", new name, latin1 caf\\xe9 \\xff\\xfe, /tmp/x, " + SHA_B)
    for line in lines:
        assert line.count(",") == 4
        assert not re.search("[\x00-\x1f\x7f-\x9f\ud800-\udfff]", line)


def test_a_corrupt_record_is_moved_aside_and_reported(tmp_path):
    path = tmp_path / "record.json"
    path.write_text('{"Names by executable": {"/usr/bin/curl": ["cu')  # cut short by a crash
    record = keeper(tmp_path)
    aside = [name for name in os.listdir(tmp_path) if name.startswith("record.json.bad-")]
    assert len(aside) == 1 and re.fullmatch(r"record\.json\.bad-\d+", aside[0])
    assert (tmp_path / aside[0]).read_text().endswith('["cu')
    assert record.load_problem.startswith("%s could not be read (" % path)
    assert record.load_problem.endswith("moved it to %s and started a new record"
                                        % (tmp_path / aside[0]))
    assert record.as_dict()[NAMES_BY_EXE] == {}
    assert record.observe("/usr/bin/curl", "curl", SHA_A)[0].kind == NEW_EXE


def test_a_record_of_the_wrong_shape_is_moved_aside_too(tmp_path):
    for number, text in enumerate(['[]', '{"Names by executable": []}',
                                   '{"SHA256 by executable": {"/x": ["abc"]}}', ""]):
        (tmp_path / "record.json").write_text(text)
        record, problem = load_record(tmp_path / "record.json")
        assert record == {} and "moved it to" in problem
        assert not (tmp_path / "record.json").exists()
        assert len(list(tmp_path.glob("record.json.bad-*"))) == number + 1  # none overwritten


def test_a_missing_record_is_simply_empty(tmp_path):
    assert load_record(tmp_path / "record.json") == ({}, None)


def test_error_log_writes_one_line_per_error_with_a_timestamp(tmp_path):
    log = ErrorLog(tmp_path / "error.log")
    log.error("cannot hash /usr/bin/x: Permission denied")
    log.error("evil \x1b[2J\nname \udcff")
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert re.fullmatch(TIMESTAMP + " cannot hash /usr/bin/x: Permission denied", lines[0])
    assert lines[1].endswith(" evil \\x1b[2J\\x0aname \\xff")
    assert len(lines) == 2


class Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1_700_000_000.0

    def __call__(self):
        return self.now


def test_error_log_collapses_repeats_and_counts_them_on_flush(tmp_path):
    clock = Clock()
    log = ErrorLog(tmp_path / "error.log", window=60, clock=clock)
    for attempt in range(38):
        clock.now += 1
        log.error("ring buffer lost %d events" % attempt, key="ring buffer loss")
    log.error("a different problem")
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert [line[20:] for line in lines] == ["ring buffer lost 0 events", "a different problem"]
    log.flush()
    log.flush()  # nothing more to count
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert lines[2][20:] == "ring buffer lost 37 events (repeated 37 times)"
    assert len(lines) == 3


def test_error_log_writes_the_count_when_the_window_ends(tmp_path):
    clock = Clock()
    log = ErrorLog(tmp_path / "error.log", window=60, clock=clock)
    log.error("disk full")
    clock.now += 10
    log.error("disk full")
    clock.now += 60  # window over: the count is written, and this error starts a new one
    log.error("disk full")
    lines = [line[20:] for line in (tmp_path / "error.log").read_text().splitlines()]
    assert lines == ["disk full", "disk full (repeated 1 time)", "disk full"]


def test_error_log_lines_are_bounded(tmp_path):
    log = ErrorLog(tmp_path / "error.log", line_limit=100)
    log.error("x" * 10_000)
    log.error("x" * 10_000)
    log.flush()
    lines = (tmp_path / "error.log").read_text().splitlines()
    assert [len(line) for line in lines] == [100, 100]
    assert lines[1].endswith("… (repeated 1 time)")


def test_error_log_accounts_for_every_error_across_many_keys(tmp_path):
    log = ErrorLog(tmp_path / "error.log")
    log.max_keys = 10
    for round_ in range(3):
        for key in range(25):
            log.error("problem %d" % key)
    log.flush()
    total = 0
    for line in (tmp_path / "error.log").read_text().splitlines():
        match = re.search(r"\(repeated (\d+) times?\)$", line)
        total += int(match.group(1)) if match else 1
    assert total == 75
