#include "support/test_support.hpp"

#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>

#include <array>
#include <chrono>
#include <cstring>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <sys/socket.h>
#include <sys/uio.h>

using namespace ringchat;
using namespace std::chrono_literals;

namespace {

/// Receives until `count` bytes arrived or EOF.
task<std::string> recv_exactly(io_context& ctx, int fd, std::size_t count) {
    std::string out;
    char buffer[4096];
    while (out.size() < count) {
        std::size_t n =
            co_await ops::recv(ctx, fd, buffer, std::min(sizeof buffer, count - out.size()));
        if (n == 0) {
            break;
        }
        out.append(buffer, n);
    }
    co_return out;
}

task<void> ping_pong(io_context& ctx, int a, int b) {
    const char ping[] = "ping";
    CHECK(co_await ops::send(ctx, a, ping, 4) == 4);
    char buffer[16] = {};
    CHECK(co_await ops::recv(ctx, b, buffer, sizeof buffer) == 4);
    CHECK(std::string_view(buffer, 4) == "ping");
    CHECK(co_await ops::send(ctx, b, "pong!", 5) == 5);
    CHECK(co_await recv_exactly(ctx, a, 5) == "pong!");
}

task<void> sendmsg_in_order(io_context& ctx, int a, int b) {
    std::string parts[] = {"first,", "", "second,", std::string(3000, 'x'), ",third"};
    std::array<iovec, 5> iov{};
    std::string expected;
    for (std::size_t i = 0; i < iov.size(); ++i) {
        iov[i].iov_base = parts[i].data();
        iov[i].iov_len = parts[i].size();
        expected += parts[i];
    }
    msghdr message{};
    message.msg_iov = iov.data();
    message.msg_iovlen = iov.size();
    std::size_t sent = co_await ops::sendmsg(ctx, a, message);
    CHECK(sent == expected.size()); // a socketpair takes this much at once
    CHECK(co_await recv_exactly(ctx, b, expected.size()) == expected);
}

task<void> shutdown_gives_eof(io_context& ctx, int a, int b) {
    co_await ops::send(ctx, a, "bye", 3);
    co_await ops::shutdown(ctx, a, SHUT_WR);
    char buffer[16];
    CHECK(co_await ops::recv(ctx, b, buffer, sizeof buffer) == 3);
    CHECK(co_await ops::recv(ctx, b, buffer, sizeof buffer) == 0);
    // The other direction still works after a half-close.
    co_await ops::send(ctx, b, "ok", 2);
    CHECK(co_await recv_exactly(ctx, a, 2) == "ok");
}

task<std::error_code> recv_error(io_context& ctx, int fd, std::chrono::nanoseconds timeout) {
    char buffer[16];
    try {
        co_await ops::recv(ctx, fd, buffer, sizeof buffer).with_timeout(timeout);
    } catch (const std::system_error& e) {
        co_return e.code();
    }
    co_return std::error_code{};
}

task<void> timeout_then_data_still_arrives(io_context& ctx, int a, int b) {
    std::error_code code = co_await recv_error(ctx, b, 20ms);
    CHECK(code == errc::timed_out);
    CHECK(code == std::errc::timed_out); // the category maps it to the generic condition
    // Nothing was lost: a later recv gets data sent after the timeout.
    co_await ops::send(ctx, a, "late", 4);
    CHECK(co_await recv_exactly(ctx, b, 4) == "late");
}

task<void> delayed_send(io_context& ctx, int fd, char byte) {
    co_await sleep_for(ctx, 0ns);
    co_await ops::send(ctx, fd, &byte, 1);
}

task<void> recv_before_deadline_many_times(io_context& ctx, int a, int b, int rounds) {
    for (int i = 0; i < rounds; ++i) {
        const char byte = static_cast<char>('a' + i % 26);
        if (i % 2 == 0) {
            // Data already there: completes at once, the linked timeout is cancelled.
            co_await ops::send(ctx, a, &byte, 1);
        } else {
            // The recv waits; data comes from another coroutine before the deadline.
            spawn(ctx, delayed_send(ctx, a, byte));
        }
        char got = 0;
        std::size_t n = co_await ops::recv(ctx, b, &got, 1).with_timeout(10s);
        REQUIRE(n == 1);
        REQUIRE(got == byte);
    }
    // The cancelled linked timeouts complete later (ignored); they must disturb nothing.
    co_await sleep_for(ctx, 1ms);
    char got = 0;
    CHECK(co_await ops::send(ctx, a, "z", 1) == 1);
    CHECK(co_await ops::recv(ctx, b, &got, 1).with_timeout(10s) == 1);
    CHECK(got == 'z');
}

task<std::error_code> recv_cancelled_by(io_context& ctx, int fd, cancel_source& source,
                                        bool* started) {
    char buffer[16];
    *started = true;
    try {
        co_await ops::recv(ctx, fd, buffer, sizeof buffer).cancel_on(source);
    } catch (const std::system_error& e) {
        co_return e.code();
    }
    co_return std::error_code{};
}

task<void> cancel_from_another_coroutine(io_context& ctx, int peer, int fd) {
    cancel_source source;
    bool started = false;
    std::error_code code;
    auto waiter = [](io_context& c, int f, cancel_source& s, bool* st,
                     std::error_code* out) -> task<void> {
        *out = co_await recv_cancelled_by(c, f, s, st);
    };
    bool finished = false;
    auto run_and_flag = [](task<void> t, bool* done) -> task<void> {
        co_await std::move(t);
        *done = true;
    };
    spawn(ctx, run_and_flag(waiter(ctx, fd, source, &started, &code), &finished));
    CHECK(started);
    CHECK_FALSE(finished);
    co_await sleep_for(ctx, 1ms); // let the recv reach the kernel and stay pending there
    CHECK_FALSE(finished);
    source.request_cancel();
    while (!finished) {
        co_await sleep_for(ctx, 0ns);
    }
    CHECK(code == errc::cancelled);
    CHECK(code == std::errc::operation_canceled);
    // Once requested, an operation attached later is cancelled at once, without the kernel.
    const std::size_t before = ctx.operations_in_flight();
    std::error_code again = co_await recv_cancelled_by(ctx, fd, source, &started);
    CHECK(again == errc::cancelled);
    CHECK(ctx.operations_in_flight() == before);
    // reset() lets operations run again.
    source.reset();
    co_await ops::send(ctx, peer, "x", 1);
    char byte = 0;
    CHECK(co_await ops::recv(ctx, fd, &byte, 1).cancel_on(source) == 1);
    CHECK(byte == 'x');
}

task<void> recv_forever(io_context& ctx, int fd, char* buffer, std::size_t size, int* done) {
    co_await ops::recv(ctx, fd, buffer, size);
    ++*done;
}

task<void> recv_into_frame_forever(io_context& ctx, int fd, int* done) {
    char buffer[512];
    co_await ops::recv(ctx, fd, buffer, sizeof buffer).with_timeout(1h);
    ++*done;
}

task<void> parent_of(task<void> child) {
    co_await std::move(child);
}

task<void> recv_then_destroy(io_context& ctx, int fd, task<void>* victim, int* done) {
    char byte;
    co_await ops::recv(ctx, fd, &byte, 1);
    *victim = {};
    ++*done;
}

task<std::size_t> recv_count(io_context& ctx, int fd, std::error_code* code) {
    char buffer[16];
    try {
        co_return co_await ops::recv(ctx, fd, buffer, sizeof buffer);
    } catch (const std::system_error& e) {
        *code = e.code();
    }
    co_return 0;
}

task<void> cancel_by_fd(io_context& ctx, int fd) {
    std::error_code codes[3];
    bool done[3] = {};
    auto one = [](io_context& c, int f, std::error_code* code, bool* flag) -> task<void> {
        co_await recv_count(c, f, code);
        *flag = true;
    };
    for (int i = 0; i < 3; ++i) {
        spawn(ctx, one(ctx, fd, &codes[i], &done[i]));
    }
    co_await sleep_for(ctx, 1ms);
    int cancelled = co_await ops::cancel(ctx, fd);
    CHECK(cancelled == 3);
    while (!(done[0] && done[1] && done[2])) {
        co_await sleep_for(ctx, 0ns);
    }
    for (const auto& code : codes) {
        CHECK(code == errc::cancelled);
    }
    CHECK(co_await ops::cancel(ctx, fd) == 0); // nothing left to cancel
}

task<void> zero_sleeps(io_context& ctx) {
    for (int i = 0; i < 100; ++i) {
        co_await sleep_for(ctx, 0ns);
    }
    co_await sleep_for(ctx, -5ms); // a negative duration is zero
}

} // namespace

