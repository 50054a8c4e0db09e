"""DMARC aggregate reports: every real reporter's fixture parses to what an independent reading
of its XML (xml.etree) finds; hostile or broken input is refused, bounded in time and memory;
storage keeps a report once and only for our domains; the query service reads it back."""

from __future__ import annotations

import gzip
import io
import time
import tracemalloc
import xml.etree.ElementTree as ET
import zipfile
import zlib
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from email.mime.application import MIMEApplication
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from pathlib import Path

import pytest
from sqlmodel import select

from models import Domain, IpAddress, IpPool, Tenant
from models.db import make_engine, migrate, session_scope
from models.dmarc import DmarcRecord, DmarcReport
from protocol.dmarc_reports import our_failures, summary
from relay.inbound.dmarc import (
    MAX_XML_BYTES,
    MAX_ZIP_MEMBERS,
    NotAReport,
    Refused,
    TooLarge,
    parse_file,
    parse_mail,
)
from relay.inbound.dmarc_store import ForeignDomain, store_report

FIXTURES = Path(__file__).parents[1] / "fixtures" / "dmarc"
NOW = datetime(2026, 5, 1, tzinfo=UTC)

# file: (org_name, report_id, policy domain, records, messages, DMARC-passing messages)
EXPECTED = {
    "google-zip.eml": ("google.com", "949348866075514174", "borschow.com", 1, 1, 0),
    "google.xml": ("google.com", "3166094538684628578", "foo-bar.io", 1, 1, 1),
    "outlook.xml": ("Outlook.com", "a4f4ef0654474d3faa5dca167a34a86a", "random.net", 2, 3, 3),
    "outlook-xsi.xml": ("Outlook.com", "cfeafefe4129445e8c81018bd9177197", "example.com", 1, 1, 0),
    "yahoo.xml": ("Yahoo", "1709600619.487850", "random.org", 1, 1, 1),
    "mailru.xml": ("Mail.Ru", "28327321193681154911721360800", "foobar.de", 1, 1, 0),
    "mimecast-gzip.eml": (
        "Mimecast",
        "157a5fe30ec76f4bc0d8bccfc96c118a167a1280fee7c7465af5115e73082e5e",
        "ab.id.au",
        1,
        1,
        1,
    ),
    "fastmail.xml.gz": ("FastMail Pty Ltd", "102675056", "indemed.com", 1, 1, 0),
    "infonacot.xml.zip": ("XYZ Corporation", "2940", "example.com", 1, 1, 0),
    "rfc9990-sample.xml": (
        "Sample Reporter",
        "3v98abbp8ya9n3va8yr8oa3ya",
        "example.com",
        1,
        123,
        123,
    ),
    "large-2286-records.xml.gz": (
        "accurateplastics.com",  # its <org_name> is empty: named by its email's domain
        "example.com:1711897200",
        "example.com",
        2286,
        2286,
        0,
    ),
    "sandbox-google.xml": ("google.com", "949348866075514174", "acme.example", 1, 1, 0),
    "sandbox-outlook.xml": (
        "Outlook.com",
        "a4f4ef0654474d3faa5dca167a34a86a",
        "acme.example",
        2,
        3,
        3,
    ),
}


def parse_fixture(name: str):
    data = (FIXTURES / name).read_bytes()
    return parse_mail(data) if name.endswith(".eml") else parse_file(data)


def xml_of(name: str) -> bytes:
    """The fixture's XML, unpacked with the standard library alone (not the relay's reader)."""
    data = (FIXTURES / name).read_bytes()
    if name.endswith(".eml"):
        message = message_from_bytes(data)
        [data] = [p.get_payload(decode=True) for p in message.walk() if p.get_filename()]
    if data.startswith(b"PK"):
        archive = zipfile.ZipFile(io.BytesIO(data))
        return archive.read(archive.namelist()[0])
    if data.startswith(b"\x1f\x8b"):
        return zlib.decompressobj(wbits=31).decompress(data)  # one member; Mimecast adds CRLF
    return data


def local(tag: str) -> str:
    return tag.rpartition("}")[2]


def etree_records(name: str) -> list[tuple]:
    root = ET.fromstring(xml_of(name))
    found = []
    for record in (e for e in root if local(e.tag) == "record"):
        fields = {local(e.tag): (e.text or "").strip() for e in record.iter()}
        found.append(
            (
                fields["source_ip"],
                int(fields["count"]),
                fields["disposition"].lower(),
                fields["header_from"].lower(),
            )
        )
    return found


