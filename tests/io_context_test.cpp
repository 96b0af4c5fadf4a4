#include "support/test_support.hpp"

#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstddef>
#include <future>
#include <memory>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

using namespace ringchat;
using namespace std::chrono_literals;

namespace {

task<void> sleep_then_set(io_context& ctx, std::chrono::nanoseconds d, bool* done) {
    co_await sleep_for(ctx, d);
    *done = true;
}

task<void> sleep_then_throw(io_context& ctx) {
    co_await sleep_for(ctx, 0ns);
    throw std::runtime_error("spawned task failure for the test");
}

task<void> throw_at_once() {
    throw std::runtime_error("synchronous spawned failure");
    co_return;
}

task<void> sleep_then_record(io_context& ctx, std::chrono::nanoseconds d, std::size_t id,
                             std::vector<std::size_t>* order) {
    co_await sleep_for(ctx, d);
    order->push_back(id);
}

task<void> recv_into_frame(io_context& ctx, int fd, int* finished) {
    char buffer[256];
    co_await ops::recv(ctx, fd, buffer, sizeof buffer);
    ++*finished;
}

task<void> recv_into_heap(io_context& ctx, int fd, int* finished) {
    auto buffer = std::make_unique<char[]>(4096);
    co_await ops::recv(ctx, fd, buffer.get(), 4096);
    ++*finished;
}

task<void> sleep_long(io_context& ctx, int* finished) {
    co_await sleep_for(ctx, std::chrono::hours(1));
    ++*finished;
}

task<int> value_after_sleep(io_context& ctx, int v) {
    co_await sleep_for(ctx, 1ms);
    co_return v;
}

int referenced = 0;
task<int&> reference_after_sleep(io_context& ctx) {
    co_await sleep_for(ctx, 0ns);
    co_return referenced;
}

task<int> throw_after_sleep(io_context& ctx) {
    co_await sleep_for(ctx, 0ns);
    throw std::out_of_range("thrown after a sleep");
    co_return 0;
}

task<std::string> string_without_io() {
    co_return "no io";
}

task<int> suspend_without_io() {
    co_await std::suspend_always{}; // nothing will ever resume this
    co_return 1;
}

} // namespace

TEST_CASE("run() returns when no work is left") {
    io_context ctx;
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    bool done = false;
    spawn(ctx, sleep_then_set(ctx, 1ms, &done));
    CHECK(ctx.spawned_tasks() == 1);
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    CHECK(done);
    CHECK(ctx.spawned_tasks() == 0);
    CHECK(ctx.operations_in_flight() == 0);
}

namespace {

// Parks the awaiting coroutine in `parked`; the test resumes it by hand.
struct park {
    std::vector<std::coroutine_handle<>>* parked;
    bool await_ready() const noexcept { return false; }
    void await_suspend(std::coroutine_handle<> h) const { parked->push_back(h); }
    void await_resume() const noexcept {}
};

struct count_on_exit {
    int* count;
    ~count_on_exit() { ++*count; }
};

task<void> parked_task(std::vector<std::coroutine_handle<>>* parked, int* ended) {
    count_on_exit guard{ended};
    co_await park{parked};
}

} // namespace

TEST_CASE("spawned tasks that finish in any order are taken off the context's list; the rest "
          "are destroyed with it") {
    constexpr int count = 200;
    int ended = 0;
    std::vector<std::coroutine_handle<>> parked;
    {
        io_context ctx;
        for (int i = 0; i < count; ++i) {
            spawn(ctx, parked_task(&parked, &ended));
        }
        REQUIRE(parked.size() == count);
        CHECK(ctx.spawned_tasks() == count);
        // Finish the first half in a shuffled order: every removal from the middle of the
        // list must keep the others' positions right.
        std::vector<std::coroutine_handle<>> order(parked.begin(), parked.begin() + count / 2);
        std::shuffle(order.begin(), order.end(), std::mt19937(12345));
        for (std::size_t i = 0; i < order.size(); ++i) {
            order[i].resume(); // runs to the end: the frame frees itself
            CHECK(ctx.spawned_tasks() == count - i - 1);
        }
        CHECK(ended == count / 2);
    }
    CHECK(ended == count); // ~io_context destroyed the other half
}

TEST_CASE("stop() from another thread makes a blocked run() return") {
    io_context ctx;
    io_context::work_guard guard(ctx);
    std::promise<void> running;
    std::future<void> running_future = running.get_future();
    // The posted function proves run() is active; the other thread then stops it.
    ctx.post([&running] { running.set_value(); });
    std::thread stopper([&] {
        if (running_future.wait_for(20s) == std::future_status::ready) {
            ctx.stop();
        }
    });
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    stopper.join();
    CHECK(ctx.stopped());
    // A stopped context returns at once until restart().
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    ctx.restart();
    CHECK_FALSE(ctx.stopped());
}

