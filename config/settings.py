"""Settings from AXIOM_* environment variables and an optional axiom.toml, validated at start."""

from __future__ import annotations

import ipaddress
import os
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

# Secrets that ship in examples and docs; outside sandbox they are refused (issue 5 hardens this).
PLACEHOLDER_SECRETS = {"", "changeme", "change-me", "secret", "placeholder", "xxx"}


def _host_port(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    return value


HostPort = Annotated[str, AfterValidator(_host_port)]


def _off_is_none(value: object) -> object:
    """An empty value (or "off") turns an optional listener off."""
    if isinstance(value, str) and value.strip().lower() in ("", "off", "none"):
        return None
    return value


def _mailbox(value: str | None) -> str | None:
    if value is None:
        return None
    local, at, domain = value.strip().rpartition("@")
    if not at or not local or "." not in domain or any(c in value for c in " <>,;"):
        raise ValueError(f"expected one address local@domain, got {value!r}")
    return value.strip()


Mailbox = Annotated[str | None, AfterValidator(_mailbox)]


def _loopback_network(value: str) -> str:
    network = ipaddress.ip_network(value, strict=False)  # ValueError names the bad text
    if network.version != 4 or not network.is_loopback or network.num_addresses < 16:
        raise ValueError(f"expected a loopback IPv4 network of /28 or larger, got {value!r}")
    return str(network)


def split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def parse_nameserver(value: str) -> tuple[str, int]:
    """One nameserver entry: IP, IP:PORT, [IPv6] or [IPv6]:PORT; the port defaults to 53."""
    entry, port = value.strip(), "53"
    host = entry
    if entry.startswith("["):
        host, sep, rest = entry[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"nameserver {value!r}: expected [IPv6] or [IPv6]:PORT")
        port = rest[1:] if rest else port
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"nameserver {value!r}: {host!r} is not an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"nameserver {value!r}: port must be 1-65535")
    return str(address), int(port)


def _nameserver_list(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        entries = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list | tuple):
        entries = [str(part).strip() for part in value]
    else:
        raise ValueError("expected a comma-separated list of HOST[:PORT]")
    for entry in entries:
        parse_nameserver(entry)
    return tuple(entries)


Nameservers = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_nameserver_list)]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="AXIOM_",
        extra="forbid",
    )

    environment: Literal["sandbox", "production"] = Field(
        default="sandbox",
        description="production refuses generated and placeholder secrets and the sandbox world",
    )
    home: Path = Field(
        default=Path("./var"),
        description="State directory: database, secret key, TLS files, logs; `axiom init` makes it",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default: SQLite file under AXIOM_HOME"
    )
    hostname: str = Field(
        default="relay.axiom.test", description="Name in the banner and Received header"
    )
    submission_listen: HostPort = Field(
        default="127.0.0.1:2525", description="Submission with STARTTLS (587 in production)"
    )
    submission_tls_listen: HostPort = Field(
        default="127.0.0.1:2465", description="Submission with implicit TLS (465 in production)"
    )
    http_listen: HostPort = Field(
        default="127.0.0.1:8025", description="The relay's /healthz and /metrics (Prometheus)"
    )
    control_listen: HostPort = Field(
        default="127.0.0.1:8026",
        description="The control process (`axiom control`): POST /slack/interactivity, "
        "/healthz and /metrics",
    )
    # Bounces and ARF complaint reports addressed to the relay's own domain (relay/inbound.py);
    # production: the return-path domain's MX on port 25. Empty or "off": no inbound listener.
    inbound_listen: Annotated[HostPort | None, BeforeValidator(_off_is_none)] = Field(
        default="127.0.0.1:2527",
        description="HOST:PORT receiving bounces and complaint reports; empty or off: none",
    )
    feedback_address: Mailbox = Field(
        default=None, description="Where feedback loops send ARF reports; default fbl@HOSTNAME"
    )
    dmarc_address: Mailbox = Field(
        default=None,
        description="Where receivers send DMARC aggregate reports (the rua of the DMARC records "
        "customers publish); default dmarc@HOSTNAME",
    )
    bounce_address: Mailbox = Field(
        default=None,
        description="The return path of delivered mail is local+TAG@domain (the tag names the "
        "message and recipient); its domain is the relay's bounce domain unless the customer's "
        "return-path subdomain is published. Local part: 1-15 octets, no '+'; default "
        "bounces@HOSTNAME",
    )
    notice_sender: Mailbox = Field(
        default=None,
        description="From address of customer notices, sent through this relay as the system "
        "tenant axiom-notices (its domain is DKIM-signed like any other); default "
        "notices@HOSTNAME",
    )
    notice_reply_to: Mailbox = Field(
        default=None,
        description="Reply-To of customer notices and the address they tell customers to "
        "write to; empty: the notice says replies are not read",
    )
    inbound_max_message_size: int = Field(
        default=26 * 1024 * 1024,
        ge=1024,
        description="Largest bounce or report accepted: room for a returned 25 MiB message",
    )
    prefect_listen: HostPort = Field(
        default="127.0.0.1:4200", description="The Prefect server `axiom up` runs (UI and API)"
    )
    sandbox_demo_domain: str = Field(
        default="demo.axiom.test", description="The demo tenant's sending domain in sandbox mode"
    )
    tls_cert: Path | None = Field(
        default=None,
        description="Listener certificate (TLS 1.2+, AEAD suites only); default "
        "AXIOM_HOME/tls/cert.pem, self-signed by `axiom init` in sandbox",
    )
    tls_key: Path | None = Field(
        default=None, description="Its private key; default AXIOM_HOME/tls/key.pem"
    )
    secret_key: str | None = Field(
        default=None,
        description="Fernet key encrypting DKIM private keys and keying the credential cache; "
        "default: AXIOM_HOME/secret.key written by `axiom init`",
    )
    relay_processes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Relay processes in all. 1: one listens and delivers. N > 1: N-1 listener "
        "processes share the ports (SO_REUSEPORT) and the main one delivers and serves HTTP; "
        "on 2 cores 3 is fastest",
    )
    event_loop: Literal["uvloop", "asyncio"] = Field(
        default="uvloop",
        description="The relay's event loop: uvloop (libuv; about a third less CPU per message "
        "in bench/submission.py) or the standard library's asyncio",
    )
    max_message_size: int = Field(
        default=25 * 1024 * 1024, ge=1024, description="Bytes: the SIZE and DATA limit (552 5.3.4)"
    )
    max_recipients: int = Field(default=100, ge=1, description="Per message (452 4.5.3)")
    auth_max_failures: int = Field(
        default=5, ge=1, description="AUTH failures per client address before a lockout (421 4.7.0)"
    )
    auth_failure_window_seconds: int = Field(
        default=300, ge=1, description="The window those failures are counted in"
    )
    auth_lockout_seconds: int = Field(
        default=900, ge=1, description="How long the address is locked out (audited)"
    )
    max_connections_per_client: int = Field(
        default=20, ge=1, description="Open connections per client address (421 4.7.0)"
    )
    max_commands_per_session: int = Field(
        default=1000, ge=10, description="Commands per SMTP verb and session (421 4.7.0)"
    )
    session_idle_timeout_seconds: int = Field(
        default=300, ge=5, description="Silence before 421 4.4.2 and close"
    )
    session_max_seconds: int = Field(
        default=1800, ge=10, description="Whole-session limit, so a slowloris client is dropped"
    )
    max_session_errors: int = Field(
        default=20,
        ge=1,
        description="Error replies (4xx/5xx) an SMTP session may get before it is closed with "
        "421 (Postfix's smtpd_hard_error_limit); an accepted message resets the count",
    )
    max_header_fields: int = Field(
        default=1000, ge=10, description="Header fields per message (552 5.3.4)"
    )
    max_header_field_bytes: int = Field(
        default=102_400,
        ge=1000,
        description="Bytes per header field (552 5.3.4); Postfix's header_size_limit",
    )
    policy_cache_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        description=(
            "Sending domains and tenant pauses are re-read this often; DKIM keys every 12 times "
            "this (60 s by default): a key rotation's switch signs within that, with no restart"
        ),
    )
    credential_cache_seconds: int = Field(
        default=60,
        ge=0,
        le=3600,
        description="Verified credentials are cached under HMAC(secret, user+password)",
    )
    spool_batch_max: int = Field(
        default=256, ge=1, description="Messages committed to the spool in one transaction at most"
    )
    dns_nameservers: Nameservers = Field(
        default=(), description="Comma list of IP[:PORT] resolvers; empty: the system resolver"
    )
    delivery_port: int = Field(default=25, ge=1, le=65535, description="Port of receiving MXs")
    delivery_enabled: bool = Field(
        default=True, description="Run the delivery engine in `axiom relay` (off: accept only)"
    )
    # The simulated receiving world (sandbox/). Its MX servers all listen on AXIOM_DELIVERY_PORT
    # when it is set, else on 2526; `axiom up` gives the relay AXIOM_DELIVERY_PORT and
    # AXIOM_DNS_NAMESERVERS=<sandbox_dns_listen> (sandbox.world.relay_environment) so the same
    # relay code reaches the simulated world by settings only.
    sandbox_dns_listen: HostPort = Field(
        default="127.0.0.1:5300",
        description="Sandbox DNS (UDP and TCP); not 5353, where mDNS responders listen",
    )
    sandbox_mx_network: Annotated[str, AfterValidator(_loopback_network)] = Field(
        default="127.0.25.0/24",
        description="Loopback IPv4 network of the simulated MX servers, one address per provider",
    )
    sandbox_feedback_address: str | None = Field(
        default=None,
        description="Where simulated providers send ARF reports; default AXIOM_FEEDBACK_ADDRESS",
    )
    sandbox_feedback_smtp: HostPort | None = Field(
        default=None,
        description="HOST:PORT the ARF reports are sent to; default AXIOM_INBOUND_LISTEN "
        "(AXIOM_SUBMISSION_LISTEN when the inbound listener is off)",
    )
    delivery_lease_seconds: int | None = Field(
        default=None,
        ge=5,
        le=3600,
        description="How long a claimed recipient stays leased; default: runbooks/delivery.yaml",
    )
    # The blocklist runbooks (runbooks/blocklists.yaml): Spamhaus's public mirrors refuse
    # queries from public resolvers and commercial use; a Data Query Service key is asked of
    # <key>.zen.dq.spamhaus.net instead. A secret: never logged, never in the audit trail.
    spamhaus_dqs_key: str | None = Field(
        default=None, description="Spamhaus DQS key (26 characters); unset: the public mirrors"
    )
    # Human checkpoints (flows/checkpoint.py) and Slack (notifications/). Without a bot token
    # and channel, approvals are answered in the Prefect UI and with `axiom approve`.
    slack_bot_token: str | None = Field(default=None, description="Bot token (xoxb-…)")
    slack_signing_secret: str | None = Field(
        default=None, description="Verifies POST /slack/interactivity; unset: endpoint answers 503"
    )
    slack_channel: str | None = Field(
        default=None, description="Channel id (C…) for approval requests and alerts"
    )
    slack_api_url: str = Field(
        default="https://slack.com/api/", description="Slack Web API base URL (tests: a fake)"
    )
    slack_language: Literal["en", "it"] = Field(
        default="en", description="Language of Slack messages (runbooks/templates/<lang>/)"
    )
    slack_retry_initial_seconds: float = Field(
        default=1.0, gt=0, le=60, description="First back-off when Slack fails; doubles to 60 s"
    )
    prefect_api_url: str | None = Field(
        default=None,
        description="Prefect API used to resume paused runs; default PREFECT_API_URL, "
        "else http://AXIOM_PREFECT_LISTEN/api",
    )
    prefect_ui_url: str | None = Field(
        default=None, description="Base of flow-run links in messages; default: the API URL's base"
    )
    checkpoint_poll_seconds: int = Field(
        default=2, ge=1, le=60, description="How often a paused run checks it was resumed"
    )

    @field_validator("slack_api_url", "prefect_api_url", "prefect_ui_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http:// or https:// URL, got {value!r}")
        return value

    @field_validator("bounce_address")
    @classmethod
    def _taggable(cls, value: str | None) -> str | None:
        # relay/delivery/return_path.py adds +TAG (up to 48 octets) to the local part, and a
        # local part has 64 octets at most (RFC 5321 4.5.3.1.1).
        local = (value or "bounces@x").rpartition("@")[0]
        if len(local.encode()) > 15 or "+" in local:
            raise ValueError(f"the local part must be 1-15 octets without '+', got {local!r}")
        return value

    @field_validator("database_url")
    @classmethod
    def _known_backend(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("sqlite", "postgresql")):
            raise ValueError(f"only sqlite:// and postgresql:// are supported, got {value!r}")
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment wins over the file, so one-off overrides need no file edit.
        # AXIOM_CONFIG names the file; read at load time so each process can point elsewhere.
        toml_file = os.environ.get("AXIOM_CONFIG", "axiom.toml")
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, toml_file))

    @cached_property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'axiom.db').resolve()}"

    @property
    def feedback_mailbox(self) -> str:
        return self.feedback_address or f"fbl@{self.hostname}"

    @property
    def dmarc_mailbox(self) -> str:
        return self.dmarc_address or f"dmarc@{self.hostname}"

    @property
    def bounce_mailbox(self) -> str:
        return self.bounce_address or f"bounces@{self.hostname}"

    @property
    def notice_mailbox(self) -> str:
        return self.notice_sender or f"notices@{self.hostname}"

    @property
    def cert_path(self) -> Path:
        return self.tls_cert or self.home / "tls" / "cert.pem"

    @property
    def key_path(self) -> Path:
        return self.tls_key or self.home / "tls" / "key.pem"

    @property
    def secret_key_path(self) -> Path:
        return self.home / "secret.key"

    @property
    def slack_configured(self) -> bool:
        return bool(self.slack_bot_token and self.slack_channel)

    def prefect_api(self) -> str:
        """Where paused runs are resumed: the setting, PREFECT_API_URL, or `axiom up`'s server.

        A Prefect profile is not consulted: config is the leaf the relay imports too, and the
        relay never imports Prefect (the data-plane contract in .importlinter).
        """
        if self.prefect_api_url:
            return self.prefect_api_url.rstrip("/")
        if os.environ.get("PREFECT_API_URL"):  # what `axiom up` gives its children
            return os.environ["PREFECT_API_URL"].rstrip("/")
        return f"http://{self.prefect_listen}/api"

    def prefect_ui(self) -> str:
        return (self.prefect_ui_url or self.prefect_api().removesuffix("/api")).rstrip("/")

    def load_secret_key(self) -> bytes:
        """The key for secrets at rest: the setting, else the file `axiom init` wrote."""
        if self.secret_key:
            return self.secret_key.encode()
        try:
            return self.secret_key_path.read_bytes().strip()
        except FileNotFoundError as exc:
            raise ConfigError(
                f"AXIOM_SECRET_KEY: not set and {self.secret_key_path} missing; run `axiom init`"
            ) from exc


class ConfigError(Exception):
    """A setting is wrong; the message is one line naming it."""


def describe_validation_error(exc: ValidationError) -> str:
    """One line naming the first bad setting, as an operator would type it."""
    err = exc.errors()[0]
    name = "AXIOM_" + "_".join(str(p) for p in err["loc"]).upper()
    msg = err["msg"].removeprefix("Value error, ")
    return f"{name}: {msg} (got {err.get('input')!r})"


def load_settings(**overrides: object) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc)) from None
