"""The return path end to end (issue 13): a running `axiom relay` delivers through Knot DNS to a
real Postfix MX that accepts every recipient and bounces an unknown one afterwards, to the
envelope sender, as Postfix does; the bounce reaches the relay's inbound listener (Postfix's
transport map names it for the return-path domains), is tied to its message and recipient by the
tag, suppresses the address, turns the recipient bounced, and the customer's DSN is delivered to
the customer's own MX. The mail Postfix stored is checked by an independent DMARC verifier
(authheaders: pyspf, dkimpy and RFC 7489 alignment) against the same DNS: with the relay's own
bounce domain DMARC passes through DKIM alone; with the customer's published return-path
subdomain through SPF alignment too."""

from __future__ import annotations

import os
import pwd
import re
import smtplib
import ssl
import time

import dns.resolver
import pytest
from authheaders import authenticate_message
from sqlmodel import Session, select

from models import DeliveryEvent, Message, Recipient, Suppression
from models.db import make_engine
from protocol.domains import domain_records
from relay.delivery.return_path import Tagger
from testbed.dns import knot  # noqa: F401  (fixture)
from testbed.postfix import PostfixInstance, SmtpSink, free_port
from tests.conftest import RelayProcess, seed_tenant

pytestmark = pytest.mark.integration

DOMAIN = "acme.example"
RETURN_PATH_DOMAIN = f"bounces.{DOMAIN}"
RCPT_DOMAIN = "bouncing.test"
MX = ("mx.bouncing.test", "127.0.0.61")
CUSTOMER_MX = ("mx.acme.example", "127.0.0.62")
HOST = "relay.axiom.test"
NO_VERIFY = ssl.create_default_context()
NO_VERIFY.check_hostname, NO_VERIFY.verify_mode = False, ssl.CERT_NONE
SPF = "v=spf1 ip4:127.0.0.1 -all"  # the relay's source address (the default pool)


def zones(home) -> dict:
    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            published = domain_records(s, DOMAIN, HOST)
    finally:
        engine.dispose()
    dkim = [(f"{r.name}.", "TXT", r.value) for r in published if r.purpose.startswith("DKIM")]
    return {
        RCPT_DOMAIN: [("@", "MX", f"10 {MX[0]}."), (f"{MX[0]}.", "A", MX[1])],
        DOMAIN: [
            *dkim,
            ("@", "TXT", SPF),
            ("_dmarc", "TXT", "v=DMARC1; p=reject; adkim=r; aspf=r"),
            ("@", "MX", f"10 {CUSTOMER_MX[0]}."),
            (f"{CUSTOMER_MX[0]}.", "A", CUSTOMER_MX[1]),
            # the return-path subdomain as onboarding will have the customer publish it
            (f"{RETURN_PATH_DOMAIN}.", "TXT", SPF),
            (f"{RETURN_PATH_DOMAIN}.", "MX", f"10 {HOST}."),
        ],
        "axiom.test": [(f"{HOST}.", "A", "127.0.0.1"), (f"{HOST}.", "TXT", SPF)],
    }


def bouncing_mx(port: int, inbound: tuple[str, int]) -> PostfixInstance:
    """Postfix for bouncing.test: ann@ has a mailbox; any other address is accepted at RCPT
    (smtpd_reject_unlisted_recipient=no) and bounced by the virtual agent after the 250. The
    bounce goes to the envelope sender; the transport map sends mail for the relay's domains
    to its inbound listener, where their MX records point in production."""
    user = pwd.getpwnam("postfix")
    instance = PostfixInstance(
        "bouncing-mx",
        host=MX[1],
        smtpd_port=port,
        hostname=MX[0],
        main_cf={
            "inet_interfaces": "all",
            "virtual_mailbox_domains": RCPT_DOMAIN,
            "virtual_uid_maps": f"static:{user.pw_uid}",
            "virtual_gid_maps": f"static:{user.pw_gid}",
            "smtpd_reject_unlisted_recipient": False,
        },
        master_cf=["virtual   unix  -       n       n       -       -       virtual"],
    )
    mailboxes = instance.write_file("vmailbox", f"ann@{RCPT_DOMAIN} inbox\n")
    nexthop = f"smtp:[{inbound[0]}]:{inbound[1]}"
    transport = instance.write_file(
        "transport", f"{HOST} {nexthop}\n{RETURN_PATH_DOMAIN} {nexthop}\n"
    )
    vmail = instance.root / "vmail"
    vmail.mkdir()
    vmail.chmod(0o755)
    os.chown(vmail, user.pw_uid, user.pw_gid)
    instance.main_cf_overrides.update(
        virtual_mailbox_maps=f"texthash:{mailboxes}",
        transport_maps=f"texthash:{transport}",
        virtual_mailbox_base=vmail,
    )
    return instance.start()


