"""A VirusTotal API v3 client: look a sha256 up, upload a file VirusTotal does not know.

Needs `requests` (the [virustotal] extra), imported only when a Client is made. Each request
starts at least `spacing` seconds after the previous one ended, whatever its kind.

lookup() answers with a status, the text record.json keeps for the hash: "clean: ...",
"suspicious: ...", "malicious: ..." (see status_from_stats), UNKNOWN (404) or PENDING (known
but not analysed yet). Failures raise VtError: `retry` for 429, 5xx, timeouts and unreachable
servers, which are worth trying again later; `refused` for 401/403 (the API key).
"""

from __future__ import annotations

import time
from typing import BinaryIO, Callable, Optional

CLEAN, SUSPICIOUS, MALICIOUS = "clean", "suspicious", "malicious"
UNKNOWN = "unknown to VirusTotal"
PENDING = "waiting for VirusTotal's analysis"
DIRECT_UPLOAD_LIMIT = 32 * 1024 * 1024  # larger files go to a URL asked for first
UPLOAD_LIMIT = 650 * 1024 * 1024  # VirusTotal's maximum
DEFAULT_TIMEOUT = (10.0, 60.0)  # connect, read (seconds)
UPLOAD_TIMEOUT = (10.0, 600.0)


def is_flagged(status: str) -> bool:
    """Whether a status says malicious or suspicious."""
    return status.split(":", 1)[0] in (MALICIOUS, SUSPICIOUS)


class VtError(Exception):
    """A request failed; `retry` when trying later may work, `refused` when the key was."""

    def __init__(self, message: str, retry: bool = False, refused: bool = False) -> None:
        super().__init__(message)
        self.retry = retry
        self.refused = refused


def status_from_stats(stats: object) -> str:
    """The status for a file report's `last_analysis_stats` ({"malicious": 3, ...}).

    PENDING when no engine has answered yet; VtError when `stats` is not what VirusTotal sends.
    """
    if not isinstance(stats, dict) or not all(
            type(value) is int and value >= 0 for value in stats.values()):
        raise VtError("VirusTotal sent an unexpected file report")
    engines = sum(stats.values())
    if not engines:
        return PENDING
    malicious, suspicious = stats.get("malicious", 0), stats.get("suspicious", 0)
    verdict = MALICIOUS if malicious else SUSPICIOUS if suspicious else CLEAN
    return "%s: %d malicious and %d suspicious of %d engines" % (
        verdict, malicious, suspicious, engines)


class Client:
    """Talks to VirusTotal at `base_url` with `api_key`, `spacing` seconds between requests."""

    def __init__(self, api_key: str, base_url: str, spacing: float,
                 timeout: tuple[float, float] = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import requests
        self._requests = requests
        self.session = requests.Session()
        self.session.headers.update({"x-apikey": api_key, "Accept": "application/json",
                                     "User-Agent": "picosnitch"})
        self.base_url = base_url.rstrip("/")
        self.spacing = spacing
        self.timeout = timeout
        self.clock, self.sleep = clock, sleep
        self._last_end: Optional[float] = None

    def _send(self, method: str, url: str, timeout: tuple[float, float], **kwargs):
        """The response to one request, spaced from the last; VtError unless 200 or 404."""
        if self._last_end is not None:
            wait = self._last_end + self.spacing - self.clock()
            if wait > 0:
                self.sleep(wait)
        try:
            response = self.session.request(method, url, timeout=timeout,
                                            allow_redirects=False, **kwargs)
        except self._requests.Timeout:
            raise VtError("VirusTotal did not answer within %g s" % timeout[1], retry=True)
        except self._requests.RequestException as error:
            raise VtError("cannot reach VirusTotal (%s)" % type(error).__name__, retry=True)
        finally:
            self._last_end = self.clock()
        code = response.status_code
        if code in (200, 404):
            return response
        problem = "VirusTotal answered %d" % code
        if code in (401, 403):
            raise VtError(problem + ": it refused the API key", refused=True)
        raise VtError(problem, retry=code == 429 or code >= 500)

    def _data(self, response) -> object:
        """The "data" member of a JSON answer."""
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict) or "data" not in answer:
            raise VtError("VirusTotal sent an answer that is not a JSON object with data")
        return answer["data"]

    def lookup(self, sha256: str) -> str:
        """The status of `sha256` at VirusTotal (UNKNOWN when it has never seen the file)."""
        response = self._send("GET", "%s/files/%s" % (self.base_url, sha256), self.timeout)
        if response.status_code == 404:
            return UNKNOWN
        data = self._data(response)
        attributes = data.get("attributes") if isinstance(data, dict) else None
        stats = attributes.get("last_analysis_stats", {}) if isinstance(attributes, dict) else None
        return status_from_stats(stats)

    def upload(self, file: BinaryIO, size: int) -> None:
        """Send the file (already checked to be the one hashed) for analysis."""
        if size > UPLOAD_LIMIT:
            raise VtError("the file is larger than VirusTotal accepts (%d bytes)" % size)
        url = "%s/files" % self.base_url
        if size > DIRECT_UPLOAD_LIMIT:
            upload_url = self._data(self._send("GET", url + "/upload_url", self.timeout))
            if not (isinstance(upload_url, str) and upload_url.startswith(("https://", "http://"))):
                raise VtError("VirusTotal sent an unusable upload URL")
            url = upload_url
        response = self._send("POST", url, UPLOAD_TIMEOUT, files={"file": ("file", file)})
        if response.status_code == 404:
            raise VtError("VirusTotal answered 404 to the upload")
