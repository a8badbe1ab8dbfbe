"""The QVD client protocol's routes (QVD's L7R, ``reference/qvd.md`` §1) over one client connection.

``GET /qvd/ping``, ``/qvd/list_of_vm``, ``/qvd/list_of_applications``, ``/qvd/connect_to_vm`` and
``/qvd/stop_vm``, in QVD's order of checks and with its status codes, so QVD's own client works unchanged.
Errors from the services are mapped to HTTP here and nowhere else below the broker: a connect that fails
after authentication is a ``503`` whose body carries the human reason (``session.py``).

One log line per request (``broker.request``) and one per connect outcome (``broker.connection``).
A connect that asks for ``Upgrade: websocket`` (the browser portal) goes to ``websocket.py`` instead.

Until a request has authenticated, a connection is on short clocks (``BrokerSettings``): the TLS handshake and
the first request must be complete ``first_request_timeout`` seconds after the accept, and it may idle
``idle_timeout`` between requests; after a successful login QVD's client may wait for its user
(``authenticated_idle_timeout``).  Every error reply names its stable code in ``X-Deckard-Error``; a bug
is logged with its traceback and answered ``500`` when the connection can still carry a reply.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

import h11
import structlog

from deckard.broker.auth import REALM_CHALLENGE, Basic, auth_params, parse_authorization
from deckard.broker.files import FILES_PATH, FilesConnect
from deckard.broker.http import BadRequest, FrontConnection, HttpChannel
from deckard.broker.nx import DISPLAY_HEADER, display_of
from deckard.broker.params import ConnectParams, parse_connect_params, parse_desktop_id
from deckard.broker.session import ConnectRequest, LoginRecord, SessionRunner
from deckard.broker.sound import SOUND_PATH, SoundConnect
from deckard.broker.websocket import WebSocketConnect, is_websocket
from deckard.db.engine import Database
from deckard.model.entities import User
from deckard.model.errors import Conflict, DeckardError
from deckard.model.states import DESKTOP_AT_REST, DesktopCommand, DesktopState
from deckard.services import identity
from deckard.services.desktops import request_stop
from deckard.services.sessions import desktop_for_user, head_start, user_desktops, withdraw_head_start

log = structlog.get_logger("deckard.broker")

MIN_FIRST_REQUEST_WAIT = 0.5  # seconds left for the first request however long the TLS handshake took
ERROR_HEADER = "X-Deckard-Error"  # the stable code of every error reply
ROUTES = ("/qvd/ping", "/qvd/list_of_vm", "/qvd/list_of_applications", "/qvd/connect_to_vm", "/qvd/stop_vm")


@dataclass
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]  # names lower-case; a repeated header keeps its last value
    received_at: float
    target: str = "/"  # as sent (path and query), for the WebSocket handshake

    @classmethod
    def from_h11(cls, req: h11.Request) -> Request:
        """Raises :class:`BadRequest` for a target that is not a URL (``urlsplit`` refuses some)."""
        try:
            target = urlsplit(req.target.decode("latin-1"))
        except ValueError as e:
            raise BadRequest(f"the request target is not a valid URL: {e}") from None
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in req.headers}
        return cls(
            req.method.decode("latin-1").upper(),
            target.path,
            parse_qsl(target.query, keep_blank_values=True),
            headers,
            time.monotonic(),
            req.target.decode("latin-1"),
        )

    def header_tokens(self, name: str) -> set[str]:
        return {t.strip().lower() for t in self.headers.get(name, "").split(",") if t.strip()}


@dataclass
class Reply:
    status: int
    body: str
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


def error_reply(err: DeckardError) -> Reply:
    """A service error as QVD's client expects it (401 always carries the Basic challenge)."""
    status = err.status if err.status in (401, 403, 404, 409, 422, 429, 503) else 500
    code = err.code if status != 500 else "internal"
    headers: tuple[tuple[str, str], ...] = ((ERROR_HEADER, code),)
    if status == 401:
        headers += (("WWW-Authenticate", REALM_CHALLENGE),)
    if "retry_after_s" in err.details:
        headers += (("Retry-After", str(err.details["retry_after_s"])),)
    body = err.message if status != 500 else "internal error in the broker"
    return Reply(status, body, headers=headers)


INTERNAL_ERROR = Reply(
    500, "internal error in the broker: the broker's log has the details", headers=((ERROR_HEADER, "internal"),)
)