def submit(relay: RelayProcess, tenant, rcpt: str, subject: str) -> str:
    with smtplib.SMTP(*relay.submission, timeout=10) as client:
        client.starttls(context=NO_VERIFY)
        client.login(tenant.username, tenant.password)
        client.mail(f"shop@{DOMAIN}")
        assert client.rcpt(rcpt)[0] == 250
        code, reply = client.data(
            f"From: Shop <shop@{DOMAIN}>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            f"Date: Thu, 26 Nov 2026 09:00:00 +0000\r\n\r\nYour order has shipped.\r\n".encode()
        )
    assert code == 250, reply
    return reply.decode().rsplit(" ", 1)[1]


def wait_for(what: str, check, timeout: float, diagnose) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.2)
    raise AssertionError(f"{what} not seen in {timeout}s:\n{diagnose()}")


def db_rows(home, model, *where):
    engine = make_engine(home.db_url)
    try:
        with Session(engine) as s:
            return list(s.exec(select(model).where(*where).order_by(model.id)).all())
    finally:
        engine.dispose()


def stored(mx: PostfixInstance, subject: str) -> bytes | None:
    """The message with subject as the MX stored it (mbox: From_ line off, CRLF lines)."""
    path = mx.root / "vmail" / "inbox"
    if not path.exists():
        return None
    for block in re.split(rb"\n(?=From )", b"\n" + path.read_bytes()):
        if f"Subject: {subject}".encode() in block:
            lines = block.strip(b"\n").split(b"\n")[1:]  # the From_ line
            return b"\r\n".join(re.sub(rb"^>(>*From )", rb"\1", line) for line in lines) + b"\r\n"
    return None


def dmarc(message: bytes, return_path: str) -> dict[str, str]:
    """spf, dkim and dmarc results of the verifier, as its Authentication-Results says."""
    header = authenticate_message(
        message,
        "verifier.test",
        ip="127.0.0.1",
        mail_from=return_path,
        helo=HOST,
        spf=True,
        dkim=True,
        dmarc=True,
    )
    found: dict[str, str] = {}
    for method, result in re.findall(r"(?<![.\w])(spf|dkim|dmarc)=(\w+)", header):
        found.setdefault(method, result)  # not policy.dmarc=reject: the published policy
    return found | {"header": header}


@pytest.fixture
def resolver_at(monkeypatch):
    """Point dnspython's default resolver (pyspf, dkimpy and authheaders use it) at Knot."""

    def point(server) -> None:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.lifetime = 5
        monkeypatch.setattr(dns.resolver, "default_resolver", resolver)

    return point


@pytest.fixture
def world(axiom_home, knot, resolver_at):  # noqa: F811
    """The tenant, DNS, the bouncing MX, the customer's MX (smtp-sink) and a running relay;
    publish=True gives acme.example its published return-path subdomain first."""
    started: list = []

    def start(publish: bool):
        tenant = seed_tenant(axiom_home, "acme", DOMAIN)
        if publish:  # as an operator marks it until onboarding checks the records itself
            said = axiom_home.cli("domain", "return-path", DOMAIN, "--published").stdout
            assert f"return path {RETURN_PATH_DOMAIN} (published" in said, said
        server = knot(zones(axiom_home))
        resolver_at(server)
        port = free_port(MX[1])
        relay = RelayProcess(
            axiom_home,
            {"AXIOM_DNS_NAMESERVERS": server.nameserver, "AXIOM_DELIVERY_PORT": str(port)},
        )
        host, inbound_port = axiom_home.inbound_listen.rsplit(":", 1)
        mx = bouncing_mx(port, (host, int(inbound_port)))
        started.append(mx)
        sink = SmtpSink(host=CUSTOMER_MX[1], port=port, capture=True).start()
        started.append(sink)
        relay.start()
        started.append(relay)
        return tenant, relay, mx, sink

    yield start
    for peer in reversed(started):
        peer.stop()


