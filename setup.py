"""Builds what the installed package needs and must not build itself: the BPF object (so installed
copies need no compiler, only libbpf1) and the man page picosnitch(1)."""

import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

MANPAGE = "build/man/picosnitch.1"


class BuildPyWithBpf(build_py):
    def run(self):
        if not shutil.which("clang"):
            raise SystemExit("building picosnitch needs clang and libbpf's headers to compile its BPF "
                             "object: apt-get install clang libbpf-dev (Debian/Ubuntu)")
        subprocess.run(["make", "-s", "-C", "picosnitch/kernel/bpf"], check=True)
        subprocess.run([sys.executable, "scripts/make-manpage.py", MANPAGE], check=True)
        self.data_files = self._get_data_files()  # now including the fresh picosnitch.bpf.o
        super().run()


class PlatformWheel(bdist_wheel):
    """The BPF object is compiled for this machine's architecture (its uprobes read registers by
    the architecture's calling convention), so the wheel is tagged for it: py3-none-<platform>."""

    def get_tag(self):
        return "py3", "none", sysconfig.get_platform().replace("-", "_").replace(".", "_")

setup(cmdclass={"build_py": BuildPyWithBpf, "bdist_wheel": PlatformWheel},
      data_files=[("share/man/man1", [MANPAGE])])
