"""Reads DMARC aggregate reports (RFC 7489 section 7.2 and Appendix C; RFC 9990's namespaced
form too) out of the mail receivers send to the relay's `rua` address.

A report is an XML document, sent as an attachment: gzip (.xml.gz, what RFC 7489 asks for),
zip (.zip, what Google and others send) or plain .xml, in a multipart mail or as the whole
body (Mimecast). Each leaf part is recognised by its bytes (gzip and zip magic, or XML text),
not by its declared type: reporters label the same file application/gzip, application/x-gzip,
application/octet-stream or nothing at all.

The documents come from anyone on the internet, so the parsing is bounded before it is
clever:
- no DTD: a document type declaration, an entity declaration or an external entity is
  refused outright (no report needs one; they are what entity expansion and external-entity
  attacks are made of). Expat (>= 2.4.1) limits amplification as well; this does not lean on it.
- decompression is streamed and stops at MAX_XML_BYTES of XML, whatever the archive claims,
  so a gzip or zip bomb costs at most that much inflating; zips with more than
  MAX_ZIP_MEMBERS members or encrypted members are refused;
- the XML is parsed incrementally (expat, fed chunk by chunk) and each <record> is turned
  into an AggregateRecord and dropped as soon as it ends, so memory follows the records kept,
  not the document; nesting, elements per parent, text per element and records per report
  are capped (MAX_DEPTH, MAX_CHILDREN, MAX_TEXT, MAX_RECORDS).

Parsing only: relay/inbound/dmarc_store.py stores what this returns.
"""

from __future__ import annotations

import io
import ipaddress
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import Message as EmailMessage
from xml.parsers import expat

# The 2,286-record report in tests/fixtures/dmarc is 0.9 MB of XML; a big receiver's daily
# report about a busy domain is a few MB. 16 MiB leaves room and bounds what a bomb costs.
MAX_XML_BYTES = 16 * 1024 * 1024
MAX_RECORDS = 50_000  # per report; 16 MiB holds ~50k of the shortest real records
MAX_ZIP_MEMBERS = 10  # reporters zip one file; a zip of many is not a report
MAX_PARTS = 50  # MIME leaf parts looked at for the report
MAX_DEPTH = 8  # feedback/record/auth_results/dkim/domain is 5 deep
MAX_CHILDREN = 200  # elements under one parent other than <feedback> (records are not kept)
MAX_TEXT = 4096  # characters kept of one element's text (longer text is cut, not stored)
CHUNK = 64 * 1024
MAX_DOMAIN = 253
MAX_ID = 255  # org_name, email, report_id: the columns' width

_GZIP = b"\x1f\x8b"
_ZIP = b"PK\x03\x04"
_SKIPPED_TYPES = {"text/html", "message/rfc822", "message/delivery-status"}


class NotAReport(Exception):
    """The mail holds no DMARC aggregate report (no XML whose root is <feedback>)."""


class Refused(Exception):
    """A report that cannot be read safely or completely; str(self) says why, for the reply."""


class TooLarge(Refused):
    """The report's XML exceeds MAX_XML_BYTES once decompressed (or MAX_RECORDS records)."""


@dataclass(frozen=True)
class DkimResult:
    domain: str | None  # reporters leave it empty when no signature named one
    selector: str | None
    result: str


@dataclass(frozen=True)
class AggregateRecord:
    source_ip: str  # normalised (ipaddress), so IPv6 compares equal however it was written
    count: int
    disposition: str  # none | quarantine | reject (| pass, RFC 9990)
    dkim: str  # the policy evaluation's DKIM result: pass | fail (aligned pass or not)
    spf: str  # the same for SPF
    header_from: str
    envelope_from: str | None
    dkim_results: tuple[DkimResult, ...]
    spf_domain: str | None  # the mfrom check when there is one, else the first SPF check;
    # None when there was no check, or its domain was empty (a real reporter sends <domain/>
    # with result none when the envelope had no sender domain)
    spf_result: str | None
    reasons: tuple[str, ...] = ()  # policy overrides: "forwarded", "local_policy: comment", …

    @property
    def dmarc_pass(self) -> bool:
        """DMARC passes when DKIM or SPF passed aligned (RFC 7489 section 6.6.2)."""
        return self.dkim == "pass" or self.spf == "pass"


@dataclass(frozen=True)
class Policy:
    p: str | None
    sp: str | None
    adkim: str | None
    aspf: str | None


