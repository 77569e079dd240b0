"""Which file a process really runs: each interpreter's argv grammar, and ld.so's.

These are what the monitor pins at exec (kernel.pins, with identity.interpreters.classify); the
daemon-level tests in test_daemon_exec_identity.py run every interpreter for real.
"""

import pytest

from picosnitch.identity.interpreters import classify, run_file
from picosnitch.kernel.records import Exec


@pytest.mark.parametrize("exe, argv, expected", [
    ("/usr/bin/python3.11", ["python3", "evil.py", "-c", "x"], "evil.py"),
    ("/usr/bin/python3.11", ["python3", "-u", "-W", "ignore", "-X", "dev", "evil.py"], "evil.py"),
    ("/usr/bin/python3.11", ["python3", "-Wignore", "-BO", "evil.py"], "evil.py"),
    ("/usr/bin/python3.11", ["python3", "-c", "import os"], None),
    ("/usr/bin/python3.11", ["python3", "-Bc", "import os"], None),
    ("/usr/bin/python3.11", ["python3", "-m", "http.server"], None),
    ("/usr/bin/python3.11", ["python3", "-", "x.py"], None),
    ("/usr/bin/python3.11", ["python3", "--", "-odd-name.py"], "-odd-name.py"),
    ("/usr/bin/perl", ["perl", "-w", "-Ilib", "-MData::Dumper", "run.pl"], "run.pl"),
    ("/usr/bin/perl", ["perl", "-e", "print 1", "x.pl"], None),
    ("/usr/bin/ruby3.1", ["ruby", "-r", "json", "-I", "lib", "app.rb"], "app.rb"),
    ("/usr/bin/ruby3.1", ["ruby", "-e", "puts 1"], None),
    ("/usr/bin/node", ["node", "--require", "x", "--inspect=9229", "server.js"], "server.js"),
    ("/usr/bin/node", ["node", "-r", "ts-node/register", "app.ts"], "app.ts"),
    ("/usr/bin/node", ["node", "-e", "1"], None),
    ("/usr/bin/php8.2", ["php", "-d", "memory_limit=1G", "index.php"], "index.php"),
    ("/usr/bin/php8.2", ["php", "-f", "cron.php"], "cron.php"),
    ("/usr/bin/php8.2", ["php", "-r", "echo 1;"], None),
    ("/usr/bin/bash", ["bash", "-e", "-o", "pipefail", "deploy.sh", "prod"], "deploy.sh"),
    ("/usr/bin/bash", ["bash", "--rcfile", "rc", "job.sh"], "job.sh"),
    ("/usr/bin/bash", ["bash", "-c", "curl x", "job.sh"], None),
    ("/usr/bin/dash", ["sh", "-s", "x"], None),
    ("/usr/bin/zsh", ["zsh", "+o", "nomatch", "z.zsh"], "z.zsh"),
    ("/usr/lib/jvm/java-17-openjdk-amd64/bin/java", ["java", "-Xmx1g", "-cp", "lib", "-jar", "app.jar"], "app.jar"),
    ("/usr/lib/jvm/java-17-openjdk-amd64/bin/java", ["java", "-cp", "app.jar", "org.Main"], None),
    ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
     ["ld.so", "--library-path", "/opt/lib", "--argv0", "ls", "./prog", "-l"], "./prog"),
    ("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", ["ld.so", "--list", "./prog"], None),
    ("/usr/bin/curl", ["curl", "evil.py"], None),
])
def test_the_file_each_grammar_runs(exe, argv, expected):
    found = run_file(exe, argv)
    assert (found[1] if found else None) == expected


def test_a_loader_is_a_program_runner_and_an_interpreter_a_script_runner():
    assert run_file("/usr/bin/python3.11", ["python3", "x.py"]) == ("script", "x.py")
    assert run_file("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", ["ld.so", "./p"]) == ("program", "./p")
    # musl's loader is its C library, executed by its ld-musl name
    assert run_file("/usr/lib/x86_64-linux-musl/libc.so", ["ld-musl", "./p"]) == ("program", "./p")
    assert run_file("/usr/lib/x86_64-linux-musl/libc.so", ["x", "./p"], "/lib/ld-musl-x86_64.so.1") == (
        "program", "./p")


def exec_of(filename, path, argv):
    return Exec(1, 1, 0, 0, 0, "x", filename, tuple(argv), False, 0.0, 1, path)


def test_a_hashbang_script_of_an_unknown_interpreter_is_the_path_execve_was_given():
    record = exec_of("/usr/bin/awk", "./report.awk", ["/usr/bin/awk", "-f", "./report.awk"])
    assert classify(record, "/usr/bin/mawk") == [("script", "./report.awk")]


def test_an_ordinary_program_and_fexecve_run_no_script():
    assert classify(exec_of("/usr/bin/curl", "/usr/bin/curl", ["curl", "x.py"]), "/usr/bin/curl") == []
    assert classify(exec_of("/dev/fd/3", "/dev/fd/3", ["hidden"]), "/memfd:x") == []
