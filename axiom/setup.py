"""`axiom init`: a home, secrets, a sandbox certificate, the schema, the default pool and the
sender of customer notices."""

from __future__ import annotations

from collections.abc import Callable

from config.settings import PLACEHOLDER_SECRETS, ConfigError, Settings


def initialise(settings: Settings, say: Callable[[str], None] = lambda _: None) -> None:
    """Idempotent: safe on every start. Raises ConfigError naming the setting at fault."""
    from config.tls import write_self_signed
    from models.db import make_engine, migrate, session_scope
    from notifications.customer_mail import ensure_notice_sender
    from protocol.egress import ensure_default_pool
    from relay.submission.keystore import KeyBox

    s = settings
    s.home.mkdir(parents=True, exist_ok=True)
    placeholder = s.secret_key is not None and s.secret_key.strip().lower() in PLACEHOLDER_SECRETS
    if s.environment != "sandbox" and placeholder:
        raise ConfigError("AXIOM_SECRET_KEY: a placeholder value is refused outside sandbox")
    if s.secret_key is None and not s.secret_key_path.exists():
        if s.environment != "sandbox":
            raise ConfigError(
                "AXIOM_SECRET_KEY: must be set outside sandbox (generate one with `axiom keygen`)"
            )
        s.secret_key_path.write_bytes(KeyBox.generate())
        s.secret_key_path.chmod(0o600)
        say(f"secret key written to {s.secret_key_path}")
    try:
        KeyBox(s.load_secret_key())
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not s.cert_path.exists() or not s.key_path.exists():
        if s.environment != "sandbox":
            raise ConfigError(
                f"AXIOM_TLS_CERT/AXIOM_TLS_KEY: {s.cert_path} or {s.key_path} does not exist"
            )
        write_self_signed(s.cert_path, s.key_path, s.hostname)
        say(f"self-signed TLS certificate for {s.hostname} written to {s.cert_path}")
    migrate(s.db_url)
    engine = make_engine(s.db_url)
    try:
        with session_scope(engine) as session:
            if ensure_default_pool(session):
                say("pool 'default' (shared) created with 127.0.0.1; new streams deliver from it")
            for line in ensure_notice_sender(session, s):  # customer notices' system sender
                say(line)
            session.commit()
    finally:
        engine.dispose()