TEST_CASE("post() from another thread runs the function on the io thread") {
    io_context ctx;
    io_context::work_guard guard(ctx);
    const std::thread::id io_thread = std::this_thread::get_id();
    std::thread::id ran_on;
    int runs = 0;
    std::thread poster([&] {
        ctx.post([&] {
            ran_on = std::this_thread::get_id();
            ++runs;
            guard.reset(); // no work left: run() returns
        });
    });
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    poster.join();
    CHECK(runs == 1);
    CHECK(ran_on == io_thread);
    CHECK_FALSE(ctx.stopped());
}

TEST_CASE("many posts from several threads all run, in order per thread") {
    io_context ctx;
    constexpr int threads = 4;
    constexpr int per_thread = 1000;
    std::vector<std::vector<int>> seen(threads);
    std::atomic<int> remaining{threads * per_thread};
    io_context::work_guard guard(ctx);
    std::vector<std::thread> posters;
    for (int t = 0; t < threads; ++t) {
        posters.emplace_back([&, t] {
            for (int i = 0; i < per_thread; ++i) {
                ctx.post([&, t, i] {
                    seen[static_cast<std::size_t>(t)].push_back(i);
                    if (--remaining == 0) {
                        guard.reset();
                    }
                });
            }
        });
    }
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    for (auto& p : posters) {
        p.join();
    }
    for (const auto& s : seen) {
        REQUIRE(s.size() == per_thread);
        CHECK(std::is_sorted(s.begin(), s.end()));
    }
}

TEST_CASE("an exception thrown by a posted function is logged, not propagated") {
    io_context ctx;
    bool later_ran = false;
    ctx.post([] { throw std::runtime_error("posted failure for the test"); });
    ctx.post([&] { later_ran = true; });
    test::stderr_capture captured;
    {
        test::run_deadline deadline(ctx);
        CHECK_NOTHROW(ctx.run());
    }
    CHECK(later_ran);
    CHECK(captured.text().find("posted failure for the test") != std::string::npos);
}

TEST_CASE("spawn() of a task that throws is logged and the context keeps running other tasks") {
    io_context ctx;
    bool before = false;
    bool after = false;
    test::stderr_capture captured;
    spawn(ctx, sleep_then_set(ctx, 0ns, &before));
    spawn(ctx, throw_at_once());
    spawn(ctx, sleep_then_throw(ctx));
    spawn(ctx, sleep_then_set(ctx, 5ms, &after));
    {
        test::run_deadline deadline(ctx);
        CHECK_NOTHROW(ctx.run());
    }
    CHECK(before);
    CHECK(after);
    CHECK(ctx.spawned_tasks() == 0);
    const std::string log = captured.text();
    CHECK(log.find("synchronous spawned failure") != std::string::npos);
    CHECK(log.find("spawned task failure for the test") != std::string::npos);
}

TEST_CASE("10,000 concurrent sleep_for timers complete in order of deadline") {
    constexpr std::size_t count = 10'000;
    constexpr auto spacing = 50us;
    io_context ctx;
    std::vector<std::size_t> order;
    order.reserve(count);
    // Each timer starts after the one before and sleeps 50 µs longer, so every deadline is
    // later than the one before however long starting them takes.
    for (std::size_t id = 0; id < count; ++id) {
        spawn(ctx, sleep_then_record(ctx, spacing * static_cast<long>(id), id, &order));
    }
    CHECK(ctx.spawned_tasks() == count);
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    REQUIRE(order.size() == count);
    const auto first_wrong = std::is_sorted_until(order.begin(), order.end());
    CHECK_MESSAGE(first_wrong == order.end(), "timer ",
                  (first_wrong == order.end() ? 0 : *first_wrong),
                  " completed after a later deadline, at position ", first_wrong - order.begin());
}

TEST_CASE("sleep_for counts from the co_await, not from when the ring submits it") {
    io_context ctx;
    std::vector<std::size_t> order;
    const auto t0 = std::chrono::steady_clock::now();
    spawn(ctx, sleep_then_record(ctx, 50ms, 1, &order)); // due at t0 + 50 ms
    // A long handler keeps the io thread from submitting (this is not synchronisation).
    while (std::chrono::steady_clock::now() - t0 < 80ms) {
    }
    spawn(ctx, sleep_then_record(ctx, 10ms, 2, &order)); // due at t0 + 90 ms or later
    {
        test::run_deadline deadline(ctx);
        ctx.run();
    }
    CHECK(order == std::vector<std::size_t>{1, 2});
}

