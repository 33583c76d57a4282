"""`mailflow smtp`: an SMTP server that does what SES receiving does with each accepted mail.

LocalStack and moto do not implement SES *receiving*. This server lets anything that speaks
SMTP (a shop system, swaks, Python's smtplib) put mail into the pipeline the way production
does: for each message it calls `mailflow.dev.ses.receive_mail`, which stores the object (SES's
headers + the message) under the incoming prefix and publishes the `Received` notification.

What it promises a client, as an MTA must:

- RCPT for a domain not on the list: `550 5.1.1`, like an SES receipt rule that matches nothing.
- More than `max_recipients` recipients: `452 4.5.3` (the client sends the rest separately).
- A message that would be larger than `max_mail_bytes` once stored: `552` (at MAIL FROM when
  the client announces SIZE, else after DATA). The limit is on the stored object, SES headers
  included, because that is what the worker measures.
- `250` only after the object is stored *and* the notification published. If AWS fails,
  `451 4.3.0` and the client keeps the mail and retries: never accept-and-lose.

The bytes stored are the message exactly as the client meant it: the DATA payload after
SMTP dot-unstuffing (RFC 5321 4.5.2), 8-bit bytes untouched (`decode_data=False`, 8BITMIME).

The server runs on the caller's event loop (no aiosmtpd `Controller` thread), so it can share
the caller's aiobotocore clients. `EmulatorThread` runs one on its own loop in a background
thread, for tests and for tools that are not async.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Self

import structlog
from aiosmtpd.smtp import SMTP, Envelope, Session

from mailflow import aws
from mailflow.dev import ses
from mailflow.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Sequence
    from types import TracebackType

    from mailflow.aws import AwsClients
    from mailflow.config import Settings

log = structlog.get_logger("mailflow.smtp")

#: SES accepts at most 50 recipients per message; so does the emulator unless told otherwise.
DEFAULT_MAX_RECIPIENTS = 50
#: The domain of DESIGN's example addresses, for a CLI that needs a default.
DEFAULT_DOMAINS = ("orders.example.com",)
#: On stop, messages already in DATA get this long to be stored before connections are cut.
DEFAULT_DRAIN_S = 10.0
#: Idle SMTP connections are closed after this long (RFC 5321 4.5.3.2 suggests minutes).
IDLE_TIMEOUT_S = 300.0
SERVER_HOSTNAME = "mailflow-smtp.invalid"

REPLY_TRY_LATER = "451 4.3.0 try again later"
REPLY_TOO_BIG = "552 5.3.4 message size exceeds fixed maximum message size"
REPLY_TOO_MANY_RCPTS = "452 4.5.3 too many recipients"


def normalize_domains(domains: Sequence[str]) -> tuple[str, ...]:
    """Lower-case, strip `@`; `.example.com` (leading dot) means "any subdomain of"."""
    cleaned: list[str] = []
    for raw in domains:
        domain = raw.strip().lower().removeprefix("@")
        if not domain or domain == "." or "@" in domain or any(c.isspace() for c in domain):
            raise ConfigError(f"smtp: {raw!r} is not a domain")
        cleaned.append(domain)
    if not cleaned:
        raise ConfigError("smtp: at least one accepted domain is needed (--domain)")
    return tuple(dict.fromkeys(cleaned))


def domain_accepted(address: str, domains: Sequence[str]) -> bool:
    """SES receipt-rule matching: `example.com` is that domain, `.example.com` its subdomains."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return False
    domain = domain.lower().rstrip(".")
    for accepted in domains:
        if accepted.startswith("."):
            if domain.endswith(accepted):
                return True
        elif domain == accepted:
            return True
    return False


def stored_size_bytes(raw: bytes, sender: str, recipients: Sequence[str]) -> int:
    """Size of the S3 object `ses.receive_mail` will write for this message."""
    probe_id = "x" * len(ses.new_message_id())
    return len(ses.ses_headers(probe_id, sender, recipients, datetime.now(UTC))) + len(raw)


