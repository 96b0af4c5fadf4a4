#!/usr/bin/env python3
"""An ECHO peer written with Python's own asynchat, for ringchat's interop tests.

It follows the PyMOTW asynchat example (EchoServer, EchoHandler, EchoClient)
closely; the protocol is the seed's: the client sends "ECHO <len>\\n" and then
<len> bytes, the server echoes those bytes back and closes once they are sent.

  asynchat_peer.py client --host H --port P (--message TEXT | --size N)
                          [--chunk 64] [--count K] [--keep-alive] [--timeout S] [-v]
      Sends the message through asynchat.simple_producer in --chunk byte pieces
      and reads the reply with an integer terminator. Prints RECEIVED COPY OF
      MESSAGE (exit 0) or ERROR IN TRANSMISSION (exit 1). --count repeats the
      exchange K times, each on a new connection, or all on one connection with
      --keep-alive. A connection that closes before the whole reply is an error.

  asynchat_peer.py server --host H --port 0 [--once] [--keep-alive] [--timeout S] [-v]
      Prints "listening on HOST:PORT" as its first stdout line. Serves ECHO
      requests until --timeout; --once exits after one connection. --keep-alive
      goes back to reading commands after each echo instead of closing.

Exit status: 0 success, 1 transmission or protocol error (for the server: some
connection failed), 2 timeout (for a server without --once reaching --timeout
is the normal end), 64 bad arguments, 77 asynchat unavailable (meson: SKIP).
-v traces each step to stderr, like the seed's logging output.
"""

import argparse
import logging
import signal
import socket
import sys
import time
import warnings

try:
    with warnings.catch_warnings():
        # Python 3.11 warns that asynchat/asyncore are deprecated (removed in 3.12).
        warnings.simplefilter("ignore", DeprecationWarning)
        import asynchat
        import asyncore
except ImportError as exc:
    print(f"SKIP: python asynchat not available: {exc}", flush=True)
    sys.exit(77)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_TIMEOUT = 2
EXIT_USAGE = 64

# The seed's lorem.txt: 166 bytes, so the default 64-byte chunking gives 64 + 64 + 38.
LOREM = (
    b"Lorem ipsum dolor sit amet, consectetuer adipiscing elit. Donec\n"
    b"egestas, enim et consectetuer ullamcorper, lectus ligula rutrum leo, a\n"
    b"elementum elit tortor eu quam.\n"
)

# Each loop step waits at most this long, so deadlines are checked often.
POLL_SECONDS = 0.05


def shown(data):
    """Formats bytes for the trace like the seed does, cut short for big payloads."""
    limit = 200
    text = data[:limit].decode("utf-8", "backslashreplace")
    more = f" ... ({len(data) - limit} more bytes)" if len(data) > limit else ""
    return f'"""{text}"""{more}'


def make_message(size):
    """A deterministic message of exactly `size` bytes: the seed's text, repeated."""
    repeats = size // len(LOREM) + 1
    return (LOREM * repeats)[:size]


