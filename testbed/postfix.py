"""Throwaway Postfix instances and smtp-sink processes on loopback.

A PostfixInstance is a complete, private Postfix: its own config_directory,
queue_directory and data_directory under one temporary directory, its master running in
the foreground (`postfix -c DIR start-fg`), its log in ROOT/maillog (postlogd, no syslog).
The master puts itself and every daemon it forks into one process group, so stopping
signals that group and nothing survives; an atexit hook stops whatever a crashed test left
running. Instances share nothing but the read-only Postfix binaries, so several run side by
side.

Postfix needs the `postfix` user and group and the `postdrop` group (the Debian package
creates them) and root to start. The queue layout `postfix set-permissions` would create is
created here directly with the same owners and modes, and `quick-start` skips the integrity
check: `set-permissions` alone costs ~2.5 s per instance.

SmtpSink runs Postfix's smtp-sink, the scriptable far end: options such as `-r RCPT`
(4xx), `-f DATA` (5xx) or `-Q MAIL` (421 and disconnect) script its replies.
"""

from __future__ import annotations

import atexit
import contextlib
import grp
import os
import pwd
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from testbed.ports import pick

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
LOOPBACK = "127.0.0.1"

# What `postfix set-permissions` creates (postfix-files): name -> (owner, group, mode).
_QUEUE_LAYOUT: dict[str, tuple[str, str, int]] = {
    **{
        name: ("postfix", "root", 0o700)
        for name in (
            "active",
            "bounce",
            "corrupt",
            "defer",
            "deferred",
            "flush",
            "hold",
            "incoming",
            "private",
            "saved",
            "trace",
        )
    },
    "maildrop": ("postfix", "postdrop", 0o730),
    "public": ("postfix", "postdrop", 0o710),
    "pid": ("root", "root", 0o755),
}
_MESSAGE_QUEUES = ("maildrop", "incoming", "active", "deferred", "hold")

# Every daemon a relaying Postfix needs, none chrooted (the instance has no chroot jail).
_BASE_MASTER_CF = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
lmtp      unix  -       -       n       -       -       lmtp
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixError(RuntimeError):
    """A peer failed to start or misbehaved; the message carries its log."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port free on host now and not handed out before (testbed/ports.py)."""
    return pick(host)


def _listening(port: int, host: str = LOOPBACK) -> bool:
    """Whether a TCP socket listens on host:port, without connecting (a probe connection
    would count as a session for smtp-sink's -n and scripted CONNECT replies)."""
    packed = socket.inet_aton(host)
    local = f"{int.from_bytes(packed, 'little'):08X}:{port:04X}"
    wildcard = f"00000000:{port:04X}"
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[3] == "0A" and fields[1] in (local, wildcard):
                return True
    return False


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    return str(value)


def _service_key(entry: str) -> tuple[str, str]:
    name, kind = entry.split()[:2]
    return name, kind


def _age(*paths: Path) -> None:
    """Backdate files: Postfix re-reads a table or main.cf younger than a second in 300 ms
    naps until it is older (a guard against half-written files), which costs ~2 s a start."""
    past = time.time() - 60
    for path in paths:
        os.utime(path, (past, past))


def _group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in a process group. Orphaned daemons are reaped by init,
    sometimes a second later; a zombie holds nothing, so it does not count."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        state, _ppid, group = stat.rpartition(")")[2].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _kill_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when no process is left in it."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # the id was reused by someone else's group
        return False


_live: set[PostfixInstance | SmtpSink] = set()


@atexit.register
def _stop_all() -> None:
    for peer in list(_live):
        with contextlib.suppress(Exception):
            peer.stop()