@dataclass
class SesReceivingHandler:
    """aiosmtpd handler: the RCPT policy and, for DATA, `ses.receive_mail`."""

    settings: Settings
    clients: AwsClients
    domains: tuple[str, ...]
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    topic_arn: str | None = None
    in_flight: int = 0
    accepted: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        self._idle.set()

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,  # noqa: ARG002 - aiosmtpd's hook signature
        session: Session,  # noqa: ARG002 - aiosmtpd's hook signature
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        """RCPT TO: `550 5.1.1` for a domain not accepted, `452 4.5.3` past `max_recipients`,
        else the recipient is added to the envelope and `250`."""
        if not domain_accepted(address, self.domains):
            log.info("smtp_rcpt_refused", recipient=address, reason="domain")
            return f"550 5.1.1 <{address}>: recipient domain not accepted here"
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return REPLY_TOO_MANY_RCPTS
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 OK"

    async def handle_DATA(  # noqa: N802 - aiosmtpd's hook name
        self,
        server: SMTP,  # noqa: ARG002 - aiosmtpd's hook signature
        session: Session,
        envelope: Envelope,
    ) -> str:
        # With decode_data=False, content and original_content are the same bytes: the DATA
        # lines after dot-unstuffing, CRLF kept. That is the message; it is what SES stores.
        """End of DATA: store the message and publish its notification, as SES would.

        `250` with the mail id only once both are done; `552` when the stored object would exceed
        `max_mail_bytes`; `451` on any failure, so the client keeps the mail and retries."""
        raw = envelope.original_content
        if raw is None:
            raw = envelope.content if isinstance(envelope.content, bytes) else b""
        sender = envelope.mail_from or ""
        recipients = list(envelope.rcpt_tos)
        size_bytes = stored_size_bytes(raw, sender, recipients)
        if size_bytes > self.settings.max_mail_bytes:
            log.info("smtp_refused", reason="too_large", size_bytes=size_bytes)
            return REPLY_TOO_BIG
        self.in_flight += 1
        self._idle.clear()
        try:
            if self.topic_arn is None:
                self.topic_arn = await ses.topic_arn(self.clients, self.settings)
            mail_id = await ses.receive_mail(
                self.clients,
                self.settings,
                raw,
                recipients=recipients,
                sender=sender,
                arn=self.topic_arn,
            )
        except Exception as exc:  # any failure: the client must keep the mail and retry
            log.warning(
                "smtp_store_failed",
                error=str(exc),
                error_type=type(exc).__name__,
                recipients=recipients,
                size_bytes=len(raw),
            )
            return REPLY_TRY_LATER
        finally:
            self.in_flight -= 1
            if self.in_flight == 0:
                self._idle.set()
        self.accepted += 1
        log.info(
            "smtp_accepted",
            mail_id=mail_id,
            recipients=recipients,
            sender=sender,
            size_bytes=len(raw),
            peer=_peer(session),
        )
        return f"250 2.0.0 Ok: queued as {mail_id}"

    async def drained(self, timeout_s: float) -> bool:
        """Wait until no DATA is being stored; False if that took longer than `timeout_s`."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


def _peer(session: Session) -> str:
    peer: Any = session.peer
    if isinstance(peer, tuple) and len(peer) >= 2:  # (host, port[, flowinfo, scope_id])
        return f"{peer[0]}:{peer[1]}"
    return str(peer)


class _TrackedSMTP(SMTP):
    """aiosmtpd's protocol, remembering its connection so that a stop can close it."""

    def __init__(
        self, handler: SesReceivingHandler, live: set[_TrackedSMTP], **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self._live = live

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._live.discard(self)
        super().connection_lost(error)

    def hang_up(self) -> asyncio.Task[None] | None:
        """Close the connection; return the session task, which the close cancels."""
        if self.transport is not None:
            self.transport.close()
        return self._handler_coroutine


@dataclass(frozen=True, slots=True)
class RunningServer:
    """Where a running emulator listens (the bound port, when 0 was asked) and its handler."""

    host: str
    port: int
    handler: SesReceivingHandler


@contextlib.asynccontextmanager
async def running(
    settings: Settings,
    clients: AwsClients,
    host: str,
    port: int,
    domains: Sequence[str],
    *,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    drain_s: float = DEFAULT_DRAIN_S,
) -> AsyncIterator[RunningServer]:
    """Listen on host:port (0 = any free port) on the running loop until the block ends."""
    if max_recipients < 1:
        raise ConfigError("smtp: max_recipients must be at least 1")
    handler = SesReceivingHandler(
        settings=settings,
        clients=clients,
        domains=normalize_domains(domains),
        max_recipients=max_recipients,
    )
    loop = asyncio.get_running_loop()
    live: set[_TrackedSMTP] = set()

    def protocol() -> _TrackedSMTP:
        # loop= is passed so aiosmtpd never looks one up itself (that path warns on 3.12+),
        # hostname= so it does not block on a reverse DNS lookup (socket.getfqdn).
        return _TrackedSMTP(
            handler,
            live,
            loop=loop,
            hostname=SERVER_HOSTNAME,
            ident="mailflow SES receiving emulator",
            data_size_limit=settings.max_mail_bytes,
            decode_data=False,
            enable_SMTPUTF8=True,
            timeout=IDLE_TIMEOUT_S,
        )

    server = await loop.create_server(protocol, host=host, port=port)
    sockname = server.sockets[0].getsockname()
    bound = RunningServer(host=str(sockname[0]), port=int(sockname[1]), handler=handler)
    log.info(
        "smtp_listening",
        host=bound.host,
        port=bound.port,
        domains=list(handler.domains),
        bucket=settings.bucket,
        topic=settings.topic,
        max_mail_bytes=settings.max_mail_bytes,
    )
    try:
        yield bound
    finally:
        server.close()  # no new connections
        if not await handler.drained(drain_s):
            log.warning("smtp_stop_with_mail_in_flight", in_flight=handler.in_flight)
        tasks = [task for proto in list(live) if (task := proto.hang_up()) is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await server.wait_closed()
        log.info("smtp_stopped", accepted=handler.accepted)


async def serve(
    settings: Settings,
    clients: AwsClients,
    host: str,
    port: int,
    domains: Sequence[str],
    stop: asyncio.Event,
    *,
    max_recipients: int = DEFAULT_MAX_RECIPIENTS,
    drain_s: float = DEFAULT_DRAIN_S,
    on_ready: Callable[[RunningServer], None] | None = None,
) -> None:
    """Run the emulator until `stop` is set, then let mails being stored finish and return.

    Raises `ConfigError` for an empty or malformed domain list, `OSError` if the address
    cannot be bound.
    """
    async with running(
        settings,
        clients,
        host,
        port,
        domains,
        max_recipients=max_recipients,
        drain_s=drain_s,
    ) as bound:
        if on_ready is not None:
            on_ready(bound)
        await stop.wait()


class EmulatorThread:
    """The emulator on its own event loop in a daemon thread, with its own AWS clients.

    For tests and synchronous callers::

        with EmulatorThread(settings, domains=["orders.example.com"]) as emu:
            smtplib.SMTP(emu.host, emu.port).sendmail(...)

    AWS clients are opened inside the thread from the environment at `start()`
    (AWS_ENDPOINT_URL etc.), so set the environment first.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        domains: Sequence[str] = DEFAULT_DOMAINS,
        host: str = "127.0.0.1",
        port: int = 0,
        max_recipients: int = DEFAULT_MAX_RECIPIENTS,
        start_timeout_s: float = 15.0,
    ) -> None:
        self._settings = settings
        self._domains = tuple(domains)
        self._host = host
        self._port = port
        self._max_recipients = max_recipients
        self._start_timeout_s = start_timeout_s
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.server: RunningServer | None = None

    @property
    def host(self) -> str:
        """The address the emulator listens on; RuntimeError when it is not running."""
        return self._bound().host

    @property
    def port(self) -> int:
        """The bound port; RuntimeError when the emulator is not running."""
        return self._bound().port

    @property
    def handler(self) -> SesReceivingHandler:
        """The running handler (`accepted`, `in_flight` counters); RuntimeError when stopped."""
        return self._bound().handler

    def _bound(self) -> RunningServer:
        if self.server is None:
            raise RuntimeError("the emulator is not running")
        return self.server

    def start(self) -> None:
        """Start the thread and wait until the server listens.

        Raises TimeoutError after `start_timeout_s`, or re-raises what stopped the server from
        starting (a bad domain list, a port in use); RuntimeError if already started."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="mailflow-smtp", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._start_timeout_s):
            raise TimeoutError(f"SMTP emulator did not start within {self._start_timeout_s} s")
        if self._error is not None:
            self.stop()
            raise self._error

    def stop(self) -> None:
        """Ask the server to stop, let mails being stored finish, and join the thread.
        Safe to call when not started or already stopped."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop ended on its own meanwhile
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout=DEFAULT_DRAIN_S + 15)
        self._thread = None
        self.server = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported to start(); the thread must not die silently
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()

        def ready(bound: RunningServer) -> None:
            self.server = bound
            self._ready.set()

        async with aws.open_clients(mail_region=self._settings.mail_region) as clients:
            await serve(
                self._settings,
                clients,
                self._host,
                self._port,
                self._domains,
                self._stop,
                max_recipients=self._max_recipients,
                on_ready=ready,
            )
