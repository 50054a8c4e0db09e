"""The domain-health runbook against real peers: Knot on loopback as the customer's DNS, a
running relay (it spools the customer's notice, and its inbound listener takes the DMARC
reports), the fake Slack, and domain_health_flow() run in this process against a private
Prefect server.

shop.test is active with everything published; the customer then edits their zone step by step
(the SPF include removed, fixed, a DKIM key changed, DMARC gone), and Knot answers SERVFAIL for
a while. The DMARC aggregate reports are real reporters' formats (tests/fixtures/dmarc/) about
shop.test naming our IP, mailed to the relay's rua address.
"""

from __future__ import annotations

import email
import gzip
import io
import json
import re
import time
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.mime.application import MIMEApplication
from email.policy import default as default_policy
from pathlib import Path

import pytest
from prefect.logging.handlers import APILogWorker
from sqlalchemy import event
from sqlmodel import select

from config.settings import load_settings
from flows import resources
from models import AuditEntry, Incident, IncidentState, Message
from models.db import make_engine, session_scope
from notifications import customer_mail
from protocol import domain_health, domains, tenants
from runbooks.loader import domain_health as rules
from testbed.axiom import RelayProcess, make_home
from testbed.dns import KnotServer
from tests.fakes.slack import FakeSlack
from tests.integration.test_dmarc_inbound import report_mail, send

pytestmark = pytest.mark.integration

RELAY = "relay.axiom.test"
DOMAIN = "shop.test"
CONTACT = "it@shop.test"
OUR_IP = "127.0.0.1"  # the default pool's address: the domain's sending IP
REVERSE = "0.0.127.in-addr.arpa"
DMARC = f"dmarc@{RELAY}"
FIXTURES = Path(__file__).parents[1] / "fixtures" / "dmarc"
# Our own names (one zone, `test.`, holds every name; see test_dns_checks.py).
OURS = [
    (f"{RELAY}.", "A", OUR_IP),
    (f"{RELAY}.", "MX", f"10 {RELAY}."),
    (f"_spf.{RELAY}.", "TXT", "v=spf1 ip4:127.0.0.0/24 -all"),
    (f"*._report._dmarc.{RELAY}.", "TXT", "v=DMARC1"),
]
PTRS = [("1", "PTR", f"{RELAY}.")]

Zone = list[tuple[str, str, str]]


@pytest.fixture
def world(prefect, tmp_path, monkeypatch) -> Iterator[dict]:
    """Knot; a home whose resolver is Knot; tenant acme (Italian, contact it@shop.test) with
    shop.test active; the notice sender (its domain relay.axiom.test active and published, as
    the sandbox DNS does); a relay that spools without delivering; the fake Slack; this
    process's settings from the home's environment."""
    slack = FakeSlack()
    with KnotServer({"test": OURS, REVERSE: PTRS}) as knot:
        home = make_home(tmp_path / "home", f"sqlite:///{tmp_path / 'axiom.db'}", hostname=RELAY)
        env = {
            "AXIOM_DNS_NAMESERVERS": knot.nameserver,
            "AXIOM_HOSTNAME": RELAY,
            "AXIOM_SLACK_BOT_TOKEN": slack.token,
            "AXIOM_SLACK_CHANNEL": "C0INCIDENTS",
            "AXIOM_SLACK_API_URL": slack.base_url,
        }
        for key, value in (home.env | env).items():
            if key.startswith("AXIOM_"):
                monkeypatch.setenv(key, value)
        resources.forget()  # the flow runs in this process: this test's home from now on
        settings = load_settings()
        engine = make_engine(home.db_url)
        with session_scope(engine) as s:
            tenants.add_tenant(s, "acme", "it", contact=CONTACT)
            domains.add_domain(s, home.keybox, "acme", DOMAIN)
            domains.mark_domain_active(s, DOMAIN, "test", "onboarded before this test")
            customer_mail.ensure_notice_sender(s, settings)  # what `axiom init` does
            s.commit()
        records = {
            name: json.loads(home.cli("domain", "records", name, "--json", extra_env=env).stdout)
            for name in (DOMAIN, RELAY)
        }

        def publish(change: Callable[[Zone], Zone] | None = None, *, without=()) -> None:
            """Our names, the notice domain's records, and the customer's (all of their kinds
            but `without`, then `change`d as the customer edits them)."""
            theirs = [
                (f"{r['name']}.", r["type"], r["value"])
                for r in records[DOMAIN]
                if r["kind"] not in without
            ]
            notices = [(f"{r['name']}.", r["type"], r["value"]) for r in records[RELAY]]
            knot.set_zone("test", OURS + notices + (change(theirs) if change else theirs))

        relay = RelayProcess(home, extra_env=env | {"AXIOM_DELIVERY_ENABLED": "false"}).start()
        try:
            yield {
                "home": home,
                "engine": engine,
                "knot": knot,
                "slack": slack,
                "relay": relay,
                "publish": publish,
            }
        finally:
            APILogWorker.drain_all(
                timeout=5
            )  # the runs' logs reach the server before the module stops it
            relay.stop()
            engine.dispose()
            slack.close()
            resources.forget()


