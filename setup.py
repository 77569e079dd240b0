"""Compiles the BPF object while the package is built, so installed copies need no compiler."""

import shutil
import subprocess

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithBpf(build_py):
    def run(self):
        if not shutil.which("clang"):
            raise SystemExit("building picosnitch needs clang and libbpf's headers to compile its BPF "
                             "object: apt-get install clang libbpf-dev (Debian/Ubuntu)")
        subprocess.run(["make", "-s", "-C", "picosnitch/bpf"], check=True)
        self.data_files = self._get_data_files()  # now including the fresh picosnitch.bpf.o
        super().run()


setup(cmdclass={"build_py": BuildPyWithBpf})