TEST_CASE("recv and send move bytes over a socketpair") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, ping_pong(ctx, pair.a, pair.b));
}

TEST_CASE("sendmsg with several iovecs delivers them in order") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, sendmsg_in_order(ctx, pair.a, pair.b));
}

TEST_CASE("shutdown(SHUT_WR) makes the peer read EOF") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, shutdown_gives_eof(ctx, pair.a, pair.b));
}

TEST_CASE("with_timeout on a recv that never gets data throws errc::timed_out") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, timeout_then_data_still_arrives(ctx, pair.a, pair.b));
    std::error_code code = test::run_with_deadline(ctx, recv_error(ctx, pair.b, 0ns));
    CHECK(code == errc::timed_out);
}

TEST_CASE("a recv that completes before its deadline returns normally, many times over") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, recv_before_deadline_many_times(ctx, pair.a, pair.b, 2000));
}

TEST_CASE("a cancel_source cancels a pending recv from another coroutine") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, cancel_from_another_coroutine(ctx, pair.a, pair.b));
}

TEST_CASE("destroying a task suspended on recv cancels the op before its buffer is freed") {
    io_context ctx;
    test::socket_pair pair;
    int done = 0;
    auto buffer = std::make_unique<char[]>(1024);
    task<void> held = test::start(recv_forever(ctx, pair.b, buffer.get(), 1024, &done));
    task<void> parent = test::start(parent_of(recv_into_frame_forever(ctx, pair.b, &done)));
    CHECK(ctx.operations_in_flight() == 2);
    // Let the kernel take both and keep them pending.
    test::run_with_deadline(ctx, zero_sleeps(ctx));
    // This one is destroyed while its SQE still sits in the submission queue.
    task<void> unsubmitted = test::start(recv_into_frame_forever(ctx, pair.b, &done));
    const std::size_t in_flight = ctx.operations_in_flight(); // ours and the watchdog's
    unsubmitted = {};
    held = {};
    buffer.reset();
    parent = {};
    CHECK(ctx.operations_in_flight() == in_flight - 3);
    CHECK(done == 0);
    // Data sent now is not written into the freed buffer or frames: it is still there.
    REQUIRE(::send(pair.a, "data", 4, MSG_NOSIGNAL) == 4);
    test::run_with_deadline(ctx, zero_sleeps(ctx));
    char got[8] = {};
    CHECK(::recv(pair.b, got, sizeof got, MSG_DONTWAIT) == 4);
    CHECK(std::string_view(got, 4) == "data");
    CHECK(done == 0);
}

