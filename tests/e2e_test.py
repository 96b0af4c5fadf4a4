#!/usr/bin/env python3
"""End-to-end tests of ringchat's apps: they start the real echo_server, echo_client and
echo_demo binaries (and, for interop, tests/asynchat_peer.py) on loopback.

  e2e_test.py GROUP --server PATH --client PATH --demo PATH --python PATH --peer PATH
              [-k SUBSTRING] [-v]

GROUP is one of: basic, errors, interop, signals, all. Each group is its own meson test
(suite 'e2e'), so a failure names its area and the groups run in parallel.

Rules the cases follow: every process is started here with its stdout and stderr
captured, and stopped through its own Popen object (terminate/kill by PID, never by
name); every wait has a deadline; only 127.0.0.1 and ::1 are used, with port 0 (the
server's first stdout line "listening on HOST:PORT" says which port); nothing uses time
to synchronise: a case waits for a condition (a line of output, an exit, bytes on a
socket) with a deadline that fails it.

Exit status: 0 all cases passed (some may have been skipped, with a reason printed),
1 some case failed, 77 everything was skipped (meson: SKIP), 64 bad arguments.
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_SKIP = 77

# The seed's lorem-ipsum message (166 bytes), as in apps/echo_protocol.hpp.
LOREM = (
    b"Lorem ipsum dolor sit amet, consectetuer adipiscing elit. Donec\n"
    b"egestas, enim et consectetuer ullamcorper, lectus ligula rutrum leo, a\n"
    b"elementum elit tortor eu quam.\n"
)

KIB = 1024
MIB = 1024 * 1024

# Filled in from the command line.
PATHS = argparse.Namespace()
VERBOSE = False


class Skip(Exception):
    """A case (or a whole group) cannot run here; the message says why."""


class CaseFailure(AssertionError):
    """A check failed; the message says what was expected and what happened."""


def check(condition, message):
    if not condition:
        raise CaseFailure(message)


def make_message(size):
    """The deterministic message echo_client --size and asynchat_peer.py --size send."""
    return (LOREM * (size // len(LOREM) + 1))[:size]


def tail(text, limit=2000):
    text = text.rstrip("\n")
    if len(text) <= limit:
        return text
    return f"... ({len(text) - limit} chars cut)\n" + text[-limit:]


# ---------------------------------------------------------------- child processes

ALL_CHILDREN = []


class Child:
    """One started process with stdout and stderr collected by reader threads, so a test
    can wait for a line without blocking and without a full pipe stalling the child."""

    def __init__(self, name, argv):
        self.name = name
        self.argv = [str(a) for a in argv]
        if VERBOSE:
            print(f"  $ {' '.join(self.argv)}", flush=True)
        self.popen = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ALL_CHILDREN.append(self)
        self._cond = threading.Condition()
        self._data = {"stdout": bytearray(), "stderr": bytearray()}
        self._open = {"stdout", "stderr"}
        self._threads = [
            threading.Thread(target=self._pump, args=("stdout", self.popen.stdout), daemon=True),
            threading.Thread(target=self._pump, args=("stderr", self.popen.stderr), daemon=True),
        ]
        for t in self._threads:
            t.start()

    @property
    def pid(self):
        return self.popen.pid

    def _pump(self, key, stream):
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            with self._cond:
                if chunk:
                    self._data[key].extend(chunk)
                else:
                    self._open.discard(key)
                self._cond.notify_all()
            if not chunk:
                break
        stream.close()

    def text(self, key):
        with self._cond:
            return self._data[key].decode("utf-8", "backslashreplace")

    @property
    def stdout(self):
        return self.text("stdout")

    @property
    def stderr(self):
        return self.text("stderr")

    def wait_for(self, key, predicate, timeout):
        """Waits until predicate(text of stream `key`) holds; False if the deadline
        passed or the stream closed (the process exited) without it holding."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                if predicate(self._data[key].decode("utf-8", "backslashreplace")):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0 or key not in self._open:
                    return False
                self._cond.wait(remaining)

    def wait(self, timeout):
        """Waits for the exit and for all of its output; returns the exit status, or None
        if it is still running at the deadline (it is left running)."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        for t in self._threads:
            t.join(timeout=5)
        return rc

    def signal(self, signum):
        if self.popen.poll() is None:
            self.popen.send_signal(signum)

    def kill(self):
        """Kills it (by its PID, through Popen) if still running and reaps it."""
        if self.popen.poll() is None:
            self.popen.kill()
        try:
            self.popen.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for t in self._threads:
            t.join(timeout=5)

    def describe(self):
        rc = self.popen.poll()
        state = "still running" if rc is None else f"exit status {rc}"
        return (f"{self.name} ({state}): {' '.join(self.argv)}\n"
                f"--- stdout:\n{tail(self.stdout)}\n--- stderr:\n{tail(self.stderr)}")


def run(name, argv, timeout):
    """Runs a process to completion; a process still running at the deadline is killed
    and the case fails."""
    child = Child(name, argv)
    rc = child.wait(timeout)
    if rc is None:
        child.kill()
        raise CaseFailure(f"{name} did not finish within {timeout} s\n{child.describe()}")
    return child


def kill_all_children():
    for child in ALL_CHILDREN:
        child.kill()


# ---------------------------------------------------------------- servers

LISTENING = re.compile(r"^listening on (\S+):(\d+)$")

# The end of the message an app prints when the kernel or a sandbox refuses io_uring
# (ringchat::errc::io_uring_unavailable): not the apps' fault, so the group is skipped.
IO_URING_UNAVAILABLE = "io_uring is unavailable"

# Lines that must never appear in a server's stderr, whatever the case did to it.
FORBIDDEN_IN_SERVER_LOG = ["ringchat error:", "unexpected failure", "AddressSanitizer",
                           "runtime error:", "LeakSanitizer", "terminate called"]


class Server:
    """A started server (echo_server or asynchat_peer.py server). As a context manager it
    stops the server at the end; if the body succeeded, the stop must be clean (exit 0)."""

    def __init__(self, child, host, port):
        self.child = child
        self.host = host
        self.port = port
        self.stopped_rc = None

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.child.kill()
            return False
        rc = self.stop(signal.SIGTERM, timeout=10)
        check(rc == 0, f"the server did not stop cleanly on SIGTERM\n{self.child.describe()}")
        self.check_log()
        return False

    def check_log(self):
        err = self.child.stderr
        bad = [needle for needle in FORBIDDEN_IN_SERVER_LOG if needle in err]
        check(not bad, f"the server's stderr contains {bad}\n{self.child.describe()}")

    def stop(self, signum, timeout):
        """Sends `signum` and waits for the exit; kills it at the deadline (returns None)."""
        self.child.signal(signum)
        rc = self.child.wait(timeout)
        if rc is None:
            self.child.kill()
        return rc


def start_listening(name, argv, timeout=10):
    child = Child(name, argv)
    ok = child.wait_for("stdout", lambda t: "\n" in t, timeout)
    first = child.stdout.split("\n", 1)[0]
    match = LISTENING.match(first)
    if not ok or not match:
        child.kill()
        err = child.stderr
        if IO_URING_UNAVAILABLE in err:
            raise Skip(f"{name} cannot use io_uring here: {err.strip()}")
        if child.popen.returncode == 77:
            raise Skip(f"{name}: {child.stdout.strip()}")
        raise CaseFailure(f"{name} did not print 'listening on HOST:PORT' within {timeout} s"
                          f" (first line {first!r})\n{child.describe()}")
    host = match.group(1)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return Server(child, host, int(match.group(2)))


def echo_server(*options, host="127.0.0.1"):
    return start_listening("echo_server",
                           [PATHS.server, "--host", host, "--port", "0", *options])


def asynchat_server(*options, host="127.0.0.1"):
    return start_listening("asynchat_peer server",
                           [PATHS.python, PATHS.peer, "server", "--host", host, "--port", "0",
                            *options])


def client_argv(server, *options):
    return [PATHS.client, "--host", server.host, "--port", str(server.port), "--timeout", "30",
            *options]


def expect_echo_client_ok(server, *options, timeout=30):
    client = run("echo_client", client_argv(server, *options), timeout)
    rc = client.popen.returncode
    check(rc == 0 and "RECEIVED COPY OF MESSAGE" in client.stdout,
          f"echo_client should print RECEIVED COPY OF MESSAGE and exit 0\n"
          f"{client.describe()}\n{server.child.describe()}")
    return client


def ipv6_loopback_available():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- raw sockets


def connect(server, timeout=10):
    return socket.create_connection((server.host, server.port), timeout=timeout)


def recv_exact(sock, n, timeout):
    deadline = time.monotonic() + timeout
    parts = []
    got = 0
    while got < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CaseFailure(f"timed out after {timeout} s with {got} of {n} bytes")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(n - got, 1 << 20))
        except socket.timeout:
            continue
        if not chunk:
            raise CaseFailure(f"connection closed after {got} of {n} bytes: "
                              f"{b''.join(parts)[:200]!r}")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def recv_to_eof(sock, timeout, limit=1 << 20):
    """Everything the peer sends until it closes. A reset is a failure: the reply must not
    be destroyed by one."""
    deadline = time.monotonic() + timeout
    parts = []
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CaseFailure(f"no EOF within {timeout} s; received {b''.join(parts)[:200]!r}")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError as e:
            raise CaseFailure(f"connection reset ({e}) after receiving "
                              f"{b''.join(parts)[:200]!r}") from e
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)
        if sum(map(len, parts)) > limit:
            raise CaseFailure(f"more than {limit} bytes without EOF")


# ---------------------------------------------------------------- cases

CASES = []


def case(group, name):
    def register(fn):
        CASES.append((group, name, fn))
        return fn
    return register


# -------- basic: echo_client against echo_server, keep-alive, raw, demo

SIZES = [(0, None), (1, None), (166, None), (1 * MIB, 65536), (64 * MIB, 65536)]


def size_name(size):
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    return f"{size} bytes"


def echo_client_case(size, chunk, host):
    def body():
        if host == "::1" and not ipv6_loopback_available():
            raise Skip("IPv6 loopback ::1 is not available here")
        with echo_server(host=host) as server:
            options = [] if size == 166 else ["--size", str(size)]
            if chunk:
                options += ["--chunk", str(chunk)]
            expect_echo_client_ok(server, *options, timeout=60)
    return body


for _size, _chunk in SIZES:
    case("basic", f"echo_client/echo_server IPv4 {size_name(_size)}")(
        echo_client_case(_size, _chunk, "127.0.0.1"))
case("basic", "echo_client/echo_server IPv6 [::1] 166 bytes")(
    echo_client_case(166, None, "::1"))
case("basic", "echo_client/echo_server IPv6 [::1] 1 MiB")(
    echo_client_case(MIB, 65536, "::1"))


@case("basic", "keep-alive: 1000 round trips on one connection")
def keep_alive_1000():
    with echo_server("--keep-alive") as server:
        expect_echo_client_ok(server, "--count", "1000")


@case("basic", "raw mode: bytes echoed as they arrive, EOF after half-close")
def raw_mode():
    with echo_server("--raw") as server:
        with connect(server) as s:
            first = b"hello, raw ringchat\n"
            s.sendall(first)
            # The echo of the first piece comes back before anything else is sent: raw
            # mode does not wait for a frame.
            check(recv_exact(s, len(first), 10) == first, "first piece not echoed")
            rest = make_message(200 * KIB)
            s.sendall(rest)
            check(recv_exact(s, len(rest), 10) == rest, "200 KiB not echoed intact")
            s.shutdown(socket.SHUT_WR)
            after = recv_to_eof(s, 10)
            check(after == b"", f"expected EOF after the half-close, received {after[:100]!r}")


@case("basic", "echo_demo prints the trace and RECEIVED COPY OF MESSAGE")
def demo():
    child = run("echo_demo", [PATHS.demo], 20)
    err = child.stderr
    if child.popen.returncode != 0 and IO_URING_UNAVAILABLE in err:
        raise Skip(f"echo_demo cannot use io_uring here: {err.strip()}")
    check(child.popen.returncode == 0, f"echo_demo should exit 0\n{child.describe()}")
    check("RECEIVED COPY OF MESSAGE" in child.stdout,
          f"no RECEIVED COPY OF MESSAGE on stdout\n{child.describe()}")
    for needle in ["EchoProducer: more() -> (64 bytes)", "read_until"]:
        check(needle in err, f"trace lacks {needle!r}\n{child.describe()}")


# -------- errors: bad input, disconnects, timeouts, refused

BAD_INPUTS = [
    ("missing command", b"\n"),
    ("ECHO without a length", b"ECHO\n"),
    ("negative length", b"ECHO -5\n"),
    ("non-decimal length", b"ECHO abc\n"),
    ("leading junk", b" ECHO 5\n"),
    ("trailing junk", b"ECHO 5x\n"),
    ("length over --max-payload 1000", b"ECHO 5000\n"),
    ("100 KiB command line without a newline (frame limit 64 KiB)", b"A" * (100 * KIB)),
    # Sending long after the server has replied: its lingering close must still deliver
    # the ERROR line instead of a reset.
    ("4 MiB without a newline", b"A" * (4 * MIB)),
]


def expect_error_reply(server, what, request):
    """Sends `request` (without closing the sending side: the server must answer on its
    own) and expects one 'ERROR ...' line followed by EOF, never a reset."""
    with connect(server) as s:
        s.settimeout(10)
        s.sendall(request)
        reply = recv_to_eof(s, 10)
    check(reply.startswith(b"ERROR ") and reply.endswith(b"\n") and reply.count(b"\n") == 1,
          f"{what}: expected one line 'ERROR ...' then EOF, received {reply[:300]!r}")
    return reply.decode("utf-8", "backslashreplace").rstrip("\n")


@case("errors", "bad input answered with ERROR and a close, while good clients are served")
def bad_input():
    with echo_server("--max-payload", "1000") as server:
        # A slow good client: its command and the first part of its payload are sent
        # before the bad requests, the rest after them.
        good = connect(server)
        message = make_message(500)
        good.sendall(b"ECHO 500\n" + message[:200])
        # And a busy one: a new connection per round trip for the whole time.
        busy = Child("echo_client", client_argv(server, "--size", "300", "--count", "300",
                                                 "--reconnect"))
        failures = []
        for what, request in BAD_INPUTS:
            try:
                line = expect_error_reply(server, what, request)
                if VERBOSE:
                    print(f"    {what}: {line}", flush=True)
            except CaseFailure as e:
                failures.append(str(e))
        with good:
            good.sendall(message[200:])
            echoed = recv_exact(good, len(message), 10)
            check(echoed == message, "the slow good client's echo differs")
            check(recv_to_eof(good, 10) == b"", "bytes after the slow client's echo")
        rc = busy.wait(60)
        if rc is None:
            busy.kill()
        check(rc == 0 and busy.stdout.count("RECEIVED COPY OF MESSAGE") == 1,
              f"the concurrent echo_client failed\n{busy.describe()}")
        check(not failures, "\n".join(failures) + "\n" + server.child.describe())
        expect_echo_client_ok(server)


@case("errors", "a client that disconnects mid-payload is logged, the server keeps serving")
def mid_payload():
    # Disconnects are logged at info level, which -v enables (the default level is warn).
    with echo_server("-v") as server:
        with connect(server) as s:
            s.sendall(b"ECHO 100\n" + b"0123456789")
        check(server.child.wait_for("stderr", lambda t: "mid-payload" in t, 10),
              f"the server did not log 'mid-payload' within 10 s\n{server.child.describe()}")
        expect_echo_client_ok(server)


@case("errors", "--idle-timeout 1: a silent client gets 'ERROR idle timeout' and a close")
def idle_timeout():
    with echo_server("--idle-timeout", "1") as server:
        started = time.monotonic()
        with connect(server) as s:
            reply = recv_to_eof(s, 10)
        elapsed = time.monotonic() - started
        check(reply == b"ERROR idle timeout\n",
              f"expected b'ERROR idle timeout\\n' then EOF, received {reply[:200]!r}")
        check(0.5 <= elapsed <= 5, f"closed after {elapsed:.2f} s, expected about 1 s")
        expect_echo_client_ok(server)


@case("errors", "echo_client against a refused port: non-zero exit, 'Connection refused'")
def refused():
    # A port nobody listens on: bound (so it was free) and closed again.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = run("echo_client", [PATHS.client, "--host", "127.0.0.1", "--port", str(port),
                                 "--timeout", "10"], 20)
    check(client.popen.returncode != 0, f"echo_client should fail\n{client.describe()}")
    check("Connection refused" in client.stdout + client.stderr,
          f"no 'Connection refused' in the output\n{client.describe()}")


@case("errors", "echo_client against --max-payload 10 with 100 bytes: exit 2, ERROR reply")
def client_sees_error_reply():
    with echo_server("--max-payload", "10") as server:
        client = run("echo_client", client_argv(server, "--size", "100"), 20)
        check(client.popen.returncode == 2, f"echo_client should exit 2\n{client.describe()}")
        check(re.search(r"server replied: ERROR ", client.stderr) is not None,
              f"stderr should say the server replied ERROR\n{client.describe()}")


# -------- signals

@case("signals", "SIGTERM with a transfer in flight: the transfer completes, exit 0")
def sigterm_in_flight():
    # -v: the trace line 'command ECHO 1000000' shows the server has the connection and the
    # command before the signal is sent (no time-based guess).
    server = echo_server("-v")
    try:
        message = make_message(1000000)
        half = len(message) // 2
        with connect(server) as s:
            s.sendall(b"ECHO 1000000\n" + message[:half])
            check(server.child.wait_for("stderr", lambda t: "command ECHO 1000000" in t, 10),
                  f"the server never read the command\n{server.child.describe()}")
            server.child.signal(signal.SIGTERM)
            check(server.child.wait_for("stderr", lambda t: "received, stopping" in t, 10),
                  f"the server did not report the signal\n{server.child.describe()}")
            check(server.child.popen.poll() is None,
                  f"the server exited with a transfer in flight\n{server.child.describe()}")
            s.sendall(message[half:])
            echoed = recv_exact(s, len(message), 20)
            check(echoed == message, "the echo differs from the message")
            check(recv_to_eof(s, 10) == b"", "bytes after the echo")
        done = time.monotonic()
        rc = server.child.wait(10)
        check(rc is not None, f"the server did not exit within 10 s of the transfer\n"
                              f"{server.child.describe()}")
        elapsed = time.monotonic() - done
        check(rc == 0, f"the server should exit 0\n{server.child.describe()}")
        server.check_log()
        check(elapsed < 3, f"the server took {elapsed:.2f} s to exit after the transfer")
    finally:
        server.child.kill()


@case("signals", "SIGINT with no connections: exit 0 promptly")
def sigint_idle():
    server = echo_server()
    try:
        started = time.monotonic()
        rc = server.stop(signal.SIGINT, timeout=10)
        elapsed = time.monotonic() - started
        check(rc == 0, f"the server should exit 0 on SIGINT\n{server.child.describe()}")
        server.check_log()
        check(elapsed < 2, f"the server took {elapsed:.2f} s to exit")
    finally:
        server.child.kill()


@case("signals", "SIGTERM with no connections: exit 0 promptly")
def sigterm_idle():
    server = echo_server()
    try:
        started = time.monotonic()
        rc = server.stop(signal.SIGTERM, timeout=10)
        elapsed = time.monotonic() - started
        check(rc == 0, f"the server should exit 0 on SIGTERM\n{server.child.describe()}")
        server.check_log()
        check(elapsed < 2, f"the server took {elapsed:.2f} s to exit")
    finally:
        server.child.kill()


@case("signals", "SIGTERM with a stalled connection: exit 0 once --grace 1 is over")
def sigterm_grace_over():
    server = echo_server("-v", "--grace", "1")
    try:
        with connect(server) as s:
            # The command and 10 of 100 bytes, then silence.
            s.sendall(b"ECHO 100\n0123456789")
            check(server.child.wait_for("stderr", lambda t: "command ECHO 100" in t, 10),
                  f"the server never read the command\n{server.child.describe()}")
            started = time.monotonic()
            server.child.signal(signal.SIGTERM)
            rc = server.child.wait(10)
            elapsed = time.monotonic() - started
            check(rc == 0, f"the server should exit 0 after the grace period\n"
                           f"{server.child.describe()}")
            server.check_log()
            check("grace period over" in server.child.stderr,
                  f"the server did not say the grace period was over\n{server.child.describe()}")
            check(0.5 <= elapsed <= 5, f"exited {elapsed:.2f} s after SIGTERM, expected ~1 s")
            # The stalled client is not left hanging: it sees the connection end.
            try:
                rest = recv_to_eof(s, 10)
            except CaseFailure as e:
                if "reset" not in str(e):
                    raise
                rest = b""
            check(rest == b"", f"unexpected bytes for the stalled client: {rest[:100]!r}")
    finally:
        server.child.kill()


@case("signals", "--threads 2: clients served, SIGTERM stops every loop, exit 0")
def threads_sigterm():
    server = echo_server("--threads", "2")
    try:
        expect_echo_client_ok(server, "--count", "50", "--reconnect")
        rc = server.stop(signal.SIGTERM, timeout=10)
        check(rc == 0, f"the server should exit 0 on SIGTERM\n{server.child.describe()}")
        server.check_log()
    finally:
        server.child.kill()


# -------- interop with Python's own asynchat

INTEROP_SIZES = [0, 1, 166, MIB]


def asynchat_client_case(size):
    def body():
        with echo_server() as server:
            peer = run("asynchat_peer client",
                       [PATHS.python, PATHS.peer, "client", "--host", server.host,
                        "--port", str(server.port), "--size", str(size), "--chunk", "64",
                        "--timeout", "40"], 50)
            check(peer.popen.returncode == 0 and "RECEIVED COPY OF MESSAGE" in peer.stdout,
                  f"the asynchat client failed\n{peer.describe()}\n{server.child.describe()}")
    return body


for _size in INTEROP_SIZES:
    case("interop", f"asynchat client -> echo_server {size_name(_size)}")(
        asynchat_client_case(_size))


@case("interop", "asynchat client -> echo_server --keep-alive, 10 requests on one connection")
def asynchat_client_keep_alive():
    with echo_server("--keep-alive") as server:
        peer = run("asynchat_peer client",
                   [PATHS.python, PATHS.peer, "client", "--host", server.host,
                    "--port", str(server.port), "--size", "166", "--keep-alive",
                    "--count", "10", "--timeout", "20"], 30)
        check(peer.popen.returncode == 0 and peer.stdout.count("RECEIVED COPY OF MESSAGE") == 10,
              f"the asynchat client failed\n{peer.describe()}\n{server.child.describe()}")


def asynchat_server_case(size):
    def body():
        server = asynchat_server("--once", "--timeout", "40")
        try:
            options = ["--size", str(size)]
            if size >= MIB:
                options += ["--chunk", "65536"]
            expect_echo_client_ok(server, *options, timeout=50)
            rc = server.child.wait(10)
            check(rc == 0, f"the asynchat server should exit 0 after its one connection\n"
                           f"{server.child.describe()}")
        finally:
            server.child.kill()
    return body


for _size in INTEROP_SIZES:
    case("interop", f"echo_client -> asynchat server {size_name(_size)}")(
        asynchat_server_case(_size))


# ---------------------------------------------------------------- driver

GROUPS = ["basic", "errors", "interop", "signals"]


def group_precondition(group):
    """Raises Skip when the whole group cannot run here."""
    for path in [PATHS.server, PATHS.client, PATHS.demo]:
        if not os.access(path, os.X_OK):
            raise CaseFailure(f"{path} is not an executable (build the apps first)")
    if group == "interop":
        probe = run("python3 -c 'import asynchat'",
                    [PATHS.python, "-W", "ignore::DeprecationWarning", "-c", "import asynchat"],
                    30)
        if probe.popen.returncode != 0:
            why = (probe.stderr.strip().splitlines() or [f"exit status {probe.popen.returncode}"])
            raise Skip(f"{PATHS.python} cannot import asynchat (removed in Python 3.12): "
                       f"{why[-1]}")
    # io_uring itself: a server that cannot start for that reason skips the group.
    server = echo_server()
    rc = server.stop(signal.SIGINT, timeout=10)
    check(rc == 0, f"echo_server did not exit 0 on SIGINT\n{server.child.describe()}")


def run_group(group, selector):
    selected = [(g, n, fn) for g, n, fn in CASES
                if (group == "all" or g == group) and selector in n]
    groups = sorted({g for g, _, _ in selected}, key=GROUPS.index)
    results = []  # (status, name, seconds, detail)
    started = time.monotonic()
    for g in groups:
        try:
            group_precondition(g)
        except Skip as e:
            print(f"SKIP group {g}: {e}", flush=True)
            results += [("SKIP", n, 0.0, str(e)) for gg, n, _ in selected if gg == g]
            continue
        except Exception as e:  # noqa: BLE001 - reported as a failure of the group
            print(f"FAIL group {g} precondition: {e}", flush=True)
            results += [("FAIL", n, 0.0, "group precondition failed")
                        for gg, n, _ in selected if gg == g]
            continue
        for gg, name, fn in selected:
            if gg != g:
                continue
            print(f"RUN  {name}", flush=True)
            t0 = time.monotonic()
            try:
                fn()
                status, detail = "PASS", ""
            except Skip as e:
                status, detail = "SKIP", str(e)
            except CaseFailure as e:
                status, detail = "FAIL", str(e)
            except Exception:  # noqa: BLE001 - an unexpected error fails only this case
                status, detail = "FAIL", traceback.format_exc()
            finally:
                kill_all_children()
            seconds = time.monotonic() - t0
            results.append((status, name, seconds, detail))
            line = f"{status} {name} ({seconds:.2f} s)"
            if detail:
                line += ":\n" + "\n".join("    " + l for l in detail.splitlines())
            print(line, flush=True)

    total = time.monotonic() - started
    counts = {s: sum(1 for r in results if r[0] == s) for s in ("PASS", "FAIL", "SKIP")}
    print(f"\n==== e2e {group}: {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped in {total:.1f} s", flush=True)
    for status, name, seconds, detail in results:
        if status != "PASS":
            reason = detail.splitlines()[0] if detail else ""
            print(f"  {status} {name}: {reason}", flush=True)
    if counts["FAIL"]:
        return EXIT_FAIL
    if counts["PASS"] == 0:
        return EXIT_SKIP
    return EXIT_OK


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("group", choices=GROUPS + ["all", "list"])
    parser.add_argument("--server", required=True)
    parser.add_argument("--client", required=True)
    parser.add_argument("--demo", required=True)
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--peer", default=os.path.join(os.path.dirname(__file__),
                                                       "asynchat_peer.py"))
    parser.add_argument("-k", default="", help="run only cases whose name contains this")
    parser.add_argument("-v", "--verbose", action="store_true")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return 64 if e.code else 0
    global VERBOSE
    VERBOSE = args.verbose
    for key in ("server", "client", "demo", "python", "peer"):
        setattr(PATHS, key, os.path.abspath(getattr(args, key))
                if os.sep in getattr(args, key) else getattr(args, key))
    if args.group == "list":
        for g, n, _ in CASES:
            print(f"{g}: {n}")
        return EXIT_OK
    try:
        return run_group(args.group, args.k)
    finally:
        kill_all_children()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
