#!/usr/bin/env python3
"""Tests of the side-by-side measurement clients bench/targets relies on: latency_pair and
cpu_slices (bench/baselines/), run briefly against real echo_server processes and against a
server that answers wrongly.

  bench_tools_test.py --server PATH --latency-pair PATH --cpu-slices PATH

Processes are started and stopped with tests/e2e_test.py's helpers: by PID through their
Popen objects, every wait with a deadline; only 127.0.0.1 and port 0 are used. Each server
must stop cleanly on SIGTERM and log no sanitizer report. Exit status: 0 all passed, 1 a
check failed, 77 skipped (no io_uring here), 64 bad arguments.
"""

import argparse
import json
import signal
import socket
import sys
import threading

# The end-to-end tests' process handling: servers started and stopped by PID through their
# Popen objects, output collected without blocking, every wait with a deadline.
from e2e_test import CaseFailure, Skip, check, run, start_listening


def echo_server(path, *options):
    return start_listening("echo_server", [path, "--port", "0", "--grace", "1", *options])


def stop(server):
    """Stops a server with SIGTERM; it must exit cleanly and log no sanitizer report."""
    rc = server.stop(signal.SIGTERM, timeout=10)
    check(rc == 0, f"echo_server did not stop cleanly on SIGTERM\n{server.child.describe()}")
    server.check_log()


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


def run_tool(cmd, timeout=60):
    """Runs a measuring client to its exit (killed and failed at the deadline): its exit
    status, stdout and stderr."""
    child = run(cmd[0].rsplit("/", 1)[-1], cmd, timeout)
    return child.popen.returncode, child.stdout, child.stderr


def test_latency_pair(args, a, b):
    code, out, err = run_tool([args.latency_pair, "--port", str(a.port), "--port", str(b.port),
                          "--server-pid", str(a.child.pid), "--server-pid", str(b.child.pid),
                          "--seconds", "0.6", "--warmup", "0.1", "--block", "0.2", "--json"])
    check(code == 0, f"latency_pair against two echo_servers: exit {code}, {err.strip()}")
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
    code, out, err = run_tool([args.cpu_slices, "--conns", "4", "--port", str(a.port), "--echo-port",
                          str(echo.port), "--server-pid", str(a.child.pid), "--server-pid",
                          str(echo.child.pid), "--seconds", "0.6", "--warmup", "0.1",
                          "--slice-ms", "50", "--json"])
    check(code == 0, f"cpu_slices against raw and ECHO servers: exit {code}, {err.strip()}")
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
        code, _, err = run_tool([args.latency_pair, "--port", str(a.port), "--port", str(wrong.port),
                            "--seconds", "0.3", "--warmup", "0", "--block", "0.1"])
        check(code == 1 and "wrong reply" in err,
              f"latency_pair against a wrong server: exit 1 naming it, got {code}: {err.strip()}")
        code, _, err = run_tool([args.cpu_slices, "--conns", "2", "--port", str(a.port), "--port",
                            str(wrong.port), "--server-pid", str(a.child.pid), "--server-pid",
                            str(a.child.pid), "--seconds", "0.3", "--warmup", "0",
                            "--slice-ms", "50"])
        check(code == 1 and "wrong reply" in err,
              f"cpu_slices against a wrong server: exit 1 naming it, got {code}: {err.strip()}")
    finally:
        wrong.stop()


def test_usage(args):
    code, _, err = run_tool([args.latency_pair, "--port", "1"])
    check(code == 64 and "at least twice" in err, f"latency_pair with one server: {code} {err}")
    code, _, err = run_tool([args.cpu_slices, "--port", "1", "--port", "2"])
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
    failed = 0
    try:
        a = echo_server(args.server, "--raw")
        servers.append(a)
        b = echo_server(args.server, "--raw")
        servers.append(b)
        echo = echo_server(args.server, "--keep-alive")
        servers.append(echo)
        cases = [("latency_pair", lambda: test_latency_pair(args, a, b)),
                 ("cpu_slices", lambda: test_cpu_slices(args, a, echo)),
                 ("wrong replies", lambda: test_wrong_replies(args, a)),
                 ("usage", lambda: test_usage(args)),
                 ("servers stop cleanly", lambda: [stop(s) for s in servers])]
        for name, test in cases:
            try:
                test()
                print(f"ok   {name}")
            except CaseFailure as e:
                failed += 1
                print(f"FAIL {name}: {e}", file=sys.stderr)
                print(f"FAIL {name}")
    except Skip as e:
        print(f"SKIP: {e}")
        return 77
    finally:
        for s in servers:
            s.child.kill()
    print(f"{len(cases) - failed} cases passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
