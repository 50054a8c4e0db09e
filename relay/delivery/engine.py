"""The delivery engine: empties the spool towards the recipients' MX, the Protocol's way.

Loop: claim due recipients under a lease → group them per (message, domain) → for each group
resolve MX, name the provider, choose a source IP, respect the path's pacing, speak SMTP
(reusing connections), classify every reply once → settle: delivered, deferred with backoff,
bounced (DSN + suppression), expired (DSN), or postponed without an attempt when no source IP
may send. Reactions to receiver signals are written as time-bounded suspensions.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import secrets
import ssl
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import aiosmtplib
from sqlalchemy import Engine

from config.clock import Clock
from models import HoldReason, RecipientState
from relay import maillog
from relay.delivery.classify import (
    Classification,
    ConnectionFailure,
    classify,
    provider_for_mx,
    rules,
)
from relay.delivery.dns import MxResult, Resolver
from relay.delivery.dsn import FailedRecipient, build_dsn, dsn_entry
from relay.delivery.egress import Egress, SourceIp
from relay.delivery.pipelining import PipeliningProtocol, check_sequence
from relay.delivery.reactions import ReactionEngine
from relay.delivery.retry import has_expired, next_attempt_at
from relay.delivery.return_path import CustomersOwnSender, ReturnPaths
from relay.delivery.shaping import PathGate, Shaper
from relay.metrics import delivery_metrics
from relay.patches.aiosmtplib import quote_address as _quote_address  # remembered per address
from relay.spool.claims import (
    TENANT_PAUSED_WAIT,
    Attempt,
    Claim,
    Hold,
    QueuedMessage,
    Settlement,
    claim_due,
    load_messages,
    renew_leases,
    settle_many,
)
from relay.spool.group_commit import GroupCommitter
from runbooks.schema_delivery import DeliverySpec, ShapingSpec

log = logging.getLogger("axiom.delivery")

HARD_BOUNCE = {"mailbox_unknown", "bad_domain"}
MAX_PACING_WAIT = 20.0  # longer waits give the lease back instead of holding it
_DNS_FAILURE_KIND = {
    "null_mx": "dns_null_mx",
    "nxdomain": "dns_nxdomain",
    "invalid_domain": "dns_nxdomain",
    "no_mail_records": "dns_no_mail_host",
    "mx_unresolvable": "dns_no_mail_host",
}


@dataclass
class _Reply:
    code: int | None
    text: str
    failure: str | None = None  # connection failure kind when there was no reply

    def classify(self, provider: str | None) -> Classification:
        if self.failure is not None:
            return classify(ConnectionFailure(self.failure, self.text), provider)
        return classify(f"{self.code} {self.text}", provider)


class _Unreachable(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(detail)
        self.kind, self.detail = kind, detail


@dataclass
class _Connection:
    smtp: aiosmtplib.SMTP
    gate: PathGate
    pipelining: bool = False  # RFC 2920 groups: advertised, and not remembered as broken
    sent: int = 0
    clean: bool = True  # False: an unfinished transaction needs RSET before reuse
    idle_since: float = field(default_factory=time.monotonic)


def opportunistic_tls_context() -> ssl.SSLContext:
    """STARTTLS to an MX as MTAs do without DANE or MTA-STS: encrypted, not authenticated
    (RFC 7435), so no certificate is checked and no CA bundle is read. Built once per pool:
    aiosmtplib, given none, builds a default context per connection and loads the system's
    CA bundle into it, which was a third of the delivery engine's CPU (issue 11)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class ConnectionPool:
    """Open SMTP sessions per (source IP, MX address); each holds one slot of its path's gate."""

    def __init__(self, hostname: str, port: int, spec: DeliverySpec):
        self._hostname = hostname
        self._port = port
        self._spec = spec
        self._tls = opportunistic_tls_context()
        self._idle: dict[tuple[str, str], list[_Connection]] = defaultdict(list)
        self._tls_broken_until: dict[str, float] = {}
        self._pipelining_broken_until: dict[str, float] = {}
        self._closing: set[asyncio.Future] = set()

    async def acquire(
        self, source: SourceIp, mx_host: str, address: str, gate: PathGate
    ) -> _Connection:
        key = (source.address, address)
        while True:
            conn = await self._take_idle(key)
            if conn is not None:
                return conn
            if not gate.connections.locked():
                break
            # Every slot of this path is taken. An idle session to another MX of the same
            # path gives its slot up; otherwise wait until a session is released.
            victim = self._idle_on(gate)
            if victim is not None:
                await self._quit(victim)
                continue
            gate.available.clear()
            await gate.available.wait()
        await gate.connections.acquire()
        try:
            smtp = await self._open(source, address)
        except BaseException:
            gate.connections.release()
            gate.available.set()
            raise
        pipelining = (
            isinstance(smtp.protocol, PipeliningProtocol)
            and smtp.supports_extension("pipelining")
            and self._pipelining_broken_until.get(address, 0) < time.monotonic()
        )
        return _Connection(smtp, gate, pipelining)

    def pipelining_failed(self, address: str, detail: str) -> None:
        """A pipelined group timed out or lost the session. Some receivers advertise PIPELINING
        and break under it (smtp-sink with delayed replies answers out of order, then hangs);
        like a broken STARTTLS, that is remembered and the retry goes command by command."""
        self._pipelining_broken_until[address] = (
            time.monotonic() + self._spec.tls_broken_memory_seconds
        )
        log.warning(
            "pipelined exchange with %s failed (%s); one command at a time for %ss",
            address,
            detail,
            self._spec.tls_broken_memory_seconds,
        )

    async def _take_idle(self, key: tuple[str, str]) -> _Connection | None:
        idle = self._idle[key]
        while idle:
            conn = idle.pop()
            if conn.smtp.is_connected:
                conn.pipelining = conn.pipelining and (
                    self._pipelining_broken_until.get(key[1], 0) < time.monotonic()
                )
                if not conn.clean:
                    with contextlib.suppress(aiosmtplib.SMTPException):
                        await conn.smtp.rset()
                    conn.clean = True
                return conn
            self._close(conn)
        return None

    def _idle_on(self, gate: PathGate) -> _Connection | None:
        for conns in self._idle.values():
            for conn in conns:
                if conn.gate is gate:
                    conns.remove(conn)
                    return conn
        return None

    async def _open(self, source: SourceIp, address: str) -> aiosmtplib.SMTP:
        use_tls = self._tls_broken_until.get(address, 0) < time.monotonic()
        try:
            return await self._connect(source, address, use_tls)
        except _Unreachable as exc:
            if exc.kind != "tls_handshake" or not use_tls:
                raise
            # Opportunistic TLS that fails is remembered for a while (as KumoMTA does) and the
            # message goes in plaintext now rather than waiting for a fix we cannot make.
            self._tls_broken_until[address] = (
                time.monotonic() + self._spec.tls_broken_memory_seconds
            )
            log.warning(
                "STARTTLS to %s failed (%s); plaintext for %ss",
                address,
                exc.detail,
                self._spec.tls_broken_memory_seconds,
            )
            return await self._connect(source, address, False)

    async def _connect(self, source: SourceIp, address: str, use_tls: bool) -> aiosmtplib.SMTP:
        smtp = aiosmtplib.SMTP(
            hostname=address,
            port=self._port,
            source_address=(source.address, 0),
            local_hostname=source.ptr_name or self._hostname,
            timeout=self._spec.command_timeout_seconds,
            use_tls=False,
            start_tls=False,
            validate_certs=False,
        )
        try:
            await smtp.connect(timeout=self._spec.connect_timeout_seconds)
        except aiosmtplib.SMTPConnectResponseError as exc:
            raise _ReplyOnConnect(exc.code, exc.message) from None
        except (aiosmtplib.SMTPConnectTimeoutError, TimeoutError) as exc:
            raise _Unreachable("connection_timeout", str(exc)) from None
        except (aiosmtplib.SMTPConnectError, OSError) as exc:
            raise _Unreachable("connection_refused", str(exc)) from None
        try:
            await smtp.ehlo()
            if use_tls and smtp.supports_extension("starttls"):
                try:
                    await smtp.starttls(validate_certs=False, tls_context=self._tls)
                except (aiosmtplib.SMTPException, ssl.SSLError, OSError) as exc:
                    smtp.close()
                    raise _Unreachable("tls_handshake", str(exc)) from None
        except aiosmtplib.SMTPResponseException as exc:
            smtp.close()
            raise _ReplyOnConnect(exc.code, exc.message) from None
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            smtp.close()
            raise _Unreachable("connection_lost", str(exc)) from None
        return smtp

    def release(self, conn: _Connection, source: SourceIp, address: str, reusable: bool) -> None:
        if (
            reusable
            and conn.smtp.is_connected
            and conn.sent < conn.gate.limits.messages_per_connection
        ):
            conn.idle_since = time.monotonic()
            self._idle[(source.address, address)].append(conn)
            conn.gate.available.set()
        else:
            task = asyncio.ensure_future(self._quit(conn))
            self._closing.add(task)  # keep a reference until the QUIT is done
            task.add_done_callback(self._closing.discard)

    async def _quit(self, conn: _Connection) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await conn.smtp.quit()
        self._close(conn)

    def _close(self, conn: _Connection) -> None:
        with contextlib.suppress(Exception):
            conn.smtp.close()
        conn.gate.connections.release()
        conn.gate.available.set()

    async def reap(self, max_idle: float = 5.0) -> None:
        # Out of the idle lists first, then QUIT: while a QUIT is awaited, jobs take and
        # return sessions. A session still listed could be taken while it closes, and lists
        # rebuilt after the awaits would list again a session a job is using (two jobs on one
        # session: interleaved transactions, mail to the wrong recipients) and forget one a
        # job returned (its slot never freed).
        now = time.monotonic()
        stale = []
        for conns in self._idle.values():
            for conn in list(conns):
                if now - conn.idle_since >= max_idle or not conn.smtp.is_connected:
                    conns.remove(conn)
                    stale.append(conn)
        for conn in stale:
            await self._quit(conn)

    async def close_all(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                await self._quit(conn)
        self._idle.clear()


class _ReplyOnConnect(Exception):
    """The server answered the greeting or EHLO with an error (e.g. 421, 554)."""

    def __init__(self, code: int, text: str):
        super().__init__(f"{code} {text}")
        self.code, self.text = code, text


class DeliveryEngine:
    def __init__(
        self,
        *,
        engine: Engine,
        resolver: Resolver,
        clock: Clock,
        hostname: str,
        delivery_port: int,
        delivery: DeliverySpec,
        shaping: ShapingSpec,
        shaping_version: str,
        egress: Egress | None = None,
        node_id: str | None = None,
        return_paths: ReturnPaths | None = None,
    ):
        self.engine = engine
        self.resolver = resolver
        self.clock = clock
        self.hostname = hostname
        self.spec = delivery
        self.egress = egress or Egress(engine, clock)
        # MAIL FROM: bounces+TAG@ a return-path domain (relay/delivery/return_path.py)
        self.return_paths = return_paths or CustomersOwnSender()
        self.shaper = Shaper(shaping.limits_for)
        self.reactions = ReactionEngine(shaping.reactions, shaping_version)
        self.pool = ConnectionPool(hostname, delivery_port, delivery)
        self.node_id = node_id or f"{hostname}:{os.getpid()}:{secrets.token_hex(3)}"
        self.wake = asyncio.Event()
        self._in_flight = 0
        self._held: set[int] = set()  # recipient ids claimed and not yet settled
        self._tasks: set[asyncio.Task] = set()
        # Outcomes are group-committed: one transaction for what many jobs finished meanwhile,
        # instead of one transaction (and one thread hop) per message.
        self.metrics = delivery_metrics()
        self.outcomes: GroupCommitter[tuple[datetime, Settlement]] = GroupCommitter(
            self._commit_outcomes,
            batch_max=256,
            name="delivery-outcomes",
        )

    def _commit_outcomes(self, batch: list[tuple[datetime, Settlement]]) -> None:
        settle_many(self.engine, self.node_id, batch)
        self.metrics.settled(batch)  # counted once committed

    # --- the loop ---
    async def run(self, stop: asyncio.Event, idle_poll: float = 1.0) -> None:
        reaper = asyncio.create_task(self._reap_forever())
        renewer = asyncio.create_task(self._renew_leases_forever())
        try:
            while not stop.is_set():
                claimed = 0
                try:
                    claimed = await self.run_once()
                except Exception:
                    log.exception("claim failed; retrying")  # e.g. database briefly unreachable
                if claimed == 0:
                    self.wake.clear()
                    waiters = [
                        asyncio.ensure_future(stop.wait()),
                        asyncio.ensure_future(self.wake.wait()),
                    ]
                    try:
                        await asyncio.wait(
                            waiters, timeout=idle_poll, return_when=asyncio.FIRST_COMPLETED
                        )
                    finally:
                        # The waiter that did not fire would stay pending for good: one task
                        # leaked per idle spell (about one per message under steady load),
                        # ~1 KB each, RSS growing without bound in the soak.
                        for waiter in waiters:
                            waiter.cancel()
        finally:
            reaper.cancel()
            await self.drain()
            renewer.cancel()
            await self.pool.close_all()
            self.outcomes.stop()

    async def run_once(self) -> int:
        room = self.spec.max_in_flight - self._in_flight
        if room <= 0:
            await asyncio.sleep(0.05)
            return 0
        now = self.clock.now()
        claims = await asyncio.to_thread(
            claim_due,
            self.engine,
            self.node_id,
            now,
            self.spec.lease_seconds,
            min(room, self.spec.claim_batch),
        )
        # A lease of ours that ran out while its job still runs (a renewal came late) can come
        # back to us: that recipient is already being worked on, and once is enough.
        claims = [c for c in claims if c.recipient_id not in self._held]
        if not claims:
            return 0
        messages = await asyncio.to_thread(
            load_messages, self.engine, {c.message_id for c in claims}
        )
        groups: dict[tuple[str, str], list[Claim]] = defaultdict(list)
        for claim in claims:
            groups[(claim.message_id, claim.domain)].append(claim)
        for (message_id, domain), group in groups.items():
            message = messages.get(message_id)
            if message is None:
                continue
            self._in_flight += len(group)
            self._held.update(c.recipient_id for c in group)
            task = asyncio.create_task(self._job(message, domain, group))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(claims)

    async def drain(self) -> None:
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(2)
            await self.pool.reap()

    async def _renew_leases_forever(self) -> None:
        """Keep the leases of recipients still being worked on. A job may wait on connection
        slots, pacing or a slow receiver for longer than lease_seconds; unrenewed, its lease
        would run out and another worker (or this one) would claim and send it a second time.
        Only a process that stopped renewing (it died) lets its leases expire."""
        # Its own thread: behind queued settle() calls in the shared pool it could come late.
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="lease-renewal")
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self.spec.lease_seconds / 3)
                held = sorted(self._held)
                if not held:
                    continue
                try:
                    await loop.run_in_executor(
                        executor,
                        renew_leases,
                        self.engine,
                        self.node_id,
                        held,
                        self.clock.now(),
                        self.spec.lease_seconds,
                    )
                except Exception:
                    log.exception("lease renewal failed; retrying")
        finally:
            executor.shutdown(wait=False)

    # --- one message to one domain ---
    async def _job(self, message: QueuedMessage, domain: str, claims: list[Claim]) -> None:
        try:
            await self._deliver(message, domain, claims)
        except Exception:
            # The leases run out and another attempt follows; nothing is lost.
            log.exception("delivery of %s to %s failed unexpectedly", message.id, domain)
        finally:
            self._in_flight -= len(claims)
            self._held.difference_update(c.recipient_id for c in claims)

    async def _deliver(self, message: QueuedMessage, domain: str, claims: list[Claim]) -> None:
        outcome = Settlement(message.tenant_id, message.stream, message.from_domain)
        if message.tenant_paused:
            # Like a hold: back to the queue without an attempt; resuming wakes it at once.
            now = self.clock.now()
            until = now + timedelta(seconds=self.spec.capped_wait_seconds)
            outcome.postponed = [(c, until, TENANT_PAUSED_WAIT) for c in claims]
            outcome.hold = Hold(HoldReason.paused)
            await self.outcomes.submit((now, outcome))
            return
        mx = await self.resolver.resolve_mx(domain)
        if not mx.ok:
            failure = mx.failure
            kind = _DNS_FAILURE_KIND.get(
                failure.kind, "dns_timeout" if "timed out" in failure.reason else "dns_servfail"
            )
            reply = _Reply(
                None, f"{failure.enhanced_code} {domain}: {failure.reason}", failure=kind
            )
            attempts = [self._attempt(c, reply, None, None, None, 0) for c in claims]
            self._conclude(message, attempts, outcome, mx_host=None)
            await self._settle(outcome, attempts)
            return
        provider = provider_for_mx(mx.targets[0].host)
        # The From domain (a new sending domain warms per provider on every IP) and the
        # customer's warm-up candidate mark (warming IPs prefer it).
        # A capped path takes a unit per recipient of the job, all at once.
        pick = (message.tenant_id, message.stream, provider, message.from_domain)
        units = len(claims)
        choice = self.egress.choose_cached(*pick, message.warmup_candidate, units)
        if choice is None:
            choice = await asyncio.to_thread(
                self.egress.choose, *pick, message.warmup_candidate, units
            )
        now = self.clock.now()
        if choice.source is None:
            until = choice.wait_until or now + timedelta(seconds=self.spec.capped_wait_seconds)
            outcome.postponed = [(c, until, f"waiting: {choice.wait_reason}") for c in claims]
            outcome.hold = Hold(choice.hold, provider)
            await self.outcomes.submit((now, outcome))
            return
        source = choice.source
        delivered = 0
        if choice.units < len(claims):
            # A warm-up cap had room for only some of the job's recipients: those go now, the
            # rest wait for the next pick (another IP, or the next hour's room), no attempt.
            until = now + timedelta(seconds=self.spec.capped_wait_seconds)
            waiting = f"waiting: warm-up cap of {source.address} for {provider} reached"
            outcome.postponed = [(c, until, waiting) for c in claims[choice.units :]]
            outcome.hold = Hold(HoldReason.capped, provider)
            claims = claims[: choice.units]
        try:
            gate = self.shaper.gate(source.address, provider, _site(mx, provider))
            delay = gate.delay_for_next(self.egress.throttle_for(source.address, provider))
            if delay > MAX_PACING_WAIT:
                outcome.postponed += [
                    (c, now + timedelta(seconds=delay), f"paced: {provider} via {source.address}")
                    for c in claims
                ]
                outcome.hold = Hold(HoldReason.paced, provider, source.address)
                await self.outcomes.submit((now, outcome))
                return
            if delay > 0:
                await asyncio.sleep(delay)
            attempts = await self._transmit(message, claims, mx, source, provider, gate)
            delivered = sum(1 for a in attempts if a.category == "delivered")
            self._conclude(
                message, attempts, outcome, mx_host=attempts[0].mx_host if attempts else None
            )
            await self._settle(outcome, attempts)
        finally:
            # choose() counted a warm-up pick in WarmupDay.sent (the IP's day, the domain's);
            # now make it what was delivered.
            if choice.warmup_day_id is not None or choice.domain_day_id is not None:
                await asyncio.to_thread(
                    self.egress.release,
                    choice.warmup_day_id,
                    delivered,
                    choice.domain_day_id,
                    choice.units,
                )

    async def _transmit(
        self,
        message: QueuedMessage,
        claims: list[Claim],
        mx: MxResult,
        source: SourceIp,
        provider: str,
        gate: PathGate,
    ) -> list[Attempt]:
        started = time.monotonic()
        last = _Reply(None, "no MX host could be reached", failure="connection_refused")
        last_host: str | None = None
        for host, address in mx.endpoints():
            last_host = host
            try:
                conn = await self.pool.acquire(source, host, address, gate)
            except _Unreachable as exc:
                last = _Reply(None, f"{host}[{address}]: {exc.detail}", failure=exc.kind)
                continue  # RFC 5321 5.1: try the next MX
            except _ReplyOnConnect as exc:
                last = _Reply(exc.code, exc.text)
                continue
            try:
                replies, reusable = await self._transaction(
                    conn, message, claims, mx.domain, address
                )
            except BaseException:
                self.pool.release(conn, source, address, False)  # never keep the path's slot
                raise
            gate.record_send(sum(1 for r in replies.values() if r.code and r.code < 300))
            self.pool.release(conn, source, address, reusable)
            latency = int((time.monotonic() - started) * 1000)
            return [
                self._attempt(c, replies[c.recipient_id], source, provider, host, latency)
                for c in claims
            ]
        latency = int((time.monotonic() - started) * 1000)
        return [self._attempt(c, last, source, provider, last_host, latency) for c in claims]

    async def _transaction(
        self,
        conn: _Connection,
        message: QueuedMessage,
        claims: list[Claim],
        ace_domain: str,
        address: str,
    ) -> tuple[dict[int, _Reply], bool]:
        """One MAIL/RCPT…/DATA exchange; per-recipient replies and whether to keep the session.
        ace_domain: the recipients' domain in A-labels (punycode), as MX resolution used it."""
        smtp = conn.smtp
        replies: dict[int, _Reply] = {}
        sender = await self.return_paths.sender(message, claims)
        wire = {c.recipient_id: _wire_address(c.address, ace_domain) for c in claims}
        options, encoding = [], "ascii"
        if not sender.isascii() or not all(a.isascii() for a in wire.values()):
            if smtp.supports_extension("smtputf8"):
                options, encoding = ["SMTPUTF8"], "utf-8"
            else:
                for claim in claims:
                    if not sender.isascii() or not wire[claim.recipient_id].isascii():
                        replies[claim.recipient_id] = _Reply(553, NO_SMTPUTF8)
                claims = [c for c in claims if c.recipient_id not in replies]
                if not claims:
                    return replies, True
        conn.clean = False
        try:
            if conn.pipelining:
                try:
                    return await self._pipelined(
                        conn, message, claims, wire, options, encoding, sender
                    )
                except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
                    self.pool.pipelining_failed(address, str(exc) or type(exc).__name__)
                    raise
            try:
                await smtp.mail(sender, options=options, encoding=encoding)
            except aiosmtplib.SMTPResponseException as exc:
                replies.update({c.recipient_id: _Reply(exc.code, exc.message) for c in claims})
                return replies, True
            accepted = []
            for claim in claims:
                try:
                    await smtp.rcpt(wire[claim.recipient_id], encoding=encoding)
                    accepted.append(claim)
                except aiosmtplib.SMTPResponseException as exc:
                    replies[claim.recipient_id] = _Reply(exc.code, exc.message)
            if not accepted:
                return replies, True
            try:
                response = await smtp.data(message.data)
                for claim in accepted:
                    replies[claim.recipient_id] = _Reply(response.code, response.message)
                conn.clean = True
                conn.sent += 1
            except aiosmtplib.SMTPResponseException as exc:
                for claim in accepted:
                    replies[claim.recipient_id] = _Reply(exc.code, exc.message)
            return replies, True
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as exc:
            kind = (
                "connection_timeout"
                if isinstance(exc, aiosmtplib.SMTPTimeoutError)
                else "connection_lost"
            )
            for claim in claims:
                replies.setdefault(claim.recipient_id, _Reply(None, str(exc) or kind, failure=kind))
            return replies, False

    async def _pipelined(
        self,
        conn: _Connection,
        message: QueuedMessage,
        claims: list[Claim],
        wire: dict[int, str],
        options: list[str],
        encoding: str,
        sender: str,
    ) -> tuple[dict[int, _Reply], bool]:
        """The same exchange as _transaction's, as one RFC 2920 group: MAIL, RCPT…, DATA in
        one write, their replies read in order, then the body after a 354."""
        smtp = conn.smtp
        protocol = smtp.protocol
        assert isinstance(protocol, PipeliningProtocol)
        mail = b"MAIL FROM:" + _quote_address(sender).encode(encoding)
        commands = [b" ".join([mail, *(o.encode("ascii") for o in options)])]
        commands += [
            b"RCPT TO:" + _quote_address(wire[c.recipient_id]).encode(encoding) for c in claims
        ]
        commands.append(b"DATA")
        got = await protocol.execute_pipelined(commands, reply_timeout=smtp.timeout)
        mail_reply, rcpt_replies, data_reply = got[0], got[1:-1], got[-1]
        check_sequence(mail_reply, rcpt_replies, data_reply)
        reusable = all(r.code != 421 for r in got)  # 421: the receiver is closing the session
        replies: dict[int, _Reply] = {}
        accepted = []
        for claim, rcpt_reply in zip(claims, rcpt_replies, strict=True):
            if mail_reply.code != 250:
                replies[claim.recipient_id] = _Reply(mail_reply.code, mail_reply.message)
            elif rcpt_reply.code in (250, 251):
                accepted.append(claim)
            else:
                replies[claim.recipient_id] = _Reply(rcpt_reply.code, rcpt_reply.message)
        if data_reply.code != 354:
            for claim in accepted:
                replies[claim.recipient_id] = _Reply(data_reply.code, data_reply.message)
            return replies, reusable
        if not accepted:
            # RFC 2920 3.1: the receiver waits for data nobody will send; end it empty.
            await protocol.send_lone_dot(reply_timeout=smtp.timeout)
            return replies, reusable
        final = await protocol.send_body(message.data, reply_timeout=smtp.timeout)
        for claim in accepted:
            replies[claim.recipient_id] = _Reply(final.code, final.message)
        if final.code == 250:
            conn.clean = True
            conn.sent += 1
        return replies, reusable and final.code != 421

    def _attempt(
        self,
        claim: Claim,
        reply: _Reply,
        source: SourceIp | None,
        provider: str | None,
        mx_host: str | None,
        latency: int,
    ) -> Attempt:
        verdict = reply.classify(provider)
        return Attempt(
            claim=claim,
            category=verdict.category,
            permanent=verdict.permanent,
            action=verdict.action,
            reply_code=reply.code if reply.code is not None else verdict.code,
            enhanced_code=verdict.enhanced_code,
            reply_text=reply.text,
            source_ip=source.address if source else None,
            provider=provider,
            mx_host=mx_host,
            latency_ms=latency,
        )

    # --- deciding what each outcome means ---
    def _conclude(
        self,
        message: QueuedMessage,
        attempts: list[Attempt],
        outcome: Settlement,
        mx_host: str | None,
    ) -> None:
        now = self.clock.now()
        failures: list[FailedRecipient] = []
        logged = maillog.enabled()  # once per job: nothing is formatted when the log is off
        for attempt in attempts:
            if attempt.category == "delivered":
                outcome.delivered.append(attempt)
                result = "delivered"
            elif attempt.permanent:
                result = "bounced"
                outcome.failed.append((attempt, RecipientState.bounced))
                failures.append(
                    FailedRecipient(
                        attempt.claim.address,
                        attempt.enhanced_code or "5.0.0",
                        attempt.reply,
                        attempt.mx_host,
                    )
                )
                if attempt.category in HARD_BOUNCE and message.mail_from:
                    outcome.suppress.append(
                        (
                            message.tenant_id,
                            attempt.claim.address,
                            f"{attempt.category}: {attempt.reply}",
                        )
                    )
            elif has_expired(_aware(message.created_at), now, self.spec.retry):
                result = "expired"
                outcome.failed.append((attempt, RecipientState.expired))
                failures.append(
                    FailedRecipient(
                        attempt.claim.address, "4.4.7", attempt.reply, attempt.mx_host, expired=True
                    )
                )
            else:
                result = "deferred"
                when = next_attempt_at(attempt.claim.attempts + 1, now, self.spec.retry)
                outcome.deferred.append((attempt, when))
            if logged:
                maillog.send_attempt(
                    message.id,
                    message.mail_from,
                    attempt.claim.address,
                    attempt=attempt.claim.attempts + 1,
                    source_ip=attempt.source_ip,
                    mx=attempt.mx_host,
                    outcome=result,
                    reply=attempt.reply,
                )
        # Never a DSN about a DSN: the null sender gets none (RFC 5321 4.5.5).
        if failures and message.mail_from:
            data = build_dsn(
                reporting_mta=self.hostname,
                from_local_part=self.spec.dsn_from_local_part,
                original_sender=message.mail_from,
                original=message.data,
                arrival=_aware(message.created_at),
                failures=failures,
                now=now,
            )
            outcome.dsns.append(
                dsn_entry(message.tenant_id, message.mail_from, data, now, self.hostname)
            )

    async def _settle(self, outcome: Settlement, attempts: list[Attempt]) -> None:
        now = self.clock.now()
        await self.outcomes.submit((now, outcome))
        fired = []
        for attempt in attempts:
            if attempt.source_ip and attempt.provider and attempt.category != "delivered":
                fired += self.reactions.observe(
                    source_ip=attempt.source_ip,
                    provider=attempt.provider,
                    category=attempt.category,
                    reply=attempt.reply,
                    now=now,
                )
        if fired:
            created = await asyncio.to_thread(self.reactions.apply, self.engine, fired, now)
            if created:
                self.egress.invalidate()
                for s in created:
                    log.warning(
                        "reaction %s: %s %s/%s until %s",
                        s.rule_id,
                        s.action,
                        s.source_ip,
                        s.provider,
                        s.expires_at,
                    )
        if outcome.dsns:
            self.wake.set()


NO_SMTPUTF8 = "5.6.7 Receiver does not offer SMTPUTF8, needed for a non-ASCII address (RFC 6531)"


def _wire_address(address: str, ace_domain: str) -> str:
    """A recipient as RCPT TO carries it. An IDN domain goes out in A-labels (punycode), which
    mean the same and which every receiver understands; only a non-ASCII local part is left
    that needs the receiver's SMTPUTF8."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or not ace_domain.isascii():
        return address
    return f"{local}@{ace_domain}"


def _site(mx: MxResult, provider: str) -> str | None:
    """The receiving site (its MX host names) of a receiver no provider entry claims; None for
    a provider's MX, whose limits hold across all its hosts (see relay/shaping.py)."""
    if provider != rules().fallback_provider:
        return None
    return ",".join(sorted({target.host for target in mx.targets}))


def _aware(moment):
    from models.audit import as_utc

    return as_utc(moment)
