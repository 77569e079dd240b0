"""config.json: defaults, the commented example, and messages that point at the mistake."""

import json
import os
import stat

import pytest

from picosnitch import config
from picosnitch.config import ConfigError

PAGES = (1 << 30) // os.sysconf("SC_PAGE_SIZE")  # the largest ring buffer: 1 GiB

ORIGINAL_DEFAULTS = {
    "DB retention (days)": 30,
    "DB sql log": True,
    "DB sql server": {},
    "DB text log": False,
    "DB write limit (seconds)": 10,
    "Dash scroll zoom": True,
    "Dash theme": "",
    "Desktop notifications": True,
    "Every exe (not just conns)": False,
    "GeoIP lookup": True,
    "Log addresses": True,
    "Log commands": True,
    "Log ignore": [],
    "Log ports": True,
    "Perf ring buffer (pages)": 256,
    "Set RLIMIT_NOFILE": None,
    "Set st_dev mask": None,
    "VT API key": "",
    "VT file upload": False,
    "VT request limit (seconds)": 15,
}


def write(tmp_path, text):
    path = tmp_path / "config.json"
    path.write_text(text)
    return path


def error_for(tmp_path, text):
    with pytest.raises(ConfigError) as caught:
        config.load(write(tmp_path, text))
    return caught.value


def test_defaults_keep_the_original_keys_and_add_the_new_ones():
    assert config.defaults() == dict(ORIGINAL_DEFAULTS, **{
        "DB sql backlog (MB)": 100, "Dash token": "", "Flow map entries": 65536, "GeoIP database": "",
        "Dpkg database": "/var/lib/dpkg",
        "Live feed group": "", "Names from traffic": True,
        "Desktop notification users": [], "VT API URL": "https://www.virustotal.com/api/v3",
        "Guard fail open": True, "Guard interfaces": [], "Guard mode": "off", "Guard prompt group": "",
        "Guard queue number": 7455, "Guard timeout (seconds)": 60, "Guard timeout action": "deny",
        **ALERT_DEFAULTS})


ALERT_DEFAULTS = {
    "Alert coalesce (seconds)": 60,
    "Alert kinds": ["new domain", "new country", "new port", "new listener", "traffic spike"],
    "Alert learning (days)": 7, "Alert spike factor": 10, "Alert spike minimum (MB)": 1,
    "Alert spike period (hours)": 24, "Event log": True, "Gotify token": "", "Gotify URL": "",
    "Metrics address": "", "Metrics textfile": "",
    "Public suffix list": "/usr/share/publicsuffix/public_suffix_list.dat", "Syslog socket": "/dev/log",
    "Webhook backoff (seconds)": 300,
    "Webhook events": ["new program", "new name", "changed hash", "alert", "loss", "degraded hook"],
    "Webhook queue (MB)": 10, "Webhook token": "", "Webhook URL": "", "ntfy token": "", "ntfy URL": ""}


@pytest.mark.parametrize("key, value, complaint", [
    ("Alert kinds", ["new domain", "new planet"], 'must be a list of some of "new domain", "new country"'),
    ("Webhook events", "alert", 'must be a list of some of "new program"'),
    ("Alert learning (days)", -1, "must be null or a number from 0 to 36500 (null: until marked learned), not -1"),
    ("Alert spike factor", 0.5, "must be a number from 1 to 1000000, not 0.5"),
    ("Metrics address", "0.0.0.0:9743", 'must be "" or a loopback address and port such as "127.0.0.1:9743"'),
    ("Metrics address", "127.0.0.1:70000", 'must be "" or a loopback address and port'),
    ("ntfy URL", "ntfy.sh/topic", "must be an http:// or https:// URL"),
])
def test_the_alert_and_delivery_keys_say_what_they_take(tmp_path, key, value, complaint):
    error = error_for(tmp_path, '{\n  "%s": %s\n}' % (key, json.dumps(value)))
    assert f'line 2: "{key}" {complaint}' in str(error)


