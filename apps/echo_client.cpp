// echo_client: sends ECHO commands to an echo server and checks the replies.

#include "cli.hpp"
#include "echo_protocol.hpp"

#include <ringchat/ringchat.hpp>

#include <fmt/core.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <vector>

using namespace ringchat;

namespace {

const char* const usage =
    "usage: echo_client [--host ADDR] --port N (--message TEXT | --size BYTES | --file PATH)\n"
    "                   [--chunk BYTES] [--count K] [--reconnect] [--timeout SECONDS] [-v]\n"
    "  Sends \"ECHO <len>\\n\" and the message through a producer in --chunk pieces (default\n"
    "  64), reads <len> bytes back and prints RECEIVED COPY OF MESSAGE (exit 0) or\n"
    "  ERROR IN TRANSMISSION (exit 1). Other failures (refused, reset, an ERROR reply,\n"
    "  timeout) exit 2.\n"
    "  --count K     K round trips on one connection (the server needs --keep-alive), or\n"
    "  --reconnect   on a new connection each\n";

struct options {
    std::string host = "127.0.0.1";
    int port = -1;
    std::string message{echo::lorem};
    std::size_t chunk = 64;
    std::size_t count = 1;
    bool reconnect = false;
    std::chrono::seconds timeout{60};
};

enum class outcome { ok = 0, mismatch = 1, failure = 2 };

// One exchange: command, payload through a producer, then exactly as many bytes back.
task<outcome> exchange(channel& ch, const options& opts) {
    const std::string& message = opts.message;
    ch.push(echo::echo_command(message.size()));
    if (log_enabled(log_level::trace)) {
        ch.push(echo::traced_producer(message, opts.chunk));
    } else {
        ch.push(simple_producer(message, opts.chunk));
    }
    std::vector<char> reply(message.size());
    std::size_t received = 0;
    try {
        co_await ch.read_exact(std::span<char>(reply)).with_timeout(opts.timeout);
        received = reply.size();
    } catch (const incomplete_read_error& e) {
        received = e.received();
        // read_exact put the partial reply back into the channel.
        std::string_view partial = ch.buffered();
        if (partial.starts_with("ERROR ")) {
            std::string_view line = partial.substr(0, partial.find('\n'));
            fmt::print(stderr, "echo_client: server replied: {}\n", line);
            co_return outcome::failure;
        }
        std::copy(partial.begin(), partial.end(), reply.begin());
    }
    if (received == message.size() && std::string_view(reply.data(), reply.size()) == message) {
        log(log_level::trace, "EchoClient: read_exact({}) -> ({} bytes)", message.size(), received);
        co_return outcome::ok;
    }
    std::string_view got(reply.data(), received);
    if (got.starts_with("ERROR ")) {
        fmt::print(stderr, "echo_client: server replied: {}\n", got.substr(0, got.find('\n')));
        co_return outcome::failure;
    }
    fmt::print("ERROR IN TRANSMISSION: expected {} bytes, received {}{}\n", message.size(),
               received, received == message.size() ? " that differ" : "");
    co_return outcome::mismatch;
}

task<outcome> run_client(io_context& ctx, options opts) {
    address server = address::from_host_port(opts.host, static_cast<std::uint16_t>(opts.port));
    std::optional<channel> ch;
    for (std::size_t i = 0; i < opts.count; ++i) {
        if (!ch || opts.reconnect) {
            log(log_level::trace, "EchoClient: connecting to {}", server.to_string());
            ch.emplace(co_await connect(ctx, server));
        }
        outcome result = co_await exchange(*ch, opts);
        if (result != outcome::ok) {
            co_return result;
        }
    }
    co_return outcome::ok;
}

options parse(int argc, char** argv) {
    options o;
    cli::args a(argc, argv, usage);
    while (a.next()) {
        if (a.is("--host")) {
            o.host = a.value();
        } else if (a.is("--port")) {
            o.port = a.port_value(false);
        } else if (a.is("--message")) {
            o.message = a.value();
        } else if (a.is("--size")) {
            o.message = echo::make_message(a.size_value());
        } else if (a.is("--file")) {
            std::string path(a.value());
            std::ifstream in(path, std::ios::binary);
            if (!in) {
                a.fail("cannot read " + path);
            }
            o.message.assign(std::istreambuf_iterator<char>(in), {});
        } else if (a.is("--chunk")) {
            o.chunk = a.size_value();
            if (o.chunk == 0) {
                a.fail("--chunk must be at least 1");
            }
        } else if (a.is("--count")) {
            o.count = a.size_value();
        } else if (a.is("--reconnect")) {
            o.reconnect = true;
        } else if (a.is("--timeout")) {
            o.timeout = std::chrono::seconds(a.size_value());
        } else if (a.is("-v") || a.is("--verbose")) {
            set_log_level(log_level::trace);
        } else if (a.is("-h") || a.is("--help")) {
            a.help();
        } else {
            a.unknown();
        }
    }
    if (o.port < 0) {
        a.fail("--port is required");
    }
    return o;
}

} // namespace

int main(int argc, char** argv) {
    options opts = parse(argc, argv);
    try {
        io_context ctx;
        outcome result = sync_wait(ctx, run_client(ctx, opts));
        if (result == outcome::ok) {
            std::printf("RECEIVED COPY OF MESSAGE\n");
        }
        return static_cast<int>(result);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "echo_client: %s\n", e.what());
        return 2;
    }
}