def run_flow() -> dict:
    from flows.domain_health import domain_health_flow

    return domain_health_flow()


def incidents_of(engine, cause: str) -> list[Incident]:
    with session_scope(engine) as s:
        return list(
            s.exec(select(Incident).where(Incident.cause == cause).order_by(Incident.id)).all()
        )


def notices_to(db_url: str, address: str) -> list[str]:
    """The spooled messages to address: subject and plain body."""
    engine = make_engine(db_url)
    found = []
    try:
        with session_scope(engine) as s:
            for row in s.exec(select(Message).order_by(Message.id)).all():
                parsed = email.message_from_bytes(bytes(row.data), policy=default_policy)
                if address in str(parsed["To"]):
                    found.append(
                        f"{parsed['Subject']}\n{parsed.get_body(('plain',)).get_content()}"
                    )
    finally:
        engine.dispose()
    return found


def _until(what: str, check: Callable[[], object], timeout: float = 30, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not {what} within {timeout}s")


def without_our_include(zone: Zone) -> Zone:
    return [
        (name, kind, re.sub(rf"\s*include:_spf\.{re.escape(RELAY)}", "", value))
        if name == f"{DOMAIN}." and value.startswith("v=spf1")
        else (name, kind, value)
        for name, kind, value in zone
    ]


def another_rsa_key(zone: Zone) -> Zone:
    """The customer pastes a DKIM record wrong: one character of the RSA key differs."""

    def changed(value: str) -> str:
        head, _, key = value.partition("p=")
        i = len(key) // 2
        return f"{head}p={key[:i]}{'A' if key[i] != 'A' else 'B'}{key[i + 1 :]}"

    return [
        (n, k, changed(v)) if "_domainkey" in n and "k=rsa" in v else (n, k, v) for n, k, v in zone
    ]


def test_dns_broken_opens_alerts_tells_the_customer_once_and_resolves(world):
    engine, slack, publish = world["engine"], world["slack"], world["publish"]
    publish()
    clean = run_flow()
    assert sorted(clean["checked"]) == sorted([DOMAIN, RELAY]) and clean["incidents"] == []
    assert sorted(clean["passing"]) == sorted([DOMAIN, RELAY])
    assert incidents_of(engine, domain_health.DNS_BROKEN) == [] and slack.calls == []

    # The customer removes our include from their SPF record.
    publish(without_our_include)
    broken = run_flow()
    (incident,) = incidents_of(engine, domain_health.DNS_BROKEN)
    assert broken["incidents"] == [incident.id]
    assert (incident.subject, incident.state, incident.severity) == (
        f"domain:{DOMAIN}",
        IncidentState.OPEN,
        "warning",  # receivers check SPF at our return path; DKIM and DMARC still pass
    )
    (row,) = incident.evidence["checks"]
    assert row["name"] == "spf.include" and not row["ok"] and f"_spf.{RELAY}" in row["reason"]
    (posted,) = slack.wait_for("chat.postMessage")
    assert f"Incident #{incident.id}" in posted.args["text"] + json.dumps(posted.args)
    assert "spf.include" in json.dumps(posted.args)
    (notice,) = broken["notices"]
    assert (notice["tenant"], notice["domain"], notice["sent"]) == ("acme", DOMAIN, True)
    (mail,) = _until("the notice spooled", lambda: notices_to(world["home"].db_url, CONTACT))
    assert "record DNS cambiati" in mail and "spf.include" in mail  # Italian, naming the row

    # Still broken the next day: the same incident, one more signal, no second notice.
    again = run_flow()
    (folded,) = incidents_of(engine, domain_health.DNS_BROKEN)
    assert again["incidents"] == [incident.id] and again["notices"] == []
    assert folded.occurrences == 2 and folded.state == IncidentState.OPEN
    slack.wait_for("chat.update")  # its one message, updated in place
    assert len(slack.calls_to("chat.postMessage")) == 1
    time.sleep(1)  # a second notice would have been submitted before the flow returned
    assert len(notices_to(world["home"].db_url, CONTACT)) == 1
    with session_scope(engine) as s:
        sent = s.exec(select(AuditEntry).where(AuditEntry.action == "notice.sent")).all()
    assert len(sent) == 1

    # Fixed: resolved by the first check that passes.
    publish()
    fixed = run_flow()
    assert fixed["resolved"] == [incident.id]
    (resolved,) = incidents_of(engine, domain_health.DNS_BROKEN)
    assert resolved.state == IncidentState.RESOLVED and resolved.open_key is None
    assert "resolved" in json.dumps(slack.calls_to("chat.update")[-1].args)

    # A DKIM key changed: a new incident, critical, and a new notice.
    publish(another_rsa_key)
    dkim = run_flow()
    new = incidents_of(engine, domain_health.DNS_BROKEN)[-1]
    assert new.id != incident.id and new.severity == "critical"
    failing = {c["name"] for c in new.evidence["checks"]}
    assert len(failing) == 1 and failing.pop().startswith("dkim:axrsa")
    assert [n["sent"] for n in dkim["notices"]] == [True]
    publish()
    assert run_flow()["resolved"] == [new.id]

    # DMARC gone: critical.
    publish(without=("dmarc",))
    run_flow()
    gone = incidents_of(engine, domain_health.DNS_BROKEN)[-1]
    assert gone.state == IncidentState.OPEN and gone.severity == "critical"
    assert "dmarc.record" in {c["name"] for c in gone.evidence["checks"]}
    assert len(_until("3 notices", lambda: notices_to(world["home"].db_url, CONTACT)[2:])) == 1

    # DNS does not answer: no verdict. Nothing opens, nothing resolves, nothing folds.
    world["knot"].servfail("test")
    dark = run_flow()
    assert set(dark["skipped"]) == {DOMAIN, RELAY} and dark["passing"] == []
    assert dark["incidents"] == dark["resolved"] == []
    still = incidents_of(engine, domain_health.DNS_BROKEN)[-1]
    assert (still.id, still.state, still.occurrences) == (gone.id, IncidentState.OPEN, 1)
    assert len(incidents_of(engine, domain_health.DNS_BROKEN)) == 3

    # DNS answers again, with DMARC back: resolved.
    publish()
    assert run_flow()["resolved"] == [gone.id]


# ---------------------------------------------------------------- DMARC aggregate reports
def _period() -> tuple[int, int]:
    """Yesterday (UTC), as a day's report covers it."""
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    begin = today - timedelta(days=1)
    return int(begin.timestamp()), int(today.timestamp()) - 1


def google_report(count: int, report_id: str) -> bytes:
    """sandbox-google.xml about shop.test, our IP failing `count` messages, zipped and mailed
    as Google does."""
    begin, end = _period()
    xml = (FIXTURES / "sandbox-google.xml").read_text()
    xml = xml.replace("acme.example", DOMAIN).replace("127.0.0.10", OUR_IP)
    xml = xml.replace("<count>1</count>", f"<count>{count}</count>")
    xml = xml.replace("949348866075514174", report_id)
    xml = re.sub(r"<begin>\d+</begin>", f"<begin>{begin}</begin>", xml)
    xml = re.sub(r"<end>\d+</end>", f"<end>{end}</end>", xml)
    name = f"google.com!{DOMAIN}!{begin}!{end}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{name}.xml", xml)
    return report_mail(
        "noreply-dmarc-support@google.com",
        f"Report domain: {DOMAIN} Submitter: google.com Report-ID: {report_id}",
        MIMEApplication(buffer.getvalue(), "zip", Name=f"{name}.zip"),
    )


