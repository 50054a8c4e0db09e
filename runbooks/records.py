"""The DNS records a customer publishes for a sending domain, rendered from
runbooks/dns-records.yaml: `axiom domain records`, the onboarding Slack message and customer
email, the DNS checks and the sandbox DNS all read them here, so they cannot drift apart."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from runbooks.schema_domains import DnsRecordsSpec


@dataclass(frozen=True)
class DnsRecord:
    name: str
    type: str
    value: str
    purpose: str
    kind: str  # dkim | spf | dmarc | return_path_mx | return_path_spf

    def as_json(self) -> dict:
        return asdict(self)

    def zone_line(self) -> str:
        value = f'"{self.value}"' if self.type == "TXT" else self.value
        return f"{self.name}. IN {self.type} {value}"


@dataclass(frozen=True)
class PublishedKey:
    selector: str
    algorithm: str  # rsa | ed25519 (the k= tag)
    public_key: str


def render_records(
    spec: DnsRecordsSpec,
    *,
    domain: str,
    keys: Iterable[PublishedKey],
    relay_hostname: str,
    dmarc_address: str,
    return_path: str,
    inbound_host: str | None = None,
) -> list[DnsRecord]:
    """Every record of `domain`, RSA keys before Ed25519, in the runbook's order."""
    fields = {
        "domain": domain.lower().rstrip("."),
        "relay_hostname": relay_hostname.lower().rstrip("."),
        "dmarc_address": dmarc_address,
        "return_path": return_path.lower().rstrip("."),
        "inbound_host": (inbound_host or relay_hostname).lower().rstrip("."),
    }
    ordered = sorted(keys, key=lambda k: (k.algorithm != "rsa", k.selector))
    out: list[DnsRecord] = []
    for template in spec.records:
        rows = [{**fields, **asdict(k)} for k in ordered] if template.per == "key" else [fields]
        out += [
            DnsRecord(
                name=template.name.format(**row),
                type=template.type,
                value=template.value.format(**row),
                purpose=template.purpose.format(**row),
                kind=template.kind,
            )
            for row in rows
        ]
    return out
