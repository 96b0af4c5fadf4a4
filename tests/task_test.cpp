#include "support/test_support.hpp"

#include <ringchat/task.hpp>

#include <memory>
#include <stdexcept>
#include <string>

using namespace ringchat;

namespace {

task<int> answer() { co_return 42; }

task<int> add_one(int x) { co_return x + 1; }

task<void> nothing() { co_return; }

task<int> throws_logic() {
    throw std::logic_error("boom");
    co_return 0;
}

int global_value = 7;
task<int&> reference_to_global() { co_return global_value; }

task<std::unique_ptr<int>> move_only_value() { co_return std::make_unique<int>(5); }

task<long> sum_of_synchronous_awaits(long count) {
    long total = 0;
    for (long i = 0; i < count; ++i) {
        total += co_await add_one(0);
    }
    co_return total;
}

task<int> nested(int depth) {
    if (depth == 0) {
        co_return 0;
    }
    co_return 1 + co_await nested(depth - 1);
}

} // namespace

TEST_CASE("a task yields its value when awaited") {
    CHECK(sync_wait(answer()) == 42);
    CHECK(sync_wait(add_one(1)) == 2);
}

TEST_CASE("task<void> completes") {
    sync_wait(nothing());
    CHECK(true);
}

TEST_CASE("task<T&> returns a reference to the same object") {
    int& r = sync_wait(reference_to_global());
    CHECK(&r == &global_value);
}

TEST_CASE("a task carries a move-only value") {
    auto p = sync_wait(move_only_value());
    REQUIRE(p);
    CHECK(*p == 5);
}

TEST_CASE("an exception in a task is rethrown to the awaiter") {
    CHECK_THROWS_WITH_AS(sync_wait(throws_logic()), "boom", std::logic_error);
    auto outer = []() -> task<std::string> {
        try {
            co_await throws_logic();
        } catch (const std::logic_error& e) {
            co_return std::string("caught ") + e.what();
        }
        co_return "not thrown";
    };
    CHECK(sync_wait(outer()) == "caught boom");
}

TEST_CASE("a task is lazy: its body runs only when awaited") {
    int runs = 0;
    auto body = [](int* counter) -> task<void> {
        ++*counter;
        co_return;
    };
    task<void> t = body(&runs);
    CHECK(runs == 0);
    sync_wait(std::move(t));
    CHECK(runs == 1);
}

TEST_CASE("a task that is never awaited is destroyed without running") {
    int runs = 0;
    auto body = [](int* counter) -> task<void> {
        ++*counter;
        co_return;
    };
    { task<void> t = body(&runs); }
    CHECK(runs == 0);
}

TEST_CASE("a million synchronous co_awaits keep the stack bounded") {
    // At -O0 and under ASan g++ does not turn symmetric transfer into a tail call; the
    // task must not nest a frame per completed await or this overflows the 8 MiB stack.
    CHECK(sync_wait(sum_of_synchronous_awaits(1'000'000)) == 1'000'000);
}

TEST_CASE("nested tasks return through every level") {
    CHECK(sync_wait(nested(1000)) == 1000);
}

TEST_CASE("moving a task transfers ownership of the frame") {
    task<int> a = answer();
    task<int> b = std::move(a);
    CHECK_FALSE(a.valid());
    CHECK(b.valid());
    CHECK(sync_wait(std::move(b)) == 42);
}

TEST_CASE("awaiting an empty task throws logic_error") {
    CHECK_THROWS_AS(sync_wait(task<int>{}), std::logic_error);
}
