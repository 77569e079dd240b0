"""The dashboard's Guard tab: the prompts waiting for an answer (from the guard socket), the
latest verdicts (from snitch.db), and answering a prompt (POST, which the dashboard accepts on
this one path only, and only with the X-Picosnitch-Answer header a cross-site form cannot send).

The dashboard runs as the user who started it: answering needs that user to be in "Guard prompt
group", like `picosnitch prompt`.
"""

from __future__ import annotations

import json
import socket

from picosnitch.guard import store
from picosnitch.guard.prompt_socket import PromptClient
from picosnitch.sanitize import printable

ANSWER_PATH = "/api/guard/answer"
ANSWER_HEADER = "x-picosnitch-answer"
DURATIONS = ("once", "restart", "forever", "1", "3", "9", "1440")


def pending(guard_socket) -> tuple:
    """(prompts, problem): the waiting prompts, or why they cannot be read."""
    try:
        client = PromptClient(guard_socket, timeout=2.0)
    except FileNotFoundError:
        return [], "guard mode does not run (\"Guard mode\" is \"off\", or the daemon is stopped)"
    except PermissionError:
        return [], "this dashboard's user may not see or answer prompts (\"Guard prompt group\" in config.json)"
    except OSError as e:
        return [], "the guard cannot be reached: %s" % (e.strerror or e)
    try:
        for message in client.messages():
            if message.get("type") == "prompts":
                return message["prompts"], None
        return [], None
    except (OSError, EOFError, ValueError) as e:
        return [], "the guard did not answer: %s" % e
    finally:
        client.close()


def verdicts(db_path, limit: int = 200) -> tuple:
    """(rows, problem): the latest verdicts in snitch.db."""
    from picosnitch.store import sqlite as sqlite_store
    try:
        conn = sqlite_store.open_readonly(str(db_path))
    except (FileNotFoundError, PermissionError) as e:
        return [], str(e)
    try:
        return store.recent(conn, limit), None
    finally:
        conn.close()


def overview(guard_socket, db_path) -> dict:
    prompts, prompt_problem = pending(guard_socket)
    rows, rows_problem = verdicts(db_path) if db_path else ([], "verdicts are kept in this machine's snitch.db")
    return {"pending": prompts, "pending_problem": prompt_problem, "verdicts": rows, "verdicts_problem": rows_problem}


def answer(guard_socket, body: bytes) -> tuple:
    """(status, reply) for a POSTed answer {"id", "action", "duration"}."""
    try:
        message = json.loads(body)
        prompt_id, action, duration = int(message["id"]), message["action"], str(message.get("duration", "once"))
    except (ValueError, KeyError, TypeError):
        return 400, {"error": "an answer is JSON: {\"id\": N, \"action\": \"allow\"|\"deny\", \"duration\": ...}"}
    if action not in ("allow", "deny") or duration not in DURATIONS:
        return 400, {"error": "action must be allow or deny, duration one of %s" % ", ".join(DURATIONS)}
    try:
        client = PromptClient(guard_socket, timeout=5.0)
    except OSError as e:
        return 503, {"error": "the guard cannot be reached: %s" % (e.strerror or e)}
    try:
        client.answer(prompt_id, action, duration)
        while True:
            for reply in client.messages():
                if reply.get("type") == "answered":
                    return 200, reply
                if reply.get("type") == "error":
                    return 409, {"error": printable(str(reply.get("message", "")))}
    except (OSError, EOFError, socket.timeout) as e:
        return 503, {"error": "the guard did not answer: %s" % e}
    finally:
        client.close()


def routes(guard_socket, db_path) -> list:
    """Starlette routes for the Guard tab."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def get(request: Request):
        return JSONResponse(overview(guard_socket, db_path))

    async def post(request: Request):
        status, reply = answer(guard_socket, await request.body())
        return JSONResponse(reply, status_code=status)

    return [Route("/api/guard", get, methods=["GET", "HEAD"]), Route(ANSWER_PATH, post, methods=["POST"])]


def allows_post(scope: dict, headers: dict) -> bool:
    """Whether the security middleware lets this POST through: the answer path, with the header."""
    return scope["path"] == ANSWER_PATH and headers.get(ANSWER_HEADER) == "1"
