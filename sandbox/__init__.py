"""The simulated receiving world: a test double for the internet, used by sandbox mode and tests.

Nothing in relay/, flows/ or models/ imports this package; the relay reaches the world through
its settings only (AXIOM_DNS_NAMESERVERS, AXIOM_DELIVERY_PORT; see `world.relay_environment`).

    behaviour.yaml / behaviour.py  providers, reply texts, reputation arithmetic, DNSBL zones,
                                   each published number with its source
    world.py     SandboxWorld(settings): start(), stop(), healthy() — what `axiom up` runs
    dns.py       authoritative DNS on loopback (UDP + TCP) answering from zones.py
    zones.py     MX/A/PTR/TXT records from behaviour and the relay's database; DNSBL answers
    mx.py        one aiosmtpd receiver per provider, answering with its published replies
    reputation.py  per (provider, source IP) standing: rate tiers, blocks, spam rate
    authn.py     SPF, DKIM (dkimpy) and DMARC as a receiver evaluates them
    feedback.py  ARF (RFC 5965) complaint reports, sent by SMTP
    mailbox.py   which mailboxes exist; delivered mail under AXIOM_HOME/sandbox/mail/
    state.py     the state file (AXIOM_HOME/sandbox/state.db) the CLI and the world share
    scenarios.py named scenarios run through the real relay; cli.py is `axiom sandbox …`

Settings: AXIOM_SANDBOX_DNS_LISTEN (127.0.0.1:5300), AXIOM_SANDBOX_MX_NETWORK (127.0.25.0/24,
provider N at .N), AXIOM_DELIVERY_PORT (the MX port; 2526 when unset), and
AXIOM_SANDBOX_FEEDBACK_ADDRESS / AXIOM_SANDBOX_FEEDBACK_SMTP for complaint reports.
"""
