"""`picosnitch dash`: the web dashboard's Starlette app, its security checks, and the server.

Safe by default:
- It binds the loopback name `localhost` (HOST and PORT environment variables change the address,
  default port 5100). A bind that reaches beyond loopback is refused unless the user configured
  a token ("Dash token" in config.json, or PICOSNITCH_DASH_TOKEN which overrides it; at least 16
  characters); every request must then carry it, as
  `Authorization: Bearer <token>` or the cookie set by opening `/?token=<token>` once.
- Requests whose Host header is not the bound name (or, on a loopback bind, a loopback name) are
  refused: a web page cannot reach the dashboard by rebinding its own domain name to 127.0.0.1.
- Only GET and HEAD exist. Responses forbid framing, sniffing, inline script and any other
  origin (Content-Security-Policy); the page inserts every value as text, never as HTML.
- It only reads snitch.db (store.sqlite.open_readonly), as the user who runs it; under sudo it
  drops to the invoking user first. With `--db URL` (or `--db config`) it reads the central SQL
  server the daemons write to instead (central.queries), with the permissions of that URL's user.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
import stat
import sys
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from picosnitch import config as config_module
from picosnitch.config import Config
from picosnitch.ui.annotations import Annotations
from picosnitch.ui.dash import api as dash_api
from picosnitch.ui.dash import guard as dash_guard

STATIC = Path(__file__).parent / "static"
DEFAULT_HOST = "localhost"
DEFAULT_PORT = 5100
TOKEN_VARIABLE = "PICOSNITCH_DASH_TOKEN"
TOKEN_KEY = "Dash token"  # in config.json
TOKEN_MIN_LENGTH = config_module.DASH_TOKEN_MIN_LENGTH
COOKIE = "picosnitch_dash_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
     b"connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]


class DashError(Exception):
    """The dashboard cannot start as asked; str() is one sentence for the user."""


def is_loopback_bind(host: str) -> bool:
    """True when every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(
        ipaddress.ip_address(str(a).split("%")[0]).is_loopback for a in addresses)


def check_bind(host: str, token: Optional[str]) -> None:
    """Refuse a non-loopback bind without a usable token (DashError says what to do)."""
    if token is not None and len(token) < TOKEN_MIN_LENGTH:
        raise DashError(f"{TOKEN_VARIABLE} is too short: use at least {TOKEN_MIN_LENGTH} "
                        "random characters (e.g. from `openssl rand -hex 16`)")
    if not is_loopback_bind(host) and not token:
        raise DashError(f'HOST={host} is reachable from beyond this machine: set "{TOKEN_KEY}" '
                        f"in config.json (or {TOKEN_VARIABLE}) to a secret of at least "
                        f"{TOKEN_MIN_LENGTH} characters to serve there (every request must then "
                        "carry it)")


def allowed_hosts(host: str, port: int) -> frozenset:
    """Host header values accepted for a server bound to `host`:`port` (lower case)."""
    names = {host.lower().strip("[]")}
    if is_loopback_bind(host):
        names.update(LOOPBACK_NAMES)
    found = set()
    for name in names:
        shown = f"[{name}]" if ":" in name else name
        found.add(f"{shown}:{port}")
        if port == 80:
            found.add(shown)
    return frozenset(found)


class SecurityMiddleware:
    """Host-header check, optional token, GET/HEAD only, security headers (pure ASGI)."""

    def __init__(self, app, hosts: frozenset, token: Optional[str] = None):
        self.app = app
        self.hosts = hosts
        self.token = token

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            if scope["type"] == "lifespan":
                return await self.app(scope, receive, send)
            return  # no websockets
        headers = {}
        for name, value in scope["headers"]:
            headers.setdefault(name.decode("latin-1").lower(), value.decode("latin-1"))
        refusal = self._refusal(scope, headers)
        if refusal is not None:
            return await self._with_headers(refusal)(scope, receive, send)
        if self.token and scope["path"] == "/" and b"token=" in scope.get("query_string", b""):
            # The token as a link: keep it in a cookie, and out of the address bar and history.
            given = parse_qs(scope["query_string"].decode("latin-1")).get("token", [""])[0]
            if hmac.compare_digest(given.encode(), self.token.encode()):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(COOKIE, self.token, httponly=True, samesite="strict")
                return await self._with_headers(response)(scope, receive, send)
            response = PlainTextResponse("wrong token\n", status_code=401)
            return await self._with_headers(response)(scope, receive, send)
        if self.token and not self._has_token(headers):
            response = PlainTextResponse(
                "this dashboard needs its token: open /?token=<token> once, or send "
                "Authorization: Bearer <token>\n", status_code=401)
            return await self._with_headers(response)(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope, headers):
        host = headers.get("host", "").lower()
        if host not in self.hosts:
            return PlainTextResponse(
                "refused: the Host header does not name this dashboard\n", status_code=421)
        if scope["method"] not in ("GET", "HEAD") and not (
                scope["method"] == "POST" and dash_guard.allows_post(scope, headers)):  # guard answers
            return PlainTextResponse("only GET and HEAD\n", status_code=405,
                                     headers={"Allow": "GET, HEAD"})
        return None

    def _has_token(self, headers) -> bool:
        assert self.token, "only asked when a token is set"
        expected = self.token.encode()
        authorization = headers.get("authorization", "")
        if authorization.startswith("Bearer ") and hmac.compare_digest(
                authorization[7:].strip().encode(), expected):
            return True
        cookie = SimpleCookie()
        try:
            cookie.load(headers.get("cookie", ""))
        except Exception:  # a malformed Cookie header is just no token
            return False
        given = cookie.get(COOKIE)
        return given is not None and hmac.compare_digest(given.value.encode(), expected)

    @staticmethod
    def _with_headers(response):
        for name, value in SECURITY_HEADERS:
            response.headers[name.decode()] = value.decode()
        return response


