#!/usr/bin/env python3
"""Opens N idle TCP connections to a server and reports the server's memory for them.

usage: idle_conns.py --port P --pid PID [--host 127.0.0.1] [--conns 9000] [--timeout 30]

Reads the server's VmRSS (/proc/PID/status) before connecting, opens the connections
(sending nothing), waits until the server has accepted them all (sockets on the server's
port that belong to a process: /proc/net/tcp shows inode 0 for connections still in the
accept queue), lets it settle, reads VmRSS again and prints one JSON object. Closes the
connections before exiting. Every wait is bounded by --timeout.
"""

import argparse
import json
import resource
import socket
import sys
import time


def vm_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def accepted_count(port):
    """Established connections whose local port is `port` and that have a socket inode."""
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode != "0":
                count += 1
    return count


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pid", type=int, required=True)
    parser.add_argument("--conns", type=int, default=9000)
    parser.add_argument("--timeout", type=float, default=30)
    parser.add_argument("--settle", type=float, default=0.5)
    args = parser.parse_args()

    need = args.conns + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            print(f"idle_conns: need {need} descriptors, ulimit -n allows {hard}", file=sys.stderr)
            return 77
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))

    deadline = time.monotonic() + args.timeout
    base_accepted = accepted_count(args.port)
    rss_before = vm_rss_kib(args.pid)
    socks = []
    error = None
    try:
        for _ in range(args.conns):
            if time.monotonic() > deadline:
                error = "timed out while connecting"
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                s.connect((args.host, args.port))
            except OSError as e:
                s.close()
                error = f"connect: {e}"
                break
            socks.append(s)
        accepted = accepted_count(args.port) - base_accepted
        while accepted < len(socks) and time.monotonic() < deadline:
            time.sleep(0.05)
            accepted = accepted_count(args.port) - base_accepted
        if accepted < len(socks) and error is None:
            error = f"server accepted only {accepted} of {len(socks)} connections"
        time.sleep(args.settle)
        rss_after = vm_rss_kib(args.pid)
    finally:
        for s in socks:
            s.close()
    opened = len(socks)
    result = {
        "conns": opened,
        "accepted": accepted,
        "rss_before_kib": rss_before,
        "rss_after_kib": rss_after,
        "bytes_per_conn": (rss_after - rss_before) * 1024 / opened if opened else None,
        "error": error,
    }
    print(json.dumps(result))
    return 0 if error is None else 2


if __name__ == "__main__":
    sys.exit(main())
