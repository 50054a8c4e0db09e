"""The `axiom` command for tests and benchmarks, run as a user runs it, without paying its imports
on every call.

A command spends about 0.7 s of its 0.9 s importing SQLAlchemy, the models, the runbooks and the
services before it reads an argument, and the suite runs some 500 of them (a third of its CPU
time, measured with process accounting). So each test process keeps one zygote: a process that
has imported `axiom.cli` once and forks a child per command. The child takes the command's own
environment, working directory, standard input and output files, then runs the same entry point
as the `axiom` script (`axiom.cli.main`) and exits with its code, so a command sees exactly what
it would see started afresh: the same modules, read from the same files, and its own settings,
read from its environment when it runs (nothing in axiom reads the environment at import).

What the zygote does not import stays lazy and is imported in the child as in a fresh process:
Prefect (its settings context is built from the environment at import), prometheus_client (it
reads PROMETHEUS_MULTIPROC_DIR at import) and anything a command imports inside itself.

    run(["queue", "--json"], env)      # a CompletedProcess, as subprocess.run(..., text=True)

`AXIOM_TEST_CLI=exec` in the test process's environment runs every command as a fresh process
instead (to compare); a command whose PYTHON* variables differ from the zygote's always does.
tests/unit/test_cli_zygote.py checks that both give the same output, codes and errors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

AXIOM = Path(sys.executable).parent / "axiom"
POLL_SECONDS = 0.005


def _python_env(env: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("PYTHON")}


# ---------------------------------------------------------------- the zygote's side
def _child(request: dict) -> None:
    """In the forked child: become the command's process, run it, leave its exit code."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the zygote reaps by ignoring it
        os.setsid()  # its own group, so a timeout kills what it started too
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        stdin = os.open(request["stdin"] or os.devnull, os.O_RDONLY)
        if request.get("log"):  # a long-running process: both streams appended to its log
            stdout = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            stderr = os.dup(stdout)
        else:
            stdout = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            stderr = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for fd, target in ((stdin, 0), (stdout, 1), (stderr, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.argv = [str(AXIOM), *request["args"]]
        # as the `axiom` script's __main__: click names the program from argv[0] unless it
        # was started with -m, as the zygote was
        main_module = sys.modules["__main__"]
        main_module.__spec__ = None
        main_module.__package__ = None
        from axiom.cli import main

        try:
            main()
            code = 0
        except SystemExit as exc:  # what the interpreter does with it
            if exc.code is None:
                code = 0
            elif isinstance(exc.code, int):
                code = exc.code
            else:
                print(exc.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()  # what a normal exit runs (logging's flush, among others)
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:
            pass
        done = Path(request["code"])
        done.with_suffix(".tmp").write_text(str(code))
        done.with_suffix(".tmp").rename(done)  # whole, or not there
        os._exit(code)


def serve() -> None:
    """The zygote: import the CLI, then fork a child for each request line on stdin."""
    import axiom.cli  # noqa: F401  (the point: imported once, before any fork)

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print(json.dumps({"ready": os.getpid()}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        print(json.dumps({"pid": pid}), flush=True)


# ---------------------------------------------------------------- the caller's side
class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "testbed.cli"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        ready = self.proc.stdout.readline()
        if not ready.startswith('{"ready"'):
            raise RuntimeError(f"the CLI zygote did not start: {ready!r}")
        self.owner = os.getpid()
        self.lock = threading.Lock()

    def fork(self, request: dict) -> int:
        with self.lock:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError("the CLI zygote exited")
        return json.loads(answer)["pid"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


_zygote: Zygote | None = None
_zygote_lock = threading.Lock()


def _the_zygote() -> Zygote:
    global _zygote
    with _zygote_lock:
        if _zygote is None or _zygote.owner != os.getpid() or _zygote.proc.poll() is not None:
            _zygote = Zygote()
            import atexit

            atexit.register(_zygote.close)
        return _zygote


class Forked:
    """A long-running axiom process forked from the zygote (`axiom relay`, `axiom deliver`),
    with the part of subprocess.Popen's interface the process wrappers use. It leads its own
    process group, as start_new_session gives; its exit code is the one it leaves in a file
    (the zygote, its parent, lets the kernel reap it), or -9 when it was killed."""

    def __init__(self, args: Sequence[str], env: Mapping[str, str], log: Path, cwd=None):
        self.args = [str(AXIOM), *args]
        self._work = Path(tempfile.mkdtemp(prefix="axiom-forked-"))
        self._code = self._work / "code"
        self.returncode: int | None = None
        self.pid = _the_zygote().fork(
            {
                "args": list(args),
                "env": dict(env),
                "cwd": str(cwd or os.getcwd()),
                "stdin": None,
                "log": str(log),
                "code": str(self._code),
            }
        )

    def poll(self) -> int | None:
        if self.returncode is None:
            if self._code.exists():
                self.returncode = int(self._code.read_text())
            elif not _alive(self.pid):
                # dead without a word: killed (or it said so just now)
                self.returncode = int(self._code.read_text()) if self._code.exists() else -9
            if self.returncode is not None:
                shutil.rmtree(self._work, ignore_errors=True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(POLL_SECONDS * 4)
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def can_fork(env: Mapping[str, str]) -> bool:
    """Whether a command with this environment may fork from the zygote: not when
    AXIOM_TEST_CLI=exec asks for fresh processes, nor when its PYTHON* variables (a path, a
    hash seed) differ from those the zygote started with."""
    return os.environ.get("AXIOM_TEST_CLI") != "exec" and _python_env(env) == _python_env(
        os.environ
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _outputs(work: Path) -> tuple[str, str]:
    return tuple(
        (work / name).read_text(errors="replace") if (work / name).exists() else ""
        for name in ("stdout", "stderr")
    )


def run(
    args: Sequence[str],
    env: Mapping[str, str],
    *,
    input: str | None = None,
    timeout: float = 120,
    cwd: str | os.PathLike | None = None,
) -> subprocess.CompletedProcess:
    """`axiom *args` with this environment, as subprocess.run(..., capture_output=True,
    text=True, timeout=timeout) runs it."""
    argv = [str(AXIOM), *args]
    if not can_fork(env):
        return subprocess.run(
            argv,
            env=dict(env),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
    zygote = _the_zygote()
    work = Path(tempfile.mkdtemp(prefix="axiom-cli-"))
    try:
        stdin = None
        if input is not None:
            stdin = work / "stdin"
            stdin.write_text(input)
        code = work / "code"
        pid = zygote.fork(
            {
                "args": list(args),
                "env": dict(env),
                "cwd": str(cwd or os.getcwd()),
                "stdin": str(stdin) if stdin else None,
                "stdout": str(work / "stdout"),
                "stderr": str(work / "stderr"),
                "code": str(code),
            }
        )
        deadline = time.monotonic() + timeout
        while not code.exists():
            if not _alive(pid) and not code.exists():  # killed before it could say
                return subprocess.CompletedProcess(argv, -signal.SIGKILL, *_outputs(work))
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(argv, timeout)
            time.sleep(POLL_SECONDS)
        return subprocess.CompletedProcess(argv, int(code.read_text()), *_outputs(work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    serve()