def outlook_report(count: int) -> bytes:
    """sandbox-outlook.xml about shop.test: its first record now our IP failing `count`
    messages (DKIM and SPF), the second still another sender passing; gzipped as Outlook.com
    mails it."""
    begin, end = _period()
    xml = (FIXTURES / "sandbox-outlook.xml").read_text().replace("acme.example", DOMAIN)
    first = re.compile(
        r"<source_ip>192\.0\.2\.25</source_ip>\s*<count>1</count>(\s*<policy_evaluated>\s*"
        r"<disposition>)none(</disposition>\s*<dkim>)pass(</dkim>\s*<spf>)pass"
    )
    xml, n = first.subn(
        rf"<source_ip>{OUR_IP}</source_ip><count>{count}</count>\1none\2fail\3fail", xml, count=1
    )
    assert n == 1
    xml = re.sub(r"<begin>\d+</begin>", f"<begin>{begin}</begin>", xml)
    xml = re.sub(r"<end>\d+</end>", f"<end>{end}</end>", xml)
    name = f"protection.outlook.com!{DOMAIN}!{begin}!{end}"
    return report_mail(
        "dmarcreport@microsoft.com",
        f"Report Domain: {DOMAIN} Submitter: protection.outlook.com Report-ID: <a4f4ef06>",
        MIMEApplication(gzip.compress(xml.encode()), "gzip", Name=f"{name}.xml.gz"),
    )


