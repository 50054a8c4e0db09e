"""Real SMTP peers for the integration tests and benchmarks: private Postfix instances and
Postfix's smtp-sink, each on loopback, on its own free port, leaving no process behind."""

from testbed.postfix import (
    PostfixError,
    PostfixInstance,
    SmtpSink,
    customer_mta,
    free_port,
    relay_to,
)

__all__ = [
    "PostfixError",
    "PostfixInstance",
    "SmtpSink",
    "customer_mta",
    "free_port",
    "relay_to",
]
