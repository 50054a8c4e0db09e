"""Wires the relay together and runs it: listeners, spool writer, HTTP endpoint, signals.

AXIOM_RELAY_PROCESSES=N is the number of processes in all. N=1: one process listens and
delivers. N>1: the parent starts N-1 listener processes sharing the ports through
SO_REUSEPORT (the kernel spreads connections evenly), because one Python process tops out at
one core, and itself runs the delivery engine and the HTTP endpoint without listening: a
parent that listened too got an equal share of the connections on top of all the delivery
work and was the bottleneck end to end. Children die with the parent (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import subprocess
import sys
import time

from sqlalchemy import text

from config.clock import Clock, OffsetClock
from config.settings import Settings, split_host_port
from config.tls import server_context
from models.audit_trail import record
from models.db import make_engine, session_scope
from models.sandbox_clock import clock_for
from relay.inbound.listener import InboundContext, InboundHandler, Mailbox
from relay.metrics import build_inbound_metrics, build_metrics
from relay.patches import install_all_or_exit
from relay.spool.writer import Spool
from relay.submission.auth import CredentialCache, LockoutTracker, dummy_hash
from relay.submission.keystore import KeyBox
from relay.submission.policy import PolicyStore
from relay.submission.server import (
    ConnectionCounter,
    RelayContext,
    SessionLimits,
    SubmissionHandler,
    make_protocol_factory,
)
from runbooks.loader import dkim_signing

# The delivery engine (aiosmtplib, dnspython, classification rules) and the HTTP endpoint
# (uvicorn, starlette) are imported where they are used: listener processes
# (AXIOM_RELAY_PROCESSES > 1) never use them, and each of those processes is ~30 MB smaller
# for it.

log = logging.getLogger("axiom.relay")


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class LogFormatter(logging.Formatter):
    """LOG_FORMAT's lines, byte for byte, for fewer instructions: the date and time to the
    second go through localtime() and strftime() once a second, not once a record, and the
    four fields are joined directly instead of through %-formatting of the record's dict.
    The maillog's send_attempt record is on the delivering process's path for every message
    (before: ~26,000 instructions in format(), ~13,000 of them in formatTime())."""

    def __init__(self) -> None:
        super().__init__(LOG_FORMAT)
        self._second: tuple[float | None, str] = (None, "")

    def usesTime(self) -> bool:
        return True  # LOG_FORMAT shows %(asctime)s

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if datefmt:
            return super().formatTime(record, datefmt)
        second = record.created // 1  # localtime() floors: the text is the same all second
        cached, text = self._second  # one tuple: threads see a pair that belongs together
        if second != cached:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return self.default_msec_format % (text, record.msecs)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return f"{record.asctime} {record.levelname} {record.name} {record.message}"


def configure_logging(level: int = logging.INFO) -> None:
    """The relay's logging: stderr in LOG_FORMAT (LogFormatter), less the record fields that
    format never shows. The caller's file and line (a stack walk), thread and process names
    cost ~4 us of the ~13 us of each record (the logging HOWTO's "Optimization"), and the
    maillog writes two records per message."""
    handler = logging.StreamHandler()  # stderr, as basicConfig's own
    handler.setFormatter(LogFormatter())
    logging.basicConfig(level=level, handlers=[handler])  # nothing if root has handlers
    logging._srcfile = None  # no sys._getframe() per record (documented in the HOWTO)
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.getLogger("mail.log").setLevel(logging.WARNING)  # aiosmtpd's per-command chatter


def build_context(settings: Settings, engine, clock: Clock) -> RelayContext:
    secret = settings.load_secret_key()
    dummy_hash()  # made now, so the first AUTH of an unknown user takes as long as any other
    policy = PolicyStore(
        engine,
        KeyBox(secret),
        CredentialCache(secret, settings.credential_cache_seconds),
        ttl=settings.policy_cache_seconds,
    )
    spool = Spool(engine, batch_max=settings.spool_batch_max, clock=clock)

    def on_lockout(client_ip: str) -> None:
        with session_scope(engine) as session:
            record(
                session,
                actor="relay:auth-lockout",
                action="auth.lockout",
                subject=f"client:{client_ip}",
                evidence={
                    "failures": settings.auth_max_failures,
                    "window_seconds": settings.auth_failure_window_seconds,
                    "lockout_seconds": settings.auth_lockout_seconds,
                },
            )
            session.commit()

    return RelayContext(
        hostname=settings.hostname,
        policy=policy,
        spool=spool,
        lockout=LockoutTracker(
            settings.auth_max_failures,
            settings.auth_failure_window_seconds,
            settings.auth_lockout_seconds,
        ),
        signing=dkim_signing().spec,
        metrics=build_metrics(),
        max_recipients=settings.max_recipients,
        on_lockout=on_lockout,
        max_header_fields=settings.max_header_fields,
        max_header_field_bytes=settings.max_header_field_bytes,
    )


def build_inbound_context(settings: Settings, engine, clock: Clock) -> InboundContext:
    from relay.delivery.return_path import Tagger
    from relay.inbound.feedback import Recording
    from runbooks.loader import delivery

    recording = Recording(
        hostname=settings.hostname,
        tagger=Tagger(settings.load_secret_key()),
        dsn_from_local_part=delivery().spec.dsn_from_local_part,
    )
    return InboundContext(
        engine=engine,
        clock=clock,
        feedback=Mailbox.of(settings.feedback_mailbox),
        bounces=Mailbox.of(settings.bounce_mailbox),
        dmarc=Mailbox.of(settings.dmarc_mailbox),
        metrics=build_inbound_metrics(),
        recording=recording,
        max_header_fields=settings.max_header_fields,
        max_header_field_bytes=settings.max_header_field_bytes,
    )


async def serve(
    settings: Settings,
    *,
    with_http: bool = True,
    reuse_port: bool = False,
    listen: bool = True,
    wake_from: tuple[int, ...] = (),
    wake_parent: bool = False,
) -> None:
    """wake_from: pipes from listener processes, one byte per committed spool batch, which
    wake this process's delivery engine; wake_parent: this listener process writes those
    bytes to its stdout."""
    engine = make_engine(settings.db_url)
    clock = clock_for(settings.environment, engine)
    following = _follow(clock)
    ctx = build_context(settings, engine, clock)
    ctx.spool.start()
    handler = SubmissionHandler(ctx)
    tls = server_context(settings.cert_path, settings.key_path)
    limits = SessionLimits(
        ConnectionCounter(settings.max_connections_per_client),
        settings.session_max_seconds,
        settings.max_session_errors,
    )
    loop = asyncio.get_running_loop()
    servers = []
    submission = [
        (settings.submission_listen, False),
        (settings.submission_tls_listen, True),
    ]
    for address, implicit in submission if listen else []:
        host, port = split_host_port(address)
        factory = make_protocol_factory(
            handler,
            hostname=settings.hostname,
            data_size_limit=settings.max_message_size,
            starttls_context=tls,
            implicit_tls=implicit,
            limits=limits,
            idle_timeout=settings.session_idle_timeout_seconds,
            commands_per_session=settings.max_commands_per_session,
        )
        servers.append(
            await loop.create_server(
                factory, host, port, ssl=tls if implicit else None, reuse_port=reuse_port or None
            )
        )
        log.info("listening on %s (%s)", address, "implicit TLS" if implicit else "STARTTLS")
    if settings.inbound_listen and listen:  # bounces and complaint reports for our own mailboxes
        host, port = split_host_port(settings.inbound_listen)
        factory = make_protocol_factory(
            InboundHandler(build_inbound_context(settings, engine, clock)),
            hostname=settings.hostname,
            data_size_limit=settings.inbound_max_message_size,
            starttls_context=tls,
            implicit_tls=False,
            limits=limits,
            idle_timeout=settings.session_idle_timeout_seconds,
            commands_per_session=settings.max_commands_per_session,
            offer_auth=False,
        )
        servers.append(await loop.create_server(factory, host, port, reuse_port=reuse_port or None))
        log.info(
            "listening on %s (inbound: bounces and complaint reports)", settings.inbound_listen
        )

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    http_task = None
    if with_http:
        import uvicorn

        from relay.http import build_app

        http_host, http_port = split_host_port(settings.http_listen)

        async def health():
            try:
                await asyncio.to_thread(_ping, engine)
                return True, {"database": "ok"}
            except Exception as exc:
                return False, {"database": str(exc).splitlines()[0]}

        config = uvicorn.Config(
            build_app(health),
            host=http_host,
            port=http_port,
            log_level="warning",
            lifespan="off",
        )
        http_server = uvicorn.Server(config)
        http_server.install_signal_handlers = lambda: None  # we own the signals
        http_task = asyncio.create_task(http_server.serve())
        # "ready" means every listener answers: wait for the HTTP endpoint too.
        while not http_server.started:
            if http_task.done():
                raise OSError(
                    f"AXIOM_HTTP_LISTEN {settings.http_listen}: the HTTP endpoint did not start"
                )
            await asyncio.sleep(0.01)

    delivery_task = None
    if with_http and settings.delivery_enabled:
        delivery = build_delivery_engine(settings, engine, clock)
        ctx.spool.on_commit = delivery.wake.set  # new mail starts out at once, not at the next poll
        for fd in wake_from:  # and so does mail the listener processes spooled
            os.set_blocking(fd, False)
            loop.add_reader(fd, _woken, loop, fd, delivery.wake)
        delivery_task = asyncio.create_task(delivery.run(stop))

    # Everything allocated so far (settings, engine, runbooks, imported modules: hundreds of
    # thousands of objects) lives as long as the process. Freezing it keeps the garbage
    # collector from walking all of it again and again under load; that walk was ~8% of the
    # event loop's time at a few hundred messages per second.
    gc.freeze()
    print(f"axiom relay ready pid={os.getpid()}", flush=True)
    if wake_parent:
        os.set_blocking(sys.stdout.fileno(), False)
        ctx.spool.on_commit = _wake_parent
    await stop.wait()
    log.info("stopping")
    if delivery_task is not None:
        await delivery_task
    for server in servers:
        server.close()
    for server in servers:
        await server.wait_closed()
    if http_task is not None:
        http_server.should_exit = True
        await http_task
    ctx.spool.stop()
    if following is not None:
        following.cancel()
    engine.dispose()


def _follow(clock: Clock) -> asyncio.Task | None:
    """The sandbox clock reads its shared offset from a worker thread, never on the loop."""
    return asyncio.create_task(clock.follow()) if isinstance(clock, OffsetClock) else None


def build_delivery_engine(settings: Settings, engine, clock: Clock | None = None):
    from relay.delivery.dns import Resolver
    from relay.delivery.engine import DeliveryEngine
    from relay.delivery.return_path import ReturnPaths
    from runbooks import loader as runbooks

    shaping = runbooks.shaping()
    delivery = runbooks.delivery().spec
    if settings.delivery_lease_seconds is not None:
        delivery = delivery.model_copy(update={"lease_seconds": settings.delivery_lease_seconds})
    return DeliveryEngine(
        engine=engine,
        resolver=Resolver.from_settings(settings),
        clock=clock or clock_for(settings.environment, engine),
        hostname=settings.hostname,
        delivery_port=settings.delivery_port,
        delivery=delivery,
        shaping=shaping.spec,
        shaping_version=shaping.version,
        return_paths=ReturnPaths.from_settings(settings, engine),
    )


async def deliver_only(settings: Settings) -> None:
    """`axiom deliver`: a delivery process without listeners (scale-out, crash tests)."""
    install_all_or_exit()
    engine = make_engine(settings.db_url)
    clock = clock_for(settings.environment, engine)
    following = _follow(clock)
    delivery = build_delivery_engine(settings, engine, clock)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"axiom deliver ready pid={os.getpid()} node={delivery.node_id}", flush=True)
    await delivery.run(stop)
    if following is not None:
        following.cancel()
    engine.dispose()


def _ping(engine) -> None:
    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def run_event_loop(settings: Settings, main) -> None:
    """Run main (a coroutine) on the event loop AXIOM_EVENT_LOOP names. uvloop (libuv) costs
    the relay markedly less CPU per SMTP session than the standard library's selector loop;
    aiosmtpd (STARTTLS through transport.set_protocol) and aiosmtplib both support it."""
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def run(settings: Settings) -> None:
    """Entry point of `axiom relay`."""
    install_all_or_exit()  # before anything connects; the listener children install their own
    listeners = settings.relay_processes - 1
    children: list[subprocess.Popen] = []
    for _ in range(listeners):
        children.append(
            subprocess.Popen(
                [sys.executable, "-m", "relay.service", "--listener-only"],
                stdout=subprocess.PIPE,
                text=True,
                preexec_fn=_die_with_parent,
            )
        )
    try:
        for child in children:
            _wait_until_listening(child)
        pipes = tuple(child.stdout.fileno() for child in children if child.stdout is not None)
        run_event_loop(
            settings, serve(settings, with_http=True, listen=not children, wake_from=pipes)
        )
    finally:
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=10)


def _wake_parent() -> None:
    with contextlib.suppress(BlockingIOError):  # a full pipe: the parent is awake already
        os.write(1, b"w")


def _woken(loop, fd: int, wake: asyncio.Event) -> None:
    try:
        data = os.read(fd, 4096)
    except BlockingIOError:
        return
    if not data:  # the listener process is gone
        loop.remove_reader(fd)
    wake.set()


def _wait_until_listening(child: subprocess.Popen, timeout: float = 60) -> None:
    """The parent says ready only once every listener process listens."""
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline() if ready else ""
    if not line.startswith("axiom relay ready"):
        child.kill()
        raise OSError(
            f"a listener process did not start listening (exit status {child.wait()}); "
            "its error is above"
        )


def _die_with_parent() -> None:
    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


if __name__ == "__main__":  # the extra listener processes
    from config.settings import load_settings

    # The parent's format (axiom relay), and its maillog lines: they share the parent's stderr.
    configure_logging(logging.WARNING)
    logging.getLogger("axiom.maillog").setLevel(logging.INFO)
    install_all_or_exit()
    listener_settings = load_settings()
    run_event_loop(
        listener_settings,
        serve(listener_settings, with_http=False, reuse_port=True, wake_parent=True),
    )