def test_our_ip_failing_dmarc_at_a_reporter_opens_an_incident_above_the_threshold(world):
    engine, relay = world["engine"], world["relay"]
    world["publish"]()
    minimum = rules().spec.dmarc_min_messages

    # Google: our IP failed one message short of the minimum. No incident.
    code, reply = send(
        relay, "noreply-dmarc-support@google.com", DMARC, google_report(minimum - 1, "1")
    )
    assert code == 250, reply
    under = run_flow()
    assert under["incidents"] == [] and incidents_of(engine, domain_health.DMARC_FAILING) == []

    # Outlook.com: our IP failed the minimum, at 100 % of our mail there. An incident naming
    # Outlook.com, not Google (under the minimum there), nor the other sender's passing mail.
    code, reply = send(relay, "dmarcreport@microsoft.com", DMARC, outlook_report(minimum))
    assert code == 250, reply
    over = run_flow()
    (incident,) = incidents_of(engine, domain_health.DMARC_FAILING)
    assert over["incidents"] == [incident.id]
    assert (incident.subject, incident.severity) == (f"domain:{DOMAIN}", "critical")
    assert f"Outlook.com: {minimum} of {minimum} (100.0%)" in incident.summary
    assert "google.com" not in incident.summary
    (reporter,) = incident.evidence["reporters"]
    assert reporter["sources"] == {OUR_IP: {"messages": minimum, "failed": minimum}}
    posted = json.dumps(world["slack"].wait_for("chat.postMessage")[0].args)
    assert "our mail failing DMARC" in posted  # the cause named for people (announce.CAUSES)
    assert incidents_of(engine, domain_health.DNS_BROKEN) == []  # the DNS is right

    # The next run reads the same reports: folded, not a second incident.
    run_flow()
    (folded,) = incidents_of(engine, domain_health.DMARC_FAILING)
    assert (folded.id, folded.occurrences) == (incident.id, 2)


def test_a_run_with_no_active_domain_costs_one_query(prefect, tmp_path, monkeypatch):
    home = make_home(tmp_path / "home", f"sqlite:///{tmp_path / 'axiom.db'}", hostname=RELAY)
    for key, value in home.env.items():
        if key.startswith("AXIOM_"):
            monkeypatch.setenv(key, value)
    resources.forget()
    statements: list[str] = []
    engine = resources.engine_for(resources.settings())  # the one the flow will use
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    try:
        assert run_flow() == {"checked": []}
    finally:
        APILogWorker.drain_all(timeout=5)
        resources.forget()
    queries = [q for q in statements if not q.startswith("BEGIN")]  # SQLite's BEGIN IMMEDIATE
    assert len(queries) == 1 and "FROM domain" in queries[0], statements