def test_every_reporter_in_the_fixtures_is_covered():
    files = {p.name for p in FIXTURES.iterdir() if p.name != "README.md"}
    assert files == set(EXPECTED)
    readme = (FIXTURES / "README.md").read_text()
    assert all(f"| {name} |" in readme for name in files)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_real_report_parses_to_its_counts_and_results(name):
    report = parse_fixture(name)
    org, report_id, domain, records, messages, passing = EXPECTED[name]
    assert (report.org_name, report.report_id, report.domain) == (org, report_id, domain)
    assert (len(report.records), report.messages) == (records, messages)
    assert sum(r.count for r in report.records if r.dmarc_pass) == passing
    assert report.begin < report.end
    # every record as xml.etree reads it, in order
    assert [
        (r.source_ip, r.count, r.disposition, r.header_from) for r in report.records
    ] == etree_records(name)


def test_details_of_reporters_formats():
    mailru = parse_fixture("mailru.xml").records[0]
    assert (mailru.disposition, mailru.dkim, mailru.spf) == ("reject", "fail", "fail")
    assert (mailru.spf_domain, mailru.spf_result, mailru.dkim_results) == (
        "foobar.de",
        "softfail",
        (),
    )
    google = parse_fixture("google.xml")
    assert (google.policy.p, google.policy.sp, google.policy.adkim) == ("reject", "reject", "r")
    [dkim] = google.records[0].dkim_results
    assert (dkim.domain, dkim.selector, dkim.result) == ("foo-bar.io", "krs", "pass")
    rfc9990 = parse_fixture("rfc9990-sample.xml")  # namespaced: the same fields
    assert (rfc9990.policy.p, rfc9990.policy.adkim, rfc9990.records[0].disposition) == (
        "quarantine",
        None,
        "pass",
    )
    assert rfc9990.begin == datetime(1979, 8, 7, tzinfo=UTC)
    fastmail = parse_fixture("fastmail.xml.gz").records[0]
    assert (fastmail.envelope_from, fastmail.spf_result) == ("example.com", "softfail")
    infonacot = parse_fixture("infonacot.xml.zip").records[0]
    assert (infonacot.spf_domain, infonacot.spf_result, infonacot.envelope_from) == (
        None,
        None,
        None,
    )
    large = parse_fixture("large-2286-records.xml.gz")
    assert {(r.spf_domain, r.spf_result) for r in large.records} == {(None, "none")}
    assert len({r.source_ip for r in large.records}) > 1000


# ------------------------------------------------------------------ hostile and broken input
FEEDBACK_HEAD = b"<?xml version='1.0'?>\n"
MINIMAL = (
    b"<feedback><report_metadata><org_name>r.example</org_name><email>d@r.example</email>"
    b"<report_id>1</report_id><date_range><begin>1700000000</begin><end>1700086399</end>"
    b"</date_range></report_metadata><policy_published><domain>acme.example</domain><p>none</p>"
    b"</policy_published>%s</feedback>"
)
RECORD = (
    b"<record><row><source_ip>%s</source_ip><count>%s</count><policy_evaluated>"
    b"<disposition>none</disposition><dkim>%s</dkim><spf>fail</spf></policy_evaluated></row>"
    b"<identifiers><header_from>acme.example</header_from></identifiers></record>"
)


def report_xml(*records: tuple[str, str, str], report_id: str = "1") -> bytes:
    body = b"".join(RECORD % (ip.encode(), n.encode(), dkim.encode()) for ip, n, dkim in records)
    return MINIMAL.replace(b"<report_id>1<", f"<report_id>{report_id}<".encode()) % body


def test_a_minimal_report_parses():
    report = parse_file(report_xml(("2001:DB8::0:1", "7", "pass")))
    [record] = report.records
    assert (record.source_ip, record.count, record.dmarc_pass) == ("2001:db8::1", 7, True)


@pytest.mark.parametrize(
    "document",
    [
        # billion laughs
        b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY a "aaaaaaaaaa">'
        b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;">]>'
        b"<feedback><report_metadata><org_name>&c;</org_name></report_metadata></feedback>",
        # external entity
        b'<?xml version="1.0"?><!DOCTYPE feedback [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        b"<feedback>&x;</feedback>",
        # a DTD by reference, no entity at all
        b'<?xml version="1.0"?><!DOCTYPE feedback SYSTEM "http://example.com/x.dtd"><feedback/>',
    ],
)
def test_a_dtd_or_entity_is_refused_before_anything_is_read(document):
    with pytest.raises(Refused, match=r"^document type declarations are not accepted$"):
        parse_file(document)
    with pytest.raises(Refused, match="document type declarations"):
        parse_file(gzip.compress(document))