TEST_CASE("destroying a task whose completion is reaped but not yet handled drops it") {
    io_context ctx;
    test::socket_pair first;
    test::socket_pair second;
    int killer_done = 0;
    int victim_done = 0;
    char victim_buffer[16];
    task<void> victim;
    task<void> killer = test::start(recv_then_destroy(ctx, first.b, &victim, &killer_done));
    victim =
        test::start(recv_forever(ctx, second.b, victim_buffer, sizeof victim_buffer, &victim_done));
    // Both have data before they reach the kernel, so both complete in one batch, the
    // killer's first: handling it destroys the victim, whose completion is already reaped.
    REQUIRE(::send(first.a, "k", 1, MSG_NOSIGNAL) == 1);
    REQUIRE(::send(second.a, "v", 1, MSG_NOSIGNAL) == 1);
    test::run_with_deadline(ctx, zero_sleeps(ctx));
    CHECK(killer_done == 1);
    CHECK(victim_done == 0);
    CHECK_FALSE(victim.valid());
}

TEST_CASE("ops::cancel cancels every operation pending on a descriptor and counts them") {
    io_context ctx;
    test::socket_pair pair;
    test::run_with_deadline(ctx, cancel_by_fd(ctx, pair.b));
}

TEST_CASE("sleep_for with a zero duration completes") {
    io_context ctx;
    test::run_with_deadline(ctx, zero_sleeps(ctx));
}
