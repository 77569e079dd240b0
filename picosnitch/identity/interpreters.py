"""Which script an interpreter runs, and which program ld.so loads, read from the command line.

`python3 evil.py` is python3 to the kernel, and `/lib64/ld-linux-x86-64.so.2 ./prog` is ld.so: the
file that decides what the process does is an argument. Each interpreter has its own grammar for
where that argument is (options that take a value, options that mean "no script": `-c`, `-e`,
`-m`), so each is parsed by its own small function here. `classify` is what the monitor calls at
exec (kernel.pins): it gets the exec record and the executable's path and returns the files to pin,
as the process named them (relative paths are resolved against the process's cwd there).

A #! script needs no grammar of its own: the kernel runs its interpreter with the script's path in
argv, as if typed, and also reports the path given to execve (Exec.path), which covers
interpreters this module does not know.
"""

import os
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from picosnitch.kernel.records import Exec

Grammar = Callable[[Sequence[str]], Optional[str]]


def _first_operand(args: Sequence[str], with_value: frozenset, no_script: frozenset,
                   attached_value: str = "", long_with_value: frozenset = frozenset()) -> Optional[str]:
    """The first argument that is not an option, for a getopt-like grammar: `with_value` are short
    options whose value may follow in the next argument, `no_script` options that mean the program
    comes from elsewhere (a command string, a module, stdin), `attached_value` short options whose
    value is only ever attached (-i.bak)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[i + 1] if i + 1 < len(args) else None
        if arg == "-" or not arg.startswith("-"):
            return None if arg == "-" else arg
        if arg.startswith("--"):
            name = arg.split("=", 1)[0]
            if name in no_script:
                return None
            if name in long_with_value and "=" not in arg:
                i += 1
            i += 1
            continue
        for j, letter in enumerate(arg[1:], 1):
            if "-" + letter in no_script:
                return None
            if letter in attached_value:
                break
            if "-" + letter in with_value:
                if j == len(arg) - 1:
                    i += 1  # the value is the next argument
                break
        i += 1
    return None


def python(args: Sequence[str]) -> Optional[str]:
    return _first_operand(args, frozenset({"-W", "-X"}), frozenset({"-c", "-m", "--help", "--version"}),
                          long_with_value=frozenset({"--check-hash-based-pycs"}))


def perl(args: Sequence[str]) -> Optional[str]:
    # -I, -M, -m, -x, -i, -l, -0, -C, -d, -D take their value attached; -e/-E are code.
    return _first_operand(args, frozenset(), frozenset({"-e", "-E", "-v", "-V"}), attached_value="IMmxil0CdDV")


def ruby(args: Sequence[str]) -> Optional[str]:
    return _first_operand(args, frozenset({"-I", "-r", "-C", "-E", "-F"}), frozenset({"-e", "--version", "-v"}),
                          attached_value="0iWTKxl",
                          long_with_value=frozenset({"--encoding", "--enable", "--disable", "--external-encoding",
                                                     "--internal-encoding"}))


def node(args: Sequence[str]) -> Optional[str]:
    return _first_operand(args, frozenset({"-r", "-C"}),
                          frozenset({"-e", "-p", "--eval", "--print", "-i", "--interactive", "-v", "--version",
                                     "-h", "--help", "--run"}),
                          long_with_value=frozenset({"--require", "--import", "--loader", "--experimental-loader",
                                                     "--input-type", "--conditions", "--title", "--env-file",
                                                     "--inspect-port", "--max-old-space-size", "--stack-size",
                                                     "--redirect-warnings", "--openssl-config", "--icu-data-dir"}))


def php(args: Sequence[str]) -> Optional[str]:
    for i, arg in enumerate(args):
        if arg == "-f" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("-f") and len(arg) > 2:
            return arg[2:]
    return _first_operand(args, frozenset({"-c", "-d", "-z", "-t", "-S"}),
                          frozenset({"-r", "-B", "-R", "-F", "-E", "-a", "-i", "-l", "-m", "-v", "-h", "-S"}))


def shell(args: Sequence[str]) -> Optional[str]:
    """sh, bash, dash, zsh: options start with - or +; -o/+o/-O/+O take a value; -c is a command
    string and -s reads stdin."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg in ("--", "-"):
            return args[i + 1] if arg == "--" and i + 1 < len(args) else None
        if arg.startswith("--"):
            i += 2 if arg in ("--rcfile", "--init-file") else 1
            continue
        if arg[:1] in "-+" and len(arg) > 1:
            letters = arg[1:]
            if "c" in letters or ("s" in letters and arg[0] == "-"):
                return None
            i += 1 + sum(letter in "oO" for letter in letters)
            continue
        return arg
    return None


