#pragma once

// doctest prints std::error_code and friends through ostream operators.
#include <ostream>

#include <doctest/doctest.h>

#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>
#include <ringchat/task.hpp>

#include <chrono>
#include <cstdint>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

#include <sys/socket.h>
#include <unistd.h>

namespace ringchat::test {

/// The io_context options the channel tests start from: the defaults (receives by
/// readiness while waits return one completion each and by completion otherwise; sends at
/// light load are send system calls), or as RINGCHAT_TEST_PATHS in the environment says:
/// "completion" always receives by completion, "ring" also sends through the ring only,
/// "readiness" always receives by readiness. Meson runs the channel tests all four ways, so
/// every read and send there runs on each path.
inline io_context_options context_options() {
    io_context_options options;
    const char* paths = std::getenv("RINGCHAT_TEST_PATHS");
    if (paths != nullptr && std::string_view(paths) == "ring") {
        options.direct_sends = false;
        options.receive = receive_mode::completion;
    } else if (paths != nullptr && std::string_view(paths) == "readiness") {
        options.receive = receive_mode::readiness;
    } else if (paths != nullptr && std::string_view(paths) == "completion") {
        options.receive = receive_mode::completion;
    }
    return options;
}

/// context_options() with every receive by completion (a multishot recv into the shared
/// buffers), for tests of what that path does itself: parking bytes between reads, keeping
/// a buffer for a send, counting its submissions.
inline io_context_options completion_options() {
    io_context_options options = context_options();
    options.receive = receive_mode::completion;
    return options;
}

/// context_options() with every receive by readiness (a poll, then the read's own recv).
inline io_context_options readiness_options() {
    io_context_options options = context_options();
    options.receive = receive_mode::readiness;
    return options;
}

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
        // Shares ownership of `src`: its sleep may still be pending (cancelled, completion not
        // yet handled) after run_with_deadline returns, and a source must outlive the co_await.
        static task<void> run(io_context& ctx, std::chrono::nanoseconds limit,
                              std::shared_ptr<cancel_source> src) {
            try {
                co_await sleep_for(ctx, limit).cancel_on(*src);
            } catch (const std::system_error&) {
                co_return; // cancelled: the test finished in time
            }
            // Stop first: FAIL would throw out of this coroutine and skip the stop, and the
            // test would then wait forever instead of failing.
            ctx.stop();
            FAIL_CHECK("test deadline passed");
        }
    };
    auto src = std::make_shared<cancel_source>();
    spawn(ctx, watchdog::run(ctx, limit, src));
    return sync_wait(ctx, with_cancel_on_exit(std::move(t), *src));
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

/// A deadline for a bare ctx.run() (or anything else that blocks the io thread): a thread
/// waits up to `limit` and, unless dismissed by the destructor first, stops `ctx` and records
/// that it fired, so the test fails instead of hanging.
class run_deadline {
public:
    explicit run_deadline(io_context& ctx,
                          std::chrono::nanoseconds limit = std::chrono::seconds(20))
        : thread_([this, &ctx, limit] {
              std::unique_lock lock(mutex_);
              if (!cv_.wait_for(lock, limit, [this] { return dismissed_; })) {
                  fired_ = true;
                  ctx.stop();
              }
          }) {}
    run_deadline(const run_deadline&) = delete;
    run_deadline& operator=(const run_deadline&) = delete;
    ~run_deadline() {
        {
            std::lock_guard lock(mutex_);
            dismissed_ = true;
        }
        cv_.notify_one();
        thread_.join();
        CHECK_MESSAGE(!fired_, "test deadline passed: ctx.run() was stopped by the watchdog");
    }

private:
    std::mutex mutex_;
    std::condition_variable cv_;
    bool dismissed_ = false;
    bool fired_ = false;
    std::thread thread_; // last: starts after the members it uses
};

/// Redirects the process's stderr (where ringchat logs) into a temporary file while alive;
/// text() returns what was written so far.
class stderr_capture {
public:
    stderr_capture() {
        std::fflush(stderr);
        file_ = std::tmpfile();
        REQUIRE(file_ != nullptr);
        saved_ = ::dup(STDERR_FILENO);
        REQUIRE(saved_ >= 0);
        REQUIRE(::dup2(::fileno(file_), STDERR_FILENO) >= 0);
    }
    stderr_capture(const stderr_capture&) = delete;
    stderr_capture& operator=(const stderr_capture&) = delete;
    ~stderr_capture() {
        std::fflush(stderr);
        ::dup2(saved_, STDERR_FILENO);
        ::close(saved_);
        std::fclose(file_);
    }
    [[nodiscard]] std::string text() const {
        std::fflush(stderr);
        std::string out;
        char buf[4096];
        for (off_t offset = 0;;) {
            ssize_t n = ::pread(::fileno(file_), buf, sizeof buf, offset);
            if (n <= 0) {
                break;
            }
            out.append(buf, static_cast<std::size_t>(n));
            offset += n;
        }
        return out;
    }

private:
    std::FILE* file_ = nullptr;
    int saved_ = -1;
};

/// Starts `t` now, as spawn() would, but leaves it owned by the returned task: destroying
/// that task destroys the coroutine wherever it is suspended (the case a test of
/// cancellation on destruction needs). Do not await the returned task.
template <typename T>
task<T> start(task<T> t) {
    auto handle = t.release();
    handle.promise().start_inline(handle, std::noop_coroutine());
    return task<T>{handle};
}

// Sends all of `bytes` on a blocking socket (a test's peer end).
inline void write_all(int fd, std::string_view bytes) {
    while (!bytes.empty()) {
        ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
        REQUIRE(n > 0);
        bytes.remove_prefix(static_cast<std::size_t>(n));
    }
}

/// Deterministic test data: byte i of the stream for `seed`, computed from its position, so
/// a 64 MiB payload can be checked without keeping a second copy.
inline char pattern_byte(std::uint64_t seed, std::size_t i) {
    std::uint64_t z = seed + (i / 8) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return static_cast<char>((z >> (8 * (i % 8))) & 0xff);
}

/// `size` bytes of the stream for `seed`, starting at byte `offset`.
inline std::string pattern(std::uint64_t seed, std::size_t size, std::size_t offset = 0) {
    std::string out(size, '\0');
    for (std::size_t i = 0; i < size; ++i) {
        out[i] = pattern_byte(seed, offset + i);
    }
    return out;
}

} // namespace ringchat::test
