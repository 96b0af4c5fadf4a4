#!/usr/bin/env python3
"""Tests of the side-by-side measurement clients bench/targets relies on: latency_pair and
cpu_slices (bench/baselines/), run briefly against real echo_server processes and against a
server that answers wrongly.

  bench_tools_test.py --server PATH --latency-pair PATH --cpu-slices PATH

Every process is started here and stopped through its own Popen object (by PID); every
wait has a deadline; only 127.0.0.1 and port 0 are used. Exit status: 0 all passed, 1 a
check failed, 64 bad arguments.
"""

import argparse
import json
import re
import socket
import subprocess
import sys
import threading
import time

FAILURES = []


def check(condition, message):
    if not condition:
        FAILURES.append(message)
        print(f"FAIL: {message}", file=sys.stderr)


class Server:
    """An echo_server started with `args`, listening on a port of the kernel's choice."""

    def __init__(self, path, *args):
        self.proc = subprocess.Popen([path, "--port", "0", "--grace", "1", *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self._first_line(deadline=time.monotonic() + 10)
        m = re.match(r"^listening on .*:(\d+)$", line or "")
        if not m:
            self.stop()
            raise RuntimeError(f"echo_server {args} did not say where it listens: {line!r}")
        self.port = int(m.group(1))

    def _first_line(self, deadline):
        result = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(max(0.0, deadline - time.monotonic()))
        return result[0].strip() if result else None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


class WrongEcho:
    """A TCP server on 127.0.0.1 that answers each request with the same number of bytes,
    the first one changed: a reply to check."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conns = []
        while not self.done.is_set():
            try:
                conn, _ = self.listener.accept()
                conn.settimeout(10)
                conns.append(conn)
                threading.Thread(target=self._answer, args=(conn,), daemon=True).start()
            except socket.timeout:
                continue
            except OSError:
                break
        for conn in conns:
            conn.close()

    def _answer(self, conn):
        try:
            while not self.done.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(bytes([data[0] ^ 0xFF]) + data[1:])
        except OSError:
            return

    def stop(self):
        self.done.set()
        self.listener.close()
        self.thread.join(timeout=10)


def run(cmd, timeout=60):
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    return done.returncode, done.stdout, done.stderr


def test_latency_pair(args, a, b):
    code, out, err = run([args.latency_pair, "--port", str(a.port), "--port", str(b.port),
                          "--server-pid", str(a.proc.pid), "--server-pid", str(b.proc.pid),
                          "--seconds", "0.6", "--warmup", "0.1", "--block", "0.2", "--json"])
    check(code == 0, f"latency_pair against two echo_servers: exit {code}, {err.strip()}")
    if code != 0:
        return
    report = json.loads(out)
    rows = report["servers"]
    check(len(rows) == 2 and report["blocks"] == 3, f"latency_pair: 2 servers, 3 blocks: {report}")
    # Requests alternate, so both servers answer the same number of them.
    check(rows[0]["messages"] > 0 and rows[0]["messages"] == rows[1]["messages"],
          f"latency_pair: equal, non-zero round trips per server: {rows}")
    for r in rows:
        check(0 < r["p50_us"] <= r["p99_us"], f"latency_pair: 0 < p50 <= p99: {r}")
        check(r["server_cpu_us_per_msg"] >= 0, f"latency_pair: server CPU reported: {r}")
    check(rows[0]["p50_ratio_median"] == 1.0, f"latency_pair: first server's ratio is 1: {rows[0]}")
    check(0.2 < rows[1]["p50_ratio_median"] < 5, f"latency_pair: a plausible ratio: {rows[1]}")


def test_cpu_slices(args, a, echo):
    code, out, err = run([args.cpu_slices, "--conns", "4", "--port", str(a.port), "--echo-port",
                          str(echo.port), "--server-pid", str(a.proc.pid), "--server-pid",
                          str(echo.proc.pid), "--seconds", "0.6", "--warmup", "0.1",
                          "--slice-ms", "50", "--json"])
    check(code == 0, f"cpu_slices against raw and ECHO servers: exit {code}, {err.strip()}")
    if code != 0:
        return
    report = json.loads(out)
    rows = report["servers"]
    check(report["turns"] >= 2, f"cpu_slices: at least 2 turns in 0.6 s of 50 ms slices: {report}")
    check([r["echo"] for r in rows] == [False, True], f"cpu_slices: framing per server: {rows}")
    for r in rows:
        check(r["messages"] > 0, f"cpu_slices: messages counted: {r}")
        check(r["server_cpu_us_per_msg"] > 0, f"cpu_slices: CPU measured: {r}")
        check(len(r["turn_cpu_us_per_msg"]) == report["turns"],
              f"cpu_slices: one figure per turn: {r}")


def test_wrong_replies(args, a):
    wrong = WrongEcho()
    try:
        code, _, err = run([args.latency_pair, "--port", str(a.port), "--port", str(wrong.port),
                            "--seconds", "0.3", "--warmup", "0", "--block", "0.1"])
        check(code == 1 and "wrong reply" in err,
              f"latency_pair against a wrong server: exit 1 naming it, got {code}: {err.strip()}")
        code, _, err = run([args.cpu_slices, "--conns", "2", "--port", str(a.port), "--port",
                            str(wrong.port), "--server-pid", str(a.proc.pid), "--server-pid",
                            str(a.proc.pid), "--seconds", "0.3", "--warmup", "0",
                            "--slice-ms", "50"])
        check(code == 1 and "wrong reply" in err,
              f"cpu_slices against a wrong server: exit 1 naming it, got {code}: {err.strip()}")
    finally:
        wrong.stop()


def test_usage(args):
    code, _, err = run([args.latency_pair, "--port", "1"])
    check(code == 64 and "at least twice" in err, f"latency_pair with one server: {code} {err}")
    code, _, err = run([args.cpu_slices, "--port", "1", "--port", "2"])
    check(code == 64 and "--server-pid" in err, f"cpu_slices without pids: {code} {err}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--server", required=True)
    parser.add_argument("--latency-pair", required=True)
    parser.add_argument("--cpu-slices", required=True)
    try:
        args = parser.parse_args()
    except SystemExit:
        return 64
    servers = []
    try:
        a = Server(args.server, "--raw")
        servers.append(a)
        b = Server(args.server, "--raw")
        servers.append(b)
        echo = Server(args.server, "--keep-alive")
        servers.append(echo)
        cases = [("latency_pair", lambda: test_latency_pair(args, a, b)),
                 ("cpu_slices", lambda: test_cpu_slices(args, a, echo)),
                 ("wrong replies", lambda: test_wrong_replies(args, a)),
                 ("usage", lambda: test_usage(args))]
        failed_cases = 0
        for name, test in cases:
            before = len(FAILURES)
            test()
            ok = len(FAILURES) == before
            failed_cases += 0 if ok else 1
            print(f"{'ok  ' if ok else 'FAIL'} {name}")
    finally:
        for s in servers:
            s.stop()
    print(f"{len(cases) - failed_cases} cases passed, {failed_cases} failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