@dataclass(frozen=True)
class AggregateReport:
    org_name: str
    email: str
    report_id: str
    domain: str  # policy_published/domain, lower-cased
    begin: datetime
    end: datetime
    policy: Policy
    records: tuple[AggregateRecord, ...] = field(repr=False)

    @property
    def messages(self) -> int:
        return sum(r.count for r in self.records)


# ------------------------------------------------------------------ the mail
def parse_mail(raw: bytes) -> AggregateReport:
    """The aggregate report a mail carries. Raises NotAReport when it carries none, Refused
    (TooLarge) when the one it carries is hostile, malformed or too big."""
    message = message_from_bytes(raw)
    for part in _leaves(message):
        if part.get_content_type() in _SKIPPED_TYPES:
            continue
        payload = part.get_payload(decode=True)
        if not isinstance(payload, bytes) or not payload:
            continue
        kind = _kind(payload)
        if kind is None:
            continue
        try:
            return parse_document(_xml_chunks(kind, payload))
        except NotAReport:
            continue  # some other XML (or a signature, a logo): look at the next part
    raise NotAReport("no DMARC aggregate report in this mail")


def parse_file(data: bytes) -> AggregateReport:
    """A report file as reporters name them: .xml, .xml.gz or .zip (recognised by content)."""
    kind = _kind(data)
    if kind is None:
        raise NotAReport("not XML, gzip or zip")
    return parse_document(_xml_chunks(kind, data))


def _leaves(message: EmailMessage) -> Iterator[EmailMessage]:
    for count, part in enumerate(p for p in message.walk() if not p.is_multipart()):
        if count >= MAX_PARTS:
            return
        yield part


def _kind(payload: bytes) -> str | None:
    if payload.startswith(_GZIP):
        return "gzip"
    if payload.startswith(_ZIP):
        return "zip"
    head = payload[:64].lstrip(b"\xef\xbb\xbf \t\r\n")
    if head.startswith(b"<"):
        return "xml"
    return None


# ------------------------------------------------------------------ decompression
def _xml_chunks(kind: str, payload: bytes) -> Iterator[bytes]:
    """The XML's bytes, chunk by chunk, at most MAX_XML_BYTES of them (TooLarge beyond)."""
    source = {"gzip": _gunzip, "zip": _unzip, "xml": _plain}[kind](payload)
    total = 0
    for chunk in source:
        total += len(chunk)
        if total > MAX_XML_BYTES:
            raise TooLarge(f"the report exceeds {MAX_XML_BYTES} octets decompressed")
        yield chunk


def _plain(payload: bytes) -> Iterator[bytes]:
    for start in range(0, len(payload), CHUNK):
        yield payload[start : start + CHUNK]


def _gunzip(payload: bytes) -> Iterator[bytes]:
    # One gzip member, inflated CHUNK octets at a time (max_length), so a bomb is stopped by
    # the caller's count, not by memory. Whatever follows the member is ignored: Mimecast's
    # attachment ends with a stray CRLF that gzip.decompress reads as a broken second member.
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pending = payload
    try:
        while not inflater.eof:
            out = inflater.decompress(pending, CHUNK)
            pending = inflater.unconsumed_tail
            if not out and not pending:
                break
            yield out
    except zlib.error as exc:
        raise Refused(f"the gzip attachment is corrupt ({exc})") from None
    if not inflater.eof:
        raise Refused("the gzip attachment is truncated")


def _unzip(payload: bytes) -> Iterator[bytes]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(payload))
        members = [m for m in archive.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise Refused(f"the zip attachment is corrupt ({exc})") from None
    if not members or len(members) > MAX_ZIP_MEMBERS:
        raise Refused(f"a zip attachment must hold 1 to {MAX_ZIP_MEMBERS} files")
    member = next((m for m in members if m.filename.lower().endswith(".xml")), members[0])
    if member.flag_bits & 0x1:
        raise Refused("the zip attachment is encrypted")
    try:
        with archive.open(member) as stream:  # inflates lazily: read() bounds the work
            while chunk := stream.read(CHUNK):
                yield chunk
    # zipfile raises NotImplementedError for a compression method it does not support: the
    # report is refused like a corrupt one, not a stub of ours
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, OSError) as exc:
        raise Refused(f"the zip attachment is corrupt ({exc})") from None


