// Counts every operator new in the process (this executable only: replacing the global
// allocation functions affects everything linked with it, libringchat included) to prove
// that steady-state I/O allocates nothing.
#include "support/test_support.hpp"

#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>

#include <atomic>
#include <cstddef>
#include <cstdlib>
#include <memory>
#include <new>
#include <optional>

using namespace ringchat;

namespace {

std::atomic<bool> counting{false};
std::atomic<std::size_t> allocations{0};

void* counted_alloc(std::size_t size, std::size_t alignment) {
    if (counting.load(std::memory_order_relaxed)) {
        allocations.fetch_add(1, std::memory_order_relaxed);
    }
    if (size == 0) {
        size = 1;
    }
    if (alignment <= alignof(std::max_align_t)) {
        return std::malloc(size);
    }
    // aligned_alloc wants a size that is a multiple of the alignment.
    return std::aligned_alloc(alignment, (size + alignment - 1) / alignment * alignment);
}

void* counted_new(std::size_t size, std::size_t alignment) {
    void* p = counted_alloc(size, alignment);
    if (p == nullptr) {
        throw std::bad_alloc();
    }
    return p;
}

/// Counts the operator new calls made between construction and stop().
class allocation_window {
public:
    allocation_window() noexcept {
        allocations.store(0);
        counting.store(true);
    }
    allocation_window(const allocation_window&) = delete;
    allocation_window& operator=(const allocation_window&) = delete;
    ~allocation_window() { stop(); }
    std::size_t stop() noexcept {
        counting.store(false);
        return allocations.load();
    }
};

} // namespace

void* operator new(std::size_t size) {
    return counted_new(size, alignof(std::max_align_t));
}
void* operator new[](std::size_t size) {
    return counted_new(size, alignof(std::max_align_t));
}
void* operator new(std::size_t size, std::align_val_t al) {
    return counted_new(size, static_cast<std::size_t>(al));
}
void* operator new[](std::size_t size, std::align_val_t al) {
    return counted_new(size, static_cast<std::size_t>(al));
}
void* operator new(std::size_t size, const std::nothrow_t&) noexcept {
    return counted_alloc(size, alignof(std::max_align_t));
}
void* operator new[](std::size_t size, const std::nothrow_t&) noexcept {
    return counted_alloc(size, alignof(std::max_align_t));
}
void* operator new(std::size_t size, std::align_val_t al, const std::nothrow_t&) noexcept {
    return counted_alloc(size, static_cast<std::size_t>(al));
}
void* operator new[](std::size_t size, std::align_val_t al, const std::nothrow_t&) noexcept {
    return counted_alloc(size, static_cast<std::size_t>(al));
}
void operator delete(void* p) noexcept {
    std::free(p);
}
void operator delete[](void* p) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete(void* p, const std::nothrow_t&) noexcept {
    std::free(p);
}
void operator delete[](void* p, const std::nothrow_t&) noexcept {
    std::free(p);
}

namespace {

constexpr int warm_up_rounds = 200;
constexpr int measured_rounds = 10'000;

// The loops call the operations directly: awaiting a child task would allocate its frame,
// which is the caller's choice, not the library's.

/// Answers every 8-byte message with the same 8 bytes until EOF.
task<void> echo(io_context& ctx, int fd, bool* finished) {
    char message[8];
    for (;;) {
        std::size_t got = 0;
        while (got < sizeof message) {
            std::size_t n = co_await ops::recv(ctx, fd, message + got, sizeof message - got);
            if (n == 0) {
                *finished = true;
                co_return;
            }
            got += n;
        }
        for (std::size_t sent = 0; sent < sizeof message;) {
            sent += co_await ops::send(ctx, fd, message + sent, sizeof message - sent);
        }
    }
}

task<void> wait_for(io_context& ctx, const bool* flag) {
    while (!*flag) {
        co_await sleep_for(ctx, std::chrono::milliseconds(1));
    }
}

/// Runs the round trips, counting allocations only after the warm-up; returns the count.
task<std::size_t> ping(io_context& ctx, int fd, bool* ok) {
    char message[8] = {'r', 'o', 'u', 'n', 'd', 0, 0, 0};
    char reply[8];
    std::optional<allocation_window> window;
    *ok = true;
    for (int i = 0; i < warm_up_rounds + measured_rounds; ++i) {
        if (i == warm_up_rounds) {
            window.emplace();
        }
        message[5] = static_cast<char>(i);
        for (std::size_t sent = 0; sent < sizeof message;) {
            sent += co_await ops::send(ctx, fd, message + sent, sizeof message - sent);
        }
        std::size_t got = 0;
        while (got < sizeof reply) {
            // With a deadline, so the linked-timeout path is measured too.
            std::size_t n = co_await ops::recv(ctx, fd, reply + got, sizeof reply - got)
                                .with_timeout(std::chrono::seconds(10));
            if (n == 0) {
                break;
            }
            got += n;
        }
        if (got != sizeof reply || reply[5] != message[5]) {
            *ok = false;
            break;
        }
    }
    co_return window ? window->stop() : 0;
}

} // namespace

TEST_CASE("the allocation counter sees operator new") {
    allocation_window window;
    auto p = std::make_unique<int>(1);
    CHECK(window.stop() == 1);
}

TEST_CASE("10,000 recv/send round trips between two coroutines allocate nothing") {
    io_context ctx;
    test::socket_pair pair;
    bool echo_finished = false;
    spawn(ctx, echo(ctx, pair.b, &echo_finished));
    bool ok = false;
    const std::size_t count = test::run_with_deadline(ctx, ping(ctx, pair.a, &ok));
    CHECK(ok);
    CHECK_MESSAGE(count == 0, count, " operator new calls during ", measured_rounds,
                  " round trips");
    // Let the echo task see EOF and finish.
    pair.close_a();
    test::run_with_deadline(ctx, wait_for(ctx, &echo_finished));
    CHECK(echo_finished);
}

#if !defined(__SANITIZE_ADDRESS__)
namespace {

task<int> leaf(int x) { co_return x + 1; }

task<void> spawned_child(int* done) {
    *done += co_await leaf(1);
}

} // namespace
#endif

TEST_CASE("spawning and awaiting tasks reuses coroutine frames after warm-up") {
#if defined(__SANITIZE_ADDRESS__)
    MESSAGE("frames are not pooled under AddressSanitizer, so that it sees use after free");
#else
    io_context ctx;
    int done = 0;
    auto round = [&](int n) {
        for (int i = 0; i < n; ++i) {
            spawn(ctx, spawned_child(&done)); // runs to completion inside spawn
        }
    };
    round(100); // warm-up: fills the free lists
    allocation_window window;
    round(10'000);
    const std::size_t count = window.stop();
    CHECK(done == 2 * 10'100);
    CHECK_MESSAGE(count == 0, count, " operator new calls for 10,000 spawned tasks");
#endif
}
