#include "support/test_support.hpp"

#include <ringchat/address.hpp>
#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/socket.hpp>

#include <fmt/core.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstddef>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

using namespace ringchat;
using namespace std::chrono_literals;

namespace {

address unique_abstract_address() {
    static std::atomic<int> counter{0};
    return address::parse(fmt::format("unix:@ringchat-test-{}-{}", ::getpid(), counter++));
}

task<std::string> recv_exactly(stream& s, std::size_t count) {
    std::string out;
    char buffer[64 * 1024];
    while (out.size() < count) {
        const std::size_t want = std::min(sizeof buffer, count - out.size());
        std::size_t n = co_await s.recv(std::span<char>(buffer, want));
        if (n == 0) {
            break;
        }
        out.append(buffer, n);
    }
    co_return out;
}

/// Accepts and connects at the same time, then talks in both directions.
task<void> exchange(io_context& ctx, listener& l, address to) {
    stream server;
    auto accepting = [](listener& lst, stream* out) -> task<void> { *out = co_await lst.accept(); };
    bool accepted = false;
    auto flagged = [](task<void> t, bool* done) -> task<void> {
        co_await std::move(t);
        *done = true;
    };
    spawn(ctx, flagged(accepting(l, &server), &accepted));
    stream client = co_await connect(ctx, to);
    while (!accepted) {
        co_await sleep_for(ctx, 0ns);
    }
    REQUIRE(server.is_open());
    REQUIRE(client.is_open());
    CHECK(client.peer() == to);
    if (to.family() != AF_UNIX) {
        // The server saw the client's address, which is the client's local address.
        CHECK(server.peer() == client.local_address());
    }
    co_await client.send_all("hello from the client");
    CHECK(co_await recv_exactly(server, 21) == "hello from the client");
    co_await server.send_all("hello back");
    CHECK(co_await recv_exactly(client, 10) == "hello back");
    co_await client.shutdown(SHUT_WR);
    char byte;
    CHECK(co_await server.recv(std::span<char>(&byte, 1)) == 0);
    co_await server.close();
    CHECK_FALSE(server.is_open());
}

task<std::string> connect_error(io_context& ctx, address to, std::error_code* code) {
    try {
        stream s = co_await connect(ctx, to);
    } catch (const std::system_error& e) {
        *code = e.code();
        co_return e.what();
    }
    co_return "";
}

/// A port on 127.0.0.1 that refuses connections: bound (so nobody else takes it during the
/// test) but not listening.
struct refusing_port {
    int fd = -1;
    address where;
    refusing_port() {
        fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        REQUIRE(fd >= 0);
        address any = address::parse("127.0.0.1:0");
        REQUIRE(::bind(fd, any.native(), any.native_size()) == 0);
        address::storage s{};
        s.length = sizeof s.sa;
        REQUIRE(::getsockname(fd, &s.sa.base, &s.length) == 0);
        where = address{s};
    }
    refusing_port(const refusing_port&) = delete;
    refusing_port& operator=(const refusing_port&) = delete;
    ~refusing_port() { ::close(fd); }
};

struct connected_pair {
    stream client;
    stream server;
};

task<connected_pair> connect_pair(io_context& ctx, listener& l) {
    // The kernel completes the handshake from the backlog, so connect first, accept after.
    stream client = co_await connect(ctx, l.local_address());
    stream server = co_await l.accept();
    co_return connected_pair{std::move(client), std::move(server)};
}

void reset_on_close(stream& s) {
    linger hard{1, 0};
    REQUIRE(::setsockopt(s.native_handle(), SOL_SOCKET, SO_LINGER, &hard, sizeof hard) == 0);
}

bool is_reset_error(const std::error_code& code) {
    return code == std::errc::connection_reset || code == std::errc::broken_pipe;
}

task<void> reset_while_sending(io_context& ctx, listener& l) {
    connected_pair p = co_await connect_pair(ctx, l);
    // The server reads a little of a large transfer, then resets the connection.
    std::string big(8 * 1024 * 1024, 'r');
    std::error_code code;
    bool send_finished = false;
    auto sender = [](stream* s, std::string_view bytes, std::error_code* out,
                     bool* finished) -> task<void> {
        try {
            co_await s->send_all(bytes);
        } catch (const std::system_error& e) {
            *out = e.code();
        }
        *finished = true;
    };
    spawn(ctx, sender(&p.client, big, &code, &send_finished));
    std::string first = co_await recv_exactly(p.server, 64 * 1024);
    CHECK(first.size() == 64 * 1024);
    reset_on_close(p.server);
    p.server.close_now();
    while (!send_finished) {
        co_await sleep_for(ctx, 1ms);
    }
    CHECK_MESSAGE(is_reset_error(code), "send_all ended with: ", code.message());
    // Once reset, recv on that side reports it too (or EOF if the reset was consumed).
    char buffer[16];
    try {
        std::size_t n = co_await p.client.recv(buffer);
        CHECK(n == 0);
    } catch (const std::system_error& e) {
        CHECK_MESSAGE(is_reset_error(e.code()), e.what());
    }
}

task<void> reset_while_receiving(io_context& ctx, listener& l) {
    connected_pair p = co_await connect_pair(ctx, l);
    co_await p.client.send_all("unread data makes close send a reset");
    // Wait until the data is there, without reading it.
    char peek;
    while (::recv(p.server.native_handle(), &peek, 1, MSG_PEEK | MSG_DONTWAIT) != 1) {
        co_await sleep_for(ctx, 1ms);
    }
    std::optional<std::string> message;
    std::error_code code;
    bool done = false;
    auto receiver = [](stream* s, std::optional<std::string>* what, std::error_code* out,
                       bool* finished) -> task<void> {
        char buffer[16];
        try {
            co_await s->recv(buffer);
        } catch (const std::system_error& e) {
            *out = e.code();
            *what = e.what();
        }
        *finished = true;
    };
    spawn(ctx, receiver(&p.client, &message, &code, &done));
    co_await sleep_for(ctx, 1ms); // the recv is pending in the kernel
    p.server.close_now();         // closing with unread data sends RST
    while (!done) {
        co_await sleep_for(ctx, 1ms);
    }
    CHECK(code == std::errc::connection_reset);
    REQUIRE(message);
    CHECK_MESSAGE(message->find("recv from 127.0.0.1:") != std::string::npos, *message);
    CHECK_MESSAGE(message->find("Connection reset by peer") != std::string::npos, *message);
    // A send on the reset connection fails with EPIPE or ECONNRESET, not SIGPIPE.
    try {
        for (int i = 0; i < 10; ++i) {
            co_await p.client.send_all("more");
        }
        FAIL_CHECK("send on a reset connection succeeded");
    } catch (const std::system_error& e) {
        CHECK_MESSAGE(is_reset_error(e.code()), e.what());
    }
}

task<void> close_listener_during_accept(io_context& ctx, listener& l) {
    std::error_code code;
    bool done = false;
    auto acceptor = [](listener* lst, std::error_code* out, bool* finished) -> task<void> {
        try {
            stream s = co_await lst->accept();
            FAIL_CHECK("accept succeeded on a closed listener");
        } catch (const std::system_error& e) {
            *out = e.code();
        }
        *finished = true;
    };
    spawn(ctx, acceptor(&l, &code, &done));
    co_await sleep_for(ctx, 1ms); // the accept is pending in the kernel
    CHECK_FALSE(done);
    l.close();
    while (!done) {
        co_await sleep_for(ctx, 1ms);
    }
    CHECK(code);
    CHECK(l.native_handle() == -1);
}

task<void> send_all_large(io_context& ctx, listener& l, std::size_t size) {
    connected_pair p = co_await connect_pair(ctx, l);
    std::string big(size, '\0');
    for (std::size_t i = 0; i < size; ++i) {
        big[i] = static_cast<char>('a' + (i * 7 + i / 4096) % 26);
    }
    bool sent = false;
    auto sender = [](stream* s, std::string_view bytes, bool* finished) -> task<void> {
        co_await s->send_all(bytes);
        co_await s->shutdown(SHUT_WR);
        *finished = true;
    };
    spawn(ctx, sender(&p.client, big, &sent));
    std::string got = co_await recv_exactly(p.server, size + 1); // +1: read to EOF
    while (!sent) { // the sender refers to `big` and `p`: let it finish first
        co_await sleep_for(ctx, 0ns);
    }
    REQUIRE(got.size() == size);
    CHECK(got == big);
}

} // namespace