# ------------------------------------------------------------------ XML
@dataclass
class _Node:
    name: str  # local name: namespaces (RFC 9990's, xsi/xsd declarations) do not matter here
    text: list[str] = field(default_factory=list)
    size: int = 0
    children: list[_Node] = field(default_factory=list)

    def child(self, name: str) -> _Node | None:
        return next((c for c in self.children if c.name == name), None)

    def all(self, name: str) -> list[_Node]:
        return [c for c in self.children if c.name == name]

    def value(self, *path: str) -> str | None:
        node: _Node | None = self
        for name in path:
            node = node.child(name) if node else None
        if node is None:
            return None
        return "".join(node.text).strip()


def _refuse(what: str):
    def handler(*_args) -> None:
        raise Refused(f"{what} are not accepted")

    return handler


class _Reader:
    """Builds <feedback>'s children as small trees; each <record> is converted when it ends."""

    def __init__(self) -> None:
        self.stack: list[_Node] = []
        self.root: _Node | None = None
        self.records: list[AggregateRecord] = []
        parser = expat.ParserCreate(namespace_separator=" ")
        parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
        parser.StartDoctypeDeclHandler = _refuse("document type declarations")
        parser.EntityDeclHandler = _refuse("entity declarations")
        parser.UnparsedEntityDeclHandler = _refuse("entity declarations")
        parser.NotationDeclHandler = _refuse("notation declarations")
        parser.ExternalEntityRefHandler = _refuse("external entities")
        parser.StartElementHandler = self.start
        parser.EndElementHandler = self.end
        parser.CharacterDataHandler = self.text
        parser.buffer_text = True
        self.parser = parser

    def start(self, name: str, _attributes: dict) -> None:
        node = _Node(name.rpartition(" ")[2])
        if not self.stack:
            if node.name != "feedback":
                raise NotAReport(f"the XML's root is <{node.name}>, not <feedback>")
            self.root = node
        else:
            parent = self.stack[-1]
            if len(self.stack) >= MAX_DEPTH:
                raise Refused(f"elements nested deeper than {MAX_DEPTH}")
            if parent is not self.root:
                if len(parent.children) >= MAX_CHILDREN:
                    raise Refused(f"more than {MAX_CHILDREN} elements in <{parent.name}>")
                parent.children.append(node)
            elif node.name != "record":
                if len(parent.children) >= MAX_CHILDREN:
                    raise Refused(f"more than {MAX_CHILDREN} elements in <feedback>")
                parent.children.append(node)
        self.stack.append(node)

    def end(self, _name: str) -> None:
        node = self.stack.pop()
        if node.name == "record" and len(self.stack) == 1:
            if len(self.records) >= MAX_RECORDS:
                raise TooLarge(f"the report has more than {MAX_RECORDS} records")
            self.records.append(_record(node))

    def text(self, data: str) -> None:
        node = self.stack[-1] if self.stack else None
        if node is None or node.size >= MAX_TEXT:
            return
        kept = data[: MAX_TEXT - node.size]
        node.text.append(kept)
        node.size += len(kept)


def parse_document(chunks: Iterator[bytes]) -> AggregateReport:
    """An aggregate report from its XML, given as chunks (see the module's limits)."""
    reader = _Reader()
    try:
        for chunk in chunks:
            reader.parser.Parse(chunk, False)
        reader.parser.Parse(b"", True)
    except expat.ExpatError as exc:
        if reader.root is None:
            raise NotAReport(f"not XML ({expat.errors.messages[exc.code]})") from None
        raise Refused(
            f"malformed XML at line {exc.lineno} ({expat.ErrorString(exc.code)})"
        ) from None
    assert reader.root is not None  # expat raises on a document without a root element
    return _report(reader.root, tuple(reader.records))