class PostfixInstance:
    """A private Postfix. main.cf starts from loopback-only defaults that `main_cf` overrides;
    master.cf holds the base daemons plus an smtpd listener on a free loopback port, and
    `master_cf` entries replace a base service of the same name and type or add new ones."""

    def __init__(
        self,
        name: str = "postfix",
        *,
        main_cf: Mapping[str, object] | None = None,
        master_cf: Iterable[str] = (),
        smtpd: bool = True,
        smtpd_port: int | None = None,
        smtpd_options: Mapping[str, object] | None = None,
        hostname: str | None = None,
        keep: bool = False,
        host: str = LOOPBACK,
    ):
        self.name = name
        self.host = host
        self.hostname = hostname or f"{name}.test"
        self.smtpd = smtpd
        self._fixed_port = smtpd_port is not None
        self.port = smtpd_port if smtpd_port is not None else free_port(host)
        self.smtpd_options = dict(smtpd_options or {})
        self.main_cf_overrides = dict(main_cf or {})
        self.master_cf_entries = list(master_cf)
        self.keep = keep or bool(os.environ.get("AXIOM_KEEP_PEERS"))
        # Not under pytest's tmp_path: that is 0700 root and the postfix user must traverse.
        self.root = Path(tempfile.mkdtemp(prefix=f"axiom-{name}-"))
        self.root.chmod(0o755)
        self.conf_dir = self.root / "conf"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.maillog = self.root / "maillog"
        self.conf_dir.mkdir()
        self._proc: subprocess.Popen | None = None
        self._master_pid: int | None = None

    # ------------------------------------------------------------------ configuration
    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def main_cf(self) -> dict[str, str]:
        values: dict[str, object] = {
            "compatibility_level": "3.6",
            "queue_directory": self.queue_dir,
            "data_directory": self.data_dir,
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": self.hostname,
            "mydomain": self.hostname,
            "myorigin": "$myhostname",
            # Postfix accepts only addresses configured on an interface here (127.0.0.1 is the
            # only one on lo); the smtpd listener in master.cf still binds self.host exactly.
            "inet_interfaces": self.host if self.host == LOOPBACK else "all",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "alias_maps": "",
            "alias_database": "",
            "relay_domains": "",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtpd_peername_lookup": False,
            "smtp_dns_support_level": "disabled",  # loopback only: [address] next hops
            "smtp_host_lookup": "native",
            "biff": False,
            "append_dot_mydomain": False,
            "maillog_file": self.maillog,
            "maillog_file_prefixes": self.root,
            "smtp_tls_loglevel": 1,
            "smtpd_tls_loglevel": 1,
            # Retry fast: a test waits seconds, not the default five minutes.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "5s",
            "delay_warning_time": 0,
            "notify_classes": "",
        }
        values.update(self.main_cf_overrides)
        return {k: _format_value(v) for k, v in values.items()}

    def master_cf(self) -> str:
        entries: dict[tuple[str, str], str] = {}
        if self.smtpd:
            lines = [f"{self.host}:{self.port} inet  n       -       n       -       -       smtpd"]
            for key, value in self.smtpd_options.items():
                text = _format_value(value)
                lines.append(
                    f"  -o {{ {key} = {text} }}" if re.search(r"\s", text) else f"  -o {key}={text}"
                )
            entries[("smtpd-listener", "inet")] = "\n".join(lines)
        for entry in _BASE_MASTER_CF.splitlines():
            entries[_service_key(entry)] = entry
        for entry in self.master_cf_entries:
            entries[_service_key(entry)] = entry.rstrip("\n")
        return "\n".join(entries.values()) + "\n"

    def write_file(self, name: str, content: str | bytes, mode: int = 0o644) -> Path:
        """A file in the config directory (a lookup table, a certificate...)."""
        path = self.conf_dir / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(mode)
        _age(path)
        return path

    def _write_config(self) -> None:
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.conf_dir / "main.cf").write_text(main)
        (self.conf_dir / "master.cf").write_text(self.master_cf())
        _age(self.conf_dir / "main.cf", self.conf_dir / "master.cf")

    def _make_queue(self) -> None:
        for path in (self.queue_dir, self.data_dir):
            shutil.rmtree(path, ignore_errors=True)
        self.queue_dir.mkdir(mode=0o755)
        self.queue_dir.chmod(0o755)
        for name, (owner, group, mode) in _QUEUE_LAYOUT.items():
            path = self.queue_dir / name
            path.mkdir()
            os.chown(path, pwd.getpwnam(owner).pw_uid, grp.getgrnam(group).gr_gid)
            path.chmod(mode)
        self.data_dir.mkdir()
        os.chown(self.data_dir, pwd.getpwnam("postfix").pw_uid, 0)
        self.data_dir.chmod(0o700)
        (self.queue_dir / "quick-start").touch()  # skip postfix-script's 2 s integrity check

    # ------------------------------------------------------------------ life cycle
    def start(self, timeout: float = 20) -> PostfixInstance:
        if os.geteuid() != 0:
            raise PostfixError("a private Postfix instance needs root to start")
        attempts = 1 if self._fixed_port or not self.smtpd else 3
        for attempt in range(attempts):
            try:
                self._start_once(timeout)
                return self
            except PostfixError:
                self.stop(remove=False)
                if attempt == attempts - 1 or "Address already in use" not in self.log():
                    self._remove()
                    raise
                self.port = free_port(self.host)  # lost the race for the port; take another
        raise AssertionError("unreachable")

    def _start_once(self, timeout: float) -> None:
        self._write_config()
        self._make_queue()
        out = open(self.root / "postfix.out", "ab")  # noqa: SIM115 (the child keeps it)
        try:
            self._proc = subprocess.Popen(
                [POSTFIX, "-c", str(self.conf_dir), "start-fg"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            out.close()
        _live.add(self)
        deadline = time.monotonic() + timeout
        pid_file = self.queue_dir / "pid" / "master.pid"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PostfixError(
                    f"postfix {self.name} exited {self._proc.returncode}:\n{self.log()}"
                )
            if self._master_pid is None:
                with contextlib.suppress(FileNotFoundError, ValueError):
                    self._master_pid = int(pid_file.read_text().strip())
            if self._master_pid is not None and (
                not self.smtpd or _listening(self.port, self.host)
            ):
                return
            time.sleep(0.02)
        raise PostfixError(f"postfix {self.name} not ready in {timeout}s:\n{self.log()}")

    def stop(self, timeout: float = 10, *, remove: bool = True) -> None:
        """SIGTERM to the master (what `postfix stop` sends; it passes it to its group), then
        SIGKILL to whatever is left of the group. Safe to call twice."""
        proc, master = self._proc, self._master_pid
        if proc is not None:
            if master is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(master, signal.SIGTERM)
            else:
                _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
            if master is not None:  # the daemons get SIGTERM from the master; make sure
                deadline = time.monotonic() + 2
                while _group_members(master) and time.monotonic() < deadline:
                    _kill_group(master, signal.SIGKILL)
                    time.sleep(0.02)
        self._proc = None
        self._master_pid = None
        _live.discard(self)
        if remove:
            self._remove()

    def _remove(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def master_pid(self) -> int | None:
        """The master's pid, which is also the process group of every Postfix daemon."""
        return self._master_pid

    def __enter__(self) -> PostfixInstance:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ inspection
    def log(self) -> str:
        parts = []
        for path in (self.root / "postfix.out", self.maillog):
            with contextlib.suppress(FileNotFoundError):
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def wait_for_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.log())
            if match:
                return match
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{pattern!r} not in {self.name}'s log in {timeout}s:\n{self.log()}"
                )
            time.sleep(0.1)

    def queue_files(self) -> list[Path]:
        """Messages still queued (maildrop, incoming, active, deferred, hold)."""
        found: list[Path] = []
        for name in _MESSAGE_QUEUES:
            found.extend(p for p in (self.queue_dir / name).rglob("*") if p.is_file())
        return found

    def wait_until_queue_empty(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.queue_files():
            if time.monotonic() >= deadline:
                raise PostfixError(
                    f"{self.name}: {len(self.queue_files())} message(s) still queued after "
                    f"{timeout}s:\n{self.log()}"
                )
            time.sleep(0.1)

    def flush(self) -> None:
        """Attempt deferred mail now (`postqueue -f`)."""
        subprocess.run(
            [POSTFIX, "-c", str(self.conf_dir), "flush"],
            check=True,
            capture_output=True,
            timeout=10,
        )

    def postconf(self, *args: str) -> str:
        return subprocess.run(
            [POSTCONF, "-c", str(self.conf_dir), *args],
            check=True,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout

    def submit(
        self, mail_from: str, rcpt_tos: Sequence[str], message: str | bytes, timeout: float = 10
    ) -> str:
        """Send one message to this instance's smtpd; returns Postfix's queue id."""
        data = message.encode() if isinstance(message, str) else message
        with smtplib.SMTP(*self.address, local_hostname="client.test", timeout=timeout) as smtp:
            smtp.ehlo()
            code, reply = smtp.mail(mail_from)
            if code != 250:
                raise PostfixError(f"MAIL FROM refused: {code} {reply!r}")
            for rcpt in rcpt_tos:
                code, reply = smtp.rcpt(rcpt)
                if code not in (250, 251):
                    raise PostfixError(f"RCPT TO {rcpt} refused: {code} {reply!r}")
            code, reply = smtp.data(data)
            if code != 250:
                raise PostfixError(f"DATA refused: {code} {reply!r}")
        match = re.search(rb"queued as ([0-9A-Za-z]+)", reply)
        if not match:
            raise PostfixError(f"no queue id in {reply!r}")
        return match.group(1).decode()


def customer_mta(
    relay_port: int,
    username: str,
    password: str,
    *,
    relay_host: str = LOOPBACK,
    name: str = "customer",
    main_cf: Mapping[str, object] | None = None,
    **kwargs,
) -> PostfixInstance:
    """A customer's MTA that sends everything through a smarthost with STARTTLS and SASL
    (the way customers configure Postfix for a relay service). Not started."""
    relayhost = f"[{relay_host}]:{relay_port}"
    instance = PostfixInstance(
        name,
        main_cf={
            "relayhost": relayhost,
            "smtp_sasl_auth_enable": True,
            "smtp_sasl_security_options": "noanonymous",
            "smtp_sasl_tls_security_options": "noanonymous",
            "smtp_tls_security_level": "encrypt",
            **(main_cf or {}),
        },
        **kwargs,
    )
    table = instance.write_file("sasl_passwd", f"{relayhost} {username}:{password}\n", 0o600)
    # texthash: read as is, no postmap step. The table lives in the instance's directory.
    instance.main_cf_overrides.setdefault("smtp_sasl_password_maps", f"texthash:{table}")
    return instance


def relay_to(
    host: str,
    port: int,
    *,
    name: str = "relay",
    main_cf: Mapping[str, object] | None = None,
    **kwargs,
) -> PostfixInstance:
    """A plain relay: accepts from 127.0.0.0/8 and forwards everything to [host]:port.
    Not started."""
    return PostfixInstance(
        name,
        main_cf={"relayhost": f"[{host}]:{port}", **(main_cf or {})},
        **kwargs,
    )


def _finished_capture(data: bytes) -> bool:
    return b"X-Rcpt-Args:" in data and data.endswith(b"\n\n")


class SmtpSink:
    """Postfix's smtp-sink on a free loopback port. `options` are smtp-sink's own, e.g.
    ["-r", "RCPT"] (450 to RCPT), ["-f", "DATA"] (5xx to DATA), ["-Q", "MAIL"] (421 and
    disconnect), ["-b", "451 4.7.1 Try later"] (the 4xx text). With capture=True every
    transaction is written to a file; messages() returns them."""

    def __init__(
        self,
        options: Sequence[str] = (),
        *,
        port: int | None = None,
        backlog: int = 256,
        hostname: str = "sink.test",
        capture: bool = False,
        keep: bool = False,
        host: str = LOOPBACK,
    ):
        self.host = host
        self.options = list(options)
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port(host)
        self.backlog = backlog
        self.hostname = hostname
        self.keep = keep or bool(os.environ.get("AXIOM_KEEP_PEERS"))
        self.root = Path(tempfile.mkdtemp(prefix="axiom-smtp-sink-"))
        self.root.chmod(0o755)
        self.dump_dir: Path | None = None
        if capture:
            self.dump_dir = self.root / "dump"
            self.dump_dir.mkdir()
            os.chown(self.dump_dir, pwd.getpwnam("postfix").pw_uid, -1)
        self._proc: subprocess.Popen | None = None

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def command(self) -> list[str]:
        args = [SMTP_SINK, "-4", "-h", self.hostname, *self.options]
        if self.dump_dir is not None:
            args += ["-d", f"{self.dump_dir}/msg."]
        if os.geteuid() == 0:
            args += ["-u", "postfix"]  # required when started as root
        return [*args, f"{self.host}:{self.port}", str(self.backlog)]

    def start(self, timeout: float = 10) -> SmtpSink:
        attempts = 1 if self._fixed_port else 3
        for attempt in range(attempts):
            out = open(self.root / "smtp-sink.out", "wb")  # noqa: SIM115 (the child keeps it)
            try:
                self._proc = subprocess.Popen(
                    self.command(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                out.close()
            _live.add(self)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self._proc.poll() is None:
                if _listening(self.port, self.host):
                    return self
                time.sleep(0.02)
            output = self.output()
            self.stop(remove=False)
            if attempt < attempts - 1 and "in use" in output:
                self.port = free_port(self.host)
                continue
            self._remove()
            raise PostfixError(f"smtp-sink on port {self.port} did not start:\n{output}")
        raise AssertionError("unreachable")

    def stop(self, timeout: float = 5, *, remove: bool = True) -> None:
        proc = self._proc
        if proc is not None:
            _kill_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid, signal.SIGKILL)
                proc.wait()
            _kill_group(proc.pid, signal.SIGKILL)
        self._proc = None
        _live.discard(self)
        if remove:
            self._remove()

    def _remove(self) -> None:
        if not self.keep:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output(self) -> str:
        try:
            return (self.root / "smtp-sink.out").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def messages(self) -> list[bytes]:
        """Completed captured transactions (capture=True), oldest first.

        smtp-sink opens a transaction's file when the transaction starts and writes it as it
        goes; a finished one holds its envelope records and ends with an empty line (smtp-sink
        (1), DUMP FILE FORMAT). Files still being written are left out, so a test that counts
        messages never reads half of one."""
        if self.dump_dir is None:
            raise PostfixError("SmtpSink(capture=True) is needed to read messages")
        files = sorted(
            (p for p in self.dump_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_mtime
        )
        captured = (p.read_bytes() for p in files)
        return [data for data in captured if _finished_capture(data)]

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