def test_tokens_are_never_repeated_in_a_complaint(tmp_path):
    for key in ("Webhook token", "ntfy token", "Gotify token"):
        error = error_for(tmp_path, '{"%s": ["tk_secret"]}' % key)
        assert "tk_secret" not in str(error) and "must be a string" in str(error)


def test_loopback_metrics_addresses_and_fractional_learning_are_taken(tmp_path):
    for address in ("127.0.0.1:9743", "[::1]:9743", "localhost:1", ""):
        assert config.parse(json.dumps({"Metrics address": address}))["Metrics address"] == address
    assert config.parse('{"Alert learning (days)": 0.0005}')["Alert learning (days)"] == 0.0005
    assert config.parse('{"Alert learning (days)": null}')["Alert learning (days)"] is None


def test_the_guard_mode_is_one_of_three(tmp_path):
    assert config.load(write(tmp_path, '{"Guard mode": "deny unknown"}'))["Guard mode"] == "deny unknown"
    error = error_for(tmp_path, '{\n  "Guard mode": "on"\n}')
    assert str(error).endswith('line 2: "Guard mode" must be one of "off", "ask", "deny unknown", not "on"')


@pytest.mark.parametrize("key", ["GeoIP database", "Live feed group"])
def test_the_ui_keys_take_strings(tmp_path, key):
    assert config.load(write(tmp_path, json.dumps({key: "x"})))[key] == "x"
    error = error_for(tmp_path, '{\n  "%s": 5\n}' % key)
    assert str(error).endswith('line 2: "%s" must be a string, not 5' % key)
    assert error.key == key


def test_write_default_creates_sorted_pretty_json_once(tmp_path):
    path = tmp_path / "config.json"
    assert config.write_default(path) is True
    text = path.read_text()
    assert text == json.dumps(config.defaults(), indent=2, sort_keys=True) + "\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert dict(config.load(path)) == config.defaults()

    path.write_text('{"DB text log": true}')
    assert config.write_default(path) is False  # an existing file is never replaced
    assert config.load(path)["DB text log"] is True
    assert os.listdir(tmp_path) == ["config.json"]  # no temporary file left behind


def test_missing_keys_take_their_defaults(tmp_path):
    cfg = config.load(write(tmp_path, '{"DB write limit (seconds)": 2}'))
    assert cfg["DB write limit (seconds)"] == 2
    assert cfg["DB retention (days)"] == 30
    assert cfg.line_of("DB write limit (seconds)") == 1
    assert cfg.line_of("DB retention (days)") is None
    assert cfg.warnings == []


def test_the_documented_example_with_comments_loads_to_the_defaults(tmp_path):
    example = config.example_text()
    assert example.count("#") > len(config.defaults())  # a comment for every key
    cfg = config.load(write(tmp_path, example))
    assert dict(cfg) == config.defaults()
    assert cfg.warnings == []


def test_a_hash_sign_inside_a_string_is_not_a_comment(tmp_path):
    cfg = config.load(write(tmp_path, """{
      "VT API key": "abc#def",  # the key itself contains '#'
      "Dash theme": "dark \\"#1\\" # not a comment",
      "Log ignore": ["/opt/app#2/bin", 443]  # trailing comment
    }"""))
    assert cfg["VT API key"] == "abc#def"
    assert cfg["Dash theme"] == 'dark "#1" # not a comment'
    assert cfg["Log ignore"] == ["/opt/app#2/bin", 443]


def test_invalid_json_names_file_line_and_column(tmp_path):
    error = error_for(tmp_path, '{\n  # a comment\n  "DB sql log": true\n  "DB text log": true\n}')
    assert (error.line, error.column) == (4, 3)
    assert str(error) == "%s line 4 column 3: invalid JSON: Expecting ',' delimiter" % (
        tmp_path / "config.json")


def test_a_wrong_type_names_file_line_and_key(tmp_path):
    error = error_for(tmp_path, '{\n  "DB sql log": true,\n  # how often\n'
                                '  "DB write limit (seconds)": "ten"\n}')
    assert str(error) == ('%s line 4: "DB write limit (seconds)" must be an integer from 1 to '
                          '86400, not "ten"' % (tmp_path / "config.json"))
    assert (error.line, error.key) == (4, "DB write limit (seconds)")


