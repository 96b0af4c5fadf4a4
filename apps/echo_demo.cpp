// echo_demo: the seed's asynchat_echo_main.py with ringchat: an ECHO server and client in
// one io_context, printing a trace of every step.

#include "echo_protocol.hpp"

#include <ringchat/ringchat.hpp>

#include <cstdio>
#include <cstring>

using namespace ringchat;

namespace {

// Accepts one connection and serves it with the same handler echo_server uses.
task<void> server(listener& l) {
    stream s = co_await l.accept();
    log(log_level::trace, "EchoServer: accepted connection from {}", s.peer().to_string());
    co_await echo::serve_connection(channel(std::move(s)), echo::server_config{});
}

task<bool> client(io_context& ctx, address server_address, std::string_view message) {
    log(log_level::trace, "EchoClient: connecting to {}", server_address.to_string());
    channel ch(co_await connect(ctx, server_address));
    log(log_level::trace, "EchoClient: connected; pushing \"ECHO {}\" and a producer",
        message.size());
    ch.push(echo::echo_command(message.size()));
    ch.push(echo::traced_producer(message, 64));
    std::string_view reply = co_await ch.read_exact(message.size());
    log(log_level::trace, "EchoClient: read_exact({}) -> ({} bytes) {}", message.size(),
        reply.size(), echo::preview(reply));
    co_return reply == message;
}

} // namespace

int main(int argc, char** argv) {
    bool quiet = argc > 1 && std::strcmp(argv[1], "-q") == 0;
    set_log_level(quiet ? log_level::warn : log_level::trace);
    try {
        io_context ctx;
        listener l(ctx, address::parse("127.0.0.1:0"));
        log(log_level::trace, "EchoServer: listening on {}", l.local_address().to_string());
        spawn(ctx, server(l));
        bool same = sync_wait(ctx, client(ctx, l.local_address(), echo::lorem));
        std::printf("%s\n", same ? "RECEIVED COPY OF MESSAGE" : "ERROR IN TRANSMISSION");
        return same ? 0 : 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "echo_demo: %s\n", e.what());
        return 1;
    }
}