def java(args: Sequence[str]) -> Optional[str]:
    """`java [options] -jar file.jar`: the jar; a main class or module names no file."""
    with_value = {"-cp", "-classpath", "--class-path", "-p", "--module-path", "--upgrade-module-path",
                  "--add-modules", "--add-opens", "--add-exports", "--add-reads", "--patch-module",
                  "--limit-modules", "--enable-native-access"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-jar":
            return args[i + 1] if i + 1 < len(args) else None
        if not arg.startswith("-") or arg in ("-m", "--module"):
            return None
        i += 2 if arg in with_value else 1
    return None


def ld_so(args: Sequence[str]) -> Optional[str]:
    """glibc's and musl's dynamic loaders run directly: `ld.so [options] program [args]`."""
    with_value = {"--library-path", "--inhibit-rpath", "--audit", "--preload", "--argv0",
                  "--glibc-hwcaps-prefix", "--glibc-hwcaps-mask"}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[i + 1] if i + 1 < len(args) else None
        if not arg.startswith("--"):
            return arg
        if arg in ("--list", "--verify", "--help", "--version", "--list-tunables", "--list-diagnostics"):
            return None
        i += 2 if arg in with_value else 1
    return None


# Executable file names (of the real file, after symlinks) and their grammars.
INTERPRETERS: List[Tuple[re.Pattern, Grammar]] = [
    (re.compile(r"python[0-9.]*[dmu]*"), python),
    (re.compile(r"pypy[0-9.]*"), python),
    (re.compile(r"perl[0-9.]*"), perl),
    (re.compile(r"ruby[0-9.]*"), ruby),
    (re.compile(r"node(js)?[0-9]*"), node),
    (re.compile(r"php[0-9.]*(-cli)?"), php),
    (re.compile(r"(ba|da|z|k|mk|a)?sh(-[0-9.]+)?"), shell),
    (re.compile(r"java"), java),
]
LOADERS = re.compile(r"ld-linux[-a-z0-9_.]*\.so\.[0-9]+|ld-musl-[a-z0-9_]+\.so\.1|ld\.so(\.[0-9]+)?|ld64\.so\.[0-9]+")


def is_loader(path: str) -> bool:
    """A dynamic loader's file name; musl's loader is its C library (x86_64-linux-musl/libc.so)."""
    name = os.path.basename(path)
    return bool(LOADERS.fullmatch(name)) or (name == "libc.so" and "musl" in path)


def grammar_of(exe: str, filename: str = "") -> Tuple[str, Optional[Grammar]]:
    """("program", ld_so) for a dynamic loader, ("script", grammar) for a known interpreter,
    ("", None) otherwise; `filename` is the path it was executed by (ld-musl-x86_64.so.1)."""
    if is_loader(exe) or (filename and is_loader(filename)):
        return "program", ld_so
    name = os.path.basename(exe)
    for pattern, grammar in INTERPRETERS:
        if pattern.fullmatch(name):
            return "script", grammar
    return "", None


def run_file(exe: str, argv: Sequence[str], filename: str = "") -> Optional[Tuple[str, str]]:
    """(role, path as given) of the script or program `exe` runs according to its argv."""
    role, grammar = grammar_of(exe, filename)
    if grammar is None:
        return None
    path = grammar(list(argv[1:]))
    return (role, path) if path else None


def classify(record: Exec, exe: str) -> List[Tuple[str, str]]:
    """What the monitor pins besides the executable (kernel.pins.Classifier): the file the argv
    grammar names, else the path execve was given when it is not the executable (a #! script of an
    interpreter this module does not know, a binfmt_misc program)."""
    found = run_file(exe, record.argv, record.filename)
    if found:
        return [found]
    path = record.path
    if path and path != record.filename and not path.startswith("/dev/fd/") and not path.startswith("/proc/"):
        return [("script", path)]
    return []


ROLES: Dict[str, str] = {"script": "the script it runs", "program": "the program ld.so loads"}