@pytest.mark.parametrize("key, value, complaint", [
    ("DB write limit (seconds)", 0, "must be an integer from 1 to 86400, not 0"),
    ("DB write limit (seconds)", 1.5, "must be an integer from 1 to 86400, not 1.5"),
    ("DB retention (days)", -1, "must be an integer from 0 to 36500 (0 keeps everything), not -1"),
    ("DB sql log", 1, "must be true or false, not 1"),
    ("DB sql server", [], "must be an object ({} for none), not []"),
    ("Dash theme", None, "must be a string, not null"),
    ("Perf ring buffer (pages)", 100, f"must be a power of two from 1 to {PAGES} (1, 2, 4, ... 256, ...), not 100"),
    ("Perf ring buffer (pages)", 0, f"must be a power of two from 1 to {PAGES} (1, 2, 4, ... 256, ...), not 0"),
    ("Set RLIMIT_NOFILE", 0, "must be null or an integer from 1 to 2147483647, not 0"),
    ("Set st_dev mask", -1, "must be null or an integer from 0 to 18446744073709551615, not -1"),
    ("Set st_dev mask", True, "must be null or an integer from 0 to 18446744073709551615, not true"),
    ("Flow map entries", 0, "must be an integer from 1 to 4194304, not 0"),
    ("DB sql backlog (MB)", 0, "must be an integer from 1 to 1000000, not 0"),
    ("VT request limit (seconds)", -5, "must be a number of seconds from 0 to 86400, not -5"),
    ("Log ignore", "443", 'must be a list ([] for none), not "443"'),
    ("Log ignore", ["a", 70000], "must list only strings and port numbers (0-65535), "
                                 "but item 2 is 70000"),
    ("Desktop notification users", "alice", "must be a list of user names or uids ([] for the "
                                            'logged-in users), not "alice"'),
    ("Desktop notification users", ["alice", -1], "must list only user names and uids, but "
                                                  "item 2 is -1"),
    ("Desktop notification users", [""], 'must list only user names and uids, but item 1 is ""'),
    ("VT API URL", "ftp://example.com", 'must be an http:// or https:// URL, not '
                                        '"ftp://example.com"'),
    ("VT API URL", "", 'must be an http:// or https:// URL, not ""'),
])
def test_out_of_range_values_are_refused(tmp_path, key, value, complaint):
    error = error_for(tmp_path, '{\n  %s: %s\n}' % (json.dumps(key), json.dumps(value)))
    assert str(error) == '%s line 2: "%s" %s' % (tmp_path / "config.json", key, complaint)


@pytest.mark.parametrize("key, value, complaint", [
    ("DB write limit (seconds)", 10**12, "must be an integer from 1 to 86400, not 1000000000000"),
    ("DB retention (days)", 10**20, "must be an integer from 0 to 36500 (0 keeps everything), not "
                                    "100000000000000000000"),
    ("Set RLIMIT_NOFILE", 10**20, "must be null or an integer from 1 to 2147483647, not 100000000000000000000"),
    ("Flow map entries", 4294967296, "must be an integer from 1 to 4194304, not 4294967296"),
    ("Perf ring buffer (pages)", 2147483648, f"must be a power of two from 1 to {PAGES} (1, 2, 4, ... 256, ...), "
                                             "not 2147483648"),
    ("VT request limit (seconds)", 1e300, "must be a number of seconds from 0 to 86400, not 1e+300"),
    ("Desktop notification users", [2**40], "must list only user names and uids, but item 1 is 1099511627776"),
])
def test_magnitudes_beyond_what_the_value_is_given_to_are_refused(tmp_path, key, value, complaint):
    error = error_for(tmp_path, '{\n  %s: %s\n}' % (json.dumps(key), json.dumps(value)))
    assert str(error) == '%s line 2: "%s" %s' % (tmp_path / "config.json", key, complaint)


def test_deeply_nested_arrays_are_refused_with_their_line_not_a_recursion_error(tmp_path):
    path = write(tmp_path, '{\n  "Log ignore": ' + "[" * 200_000 + "]" * 200_000 + "\n}")
    with pytest.raises(ConfigError, match=r"line 2: arrays and objects are nested more than 100 deep$"):
        config.load(path)


