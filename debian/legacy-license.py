#!/usr/bin/python3
"""Gives pyproject.toml the license form an older setuptools reads, for Debian 12's build.

pyproject.toml declares its license as PEP 639 has it: an SPDX `license` string and
`license-files`, which setuptools reads from version 77. Debian 12 has setuptools 66, which
refuses both; it reads `license = {text = ...}` and finds the license files by their names.
Run by debian/rules on the tree it builds: `prepare` rewrites pyproject.toml when the system's
setuptools is older (keeping the original in debian/), `restore` puts the original back.
"""

import re
import shutil
import sys
from pathlib import Path

import setuptools

PYPROJECT = Path("pyproject.toml")
SAVED = Path("debian/pyproject.toml.orig")


def legacy(text: str) -> str:
    text = re.sub(r'^license = "([^"]*)"$', r'license = {text = "\1"}', text, count=1, flags=re.M)
    return re.sub(r"^license-files = \[[^\]]*\]\n", "", text, count=1, flags=re.M)


def main(action: str) -> None:
    if action == "restore":
        if SAVED.exists():
            shutil.move(SAVED, PYPROJECT)
        return
    if int(setuptools.__version__.split(".")[0]) >= 77 or SAVED.exists():
        return
    shutil.copy2(PYPROJECT, SAVED)
    PYPROJECT.write_text(legacy(PYPROJECT.read_text()))


if __name__ == "__main__":
    main(sys.argv[1])
