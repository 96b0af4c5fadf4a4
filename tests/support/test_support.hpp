#pragma once

// doctest prints std::error_code and friends through ostream operators.
#include <ostream>

#include <doctest/doctest.h>

#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>
#include <ringchat/task.hpp>

#include <chrono>
#include <utility>

#include <sys/socket.h>
#include <unistd.h>

namespace ringchat::test {

/// A connected AF_UNIX stream socketpair whose ends close on destruction.
struct socket_pair {
    int a = -1;
    int b = -1;
    socket_pair() {
        int fds[2];
        REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) == 0);
        a = fds[0];
        b = fds[1];
    }
    socket_pair(const socket_pair&) = delete;
    socket_pair& operator=(const socket_pair&) = delete;
    ~socket_pair() {
        close_a();
        close_b();
    }
    int release_a() { return std::exchange(a, -1); }
    int release_b() { return std::exchange(b, -1); }
    void close_a() {
        if (a >= 0) {
            ::close(std::exchange(a, -1));
        }
    }
    void close_b() {
        if (b >= 0) {
            ::close(std::exchange(b, -1));
        }
    }
};

template <typename T>
task<T> with_cancel_on_exit(task<T> inner, cancel_source& src);
task<void> with_cancel_on_exit(task<void> inner, cancel_source& src);

/// Runs `t` on `ctx` with a deadline: if it has not finished after `limit`, the context is
/// stopped and the test fails (sync_wait then throws errc::cancelled). No test waits forever.
template <typename T>
T run_with_deadline(io_context& ctx, task<T> t,
                    std::chrono::nanoseconds limit = std::chrono::seconds(20)) {
    struct watchdog {
        static task<void> run(io_context& ctx, std::chrono::nanoseconds limit, cancel_source& src) {
            try {
                co_await sleep_for(ctx, limit).cancel_on(src);
            } catch (const std::system_error&) {
                co_return; // cancelled: the test finished in time
            }
            FAIL("test deadline passed");
            ctx.stop();
        }
    };
    cancel_source src;
    spawn(ctx, watchdog::run(ctx, limit, src));
    return sync_wait(ctx, with_cancel_on_exit(std::move(t), src));
}

/// Awaits `inner`, then cancels `src` however `inner` ended.
template <typename T>
task<T> with_cancel_on_exit(task<T> inner, cancel_source& src) {
    struct cancel_on_exit {
        cancel_source& s;
        ~cancel_on_exit() { s.request_cancel(); }
    } guard{src};
    co_return co_await std::move(inner);
}

inline task<void> with_cancel_on_exit(task<void> inner, cancel_source& src) {
    struct cancel_on_exit {
        cancel_source& s;
        ~cancel_on_exit() { s.request_cancel(); }
    } guard{src};
    co_await std::move(inner);
}

} // namespace ringchat::test
