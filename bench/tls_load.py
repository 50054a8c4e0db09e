"""An aiosmtplib load generator: CONCURRENCY sessions, a new connection per message, each
with STARTTLS (or implicit TLS) and AUTH, as customers' applications submit.

Run as its own process so its CPU is not the benchmark's: prints one JSON object with the
count sent, failures, elapsed seconds and its own CPU seconds. Bounded by --count and
--deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import ssl
import sys
import time
from email.utils import formatdate


def build_message(sender: str, recipient: str, size: int, seq: int) -> bytes:
    line = b"X" * 76
    body_lines = [b"%d%s" % (i, line)[:77] for i in range(size // 79 + 1)]
    body = b"\r\n".join(body_lines)[:size] + b"\r\n"
    head = (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: bench {seq}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: <bench.{seq}.{time.time_ns()}@client.test>\r\n\r\n"
    ).encode()
    return head + body


async def run(args: argparse.Namespace) -> dict:
    import aiosmtplib

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    next_seq = 0
    sent = 0
    failures: dict[str, int] = {}
    deadline = time.monotonic() + args.deadline

    async def worker() -> None:
        nonlocal next_seq, sent
        while next_seq < args.count and time.monotonic() < deadline:
            seq = next_seq
            next_seq += 1
            message = build_message(args.sender, args.recipient, args.size, seq)
            smtp = aiosmtplib.SMTP(
                hostname=args.host,
                port=args.port,
                local_hostname="client.test",
                use_tls=args.implicit_tls,
                start_tls=not args.implicit_tls,
                tls_context=context,
                timeout=30,
            )
            try:
                await smtp.connect()
                await smtp.login(args.username, args.password)
                errors, reply = await smtp.sendmail(args.sender, [args.recipient], message)
                if errors or "queued as" not in reply:
                    raise RuntimeError(f"refused: {errors or reply}")
                await smtp.quit()
                sent += 1
            except Exception as exc:
                key = f"{type(exc).__name__}: {str(exc)[:120]}"
                failures[key] = failures.get(key, 0) + 1
                smtp.close()
            if args.progress and sent and sent % args.progress == 0:
                print(f"  sent {sent}", file=sys.stderr, flush=True)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    elapsed = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "sent": sent,
        "failed": sum(failures.values()),
        "failures": failures,
        "elapsed": elapsed,
        "rate": sent / elapsed if elapsed else 0.0,
        "client_cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--implicit-tls", action="store_true")
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--sender", required=True)
    parser.add_argument("--recipient", default="rcpt@example.org")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--progress", type=int, default=0, help="print every N messages")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
