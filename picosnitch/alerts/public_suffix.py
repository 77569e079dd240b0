"""Registrable domains (eTLD+1) from the Public Suffix List the system ships.

A person registers `example.co.uk`; `co.uk` is a public suffix under which anyone may register.
The baseline learns registrable domains rather than host names, so a program's traffic to www.,
cdn. and api.example.com is one destination, and a new one is something the program never
talked to. Which part of a name is public cannot be guessed from its labels (`co.uk`,
`github.io`, `*.ck`): it takes the list, which Debian's package `publicsuffix` installs at
DEFAULT_PATH (Fedora's `publicsuffix-list` and Arch's `publicsuffix-list` there too).
picosnitch never downloads it.

The matching follows the list's own rules: the longest matching rule wins, a wildcard rule
(`*.ck`) matches any one label in its place, an exception rule (`!www.ck`) beats every other and
makes its own parent the suffix, and a name no rule matches has its last label as the suffix.
Rules written in Unicode are compared in their ASCII (punycode) form, the form names have in
traffic.
"""

from __future__ import annotations

import os
from typing import Optional

DEFAULT_PATH = "/usr/share/publicsuffix/public_suffix_list.dat"
CACHE_LIMIT = 50_000  # names remembered with their registrable domain


class PublicSuffixError(Exception):
    """The list cannot be used; str() is one sentence."""


def _ascii(rule: str) -> Optional[str]:
    """A rule's labels in the ASCII form names have on the wire; None if it has none."""
    try:
        return ".".join(label if label.isascii() else label.encode("idna").decode("ascii")
                        for label in rule.split("."))
    except UnicodeError:
        return None


class PublicSuffixList:
    """The rules of one list; `registrable("www.example.co.uk")` is "example.co.uk"."""

    def __init__(self, text: str) -> None:
        self.rules: set[str] = set()
        self.wildcards: set[str] = set()  # "ck" for the rule *.ck
        self.exceptions: set[str] = set()  # "www.ck" for the rule !www.ck
        for line in text.splitlines():
            rule = line.split(None, 1)[0].lower() if line.strip() else ""
            if not rule or rule.startswith("//"):
                continue
            target = self.rules
            if rule.startswith("!"):
                rule, target = rule[1:], self.exceptions
            elif rule.startswith("*."):
                rule, target = rule[2:], self.wildcards
            converted = _ascii(rule)
            if converted:
                target.add(converted)
        if not self.rules:
            raise PublicSuffixError("it holds no rules")
        self._cache: dict[str, str] = {}

    @classmethod
    def load(cls, path: str | os.PathLike = DEFAULT_PATH) -> "PublicSuffixList":
        """The list in the file at `path`; PublicSuffixError when it cannot be read."""
        try:
            with open(path, encoding="utf-8") as file:
                return cls(file.read())
        except OSError as error:
            raise PublicSuffixError("cannot read %s (%s)" % (path, error.strerror or error)) from None
        except (UnicodeDecodeError, PublicSuffixError) as error:
            raise PublicSuffixError("%s is not a public suffix list (%s)" % (path, error)) from None

    def suffix_length(self, labels: list[str]) -> int:
        """How many of the last `labels` form the public suffix."""
        for start in range(len(labels)):
            if ".".join(labels[start:]) in self.exceptions:
                return len(labels) - start - 1
        for start in range(len(labels)):
            name = ".".join(labels[start:])
            if name in self.rules or ".".join(labels[start + 1:]) in self.wildcards:
                return len(labels) - start
        return 1

    def registrable(self, name: str) -> str:
        """The registrable domain of host `name` (lower case, no trailing dot); `name` itself
        when it is a public suffix or a single label."""
        found = self._cache.get(name)
        if found is not None:
            return found
        labels = [label for label in name.lower().rstrip(".").split(".") if label]
        suffix = self.suffix_length(labels)
        found = ".".join(labels[-(suffix + 1):]) if len(labels) > suffix else ".".join(labels)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[name] = found
        return found


def unreversed(domain: str) -> str:
    """A name as stored in snitch.db (com.example.www) in the usual order (www.example.com)."""
    return ".".join(reversed(domain.split(".")))
