"""Builds what the installed package needs and must not build itself: the BPF object (so installed
copies need no compiler, only libbpf1) and the man page picosnitch(1)."""

import shutil
import subprocess
import sys
import sysconfig

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

try:
    from setuptools.command.bdist_wheel import bdist_wheel  # setuptools >= 70.1
except ImportError:
    from wheel.bdist_wheel import bdist_wheel

MANPAGE = "build/man/picosnitch.1"
BPF_PACKAGE = "picosnitch.kernel.bpf"


class BuildPyWithBpf(build_py):
    def run(self):
        if not shutil.which("clang"):
            raise SystemExit("building picosnitch needs clang and libbpf's headers to compile its BPF "
                             "object: apt-get install clang libbpf-dev (Debian/Ubuntu)")
        subprocess.run(["make", "-s", "-C", "picosnitch/kernel/bpf"], check=True)
        subprocess.run([sys.executable, "scripts/make-manpage.py", MANPAGE], check=True)
        # The object goes into wheels only: an sdist carries the source, never an object built
        # for one architecture (which `make` would then not rebuild for another).
        self.package_data.setdefault(BPF_PACKAGE, []).append("*.bpf.o")
        self.data_files = self._get_data_files()  # now including the fresh picosnitch.bpf.o
        super().run()


class SourceOnlySdist(sdist):
    """An sdist never carries the BPF object, even when a wheel built in this tree before left
    one behind (and listed it in the egg-info's SOURCES.txt, which the sdist reads)."""

    def make_distribution(self):
        self.filelist.files = [f for f in self.filelist.files if not f.endswith(".bpf.o")]
        super().make_distribution()


class PlatformWheel(bdist_wheel):
    """The BPF object is compiled for this machine's architecture (its uprobes read registers by
    the architecture's calling convention), so the wheel is tagged for it: py3-none-<platform>."""

    def get_tag(self):
        return "py3", "none", sysconfig.get_platform().replace("-", "_").replace(".", "_")

setup(cmdclass={"build_py": BuildPyWithBpf, "sdist": SourceOnlySdist, "bdist_wheel": PlatformWheel},
      data_files=[("share/man/man1", [MANPAGE])])