# ------------------------------------------------------------------ the report's fields
def _report(root: _Node, records: tuple[AggregateRecord, ...]) -> AggregateReport:
    meta = root.child("report_metadata")
    policy = root.child("policy_published")
    if meta is None or policy is None:
        raise NotAReport("<feedback> without report_metadata and policy_published")
    email = _bounded(meta.value("email") or "", MAX_ID, "email")
    # org_name is required, yet one real reporter sends it empty: its email's domain names it.
    org_name = meta.value("org_name") or email.rpartition("@")[2]
    report_id = meta.value("report_id")
    if not org_name:
        raise Refused("the report names no organisation (org_name, email)")
    if not report_id:
        raise Refused("the report has no report_id")
    begin = _timestamp(meta.value("date_range", "begin"), "date_range/begin")
    end = _timestamp(meta.value("date_range", "end"), "date_range/end")
    if end < begin:
        raise Refused("date_range ends before it begins")
    return AggregateReport(
        org_name=_bounded(org_name, MAX_ID, "org_name"),
        email=email,
        report_id=_bounded(report_id, MAX_ID, "report_id"),
        domain=_domain(policy.value("domain"), "policy_published/domain"),
        begin=begin,
        end=end,
        policy=Policy(
            p=_word(policy.value("p")),
            sp=_word(policy.value("sp")),
            adkim=_word(policy.value("adkim")),
            aspf=_word(policy.value("aspf")),
        ),
        records=records,
    )


def _record(node: _Node) -> AggregateRecord:
    row = node.child("row")
    if row is None:
        raise Refused("a record without a row")
    evaluated = row.child("policy_evaluated")
    ip = row.value("source_ip")
    try:
        source_ip = str(ipaddress.ip_address(ip or ""))
    except ValueError:
        raise Refused(f"a record's source_ip is not an IP address: {ip!r:.60}") from None
    if evaluated is None:
        raise Refused(f"the record for {source_ip} has no policy_evaluated")
    auth = node.child("auth_results") or _Node("auth_results")
    dkim_results = tuple(
        DkimResult(
            domain=_optional_domain(d.value("domain"), "auth_results/dkim/domain"),
            selector=_bounded(d.value("selector"), MAX_DOMAIN, "dkim selector") or None,
            result=_word(d.value("result")) or "none",
        )
        for d in auth.all("dkim")
    )
    spf_checks = auth.all("spf")
    spf = next((s for s in spf_checks if _word(s.value("scope")) == "mfrom"), None)
    spf = spf or (spf_checks[0] if spf_checks else None)
    return AggregateRecord(
        source_ip=source_ip,
        count=_count(row.value("count"), source_ip),
        disposition=_required_word(evaluated.value("disposition"), "disposition", source_ip),
        dkim=_required_word(evaluated.value("dkim"), "dkim", source_ip),
        spf=_required_word(evaluated.value("spf"), "spf", source_ip),
        header_from=_domain(node.value("identifiers", "header_from"), "header_from"),
        envelope_from=_optional_domain(node.value("identifiers", "envelope_from"), "envelope_from"),
        dkim_results=dkim_results,
        spf_domain=_optional_domain(spf.value("domain"), "auth_results/spf/domain")
        if spf
        else None,
        spf_result=(_word(spf.value("result")) or "none") if spf else None,
        reasons=tuple(_reason(r) for r in evaluated.all("reason")),
    )


def _reason(node: _Node) -> str:
    kind = _word(node.value("type")) or "other"
    comment = node.value("comment")
    return _bounded(f"{kind}: {comment}" if comment else kind, 500, "reason")


def _timestamp(value: str | None, what: str) -> datetime:
    try:
        seconds = int(value or "")
        return datetime.fromtimestamp(seconds, UTC)
    except (ValueError, OverflowError, OSError):
        raise Refused(f"{what} is not a Unix time: {value!r:.40}") from None


def _count(value: str | None, source_ip: str) -> int:
    if value is None or not value.isdigit() or int(value) >= 2**31:
        raise Refused(f"the record for {source_ip} has no valid count: {value!r:.40}")
    return int(value)


def _word(value: str | None) -> str | None:
    """A keyword (pass, fail, none, r, s, …): lower-cased; some reporters write 'Pass'."""
    return _bounded(value.lower(), 32, "a result") if value else None


def _required_word(value: str | None, what: str, source_ip: str) -> str:
    word = _word(value)
    if not word:
        raise Refused(f"the record for {source_ip} has no policy_evaluated/{what}")
    return word


def _domain(value: str | None, what: str) -> str:
    domain = (value or "").strip().rstrip(".").lower()
    if not domain:
        raise Refused(f"the report has no {what}")
    return _bounded(domain, MAX_DOMAIN, what)


def _optional_domain(value: str | None, what: str) -> str | None:
    return _domain(value, what) if value and value.strip().rstrip(".") else None


def _bounded(value: str | None, limit: int, what: str) -> str:
    if value is not None and len(value) > limit:
        raise Refused(f"{what} is longer than {limit} characters")
    return value or ""
