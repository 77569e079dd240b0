"""Building picosnitch: the wheel and the sdist hold what they should, and setuptools has
nothing to warn about (pyproject.toml's license is PEP 639's, the packages are listed by name).

The builds run in a copy of the tree, as pip would build a checkout, with build isolation:
setuptools comes from the package index at the version pyproject.toml asks for.
"""

import os
import re
import subprocess
import sys
import tarfile
import zipfile

import pytest
from test_packaging import SYSTEM_PYTHON, source_copy

from picosnitch import __version__

LICENSE_FILES = {"LICENSE", "LICENSES/GPL-2.0-only.txt", "picosnitch/ui/dash/static/vendor/uPlot.LICENSE"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return source_copy(tmp_path_factory.mktemp("build") / "src")


@pytest.fixture(scope="module")
def pip_wheel(source, tmp_path_factory):
    """(the wheel, pip's verbose output) of `pip wheel -v .`."""
    out = tmp_path_factory.mktemp("wheel")
    # Without PYTHONDONTWRITEBYTECODE, which some shells set: setuptools says it skips
    # byte-compiling then, a notice about the environment and not about picosnitch.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--wheel-dir", str(out), "."],
                          cwd=source, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    wheel, = out.glob("*.whl")
    return wheel, done.stdout + done.stderr


def test_pip_wheel_prints_no_setuptools_warning(pip_wheel):
    _, output = pip_wheel
    # pip's own WARNING lines (about its index configuration) are not the build's.
    build_lines = [line for line in output.splitlines() if not line.startswith("WARNING: ")]
    warned = [line for line in build_lines if re.search(r"warn|deprecat", line, re.I)]
    assert warned == []


def test_the_wheel_holds_every_package_and_its_data_and_the_licenses(pip_wheel):
    wheel, _ = pip_wheel
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    packages = {os.path.dirname(n) for n in names if n.endswith("/__init__.py")}
    assert packages == {"picosnitch", "picosnitch/kernel", "picosnitch/identity", "picosnitch/store",
                        "picosnitch/central", "picosnitch/alerts", "picosnitch/guard", "picosnitch/daemon", "picosnitch/ui",
                        "picosnitch/ui/dash"}
    assert {"picosnitch/kernel/bpf/picosnitch.bpf.o", "picosnitch/ui/dash/static/index.html",
            "picosnitch/ui/dash/static/dash.js", "picosnitch/ui/dash/static/vendor/uPlot.iife.min.js"} <= names
    info = f"picosnitch-{__version__}.dist-info"
    assert {f"{info}/licenses/{name}" for name in LICENSE_FILES} <= names
    with zipfile.ZipFile(wheel) as z:
        metadata = z.read(f"{info}/METADATA").decode()
    assert "License-Expression: GPL-3.0-or-later AND GPL-2.0-only AND MIT" in metadata.splitlines()


def test_the_sdist_carries_the_bpf_source_but_never_an_object(source, tmp_path):
    if subprocess.run([SYSTEM_PYTHON, "-c", "import build"], capture_output=True).returncode:
        pytest.skip("needs python3-build")
    # A wheel built first leaves the object in the tree: the sdist must still leave it out.
    subprocess.run(["make", "-s", "-C", "picosnitch/kernel/bpf"], cwd=source, check=True)
    assert (source / "picosnitch/kernel/bpf/picosnitch.bpf.o").exists()
    subprocess.run([SYSTEM_PYTHON, "-m", "build", "--sdist", "--outdir", str(tmp_path)], cwd=source,
                   check=True, capture_output=True, timeout=600)
    sdist, = tmp_path.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert not [n for n in names if n.endswith(".bpf.o")]
    assert {"picosnitch/kernel/bpf/picosnitch.bpf.c", "picosnitch/kernel/bpf/Makefile", "setup.py",
            "scripts/make-manpage.py", "picosnitch.service", "picosnitch/ui/dash/static/vendor/uPlot.min.css"} <= names
    assert LICENSE_FILES <= names