TEST_CASE("destroying the io_context destroys spawned tasks suspended on recv and sleep") {
    test::socket_pair pair;
    int finished = 0;
    {
        io_context ctx;
        spawn(ctx, recv_into_frame(ctx, pair.a, &finished));
        spawn(ctx, recv_into_heap(ctx, pair.a, &finished));
        spawn(ctx, sleep_long(ctx, &finished));
        // Let the kernel take the operations (they are submitted by run()).
        test::run_with_deadline(ctx, value_after_sleep(ctx, 1));
        CHECK(ctx.spawned_tasks() >= 3); // and maybe run_with_deadline's watchdog
        CHECK(ctx.operations_in_flight() >= 3);
    }
    {
        // Not even submitted yet: the destructor cancels SQEs still in the submission queue.
        io_context ctx;
        spawn(ctx, recv_into_frame(ctx, pair.a, &finished));
        spawn(ctx, recv_into_heap(ctx, pair.b, &finished));
        spawn(ctx, sleep_long(ctx, &finished));
    }
    CHECK(finished == 0);
    // The cancelled receives consumed nothing: data sent now is still there to read.
    REQUIRE(::write(pair.b, "x", 1) == 1);
    char c = 0;
    REQUIRE(::recv(pair.a, &c, 1, MSG_DONTWAIT) == 1);
    CHECK(c == 'x');
}

TEST_CASE("sync_wait(ctx, task) returns values and rethrows exceptions") {
    io_context ctx;
    CHECK(test::run_with_deadline(ctx, value_after_sleep(ctx, 7)) == 7);
    CHECK(sync_wait(ctx, value_after_sleep(ctx, 8)) == 8);
    CHECK(&sync_wait(ctx, reference_after_sleep(ctx)) == &referenced);
    CHECK(sync_wait(ctx, string_without_io()) == "no io");
    CHECK_THROWS_WITH_AS(sync_wait(ctx, throw_after_sleep(ctx)), "thrown after a sleep",
                         std::out_of_range);
    CHECK_THROWS_AS(test::run_with_deadline(ctx, throw_after_sleep(ctx)), std::out_of_range);
    // A task that waits for something that is not an operation leaves run() without work:
    // sync_wait reports that instead of blocking.
    {
        test::run_deadline deadline(ctx);
        try {
            (void)sync_wait(ctx, suspend_without_io());
            FAIL_CHECK("sync_wait returned for a task that never finished");
        } catch (const std::system_error& e) {
            CHECK(e.code() == errc::cancelled);
        }
    }
    // The context is still usable after all that.
    CHECK(sync_wait(ctx, value_after_sleep(ctx, 9)) == 9);
}

TEST_CASE("setup_description() names the accepted setup") {
    io_context ctx;
    CHECK_FALSE(ctx.setup_description().empty());
    MESSAGE("io_uring setup: ", ctx.setup_description());
}

TEST_CASE("a full submission queue and an overflowing completion queue lose no operation") {
    // 2,000 operations through a ring of 4 SQ and 8 CQ entries: submissions wait for room,
    // and completions beyond the CQ's size go to the kernel's overflow list and come back.
    io_context_options options;
    options.sq_entries = 4;
    options.cq_entries = 8;
    io_context ctx(options);
    constexpr int count = 2000;
    int finished = 0;
    auto sleeper = [](io_context& c, int& done) -> task<void> {
        co_await sleep_for(c, std::chrono::nanoseconds(0));
        ++done;
    };
    for (int i = 0; i < count; ++i) {
        spawn(ctx, sleeper(ctx, finished));
    }
    std::vector<std::unique_ptr<test::socket_pair>> pairs;
    auto echo_pair = [](io_context& c, int fd_a, int fd_b, int& done) -> task<void> {
        char out[1] = {'x'};
        char in[1] = {};
        co_await ops::send(c, fd_a, out, 1);
        co_await ops::recv(c, fd_b, in, 1);
        if (in[0] == 'x') {
            ++done;
        }
    };
    int echoed = 0;
    for (int i = 0; i < 200; ++i) {
        pairs.push_back(std::make_unique<test::socket_pair>());
        spawn(ctx, echo_pair(ctx, pairs.back()->a, pairs.back()->b, echoed));
    }
    test::run_deadline guard(ctx, std::chrono::seconds(20));
    ctx.run();
    CHECK(finished == count);
    CHECK(echoed == 200);
    CHECK(ctx.operations_in_flight() == 0);
}

TEST_CASE("a thread-local io_context destroyed after the frame pool frees its tasks' frames") {
    // Thread-local objects die in reverse order of construction. This context is built
    // before the first coroutine frame (and so the frame pool) on its thread, so at thread
    // exit the pool is drained first and the context frees its unfinished task's frames
    // afterwards: they must go to operator delete, not onto the drained pool.
    bool frames_destroyed = false;
    std::thread worker([&frames_destroyed] {
        thread_local std::optional<io_context> ctx;
        ctx.emplace();
        auto sleeper = [](io_context& c, bool* destroyed) -> task<void> {
            struct mark {
                bool* flag;
                ~mark() { *flag = true; }
            } m{destroyed};
            co_await sleep_for(c, std::chrono::hours(1));
        };
        spawn(*ctx, sleeper(*ctx, &frames_destroyed));
    });
    worker.join();
    CHECK(frames_destroyed);
}