def test_an_undeclared_entity_is_malformed_xml():
    with pytest.raises(Refused, match="malformed XML at line 1"):
        parse_file(report_xml(("192.0.2.1", "1", "pass")).replace(b"r.example<", b"&x;<", 1))


def bomb_xml(size: int) -> bytes:
    """A report whose XML is `size` octets: its text padded with spaces inside <feedback>."""
    return report_xml(("192.0.2.1", "1", "pass")).replace(
        b"<feedback>", b"<feedback>" + b" " * size
    )


@pytest.mark.parametrize("packing", ["gzip", "zip"])
def test_a_decompression_bomb_stops_at_the_limit_in_bounded_time_and_memory(packing):
    xml = bomb_xml(8 * MAX_XML_BYTES)  # 128 MiB of XML
    if packing == "gzip":
        packed = gzip.compress(xml, 9)
    else:
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("bomb.xml", xml)
        packed = buffer.getvalue()
    del xml
    assert len(packed) < 1024 * 1024  # a bomb: >128x
    tracemalloc.start()
    started = time.monotonic()
    try:
        with pytest.raises(TooLarge, match=f"^the report exceeds {MAX_XML_BYTES} octets"):
            parse_file(packed)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    assert peak < 4 * 1024 * 1024, peak  # chunks, never the whole document
    assert elapsed < 10, elapsed


def test_a_report_just_under_the_limit_is_read():
    xml = bomb_xml(MAX_XML_BYTES - 2000)
    assert len(xml) <= MAX_XML_BYTES
    assert parse_file(gzip.compress(xml)).messages == 1


def test_broken_archives_and_fields_are_refused():
    good = report_xml(("192.0.2.1", "1", "pass"))
    with pytest.raises(Refused, match=r"^the gzip attachment is truncated$"):
        parse_file(gzip.compress(good)[:-30])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n in range(MAX_ZIP_MEMBERS + 1):
            archive.writestr(f"{n}.xml", good)
    with pytest.raises(Refused, match=f"^a zip attachment must hold 1 to {MAX_ZIP_MEMBERS} files$"):
        parse_file(buffer.getvalue())
    with pytest.raises(Refused, match=r"^the report has no report_id$"):
        parse_file(good.replace(b"<report_id>1</report_id>", b""))
    with pytest.raises(Refused, match="source_ip is not an IP address: 'not-an-ip'"):
        parse_file(report_xml(("not-an-ip", "1", "pass")))
    with pytest.raises(Refused, match="has no valid count: '-3'"):
        parse_file(report_xml(("192.0.2.1", "-3", "pass")))
    with pytest.raises(Refused, match="has no policy_evaluated/dkim"):
        parse_file(report_xml(("192.0.2.1", "1", "")))
    with pytest.raises(Refused, match=r"^elements nested deeper than 8$"):
        parse_file(
            good.replace(b"<p>none</p>", b"<a><b><c><d><e><f><g>x</g></f></e></d></c></b></a>")
        )


def mail(*parts, content_type: str = "multipart/mixed") -> bytes:
    message = MIMEMultipart()
    message["From"] = "noreply-dmarc-support@google.com"
    message["Subject"] = "Report domain: acme.example Submitter: google.com Report-ID: 1"
    for part in parts:
        message.attach(part)
    return message.as_bytes()


def test_mail_without_a_report_is_not_a_report():
    with pytest.raises(NotAReport):
        parse_mail(b"From: a@b.example\r\nSubject: hello\r\n\r\nPlease unsubscribe me.\r\n")
    with pytest.raises(NotAReport):
        parse_mail(mail(MIMEText("<html><body>hi</body></html>", "html")))
    rss = b"<?xml version='1.0'?><rss><channel><title>x</title></channel></rss>"
    with pytest.raises(NotAReport):
        parse_mail(mail(MIMEApplication(gzip.compress(rss), "gzip", Name="x.xml.gz")))
    with pytest.raises(NotAReport):
        parse_mail(mail(MIMEApplication(b"\x00\x01binary", "octet-stream", Name="x.bin")))
    with pytest.raises(NotAReport):
        parse_file(b"%PDF-1.4")


def test_a_report_is_found_beside_other_parts():
    xml = report_xml(("192.0.2.1", "2", "pass"))
    raw = mail(
        MIMEText("This is an aggregate report from google.com."),
        MIMEApplication(xml, "xml", Name="google.com!acme.example!1700000000!1700086399.xml"),
    )
    assert parse_mail(raw).messages == 2