class QvdProtocol:
    """Serves every request of one client connection, keep-alive included, until close or upgrade."""

    def __init__(self, db: Database, sessions: SessionRunner, network: str | None = None) -> None:
        self.db = db
        self.sessions = sessions
        self.network = network  # the desktop network: an auto-provisioned user's first desktop goes there
        self.settings = sessions.settings
        self.websocket = WebSocketConnect(db, sessions)
        self.files = FilesConnect(db, sessions.settings, sessions.ports.agent)
        self.sound = SoundConnect(db, sessions.ports.agent)

    async def serve(self, front: FrontConnection) -> None:
        channel = HttpChannel(front, self.settings.max_request_head)
        loop = asyncio.get_running_loop()
        first_left = self.settings.first_request_timeout - (loop.time() - front.accepted_at)
        timeout = max(first_left, MIN_FIRST_REQUEST_WAIT)
        try:
            while not front.gone:
                try:
                    event = await channel.receive_request(timeout)
                    if event is None:
                        return
                    req = Request.from_h11(event)
                except BadRequest as e:
                    channel.reply_bad_request(str(e), e.status, e.code)
                    log.info("broker.request", peer=front.peer, status=e.status, error=e.code)
                    return
                except TimeoutError:
                    log.info("broker.idle_timeout", peer=front.peer, authenticated=front.authenticated)
                    return
                try:
                    if is_websocket(req):
                        await self.websocket.serve(channel, req)
                    elif req.path == FILES_PATH and req.method == "GET":
                        await self.files.serve(channel, req)
                    elif req.path == SOUND_PATH and req.method == "GET":
                        await self.sound.serve(channel, req)
                    elif req.path == "/qvd/connect_to_vm" and req.method == "GET":
                        await self._connect(channel, req)
                    else:
                        reply, login = await self._simple(front, req)
                        if login:
                            front.mark_authenticated()
                        self._send(channel, req, reply, login)
                except Exception:
                    log.exception("broker.request_crashed", peer=front.peer, method=req.method, path=req.path)
                    if front.relay is None and channel.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                        try:
                            self._send(channel, req, INTERNAL_ERROR)
                        except h11.LocalProtocolError:
                            front.abort()  # the reply itself cannot be framed: nothing more to say
                    return
                if front.relay is not None or not channel.next_cycle():
                    return
                settings = self.settings
                timeout = settings.authenticated_idle_timeout if front.authenticated else settings.idle_timeout
        finally:
            if front.relay is None:
                front.close()

    def _send(self, channel: HttpChannel, req: Request, reply: Reply, login: str = "") -> None:
        if not channel.front.gone:
            channel.respond(reply.status, reply.body, headers=reply.headers, content_type=reply.content_type)
        log.info(
            "broker.request",
            peer=channel.front.peer,
            method=req.method,
            path=req.path,
            status=reply.status,
            login=login or None,
            ms=round((time.monotonic() - req.received_at) * 1000, 1),
        )

    async def _authenticate(
        self,
        front: FrontConnection,
        req: Request,
        on_known: Callable[[int], None] | None = None,
        record: LoginRecord | None = None,
    ) -> tuple[User, str]:
        """The login chain (``services/identity.py``) for Basic or Bearer credentials.  QVD's client sends the same
        credentials with each request of a connection (list, then connect): the second reuses the first's result,
        so a one-time second-factor code is not refused as a replay.  ``on_known``: ``login_password``'s;
        ``record``: a password login's audit record is left to it (a connect writes it while the desktop boots)."""
        header = req.headers.get("authorization")
        extra = auth_params(req.headers)
        memo = hashlib.sha256(repr((header, sorted(extra.items()))).encode()).digest()
        if front.login_memo is not None and front.login_memo[0] == memo:
            return front.login_memo[1], front.login_memo[2]
        creds = parse_authorization(header)
        if isinstance(creds, Basic):
            result = await identity.login_password(
                self.db,
                creds.login,
                creds.password,
                source=front.peer,
                factors=extra,
                network=self.network,
                on_known=on_known,
                record_later=record is not None,
            )
            if record is not None:
                record.hold(result.record)
            login = creds.login
        else:
            result = await identity.login_token(self.db, creds.token, source=front.peer)
            login = result.user.login
        front.login_memo = (memo, result.user, login)
        return result.user, login

    async def _simple(self, front: FrontConnection, req: Request) -> tuple[Reply, str]:
        """Every route but connect; returns the reply and the login it was made for (for the log)."""
        if req.path not in ROUTES:
            return Reply(404, f"no such page: {req.path}", headers=((ERROR_HEADER, "no_such_page"),)), ""
        if req.method != "GET":
            return Reply(
                405,
                f"{req.method} is not allowed here: use GET",
                headers=((ERROR_HEADER, "method_not_allowed"), ("Allow", "GET")),
            ), ""
        if req.path == "/qvd/ping":
            return Reply(200, "I am alive!"), ""
        login = ""
        try:
            user, login = await self._authenticate(front, req)
            if req.path == "/qvd/list_of_vm":
                desktops = [{**d, "is_application": 0} for d in await user_desktops(self.db, user)]
                return Reply(200, json.dumps(desktops), content_type="application/json"), login
            if req.path == "/qvd/list_of_applications":
                return Reply(200, "[]", content_type="application/json"), login  # no application OSFs here
            return await self._stop(req, user), login
        except DeckardError as e:
            return error_reply(e), login

    async def _stop(self, req: Request, user: User) -> Reply:
        desk = await desktop_for_user(self.db, user, parse_desktop_id(req.query))
        if desk.state not in (*DESKTOP_AT_REST, DesktopState.STOPPING) or desk.cmd == DesktopCommand.START:
            try:
                await request_stop(self.db, desk.id)
            except Conflict as e:
                return error_reply(e)
        return Reply(200, "Machine stopped")

    async def _connect(self, channel: HttpChannel, req: Request) -> None:
        """QVD's checks in QVD's order, then the session flow (which answers 101 or 503 itself)."""
        login = ""
        head: asyncio.Task[bool] | None = None  # the desktop's start, asked for while the password is checked
        record = LoginRecord()  # written once the start is asked for (session.py), and in any case at the end
        connecting = False
        try:
            if "upgrade" not in req.header_tokens("connection") or "qvd/1.0" not in req.header_tokens("upgrade"):
                self._send(
                    channel,
                    req,
                    Reply(
                        426,
                        "connect_to_vm needs the headers Connection: Upgrade and Upgrade: QVD/1.0",
                        headers=((ERROR_HEADER, "upgrade_required"), ("Connection", "Upgrade"), ("Upgrade", "QVD/1.0")),
                    ),
                )
                return

            try:
                wanted: ConnectParams | None = self._params(req)
            except DeckardError:
                wanted = None  # reported once logged in (QVD's order)

            def start_early(user_id: int) -> None:
                nonlocal head
                if wanted is not None:
                    head = asyncio.create_task(head_start(self.db, user_id, wanted.desktop_id), name="head-start")

            user, login = await self._authenticate(
                channel.front, req, on_known=start_early if self.settings.head_start else None, record=record
            )
            channel.front.mark_authenticated()
            auth_ms = round((time.monotonic() - req.received_at) * 1000, 1)
            params = wanted or self._params(req)
            desk = await desktop_for_user(self.db, user, params.desktop_id)
            started = False  # by the head start: the session's own claim finds the command in (or, if not, asks)
            if head is not None:
                (asked,) = await asyncio.gather(head, return_exceptions=True)
                started = asked is True
            connecting = True
        except DeckardError as e:
            self._send(channel, req, error_reply(e), login)
            return
        finally:
            if head is not None and not connecting:  # the login failed (or the client left): no desktop for it
                assert wanted is not None
                await asyncio.shield(self._withdraw(head, wanted.desktop_id, channel.front.peer))
            if not connecting:
                await record.written()
        connect = ConnectRequest(
            user, login, params, desk, req.received_at, auth_ms, head_started=started, login_record=record
        )
        try:
            await self.sessions.run(channel, connect)
        finally:
            await record.written()

    @staticmethod
    def _params(req: Request) -> ConnectParams:
        return parse_connect_params(req.query, display_of(req.headers.get(DISPLAY_HEADER)))

    async def _withdraw(self, head: asyncio.Task[bool], desktop_id: int, peer: str) -> None:
        """Stop the desktop a failed login's head start asked for (``sessions.withdraw_head_start``)."""
        try:
            if not await head:
                return
            await withdraw_head_start(self.db, desktop_id)
            log.info("broker.head_start_withdrawn", desktop_id=desktop_id, peer=peer)
        except Exception as e:  # the desktop stays started; its idle policy or an administrator stops it
            log.warning("broker.head_start_not_withdrawn", peer=peer, error=str(e))