TEST_CASE("accept, connect, send and recv work over IPv4 loopback") {
    io_context ctx;
    listener l(ctx, address::parse("127.0.0.1:0"));
    test::run_with_deadline(ctx, exchange(ctx, l, l.local_address()));
}

TEST_CASE("accept, connect, send and recv work over IPv6 loopback") {
    io_context ctx;
    std::optional<listener> l;
    try {
        l.emplace(ctx, address::parse("[::1]:0"));
    } catch (const std::system_error& e) {
        MESSAGE("skipping the IPv6 test, [::1] is not available: ", e.what());
        return;
    }
    CHECK(l->local_address().to_string().starts_with("[::1]:"));
    test::run_with_deadline(ctx, exchange(ctx, *l, l->local_address()));
}

TEST_CASE("accept, connect, send and recv work over an abstract Unix socket") {
    io_context ctx;
    const address where = unique_abstract_address();
    listener l(ctx, where);
    CHECK(l.local_address() == where);
    CHECK(l.local_address().to_string() == where.to_string());
    test::run_with_deadline(ctx, exchange(ctx, l, where));
}

TEST_CASE("listener.local_address() reports the port the kernel chose") {
    io_context ctx;
    listener l(ctx, address::parse("127.0.0.1:0"));
    CHECK(l.local_address().family() == AF_INET);
    CHECK(l.local_address().port() != 0);
    CHECK(l.local_address().to_string() == fmt::format("127.0.0.1:{}", l.local_address().port()));
    listener other(ctx, address::parse("127.0.0.1:0"));
    CHECK(other.local_address().port() != l.local_address().port());
}