@pytest.mark.parametrize("publish", [False, True], ids=["bounce-domain", "published"])
def test_an_asynchronous_bounce_comes_back_and_dmarc_passes(axiom_home, world, publish):
    tenant, relay, mx, sink = world(publish)
    rp_domain = RETURN_PATH_DOMAIN if publish else HOST
    tagger = Tagger(axiom_home.secret)

    # delivered: the MX stored it with our tagged return path
    delivered = submit(relay, tenant, f"ann@{RCPT_DOMAIN}", "Order 1")
    message = wait_for(
        "the delivered message", lambda: stored(mx, "Order 1"), 30, lambda: relay.tail()
    )
    [ann] = db_rows(axiom_home, Recipient, Recipient.message_id == delivered)
    return_path = f"bounces+{tagger.tag(delivered, ann.id)}@{rp_domain}"
    assert message.startswith(f"Return-Path: <{return_path}>\r\n".encode()), message[:300]

    # DMARC, by an independent verifier against the same DNS
    verdict = dmarc(message, return_path)
    assert (verdict["spf"], verdict["dkim"], verdict["dmarc"]) == ("pass", "pass", "pass"), verdict
    assert f"smtp.mailfrom={rp_domain}" in verdict["header"]
    unsigned = re.sub(rb"DKIM-Signature:.*?\r\n(?=\S)", b"", message, flags=re.S)
    assert b"DKIM-Signature" not in unsigned
    without_dkim = dmarc(unsigned, return_path)
    # the relay's bounce domain is not aligned with acme.example: DKIM alone carried DMARC;
    # the customer's published subdomain is, so SPF alone carries it too
    assert without_dkim["spf"] == "pass"
    assert without_dkim["dmarc"] == ("pass" if publish else "fail"), without_dkim

    # accepted, then bounced by the MX after its 250: back to us, tied to message and recipient
    bounced = submit(relay, tenant, f"gone@{RCPT_DOMAIN}", "Order 2")
    events = wait_for(
        "the bounce event",
        lambda: db_rows(axiom_home, DeliveryEvent, DeliveryEvent.kind == "bounce"),
        60,
        lambda: mx.log()[-3000:] + relay.tail(),
    )
    [gone] = db_rows(axiom_home, Recipient, Recipient.message_id == bounced)
    [event] = events
    assert (event.message_id, event.recipient_id, event.recipient) == (
        bounced,
        gone.id,
        f"gone@{RCPT_DOMAIN}",
    )
    assert (event.stream, event.from_domain, event.category) == (
        "transactional",
        DOMAIN,
        "mailbox_unknown",
    )
    assert (event.source_ip, event.mx_host) == ("127.0.0.1", MX[0])
    # Postfix sent its bounce to the tagged address of that recipient
    mx.wait_for_log(
        rf"to=<bounces\+{re.escape(tagger.tag(bounced, gone.id))}@{re.escape(rp_domain)}>"
        rf".*status=sent \(250 2\.0\.0 Ok: bounce recorded, 1 recipient\(s\) suppressed\)"
    )
    [row] = db_rows(axiom_home, Suppression)
    assert (row.address, row.source) == (f"gone@{RCPT_DOMAIN}", "bounce")
    assert gone.state == "bounced"
    # read again: the first read follows the MX's store, which comes before the relay has its
    # 250 and records the delivery (CI on PostgreSQL read it still queued)
    [ann] = db_rows(axiom_home, Recipient, Recipient.id == ann.id)
    assert ann.state == "delivered"
    # the customer's DSN, as for a refusal at delivery, reached the customer's MX
    [dsn] = db_rows(axiom_home, Message, Message.mail_from == "")
    captured = wait_for("the customer's DSN", lambda: sink.messages(), 30, lambda: relay.tail())
    [notice] = [m for m in captured if b"Final-Recipient" in m]
    assert f"Final-Recipient: rfc822; gone@{RCPT_DOMAIN}".encode() in notice
    assert b"it was accepted, then returned by the receiving system" in notice
    assert b"X-Mail-Args: <>" in notice  # from the null sender
    assert f"X-Rcpt-Args: <shop@{DOMAIN}>".encode() in notice
    assert dsn.data.split(b"\r\n\r\n", 1)[1] in notice.replace(b"\n", b"\r\n")