# ------------------------------------------------------------------ storage and queries
@pytest.fixture
def engine(db_url):
    migrate(db_url)
    engine = make_engine(db_url)
    with session_scope(engine) as s:
        tenant = Tenant(name="acme")
        s.add(tenant)
        s.flush()
        s.add(Domain(tenant_id=tenant.id, name="acme.example"))
        pool = IpPool(name="shared")
        s.add(pool)
        s.flush()
        s.add(IpAddress(address="127.0.0.10", pool_id=pool.id))
        s.add(IpAddress(address="2001:db8::10", pool_id=pool.id))
        s.commit()
    yield engine
    engine.dispose()


def test_a_report_is_stored_once_and_a_foreign_one_not_at_all(engine):
    report = parse_fixture("sandbox-outlook.xml")
    first = store_report(engine, report, NOW)
    again = store_report(engine, report, NOW + timedelta(hours=1))
    assert (first.duplicate, first.records, again.duplicate) == (False, 2, True)
    assert again.report_row_id == first.report_row_id
    with pytest.raises(ForeignDomain):
        store_report(engine, parse_fixture("outlook.xml"), NOW)  # random.net is not ours
    with session_scope(engine) as s:
        [row] = s.exec(select(DmarcReport)).all()
        records = s.exec(select(DmarcRecord).order_by(DmarcRecord.id)).all()
    assert (row.org_name, row.domain, row.messages, row.p, row.adkim) == (
        "Outlook.com",
        "acme.example",
        3,
        "reject",
        "r",
    )
    assert [(r.source_ip, r.count, r.dkim, r.spf, r.envelope_from) for r in records] == [
        ("192.0.2.25", 1, "pass", "pass", "acme.example"),
        ("192.0.2.25", 2, "pass", "pass", "acme.example"),
    ]
    assert records[0].dkim_results == [
        {"domain": "acme.example", "selector": "def", "result": "pass"}
    ]


def test_reports_about_our_organisational_domain_are_kept(engine):
    for n, domain in enumerate(["news.acme.example", "example"]):
        xml = report_xml(("192.0.2.1", "1", "pass"), report_id=str(n))
        report = parse_file(
            xml.replace(b"<domain>acme.example</domain>", f"<domain>{domain}</domain>".encode())
        )
        if domain == "example":  # a public suffix is no one's organisational domain
            with pytest.raises(ForeignDomain):
                store_report(engine, report, NOW)
        else:
            assert not store_report(engine, report, NOW).duplicate
    other = report_xml(("192.0.2.1", "1", "pass"), report_id="9").replace(
        b"<domain>acme.example</domain>", b"<domain>notacme.example</domain>"
    )
    with pytest.raises(ForeignDomain):
        store_report(engine, parse_file(other), NOW)


def test_summary_and_our_failures(engine):
    store_report(engine, parse_fixture("sandbox-outlook.xml"), NOW)
    store_report(engine, parse_fixture("sandbox-google.xml"), NOW)
    ours_v6 = report_xml(
        ("2001:DB8:0::10", "40", "fail"), ("192.0.2.7", "5", "pass"), report_id="v6"
    ).replace(b"<begin>1700000000<", b"<begin>1700000100<")
    store_report(engine, parse_file(ours_v6), NOW)
    since, until = datetime(2019, 1, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC)
    with session_scope(engine) as s:
        rows = summary(s, domain="ACME.example.", since=since, until=until)
        failing = our_failures(s, since=since, min_messages=1)
        big = our_failures(s, since=since, min_messages=10)
        later = summary(s, domain=None, since=datetime(2024, 1, 1, tzinfo=UTC), until=until)
        none = summary(s, domain="other.example", since=since, until=until)
    table = [
        (r.source_ip, r.ours, r.messages, r.dmarc_pass, r.dmarc_fail, r.reporters) for r in rows
    ]
    assert table == [
        ("2001:db8::10", True, 40, 0, 40, ("r.example",)),
        ("192.0.2.7", False, 5, 5, 0, ("r.example",)),
        ("192.0.2.25", False, 3, 3, 0, ("Outlook.com",)),
        ("127.0.0.10", True, 1, 0, 1, ("google.com",)),
    ]
    assert [(r.domain, r.source_ip, r.dmarc_fail) for r in failing] == [
        ("acme.example", "2001:db8::10", 40),
        ("acme.example", "127.0.0.10", 1),
    ]
    assert [r.source_ip for r in big] == ["2001:db8::10"]
    assert [r.source_ip for r in later] == ["192.0.2.25"]  # Outlook's 2024 report only
    assert none == []
    assert rows[0].as_json()["fail_rate"] == 1.0
    assert rows[0].first_begin == datetime.fromtimestamp(1700000100, UTC)