TEST_CASE("connecting to a closed port throws Connection refused naming the address") {
    io_context ctx;
    refusing_port closed;
    std::error_code code;
    std::string what = test::run_with_deadline(ctx, connect_error(ctx, closed.where, &code));
    CHECK(code == std::errc::connection_refused);
    CHECK_MESSAGE(what.find("Connection refused") != std::string::npos, what);
    CHECK_MESSAGE(what.find(closed.where.to_string()) != std::string::npos, what);
}

TEST_CASE("a peer resetting mid-transfer makes send fail with ECONNRESET or EPIPE") {
    io_context ctx;
    listener l(ctx, address::parse("127.0.0.1:0"));
    test::run_with_deadline(ctx, reset_while_sending(ctx, l));
}

TEST_CASE("a peer closing with unread data makes a pending recv fail with ECONNRESET") {
    io_context ctx;
    listener l(ctx, address::parse("127.0.0.1:0"));
    test::run_with_deadline(ctx, reset_while_receiving(ctx, l));
}

TEST_CASE("closing a listener while an accept is pending makes the accept fail") {
    io_context ctx;
    listener l(ctx, address::parse("127.0.0.1:0"));
    test::run_with_deadline(ctx, close_listener_during_accept(ctx, l));
}

TEST_CASE("stream::send_all sends a 4 MiB buffer fully while the peer reads it") {
    io_context ctx;
    listener l(ctx, address::parse("127.0.0.1:0"));
    test::run_with_deadline(ctx, send_all_large(ctx, l, 4 * 1024 * 1024));
}

TEST_CASE("stream::send_all sends 4 MiB over a Unix socket too") {
    io_context ctx;
    listener l(ctx, unique_abstract_address());
    test::run_with_deadline(ctx, send_all_large(ctx, l, 4 * 1024 * 1024));
}
