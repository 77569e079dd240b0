"""Make untrusted text (process names, command lines, paths) safe to show or log.

Inside picosnitch every such value is a `str` decoded from the kernel's bytes with
`surrogateescape`, so nothing is lost until it is displayed. These functions are the only
places where it is made printable: control characters (terminal escape sequences, newlines,
NUL) become visible `\\xNN` escapes and undecodable bytes become `\\xNN` too.
"""

import re

# C0 controls, DEL, C1 controls, and the lone surrogates that stand for undecodable bytes.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\udc80-\udcff]")


def _escape(match: "re.Match[str]") -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte
        code -= 0xDC00
    return "\\x%02x" % code


def printable(value: str, limit: int = 0) -> str:
    """`value` with every control character and undecodable byte written as `\\xNN`.

    With `limit`, the result is cut to that many characters and ends in an ellipsis.
    """
    text = _UNSAFE.sub(_escape, value)
    if limit and len(text) > limit:
        text = text[: max(limit - 1, 0)] + "…"
    return text


def log_field(value: str) -> str:
    """A value for a comma-separated log line: printable, and without commas."""
    return printable(value).replace(",", "")


def from_bytes(raw: bytes) -> str:
    """Kernel or /proc bytes as the lossless `str` used throughout picosnitch."""
    return raw.decode("utf-8", "surrogateescape")


def to_bytes(value: str) -> bytes:
    """Inverse of from_bytes: the exact original bytes."""
    return value.encode("utf-8", "surrogateescape")


def one_line(error: BaseException) -> str:
    """An exception's message on one printable line (database drivers' messages span several)."""
    return printable(" ".join(str(error).split()), limit=400) or type(error).__name__