def create_app(dash: dash_api.Dash, hosts: frozenset, token: Optional[str] = None):
    """The ASGI app: "/" the page, /static/* its files, /api/<name> the JSON endpoints."""

    def index(request):
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    def no_icon(request):
        return Response(status_code=204)

    routes = [Route("/", index, methods=["GET", "HEAD"]),
              Route("/favicon.ico", no_icon, methods=["GET", "HEAD"]),
              Mount("/static", StaticFiles(directory=STATIC), name="static")]
    routes += [Route(f"/api/{name}", dash_api.endpoint(dash, name), methods=["GET", "HEAD"])
               for name in dash_api.ENDPOINTS]
    routes += dash_guard.routes(getattr(dash, "guard_socket", None), getattr(dash, "guard_db", None))
    app = Starlette(routes=routes)
    return SecurityMiddleware(app, hosts, token)


def token_warning(cfg) -> Optional[str]:
    """A sentence when config.json holds a token that every user can read, else None."""
    path = getattr(cfg, "path", "")
    if not (path and cfg.get(TOKEN_KEY)):
        return None
    try:
        readable = os.stat(path).st_mode & stat.S_IROTH
    except OSError:
        return None
    if not readable:
        return None
    return (f'warning: {path} holds the "{TOKEN_KEY}" and every user can read it: `chmod o-r` '
            f"it (the dashboard's user reads it through its group), or set {TOKEN_VARIABLE} "
            "instead")


def settings(environ=None, cfg=None) -> tuple[str, int, Optional[str]]:
    """(host, port, token) from HOST, PORT, and PICOSNITCH_DASH_TOKEN or else the "Dash token"
    of config.json's settings `cfg`; prints token_warning() on stderr."""
    environ = os.environ if environ is None else environ
    cfg = config_module.defaults() if cfg is None else cfg
    host = environ.get("HOST") or DEFAULT_HOST
    try:
        port = int(environ.get("PORT") or DEFAULT_PORT)
        if not 0 < port < 65536:
            raise ValueError
    except ValueError:
        raise DashError(f"PORT must be a TCP port number, not {environ.get('PORT')!r}") from None
    warning = token_warning(cfg)
    if warning:
        print(f"picosnitch dash: {warning}", file=sys.stderr, flush=True)
    return host, port, environ.get(TOKEN_VARIABLE) or cfg[TOKEN_KEY] or None


def drop_privileges(environ=None) -> None:
    """Under sudo, become the invoking user (the dashboard never needs root)."""
    environ = os.environ if environ is None else environ
    if os.geteuid() != 0 or not environ.get("SUDO_UID"):
        return
    uid, gid = int(environ["SUDO_UID"]), int(environ.get("SUDO_GID") or environ["SUDO_UID"])
    import pwd
    try:
        user = pwd.getpwuid(uid).pw_name
        os.initgroups(user, gid)
    except KeyError:
        os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)


def history_readers(paths, cfg: Config, db: Optional[str] = None):
    """A function opening a new history reader: of snitch.db, or of the central server `db`
    names (a URL, or "config" for the "DB sql server" of `cfg`; central.connect.CentralError
    when it names none)."""
    if db is not None:
        from picosnitch.central.queries import server_readers
        return server_readers(db, cfg)
    from picosnitch.store.sqlite import open_readonly
    return lambda: dash_api.LocalHistory(open_readonly(str(paths.db)))


def load(paths, cfg: Config, environ=None, db: Optional[str] = None):
    """(Dash, host, port, token) for `paths` and config.json's settings `cfg`: checks the bind,
    then that the history (snitch.db, or the central server `db` names) can be read.

    Raises DashError, FileNotFoundError or PermissionError (snitch.db), central.connect.CentralError
    (a bad URL, a missing driver) or central.queries.QueryError (a server that does not answer).
    """
    host, port, token = settings(environ, cfg)
    check_bind(host, token)
    options = {"theme": cfg["Dash theme"], "scroll_zoom": cfg["Dash scroll zoom"]}
    dash = dash_api.Dash(history_readers(paths, cfg, db), Annotations.load(paths, cfg), options,
                         paths.live_socket)
    dash.guard_socket, dash.guard_db = paths.guard_socket, (None if db else paths.db)  # the Guard tab
    with dash.reader() as reader:
        reader.bounds()  # fail now, with one sentence, if the history cannot be read
    return dash, host, port, token


def main(paths, cfg: Config, db: Optional[str] = None) -> int:
    """`picosnitch dash [--db URL|config]`: serve until interrupted.

    The CLI has dropped privileges (drop_privileges) and then read config.json's settings `cfg`:
    a file that is there but unusable never gets here, since it may hold the token and serving
    without the token the user set would not be safe."""
    import uvicorn

    from picosnitch.central.connect import CentralError
    from picosnitch.central.queries import QueryError
    from picosnitch.sanitize import printable

    try:
        dash, host, port, token = load(paths, cfg, db=db)
    except (DashError, FileNotFoundError, PermissionError, CentralError, QueryError) as exc:
        print(f"picosnitch dash: {printable(str(exc))}", file=sys.stderr)
        return 1
    shown = f"[{host}]" if ":" in host else host
    with dash.reader() as reader:
        source = f"  (server {reader.label})" if reader.label else ""
    print(f"picosnitch dash: http://{shown}:{port}/" + ("  (token required)" if token else "")
          + source, flush=True)
    app = create_app(dash, allowed_hosts(host, port), token)
    uvicorn.run(app, host=host, port=port, log_level="warning", server_header=False,
                proxy_headers=False, access_log=False)
    return 0
