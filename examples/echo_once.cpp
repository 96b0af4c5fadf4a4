// The README's example, compiled so that it cannot drift from the API: the seed's
// EchoHandler as one coroutine, and a server that spawns it per connection.
// Run it, then: printf 'ECHO 5\nhello' | nc 127.0.0.1 7000

#include <ringchat/ringchat.hpp>

#include <charconv>
#include <stdexcept>

using namespace ringchat;

// "ECHO <len>" -> len; throws on anything else.
std::size_t parse_echo_command(std::string_view line) {
    std::size_t length = 0;
    auto [end, ec] = std::from_chars(line.data() + 5, line.data() + line.size(), length);
    if (!line.starts_with("ECHO ") || ec != std::errc{} || end != line.data() + line.size()) {
        throw std::invalid_argument("expected ECHO <length>");
    }
    return length;
}

task<void> echo_handler(channel ch) {
    std::string_view command = co_await ch.read_until("\n");   // "ECHO 166"
    std::size_t length = parse_echo_command(command);          // throws on bad input
    std::string_view payload = co_await ch.read_exact(length); // now framed by a byte count
    ch.push(payload);                                          // queued, sent in order
    co_await ch.close_when_done();                             // nothing pushed is lost
}

task<void> serve(io_context& ctx, listener& l) {
    for (;;) {
        spawn(ctx, echo_handler(channel(co_await l.accept())));
    }
}

int main(int argc, char** argv) {
    io_context ctx;
    listener l(ctx, address::parse(argc > 1 ? argv[1] : "127.0.0.1:7000"));
    spawn(ctx, serve(ctx, l));
    ctx.run();
}
