"""The documentation says what the code does: each test reads a part of the README (or the help
text, or the BPF source) and holds it against the code it describes."""

import re
from pathlib import Path

import pytest
import tomllib

from picosnitch import cli, config, installed
from picosnitch.kernel import monitor

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BPF_SOURCE = REPO / "picosnitch" / "kernel" / "bpf" / "picosnitch.bpf.c"


def section(title: str) -> str:
    """The README's section `## title`, up to the next section of that level."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start: end if end > 0 else None]


# ---- configuration ----

def test_the_readme_config_example_is_the_one_the_code_documents():
    block = re.search(r"```\n(.*?)```", section("Configuration"), re.S).group(1)
    assert block == config.example_text()


def test_the_config_example_holds_every_key_with_its_default():
    example = config.parse(config.example_text())
    assert example.warnings == []
    assert dict(example) == config.defaults()


# ---- commands ----

def help_commands() -> list[str]:
    """The command names `picosnitch help` lists."""
    listing = cli.USAGE.split("commands:\n", 1)[1].split("\n\n", 1)[0]
    return list(dict.fromkeys(re.findall(r"^  (\S+)", listing, re.M)))


def test_every_command_in_help_is_handled_and_every_handled_one_is_in_help():
    assert help_commands() and set(help_commands()) == set(cli.COMMANDS)


def test_every_command_is_in_the_readme_commands_table():
    documented = set(re.findall(r"^\| `picosnitch ([\w-]+)", section("Commands"), re.M))
    assert documented == set(cli.COMMANDS)


def test_the_db_option_is_read_in_both_spellings():
    assert cli.db_option(["--db", "config"]) == cli.db_option(["--db=config"]) == "config"
    assert cli.db_option([]) is None and cli.db_option(["--db"]) is None


def test_an_unknown_command_or_option_is_refused_with_the_usage(capsys):
    for args in (["frobnicate"], ["status", "--now"], ["monitor"], ["view", "--db"], ["dash", "--db", "x", "y"]):
        assert cli.run(args) == 2
        assert capsys.readouterr().err.startswith(f"picosnitch: unknown command {' '.join(args)!r}")


# ---- the kernel side ----

def bpf_programs() -> dict[str, str]:
    """{program name: section} of every SEC() program in the BPF source."""
    text = BPF_SOURCE.read_text()
    found = re.findall(r'^SEC\("([^".][^"]*)"\)\s*\nint\s+(?:BPF_\w+\()?(\w+)', text, re.M)
    return {name: sec for sec, name in found}


def test_every_bpf_program_belongs_to_a_hook_group():
    programs = bpf_programs()
    assert len(programs) >= 15 and "sock_send_length" in programs
    assert sorted(set(programs) - set(monitor.GROUP_OF)) == []


def test_every_program_a_hook_group_names_is_in_the_bpf_source():
    assert sorted(set(monitor.GROUP_OF) - set(bpf_programs())) == []


def test_the_built_object_has_the_programs_of_the_source():
    path = BPF_SOURCE.with_suffix(".o")
    if not path.exists():
        pytest.skip("the BPF object is not built (make -C picosnitch/kernel/bpf)")
    from picosnitch.kernel import libbpf
    obj = libbpf.BpfObject(str(path))
    try:
        assert {p.name: p.section for p in obj.programs()} == bpf_programs()
    finally:
        obj.close()


# ---- installing ----

def test_the_extras_the_messages_name_are_those_of_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {name: list(p.pip) for name, p in installed.EXTRAS.items()} == {
        name: extras[name] for name in installed.EXTRAS}


def test_the_readme_install_gives_what_view_top_and_dash_need():
    install = (REPO / "scripts" / "install.sh").read_text()
    chosen = re.search(r"pip\" install --quiet \"\.\[([\w,]+)\]\"", install).group(1).split(",")
    assert {"dash", "geoip"} <= set(chosen)


# ---- the layout ----

def test_how_it_works_names_every_folder_of_the_package():
    text = section("How it works")
    folders = sorted(p.name for p in (REPO / "picosnitch").iterdir()
                     if p.is_dir() and (p / "__init__.py").exists())
    assert folders == ["alerts", "central", "daemon", "guard", "identity", "kernel", "store", "ui"]
    for folder in folders:
        assert f"`{folder}/`" in text, folder