def test_brackets_inside_strings_do_not_count_as_nesting(tmp_path):
    cfg = config.load(write(tmp_path, '{"Dash theme": "%s"}' % ("[" * 500)))
    assert cfg["Dash theme"] == "[" * 500


def test_a_file_larger_than_a_config_file_is_refused(tmp_path):
    path = write(tmp_path, '{"Dash theme": "%s"}' % ("x" * config.MAX_SIZE))
    with pytest.raises(ConfigError, match=r"config.json: is \d+ bytes, more than the 1048576 a config file may have$"):
        config.load(path)


def test_a_fifo_is_refused_at_once_instead_of_waiting_for_a_writer(tmp_path):
    path = tmp_path / "config.json"
    os.mkfifo(path)
    with pytest.raises(ConfigError, match=r"config.json: is not a regular file \(it is a FIFO\)$"):
        config.load(path)


@pytest.mark.parametrize("kind, made", [("a directory", lambda p: p.mkdir()),
                                        ("a character device", lambda p: p.symlink_to("/dev/zero"))])
def test_other_files_that_are_not_regular_are_refused(tmp_path, kind, made):
    path = tmp_path / "config.json"
    made(path)
    with pytest.raises(ConfigError, match=r"config.json: is not a regular file \(it is %s\)$" % kind):
        config.load(path)


@pytest.mark.parametrize("key, value", [
    ("DB retention (days)", 0),
    ("Perf ring buffer (pages)", 1),
    ("Set RLIMIT_NOFILE", 4096),
    ("Set st_dev mask", 0),
    ("VT request limit (seconds)", 0.5),
    ("Log ignore", ["example.com", "10.0.0.0/8", 53, 0]),
    ("DB sql server", {"host": "db.example"}),
    ("DB sql backlog (MB)", 1),
    ("Desktop notification users", ["alice", 1000]),
    ("VT API URL", "http://127.0.0.1:8080/api/v3"),
])
def test_values_within_range_are_accepted(tmp_path, key, value):
    assert config.load(write(tmp_path, json.dumps({key: value})))[key] == value


def test_unknown_keys_are_kept_and_reported_as_warnings(tmp_path):
    cfg = config.load(write(tmp_path, '{\n  "Log ports": false,\n  "Log port": false\n}'))
    assert cfg["Log port"] is False and cfg["Log ports"] is False
    assert cfg.warnings == ['%s line 3: unknown key "Log port" is kept but not used '
                            '(did you mean "Log ports"?)' % (tmp_path / "config.json")]


def test_a_repeated_key_uses_the_last_value_and_warns(tmp_path):
    cfg = config.load(write(tmp_path, '{\n  "DB text log": false,\n  "DB text log": true\n}'))
    assert cfg["DB text log"] is True
    assert cfg.warnings == ['%s line 3: "DB text log" is set again (first on line 2); this '
                            "later value is used" % (tmp_path / "config.json")]


def test_the_file_must_hold_an_object(tmp_path):
    error = error_for(tmp_path, "[]")
    assert str(error).endswith('line 1: must hold one JSON object: { "key": value, ... }')


def test_a_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config.json: cannot be read \(No such file"):
        config.load(tmp_path / "config.json")


def test_hostile_text_in_messages_is_made_printable(tmp_path):
    # \u009b starts a terminal escape sequence on some terminals; \udcff is an undecodable byte.
    cfg = config.load(write(tmp_path, '{"bad\\u009b31m\\n": 1}'))
    assert cfg.warnings[0].endswith('unknown key "bad\\x9b31m\\x0a" is kept but not used')
    error = error_for(tmp_path, '{"Dash theme": ["\\u009b31m", "\\udcff"]}')
    assert str(error).endswith('"Dash theme" must be a string, not ["\\x9b31m", "\\xff"]')


def test_text_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{\n "Dash theme": "\xff"\n}')
    with pytest.raises(ConfigError, match=r"line 2: is not valid UTF-8 text$"):
        config.load(path)