def resolve(host, port):
    """Returns (family, sockaddr) for a TCP endpoint; numeric and named hosts work."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    if not infos:
        raise OSError(f"cannot resolve {host}")
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def run_loop(socket_map, is_done, deadline):
    """Runs asyncore until is_done() or the map empties; False if the deadline passed."""
    while socket_map and not is_done():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        asyncore.loop(timeout=min(POLL_SECONDS, remaining), use_poll=True,
                      map=socket_map, count=1)
    return True


# ---------------------------------------------------------------- server side


class EchoHandler(asynchat.async_chat):
    """Handles echoing messages from a single client (the seed's EchoHandler)."""

    def __init__(self, sock, socket_map, keep_alive, buffer_size, on_done):
        self.ac_in_buffer_size = buffer_size
        self.ac_out_buffer_size = buffer_size
        self.received_data = []
        self.keep_alive = keep_alive
        self.on_done = on_done
        self.echoed = 0
        self.in_request = False
        self.failed = None
        self.logger = logging.getLogger("EchoHandler")
        asynchat.async_chat.__init__(self, sock, map=socket_map)
        # Start by waiting for the "ECHO <len>\n" command.
        self.process_data = self._process_command
        self.set_terminator(b"\n")

    def collect_incoming_data(self, data):
        """Reads an incoming message from the client and puts it into our outgoing queue."""
        self.logger.debug("collect_incoming_data() -> (%d bytes)\n%s", len(data), shown(data))
        self.received_data.append(data)

    def found_terminator(self):
        """The end of a command or message has been seen."""
        self.logger.debug("found_terminator()")
        self.process_data()

    def _process_command(self):
        """We have the full ECHO command."""
        command = b"".join(self.received_data)
        self.received_data = []
        self.logger.debug('_process_command() "%s"', command.decode("utf-8", "backslashreplace"))
        parts = command.strip().split(b" ")
        length = None
        if len(parts) == 2 and parts[0] == b"ECHO" and parts[1].isdigit():
            length = int(parts[1])
        if length is None:
            self._fail(f"bad command {command!r}, expected b'ECHO <len>'")
            return
        self.in_request = True
        self.process_data = self._process_message
        if length == 0:
            # An integer terminator of 0 never fires (no data will come): echo at once.
            self._process_message()
        else:
            self.set_terminator(length)

    def _process_message(self):
        """We have read the entire message to be sent back to the client."""
        to_echo = b"".join(self.received_data)
        self.received_data = []
        self.logger.debug("_process_message() echoing\n%s", shown(to_echo))
        self.push(to_echo)
        self.echoed += 1
        self.in_request = False
        if self.keep_alive:
            self.process_data = self._process_command
            self.set_terminator(b"\n")
        else:
            # Disconnect after sending the entire response, since we only want
            # to do one thing per connection.
            self.close_when_done()

    def _fail(self, reason):
        self.failed = reason
        print(f"asynchat_peer server: {reason}", file=sys.stderr, flush=True)
        self.close()

    def handle_error(self):
        _, value, _ = sys.exc_info()
        self._fail(f"error: {value!r}")

    def handle_close(self):
        pending = sum(len(chunk) for chunk in self.received_data) + len(self.ac_in_buffer)
        if self.failed is None and (pending or self.in_request):
            self._fail(f"connection closed in the middle of a request ({pending} bytes pending)")
        elif self.failed is None and self.echoed == 0:
            self._fail("connection closed before any request")
        else:
            self.close()

    def close(self):
        asynchat.async_chat.close(self)
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done(self)


class EchoServer(asyncore.dispatcher):
    """Receives connections and establishes handlers for each client (the seed's EchoServer)."""

    def __init__(self, sockaddr, family, socket_map, once, keep_alive, buffer_size):
        self.logger = logging.getLogger("EchoServer")
        asyncore.dispatcher.__init__(self, map=socket_map)
        self.socket_map = socket_map
        self.once = once
        self.keep_alive = keep_alive
        self.buffer_size = buffer_size
        self.served = 0
        self.failures = 0
        self.create_socket(family, socket.SOCK_STREAM)
        self.set_reuse_addr()
        self.bind(sockaddr)
        self.address = self.socket.getsockname()
        self.logger.debug("binding to %s", self.address)
        self.listen(64)

    def handle_accepted(self, sock, addr):
        self.logger.debug("handle_accepted() -> %s", addr)
        EchoHandler(sock, self.socket_map, self.keep_alive, self.buffer_size, self._handler_done)
        if self.once:
            # One connection only: stop listening, the loop ends when the handler closes.
            self.close()

    def _handler_done(self, handler):
        self.served += 1
        if handler.failed is not None:
            self.failures += 1

    def handle_close(self):
        self.logger.debug("handle_close()")
        self.close()


def run_server(args):
    family, sockaddr = resolve(args.host, args.port)
    socket_map = {}
    server = EchoServer(sockaddr, family, socket_map, args.once, args.keep_alive, args.buffer)
    host, port = server.address[0], server.address[1]
    print(f"listening on {host}:{port}", flush=True)

    stopped = []

    def stop(signum, _frame):
        stopped.append(signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    deadline = time.monotonic() + args.timeout
    finished = run_loop(socket_map, lambda: bool(stopped), deadline)
    for channel in list(socket_map.values()):
        channel.close()

    if server.failures:
        return EXIT_ERROR
    if args.once and not finished and not stopped:
        print(f"asynchat_peer server: timed out after {args.timeout} s",
              file=sys.stderr, flush=True)
        return EXIT_TIMEOUT
    return EXIT_OK


# ---------------------------------------------------------------- client side


class EchoProducer(asynchat.simple_producer):
    """The seed's simple_producer with a trace of each chunk handed to the channel."""

    logger = logging.getLogger("EchoProducer")

    def more(self):
        response = asynchat.simple_producer.more(self)
        self.logger.debug("more() -> (%s bytes)\n%s", len(response), shown(response))
        return response


class EchoClient(asynchat.async_chat):
    """Sends messages to the server and receives responses (the seed's EchoClient)."""

    def __init__(self, family, sockaddr, message, chunk, count, keep_alive, socket_map):
        self.message = message
        self.chunk = chunk
        self.remaining = count
        self.keep_alive = keep_alive
        self.received_data = []
        self.received = 0
        self.verified = 0
        self.error = None
        self.finished = False
        self.logger = logging.getLogger("EchoClient")
        asynchat.async_chat.__init__(self, map=socket_map)
        self.create_socket(family, socket.SOCK_STREAM)
        self.logger.debug("connecting to %s", sockaddr)
        self.connect(sockaddr)

    def handle_connect(self):
        self.logger.debug("handle_connect()")
        self._send_request()

    def _send_request(self):
        # Send the command, then the message through a producer in fixed-size chunks.
        self.push(b"ECHO %d\n" % len(self.message))
        self.push_with_producer(EchoProducer(self.message, buffer_size=self.chunk))
        self.received_data = []
        self.received = 0
        if self.message:
            # We expect the data to come back as-is, so set a length-based terminator.
            self.set_terminator(len(self.message))
        else:
            # Nothing will come back for an empty message: a clean close is the answer.
            self.set_terminator(None)

    def collect_incoming_data(self, data):
        """Read an incoming message from the server."""
        self.logger.debug("collect_incoming_data() -> (%d)\n%s", len(data), shown(data))
        if self.finished or not self.message:
            self._fail(f"{len(data)} unexpected bytes after the reply")
            return
        self.received_data.append(data)
        self.received += len(data)

    def found_terminator(self):
        self.logger.debug("found_terminator()")
        received_message = b"".join(self.received_data)
        last = self.remaining <= 1 or not self.keep_alive
        if last and self.ac_in_buffer:
            # asynchat keeps what followed the n bytes in ac_in_buffer: the server sent more.
            self._fail(f"{len(self.ac_in_buffer)} unexpected bytes after the reply")
            return
        if received_message != self.message:
            self._report_mismatch(received_message)
            return
        self._received_copy()

    def _received_copy(self):
        self.logger.debug("RECEIVED COPY OF MESSAGE")
        print("RECEIVED COPY OF MESSAGE", flush=True)
        self.verified += 1
        self.remaining -= 1
        if self.remaining > 0 and self.keep_alive:
            self._send_request()
        else:
            self.finished = True
            self.close()

    def _report_mismatch(self, received_message):
        first_difference = next(
            (i for i, (a, b) in enumerate(zip(received_message, self.message)) if a != b),
            min(len(received_message), len(self.message)))
        self._fail(f"expected {len(self.message)} bytes, received {len(received_message)} bytes,"
                   f" first difference at byte {first_difference}")

    def _fail(self, reason):
        if self.error is None:
            self.error = reason
        self.finished = True
        self.close()

    def handle_error(self):
        _, value, _ = sys.exc_info()
        self._fail(f"{type(value).__name__}: {value}")

    def handle_close(self):
        if self.finished:
            self.close()
        elif not self.message and self.connected:
            # An empty message's reply is complete when the server closes cleanly.
            self._received_copy()
        else:
            self._fail(f"connection closed early: expected {len(self.message)} bytes,"
                       f" received {self.received} bytes")


def run_client(args):
    if args.message is not None:
        message = args.message.encode("utf-8")
    else:
        message = make_message(args.size)
    if args.keep_alive and not message:
        # An empty reply is only visible as the server closing, which keep-alive forbids.
        print("ERROR: --keep-alive needs a non-empty message", file=sys.stderr, flush=True)
        return EXIT_USAGE
    family, sockaddr = resolve(args.host, args.port)
    deadline = time.monotonic() + args.timeout

    connections = 1 if args.keep_alive else args.count
    per_connection = args.count if args.keep_alive else 1
    for _ in range(connections):
        socket_map = {}
        client = EchoClient(family, sockaddr, message, args.chunk, per_connection,
                            args.keep_alive, socket_map)
        in_time = run_loop(socket_map, lambda: client.finished, deadline)
        for channel in list(socket_map.values()):
            channel.close()
        if not in_time:
            print(f"ERROR: timed out after {args.timeout} s: expected {len(message)} bytes,"
                  f" received {client.received} bytes", flush=True)
            return EXIT_TIMEOUT
        if client.error is not None or client.verified != per_connection:
            reason = client.error or "connection ended before the reply"
            print(f"ERROR IN TRANSMISSION: {reason}", flush=True)
            return EXIT_ERROR
    return EXIT_OK


# ---------------------------------------------------------------- command line


class ArgumentParser(argparse.ArgumentParser):
    """Exits with 64 on bad arguments, so they are not mistaken for a timeout (2)."""

    def error(self, message):
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def positive_int(text):
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def positive_float(text):
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def parse_args(argv):
    parser = ArgumentParser(description="ECHO peer built on Python's asynchat (ringchat interop)")
    common = ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="trace each step to stderr, like the seed example")
    common.add_argument("--host", default="127.0.0.1")
    common.add_argument("--timeout", type=positive_float, default=30.0,
                        help="overall deadline in seconds (default 30)")
    common.add_argument("--keep-alive", action="store_true",
                        help="several ECHO requests per connection")
    sub = parser.add_subparsers(dest="mode", required=True)

    client = sub.add_parser("client", parents=[common], help="send ECHO requests")
    client.add_argument("--port", type=positive_int, required=True)
    what = client.add_mutually_exclusive_group(required=True)
    what.add_argument("--message", help="the message text (sent as UTF-8)")
    what.add_argument("--size", type=non_negative_int,
                      help="send a deterministic message of N bytes (the seed's text, repeated)")
    client.add_argument("--chunk", type=positive_int, default=64,
                        help="producer chunk size in bytes (default 64, like the seed)")
    client.add_argument("--count", type=positive_int, default=1,
                        help="number of exchanges (default 1), one connection each"
                             " unless --keep-alive")

    server = sub.add_parser("server", parents=[common], help="serve ECHO requests")
    server.add_argument("--port", type=non_negative_int, default=0,
                        help="port to bind (default 0: any free port, printed on stdout)")
    server.add_argument("--once", action="store_true", help="exit after one connection")
    server.add_argument("--buffer", type=positive_int, default=65536,
                        help="asynchat in/out buffer size (64 reproduces the seed's trace)")
    return parser.parse_args(argv)


def main(argv):
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.mode == "server":
            return run_server(args)
        return run_client(args)
    except OSError as exc:
        print(f"ERROR: {args.mode} {args.host}:{args.port}: {exc}", flush=True)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
