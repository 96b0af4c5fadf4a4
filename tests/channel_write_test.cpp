#include "support/test_support.hpp"

#include <ringchat/channel.hpp>
#include <ringchat/error.hpp>
#include <ringchat/socket.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <csignal>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

#include <sys/socket.h>
#include <unistd.h>

using namespace ringchat;
using namespace std::chrono_literals;
using namespace std::string_view_literals;

namespace {

constexpr std::size_t mib = 1024 * 1024;

channel make_channel(io_context& ctx, int fd, channel_options options = {}) {
    return channel(stream(ctx, fd, address::unix_path("@ringchat-channel-write-test")), options);
}

void set_buffer_size(int fd, int option, int bytes) {
    REQUIRE(::setsockopt(fd, SOL_SOCKET, option, &bytes, sizeof bytes) == 0);
}

using test::pattern;
using test::write_all;

// Index of the first byte of `got` that differs from pattern(seed, got.size()), or npos.
std::size_t first_pattern_mismatch(std::string_view got, std::uint64_t seed) {
    constexpr std::size_t block = 64 * 1024;
    for (std::size_t offset = 0; offset < got.size(); offset += block) {
        std::size_t n = std::min(block, got.size() - offset);
        std::string expected = pattern(seed, n, offset);
        if (std::memcmp(expected.data(), got.data() + offset, n) != 0) {
            for (std::size_t i = 0; i < n; ++i) {
                if (expected[i] != got[offset + i]) {
                    return offset + i;
                }
            }
        }
    }
    return std::string_view::npos;
}

// Index of the first difference between two byte strings (npos if equal), for messages that
// stay readable when megabytes differ.
std::size_t first_difference(std::string_view a, std::string_view b) {
    auto [ia, ib] = std::mismatch(a.begin(), a.end(), b.begin(), b.end());
    if (ia == a.end() && ib == b.end()) {
        return std::string_view::npos;
    }
    return static_cast<std::size_t>(ia - a.begin());
}

// A producer whose more() returns std::string by value, counting its calls.
struct string_producer {
    std::string data;
    std::size_t chunk = 1;
    std::size_t* calls = nullptr;
    std::size_t position = 0;

    std::string more() {
        if (calls != nullptr) {
            ++*calls;
        }
        std::size_t n = std::min(chunk, data.size() - position);
        std::string out = data.substr(position, n);
        position += n;
        return out;
    }
};

// Wraps a producer and records the size of every chunk it hands out.
template <typename P>
struct recording_producer {
    P inner;
    std::vector<std::size_t>* sizes;

    auto more() {
        auto chunk = inner.more();
        sizes->push_back(std::string_view(chunk).size());
        return chunk;
    }
};

// Hands out `good_chunks` chunks of "p", then throws from more().
struct throwing_producer {
    int good_chunks = 0;

    std::string_view more() {
        if (good_chunks-- == 0) {
            throw std::runtime_error("producer failed on purpose");
        }
        return "p";
    }
};

// A one-shot event one coroutine waits for and another sets (same thread). set() resumes
// the waiter at once: io_context::schedule() from a coroutine that a channel's writer resumed
// while preparing its sends would wait for the next completion before running it.
class latch {
public:
    void set() {
        set_ = true;
        if (waiter_) {
            std::exchange(waiter_, {}).resume();
        }
    }
    [[nodiscard]] bool is_set() const noexcept { return set_; }

    struct awaiter {
        latch& l;
        bool await_ready() const noexcept { return l.set_; }
        void await_suspend(std::coroutine_handle<> h) noexcept { l.waiter_ = h; }
        void await_resume() const noexcept {}
    };
    [[nodiscard]] awaiter wait() noexcept { return {*this}; }

private:
    std::coroutine_handle<> waiter_;
    bool set_ = false;
};

// How a spawned task ended.
struct outcome {
    latch finished;
    std::exception_ptr error;
};

task<void> run_and_record(task<void> inner, outcome& out) {
    try {
        co_await std::move(inner);
    } catch (...) {
        out.error = std::current_exception();
    }
    out.finished.set();
}

// Spawns `t`; `out` says when and how it ended. `out` must outlive the context's run.
void spawn_recorded(io_context& ctx, task<void> t, outcome& out) {
    spawn(ctx, run_and_record(std::move(t), out));
}

// The code of the std::system_error `error` holds (or a failed check if it holds another
// kind of exception, or nothing).
std::error_code error_code_of(const std::exception_ptr& error) {
    if (!error) {
        FAIL_CHECK("expected an exception, got none");
        return {};
    }
    try {
        std::rethrow_exception(error);
    } catch (const std::system_error& e) {
        return e.code();
    } catch (const std::exception& e) {
        FAIL_CHECK("expected a std::system_error, got: " << e.what());
    }
    return {};
}

// Lets the event loop run one iteration (a zero timeout completes at once).
task<void> yield(io_context& ctx) {
    co_await sleep_for(ctx, 0ns);
}

task<void> drain_forever(channel& ch) {
    co_await ch.drain();
}

// The peer side, on the raw descriptor: reads until EOF.
task<std::string> read_until_eof(io_context& ctx, int fd) {
    std::string out;
    std::vector<char> buffer(256 * 1024);
    for (;;) {
        std::size_t n = co_await ops::recv(ctx, fd, buffer.data(), buffer.size());
        if (n == 0) {
            co_return out;
        }
        out.append(buffer.data(), n);
    }
}

// The peer side: reads exactly `count` bytes (fewer only if EOF comes first).
task<std::string> read_count(io_context& ctx, int fd, std::size_t count) {
    std::string out;
    std::vector<char> buffer(256 * 1024);
    while (out.size() < count) {
        std::size_t n =
            co_await ops::recv(ctx, fd, buffer.data(), std::min(buffer.size(), count - out.size()));
        if (n == 0) {
            break;
        }
        out.append(buffer.data(), n);
    }
    co_return out;
}

task<void> send_all_raw(io_context& ctx, int fd, std::string bytes) {
    std::string_view rest = bytes;
    while (!rest.empty()) {
        rest.remove_prefix(co_await ops::send(ctx, fd, rest.data(), rest.size()));
    }
}

// Restores SIGPIPE's default action (terminate the process) while alive, so a send that
// raised SIGPIPE would kill the test instead of passing unnoticed.
class default_sigpipe {
public:
    default_sigpipe() {
        struct sigaction action {};
        action.sa_handler = SIG_DFL;
        sigemptyset(&action.sa_mask);
        REQUIRE(::sigaction(SIGPIPE, &action, &saved_) == 0);
    }
    default_sigpipe(const default_sigpipe&) = delete;
    default_sigpipe& operator=(const default_sigpipe&) = delete;
    ~default_sigpipe() { ::sigaction(SIGPIPE, &saved_, nullptr); }

private:
    struct sigaction saved_ {};
};

// ---------------------------------------------------------------- ordering

task<void> push_every_kind(io_context& ctx, channel& ch, int peer, std::vector<std::size_t>& sizes,
                           std::size_t& string_calls) {
    std::string expected;
    auto push_view = [&](std::string_view bytes) {
        ch.push(bytes);
        expected += bytes;
    };
    auto push_owned = [&](std::string bytes) {
        expected += bytes;
        ch.push(std::move(bytes));
    };

    push_view("HELLO ");
    push_owned(std::string(100, 'o')); // long enough to be moved in, not copied
    push_owned("short ");
    std::string simple_data = pattern(1, 166);
    ch.push(recording_producer<simple_producer>{simple_producer(simple_data, 64), &sizes});
    expected += simple_data;
    push_view("|between producers|");
    std::string custom_data = pattern(2, 1000);
    ch.push(string_producer{custom_data, 300, &string_calls});
    expected += custom_data;
    push_owned(std::string(5000, 'x'));
    push_view("");
    push_owned("");
    ch.push(simple_producer("", 8)); // empty producer: nothing, and nothing blocks behind it
    push_view("END");
    co_await ch.drain();

    CHECK(ch.queued_bytes() == 0);
    CHECK(ch.stats().bytes_sent == expected.size());
    std::string got = co_await read_count(ctx, peer, expected.size());
    CHECK(got.size() == expected.size());
    CHECK(first_difference(got, expected) == std::string_view::npos);

    // A second round after the queue ran dry: order still holds.
    std::string more = "second round:";
    ch.push(more);
    ch.push(simple_producer(pattern(3, 10000), 1000));
    more += pattern(3, 10000);
    ch.push(std::string(64, 'z'));
    more += std::string(64, 'z');
    co_await ch.drain();
    std::string got_more = co_await read_count(ctx, peer, more.size());
    CHECK(first_difference(got_more, more) == std::string_view::npos);
}

TEST_CASE("pushes of views, strings and producers arrive in call order, byte-exact") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    std::vector<std::size_t> sizes;
    std::size_t string_calls = 0;
    test::run_with_deadline(ctx, push_every_kind(ctx, ch, sp.b, sizes, string_calls));

    // simple_producer(166 bytes, chunk 64) is polled chunk by chunk, and not after the
    // empty chunk that ends it.
    CHECK(sizes == std::vector<std::size_t>{64, 64, 38, 0});
    // 1000 bytes in chunks of 300 returned by value: 300, 300, 300, 100, then empty.
    CHECK(string_calls == 5);
}

task<void> drain_each_chunk(io_context& ctx, channel& ch, int peer, std::vector<std::size_t>& sizes,
                            std::size_t& sends_before_end) {
    ch.push(recording_producer<simple_producer>{simple_producer(pattern(4, 166), 64), &sizes});
    co_await ch.drain();
    sends_before_end = ch.stats().sends;
    CHECK(co_await read_count(ctx, peer, 166) == pattern(4, 166));
}

TEST_CASE("drain after pushing only a producer returns once the producer is exhausted") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    std::vector<std::size_t> sizes;
    std::size_t sends = 0;
    test::run_with_deadline(ctx, drain_each_chunk(ctx, ch, sp.b, sizes, sends));
    CHECK(sizes == std::vector<std::size_t>{64, 64, 38, 0});
    // Each chunk is sent before the next more() call: one send per chunk.
    CHECK(sends == 3);
}

task<void> push_then_failing_producer(io_context& ctx, channel& ch, int peer) {
    ch.push("before the producer;"sv);
    ch.push(throwing_producer{3});
    ch.push("after the producer"sv);
    try {
        co_await ch.drain();
        FAIL_CHECK("drain() should rethrow the producer's exception");
    } catch (const std::runtime_error& e) {
        CHECK(std::string_view(e.what()) == "producer failed on purpose");
    }
    // The bytes queued before the producer and the chunks it handed out before failing were
    // sent; nothing after it was.
    CHECK(ch.queued_bytes() == 0);
    CHECK(co_await read_count(ctx, peer, 23) == "before the producer;ppp");

    // The writer stays failed: later pushes are dropped and waits rethrow the same exception.
    ch.push("dropped"sv);
    CHECK(ch.queued_bytes() == 0);
    CHECK_THROWS_AS(co_await ch.drain(), std::runtime_error);
    CHECK_THROWS_AS(co_await ch.write("dropped too"), std::runtime_error);
}

TEST_CASE("a producer that throws from more() makes drain() rethrow its exception") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    test::run_with_deadline(ctx, push_then_failing_producer(ctx, ch, sp.b));
    // Nothing reached the peer beyond what the test already read.
    char c;
    CHECK(::recv(sp.b, &c, 1, MSG_DONTWAIT) < 0);
}

task<void> producer_throwing_at_once(io_context& ctx, channel& ch, int peer, bool bytes_before) {
    if (bytes_before) {
        ch.push("sent before the producer failed"sv);
    }
    ch.push(throwing_producer{0});
    ch.push("never sent"sv);
    CHECK_THROWS_WITH_AS(co_await ch.drain(), "producer failed on purpose", std::runtime_error);
    if (bytes_before) {
        // The writer reached the producer only after sending what was queued before it.
        CHECK(co_await read_count(ctx, peer, 31) == "sent before the producer failed");
    }
}

TEST_CASE("a producer that throws on its first more() fails drain() once the writer reaches it") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    bool bytes_before = false;
    SUBCASE("alone") {}
    SUBCASE("after bytes pushed before it") {
        bytes_before = true;
    }
    test::run_with_deadline(ctx, producer_throwing_at_once(ctx, ch, sp.b, bytes_before));
    CHECK(ch.stats().sends == (bytes_before ? 1 : 0));
    char c;
    CHECK(::recv(sp.b, &c, 1, MSG_DONTWAIT) < 0);
}

// ---------------------------------------------------------------- batching

task<void> push_many_small(io_context& ctx, channel& ch, int peer, bool owned) {
    std::string expected;
    for (int i = 0; i < 100; ++i) {
        // Owned strings of 40 bytes are moved in as queue entries of their own; views are
        // copied and coalesced.
        std::string line = fmt::format("{:<37}{:02}\n", owned ? "owned line" : "line", i);
        expected += line;
        if (owned) {
            ch.push(std::move(line));
        } else {
            ch.push(std::string_view(line));
        }
    }
    CHECK(ch.queued_bytes() == expected.size());
    co_await ch.drain();
    CHECK(co_await read_count(ctx, peer, expected.size()) == expected);
}

TEST_CASE("100 small pushes in one go go out in very few sends and arrive intact") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());

    // Views are copied into one coalesced buffer: one send (measured: 1).
    test::run_with_deadline(ctx, push_many_small(ctx, ch, sp.b, false));
    const auto view_sends = ch.stats().sends;
    CHECK(view_sends >= 1);
    CHECK(view_sends <= 2);

    // 100 separate entries of 40 bytes, 16 buffers per sendmsg: 7 sends (measured: 7).
    test::run_with_deadline(ctx, push_many_small(ctx, ch, sp.b, true));
    const auto owned_sends = ch.stats().sends - view_sends;
    CHECK(owned_sends <= 7);
}

// ---------------------------------------------------------------- drain

task<void> drain_then_abort(channel& ch, std::string payload) {
    ch.push(std::move(payload));
    co_await ch.drain();
    CHECK(ch.queued_bytes() == 0);
    // close() drops whatever is still queued: had drain() returned early, the peer would now
    // miss bytes.
    ch.close();
}

task<void> drain_waits(io_context& ctx, channel& ch, int peer) {
    const std::size_t size = 4 * mib; // far more than the socket buffers hold
    outcome writer;
    spawn_recorded(ctx, drain_then_abort(ch, pattern(5, size)), writer);
    CHECK_FALSE(writer.finished.is_set()); // drain() is waiting for the peer to read
    std::string got = co_await read_until_eof(ctx, peer);
    co_await writer.finished.wait();
    CHECK_FALSE(writer.error);
    CHECK(got.size() == size);
    CHECK(first_pattern_mismatch(got, 5) == std::string_view::npos);
}

TEST_CASE("drain waits until everything queued has been sent") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    test::run_with_deadline(ctx, drain_waits(ctx, ch, sp.b));
    CHECK(ch.stats().bytes_sent == 4 * mib);
}

task<void> drain_empty(channel& ch) {
    auto first = ch.drain();
    CHECK(first.await_ready());
    co_await ch.drain();
    ch.push(""sv);
    ch.push(std::string());
    co_await ch.drain();
}

TEST_CASE("drain on an empty queue returns at once") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    test::run_with_deadline(ctx, drain_empty(ch));
    CHECK(ch.stats().sends == 0);
}

// ---------------------------------------------------------------- back-pressure

struct writer_state {
    bool in_write = false;
    std::size_t written = 0;
    std::size_t waits = 0;
    std::size_t most_queued_after_wait = 0;
};

task<void> write_with_back_pressure(channel& ch, std::size_t total, std::size_t chunk,
                                    writer_state& st) {
    std::size_t offset = 0;
    while (offset < total) {
        std::size_t n = std::min(chunk, total - offset);
        const bool must_wait = ch.queued_bytes() + n > ch.options().high_water;
        st.in_write = true;
        co_await ch.write(pattern(6, n, offset));
        st.in_write = false;
        if (must_wait) {
            ++st.waits;
            st.most_queued_after_wait = std::max(st.most_queued_after_wait, ch.queued_bytes());
        }
        offset += n;
        st.written = offset;
    }
    co_await ch.drain();
}

task<void> back_pressure(io_context& ctx, channel& ch, int peer) {
    const std::size_t total = 1 * mib;
    writer_state st;
    outcome writer;
    spawn_recorded(ctx, write_with_back_pressure(ch, total, 8 * 1024, st), writer);

    // The writer queued past the high-water mark without suspending, then its write() had
    // to wait: nothing has been sent yet, so it cannot be done.
    CHECK(st.in_write);
    CHECK(ch.queued_bytes() > ch.options().high_water);
    CHECK(st.written < total);

    // Let the channel fill the socket buffers; the peer does not read, so the writer must
    // stay blocked however many loop iterations pass.
    while (ch.stats().sends == 0) {
        co_await yield(ctx);
    }
    for (int i = 0; i < 20; ++i) {
        co_await yield(ctx);
    }
    const std::size_t written_while_blocked = st.written;
    CHECK(st.in_write);
    CHECK_FALSE(writer.finished.is_set());
    CHECK(ch.queued_bytes() > ch.options().low_water);
    CHECK(ch.stats().bytes_sent < total);

    // Now the peer reads: the writer resumes and finishes.
    std::string got = co_await read_count(ctx, peer, total);
    co_await writer.finished.wait();
    CHECK_FALSE(writer.error);
    CHECK(st.written == total);
    CHECK(st.written > written_while_blocked);
    CHECK(got.size() == total);
    CHECK(first_pattern_mismatch(got, 6) == std::string_view::npos);
    CHECK(st.waits >= 1);
    // Every write that had to wait returned with at most low_water bytes queued.
    CHECK(st.most_queued_after_wait <= ch.options().low_water);
}

TEST_CASE("write() waits above the high-water mark until the peer reads, then resumes") {
    test::socket_pair sp;
    set_buffer_size(sp.a, SO_SNDBUF, 4096);
    set_buffer_size(sp.b, SO_RCVBUF, 4096);
    io_context ctx(test::context_options());
    channel_options options;
    options.high_water = 64 * 1024;
    options.low_water = 16 * 1024;
    channel ch = make_channel(ctx, sp.release_a(), options);
    test::run_with_deadline(ctx, back_pressure(ctx, ch, sp.b));
}

task<void> producer_chunk_counts(io_context& ctx, channel& ch, int peer) {
    const std::size_t chunk = 64 * 1024;
    ch.push(simple_producer(pattern(7, 4 * chunk), chunk));
    while (ch.stats().sends == 0) {
        co_await yield(ctx);
    }
    for (int i = 0; i < 5; ++i) {
        co_await yield(ctx);
    }
    // The chunk being sent counts; the rest of the producer does not.
    CHECK(ch.queued_bytes() > 0);
    CHECK(ch.queued_bytes() <= chunk);
    outcome drainer;
    spawn_recorded(ctx, drain_forever(ch), drainer);
    std::string got = co_await read_count(ctx, peer, 4 * chunk);
    co_await drainer.finished.wait();
    CHECK_FALSE(drainer.error);
    CHECK(ch.queued_bytes() == 0);
    CHECK(first_pattern_mismatch(got, 7) == std::string_view::npos);
}

TEST_CASE("queued_bytes counts the chunk of a producer that is being sent") {
    test::socket_pair sp;
    set_buffer_size(sp.a, SO_SNDBUF, 4096);
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    test::run_with_deadline(ctx, producer_chunk_counts(ctx, ch, sp.b));
}

// ---------------------------------------------------------------- close_when_done

std::string big_reply_expected() {
    return pattern(8, mib) + pattern(9, 100 * 1000) + "tail";
}

void push_big_reply(channel& ch) {
    ch.push(pattern(8, mib));
    ch.push(simple_producer(pattern(9, 100 * 1000), 1000));
    ch.push("tail"sv);
}

task<void> reply_and_close(channel ch) {
    push_big_reply(ch);
    co_await ch.close_when_done();
    CHECK(ch.queued_bytes() == 0);
}

// Waits (with the test's deadline) until only run_with_deadline's watchdog is in flight:
// the abandoned channel finished on its own and closed.
task<void> wait_until_channel_gone(io_context& ctx) {
    while (ctx.operations_in_flight() > 1) {
        co_await yield(ctx);
    }
}

task<void> peer_reads_reply(io_context& ctx, test::socket_pair& sp, bool spawn_handler) {
    outcome handler;
    if (spawn_handler) {
        spawn_recorded(ctx, reply_and_close(make_channel(ctx, sp.release_a())), handler);
    }
    std::string got = co_await read_until_eof(ctx, sp.b);
    std::string expected = big_reply_expected();
    CHECK(got.size() == expected.size());
    CHECK(first_difference(got, expected) == std::string_view::npos);
    if (spawn_handler) {
        co_await handler.finished.wait();
        CHECK_FALSE(handler.error);
    }
    // The peer closes; the lingering channel sees it, closes its descriptor and goes away.
    sp.close_b();
    co_await wait_until_channel_gone(ctx);
}

TEST_CASE("co_await close_when_done() delivers everything queued, then EOF") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    test::run_with_deadline(ctx, peer_reads_reply(ctx, sp, true));
}

TEST_CASE("close_when_done() without co_await and then destroying the channel still delivers "
          "everything, then EOF") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    {
        channel ch = make_channel(ctx, sp.release_a());
        push_big_reply(ch);
        ch.close_when_done(); // not awaited; the channel is destroyed right away
        CHECK_THROWS_AS(ch.push("late"sv), std::logic_error);
    }
    test::run_with_deadline(ctx, peer_reads_reply(ctx, sp, false));
}

TEST_CASE("destroying a channel with queued output still delivers it, then EOF") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    {
        channel ch = make_channel(ctx, sp.release_a());
        push_big_reply(ch);
    }
    test::run_with_deadline(ctx, peer_reads_reply(ctx, sp, false));
}

// A peer that never closes and keeps sending: the lingering channel discards its bytes and
// gives up when channel_options::linger is over, closing its descriptor.
task<void> linger_gives_up(io_context& ctx, test::socket_pair& sp,
                           std::chrono::steady_clock::time_point before) {
    std::string got;
    char piece[256];
    for (;;) { // the reply, then EOF (the channel shut down its write side)
        ssize_t n = ::recv(sp.b, piece, sizeof piece, MSG_DONTWAIT);
        if (n == 0) {
            break;
        }
        if (n > 0) {
            got.append(piece, static_cast<std::size_t>(n));
        } else {
            REQUIRE(errno == EAGAIN);
            co_await yield(ctx);
        }
    }
    CHECK(got == "reply");
    // Still sending: discarded by the lingering channel, which does not stop for it.
    CHECK(::send(sp.b, "more input", 10, MSG_NOSIGNAL) == 10);
    co_await wait_until_channel_gone(ctx);
    // Not before the linger's end (the timer wheel may be late, never early).
    CHECK(std::chrono::steady_clock::now() - before >= 50ms);
    CHECK(ctx.operations_in_flight() == 1);
}

TEST_CASE("a lingering channel whose peer never closes closes when the linger time is over") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    const auto before = std::chrono::steady_clock::now();
    {
        channel_options options;
        options.linger = 50ms;
        channel ch = make_channel(ctx, sp.release_a(), options);
        ch.push("reply"sv);
        ch.close_when_done(); // the channel goes away at once; the context finishes it
    }
    test::run_with_deadline(ctx, linger_gives_up(ctx, sp, before));
}

TEST_CASE("destroying a channel in the middle of sending still delivers everything") {
    test::socket_pair sp;
    set_buffer_size(sp.a, SO_SNDBUF, 4096);
    io_context ctx(test::context_options());
    struct steps {
        static task<void> start_sending(io_context& ctx, channel& ch) {
            push_big_reply(ch);
            while (ch.stats().sends == 0) {
                co_await yield(ctx);
            }
        }
    };
    std::optional<channel> ch;
    ch.emplace(make_channel(ctx, sp.release_a()));
    test::run_with_deadline(ctx, steps::start_sending(ctx, *ch));
    CHECK(ch->queued_bytes() > 0);
    ch.reset(); // a send is in flight, the producer is half done
    test::run_with_deadline(ctx, peer_reads_reply(ctx, sp, false));
}

// ---------------------------------------------------------------- half-close

task<void> half_close(io_context& ctx, channel& ch, int peer) {
    ch.push("request\n"sv);
    co_await ch.shutdown_send();
    CHECK_THROWS_AS(ch.push("too late"sv), std::logic_error);
    CHECK(co_await read_until_eof(ctx, peer) == "request\n");

    // The peer still talks, and the channel still reads.
    co_await send_all_raw(ctx, peer, "reply one\nreply two\n");
    CHECK(co_await ch.read_until("\n") == "reply one");
    CHECK(co_await ch.read_until("\n").owned() == "reply two");
    ::shutdown(peer, SHUT_WR);
    CHECK_THROWS_WITH_AS(co_await ch.read_until("\n"), doctest::Contains("connection closed"),
                         std::system_error);
}

TEST_CASE("shutdown_send() gives the peer EOF while the channel keeps reading") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    test::run_with_deadline(ctx, half_close(ctx, ch, sp.b));
}

// ---------------------------------------------------------------- peer reset

bool is_reset_or_broken_pipe(const std::error_code& code) {
    return code == std::errc::connection_reset || code == std::errc::broken_pipe;
}

struct tcp_pair {
    stream client;
    int server_fd = -1;
};

task<tcp_pair> connect_loopback(io_context& ctx) {
    listener lst(ctx, address::parse("127.0.0.1:0"));
    CHECK(lst.local_address().port() != 0);
    stream client = co_await connect(ctx, lst.local_address());
    stream server = co_await lst.accept();
    co_return tcp_pair{std::move(client), server.release()};
}

void reset_on_close(int fd) {
    linger lg{1, 0};
    REQUIRE(::setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg) == 0);
}

task<void> drain_fails_on_reset(io_context& ctx) {
    tcp_pair tcp = co_await connect_loopback(ctx);
    set_buffer_size(tcp.client.native_handle(), SO_SNDBUF, 4096);
    reset_on_close(tcp.server_fd);
    channel ch(std::move(tcp.client));

    ch.push(pattern(10, 8 * mib));
    while (ch.stats().sends == 0) {
        co_await yield(ctx);
    }
    CHECK(ch.queued_bytes() > 0);
    ::close(tcp.server_fd); // with unread data and SO_LINGER {1, 0}: a reset

    std::error_code code;
    try {
        co_await ch.drain();
        FAIL_CHECK("drain() should fail after the peer reset the connection");
    } catch (const std::system_error& e) {
        code = e.code();
        CHECK(std::string_view(e.what()).find("send to 127.0.0.1:") != std::string_view::npos);
    }
    CHECK_MESSAGE(is_reset_or_broken_pipe(code), code.message());
    CHECK(ch.queued_bytes() == 0);

    // Later pushes are dropped silently; waits rethrow the same failure.
    ch.push("dropped"sv);
    ch.push(std::string(1000, 'd'));
    ch.push(simple_producer("dropped", 2));
    CHECK(ch.queued_bytes() == 0);
    try {
        co_await ch.write("dropped");
        FAIL_CHECK("write() should rethrow the send failure");
    } catch (const std::system_error& e) {
        CHECK(e.code() == code);
    }
    try {
        co_await ch.close_when_done();
        FAIL_CHECK("close_when_done() should rethrow the send failure");
    } catch (const std::system_error& e) {
        CHECK(e.code() == code);
    }
}

task<void> still_works(io_context& ctx) {
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    ch.push("still alive"sv);
    co_await ch.drain();
    CHECK(co_await read_count(ctx, sp.b, 11) == "still alive");
}

TEST_CASE("at light load a reply goes out with a send call of the channel's own; "
          "direct_sends = false keeps it in the ring") {
    for (const bool direct : {true, false}) {
        CAPTURE(direct);
        io_context_options options;
        options.direct_sends = direct;
        io_context ctx(options);
        test::socket_pair sp;
        channel ch = make_channel(ctx, sp.release_a());
        write_all(sp.b, "ping\n");
        auto body = [](io_context& c, channel& x, int peer) -> task<std::string> {
            // The request's receive is the only completion of its wait: light load.
            std::string request(co_await x.read_until("\n"));
            x.push("pong to " + request);
            co_await x.drain();
            co_return co_await read_count(c, peer, 12);
        };
        CHECK(test::run_with_deadline(ctx, body(ctx, ch, sp.b)) == "pong to ping");
        CHECK(ch.stats().sends == 1);
        CHECK(ch.stats().bytes_sent == 12);
        CHECK(ch.stats().direct_sends == (direct ? 1 : 0));
    }
}

TEST_CASE("at light load write() sends what is queued before it returns; push() leaves it to "
          "the loop's flush") {
    for (const bool direct : {true, false}) {
        CAPTURE(direct);
        io_context_options options = test::context_options();
        options.direct_sends = direct;
        io_context ctx(options);
        test::socket_pair sp;
        channel ch = make_channel(ctx, sp.release_a());
        write_all(sp.b, "ping\n");
        auto body = [](channel& x, int peer, bool sends_now) -> task<std::string> {
            CHECK(co_await x.read_until("\n") == "ping"); // one completion: light load
            char got[16];
            x.push("po"sv);
            CHECK(::recv(peer, got, sizeof got, MSG_DONTWAIT) < 0); // still queued
            co_await x.write("ng"sv); // returns at once: far below the high-water mark
            const ssize_t n = ::recv(peer, got, sizeof got, MSG_DONTWAIT);
            if (sends_now) {
                // Both pieces, in one send, before this coroutine waited for anything.
                CHECK(x.stats().direct_sends == 1);
                CHECK(x.stats().sends == 1);
                CHECK(x.queued_bytes() == 0);
                co_return n > 0 ? std::string(got, static_cast<std::size_t>(n)) : "";
            }
            CHECK(n < 0); // through the ring, once the loop flushes
            CHECK(x.stats().sends == 0);
            co_await x.drain();
            CHECK(x.stats().sends == 1);
            const ssize_t m = ::recv(peer, got, sizeof got, MSG_DONTWAIT);
            co_return m > 0 ? std::string(got, static_cast<std::size_t>(m)) : "";
        };
        CHECK(test::run_with_deadline(ctx, body(ch, sp.b, direct)) == "pong");
        CHECK(ch.stats().direct_sends == (direct ? 1 : 0));
    }
}

TEST_CASE("at light load a write() to a peer that has gone throws EPIPE from the co_await, "
          "never SIGPIPE; through the ring, the next wait for the writer throws it") {
    default_sigpipe sigpipe;
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "ping\n");
    auto body = [](channel& x, test::socket_pair& peer) -> task<int> {
        CHECK(co_await x.read_until("\n") == "ping"); // one completion: light load
        peer.close_b(); // gone before the reply: nothing the loop has seen yet
        int failures = 0;
        for (int i = 0; i < 2; ++i) {
            try {
                co_await x.write("pong"sv);
            } catch (const std::system_error& e) {
                CHECK(e.code() == std::error_code(EPIPE, std::generic_category()));
                ++failures;
            }
        }
        if (failures == 0) {
            CHECK_THROWS_AS(co_await x.drain(), std::system_error);
        }
        co_return failures;
    };
    const int failures = test::run_with_deadline(ctx, body(ch, sp));
    // A direct send fails inside the first write() and the failure sticks; through the ring
    // the writes only queue, and the send's completion fails the drain.
    CHECK(failures == (ctx.options().direct_sends ? 2 : 0));
    CHECK(ch.stats().bytes_sent == 0);
}

TEST_CASE("what a direct send leaves, the socket being full, goes through the ring in order") {
    // push() sends from the queue when the loop flushes; write() with nothing queued sends
    // straight from its argument and queues only what the socket did not take.
    for (const bool by_write : {false, true}) {
        CAPTURE(by_write);
        io_context_options options = test::context_options();
        options.direct_sends = true;
        io_context ctx(options);
        test::socket_pair sp;
        set_buffer_size(sp.a, SO_SNDBUF, 64 * 1024);
        channel ch = make_channel(ctx, sp.release_a());
        write_all(sp.b, "go");
        const std::string payload = pattern(7, mib / 2);
        auto body = [](io_context& c, channel& x, int peer, const std::string& bytes,
                       bool w) -> task<std::string> {
            CHECK(co_await x.read_exact(2) == "go");
            // More than the socket takes at once, and less than the high-water mark.
            if (w) {
                co_await x.write(bytes);
                CHECK(x.stats().direct_sends == 1);
                CHECK(x.queued_bytes() == bytes.size() - x.stats().bytes_sent);
            } else {
                x.push(std::string_view(bytes));
            }
            std::string got = co_await read_count(c, peer, bytes.size());
            co_await x.drain();
            co_return got;
        };
        const std::string got =
            test::run_with_deadline(ctx, body(ctx, ch, sp.b, payload, by_write));
        CHECK(got.size() == payload.size());
        CHECK(first_pattern_mismatch(got, 7) == std::string::npos);
        CHECK(ch.stats().bytes_sent == payload.size());
        CHECK(ch.stats().direct_sends >= 1);               // the first part
        CHECK(ch.stats().sends > ch.stats().direct_sends); // the rest, through the ring
    }
}

TEST_CASE("a peer reset while sending fails drain() with ECONNRESET or EPIPE, never SIGPIPE") {
    default_sigpipe sigpipe;
    io_context ctx(test::context_options());
    test::run_with_deadline(ctx, drain_fails_on_reset(ctx));
    // The process is alive and the context keeps serving.
    test::run_with_deadline(ctx, still_works(ctx));
}

task<void> write_until_failure(channel& ch, writer_state& st) {
    const std::string chunk = pattern(11, 16 * 1024);
    for (;;) {
        st.in_write = true;
        co_await ch.write(chunk);
        st.in_write = false;
        st.written += chunk.size();
        if (st.written > 512 * mib) {
            FAIL_CHECK("write() never failed");
            co_return;
        }
    }
}

task<void> write_fails_on_reset(io_context& ctx, bool tcp) {
    channel_options options;
    options.high_water = 64 * 1024;
    options.low_water = 16 * 1024;
    std::optional<channel> ch;
    std::optional<test::socket_pair> sp;
    int peer = -1;
    if (tcp) {
        tcp_pair pair = co_await connect_loopback(ctx);
        set_buffer_size(pair.client.native_handle(), SO_SNDBUF, 4096);
        reset_on_close(pair.server_fd);
        ch.emplace(std::move(pair.client), options);
        peer = pair.server_fd;
    } else {
        sp.emplace();
        set_buffer_size(sp->a, SO_SNDBUF, 4096);
        ch.emplace(make_channel(ctx, sp->release_a(), options));
        peer = sp->release_b();
    }
    writer_state st;
    outcome writer;
    spawn_recorded(ctx, write_until_failure(*ch, st), writer);
    while (ch->stats().sends == 0) {
        co_await yield(ctx);
    }
    CHECK(st.in_write); // blocked by back-pressure
    ::close(peer);
    co_await writer.finished.wait();
    std::error_code code = error_code_of(writer.error);
    CHECK_MESSAGE(is_reset_or_broken_pipe(code), code.message());
    CHECK(ch->queued_bytes() == 0);
    ch->push("dropped"sv);
    CHECK(ch->queued_bytes() == 0);
    try {
        co_await ch->drain();
        FAIL_CHECK("drain() should rethrow the send failure");
    } catch (const std::system_error& e) {
        CHECK(e.code() == code);
    }
}

TEST_CASE("a peer reset while write() waits fails it with ECONNRESET or EPIPE") {
    default_sigpipe sigpipe;
    io_context ctx(test::context_options());
    SUBCASE("TCP, SO_LINGER {1, 0}") {
        test::run_with_deadline(ctx, write_fails_on_reset(ctx, true));
    }
    SUBCASE("AF_UNIX, peer closes") {
        test::run_with_deadline(ctx, write_fails_on_reset(ctx, false));
    }
    test::run_with_deadline(ctx, still_works(ctx));
}

// ---------------------------------------------------------------- misuse and close()

TEST_CASE("push after close_when_done() or shutdown_send() throws std::logic_error") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    {
        channel ch = make_channel(ctx, sp.release_a());
        ch.push("ok"sv);
        ch.close_when_done();
        CHECK_THROWS_AS(ch.push("no"sv), std::logic_error);
        CHECK_THROWS_AS(ch.push(std::string(100, 'n')), std::logic_error);
        CHECK_THROWS_AS(ch.push(simple_producer("no")), std::logic_error);
        CHECK_THROWS_AS((void)ch.write("no"), std::logic_error);
    }
    test::socket_pair sp2;
    channel ch2 = make_channel(ctx, sp2.release_a());
    (void)ch2.shutdown_send();
    CHECK_THROWS_AS(ch2.push("no"sv), std::logic_error);
    struct check {
        static task<void> eof(io_context& ctx, int fd) {
            CHECK(co_await read_until_eof(ctx, fd) == "");
        }
    };
    test::run_with_deadline(ctx, check::eof(ctx, sp2.b));
}

task<void> close_fails_everything(io_context& ctx, channel& ch, int peer) {
    ch.push("queued, then dropped"sv);
    ch.close();
    ch.close(); // twice is harmless
    CHECK(ch.queued_bytes() == 0);
    CHECK(ch.native_handle() < 0);
    CHECK_THROWS_WITH_AS(co_await ch.drain(), doctest::Contains("send to"), std::system_error);
    try {
        co_await ch.drain();
    } catch (const std::system_error& e) {
        CHECK(e.code() == errc::closed);
    }
    try {
        co_await ch.read_until("\n");
        FAIL_CHECK("read after close() should throw");
    } catch (const std::system_error& e) {
        CHECK(e.code() == errc::closed);
    }
    try {
        co_await ch.read_exact(4);
        FAIL_CHECK("read after close() should throw");
    } catch (const std::system_error& e) {
        CHECK(e.code() == errc::closed);
    }
    try {
        co_await ch.write("late");
        FAIL_CHECK("write after close() should throw");
    } catch (const std::system_error& e) {
        CHECK(e.code() == errc::closed);
    }
    // The peer sees the connection end, without the dropped output.
    CHECK(co_await read_until_eof(ctx, peer) == "");
}

TEST_CASE("close() makes drain(), write() and reads throw errc::closed") {
    test::socket_pair sp;
    io_context ctx(test::context_options());
    channel ch = make_channel(ctx, sp.release_a());
    test::run_with_deadline(ctx, close_fails_everything(ctx, ch, sp.b));
}

task<void> read_forever(channel& ch) {
    (void)co_await ch.read_until("\n");
}

task<void> close_while_waiting(io_context& ctx, channel& writer_ch, channel& reader_ch) {
    outcome drainer;
    outcome reader;
    writer_ch.push(pattern(12, 4 * mib)); // the peer never reads
    spawn_recorded(ctx, drain_forever(writer_ch), drainer);
    spawn_recorded(ctx, read_forever(reader_ch), reader);
    while (writer_ch.stats().sends == 0) {
        co_await yield(ctx);
    }
    writer_ch.close();
    reader_ch.close();
    co_await drainer.finished.wait();
    co_await reader.finished.wait();
    CHECK(error_code_of(drainer.error) == errc::closed);
    CHECK(error_code_of(reader.error) == errc::closed);
}

TEST_CASE("close() wakes a pending drain() and a pending read with errc::closed") {
    test::socket_pair sp1;
    test::socket_pair sp2;
    io_context ctx(test::context_options());
    channel writer_ch = make_channel(ctx, sp1.release_a());
    channel reader_ch = make_channel(ctx, sp2.release_a());
    test::run_with_deadline(ctx, close_while_waiting(ctx, writer_ch, reader_ch));
}

// ---------------------------------------------------------------- large payloads over TCP

task<void> send_two_payloads(channel ch, std::size_t size) {
    ch.push(pattern(13, size));
    ch.push(pattern(14, size));
    co_await ch.close_when_done();
}

task<void> receive_two_payloads(io_context& ctx, std::size_t size) {
    listener lst(ctx, address::parse("127.0.0.1:0"));
    stream client = co_await connect(ctx, lst.local_address());
    channel receiver(co_await lst.accept());
    outcome sender;
    spawn_recorded(ctx, send_two_payloads(channel(std::move(client)), size), sender);

    std::vector<char> into(size);
    std::string_view got = co_await receiver.read_exact(std::span<char>(into));
    CHECK(got.data() == into.data());
    CHECK(got.size() == size);
    CHECK(first_pattern_mismatch(got, 13) == std::string_view::npos);

    std::string_view view = co_await receiver.read_exact(size);
    CHECK(view.size() == size);
    CHECK(first_pattern_mismatch(view, 14) == std::string_view::npos);
    CHECK(co_await receiver.read_some() == "");

    co_await sender.finished.wait();
    CHECK_FALSE(sender.error);
    CHECK(receiver.stats().bytes_received == 2 * size);
}

TEST_CASE("a 64 MiB payload over loopback TCP arrives byte-exact through read_exact") {
    io_context ctx(test::context_options());
    const std::size_t size = 64 * mib;
    REQUIRE(channel_options{}.max_buffer >= size);
    test::run_with_deadline(ctx, receive_two_payloads(ctx, size), 120s);
}

// ---------------------------------------------------------------- seeded random

enum class op_kind { view, owned, simple, custom, write, drain };

struct random_op {
    op_kind kind;
    std::size_t size;
    std::size_t chunk;
};

std::string describe(const std::vector<random_op>& ops) {
    std::string out;
    for (const random_op& op : ops) {
        static constexpr const char* names[] = {"view",   "owned", "simple",
                                                "custom", "write", "drain"};
        out += fmt::format("{}({}{}) ", names[static_cast<int>(op.kind)], op.size,
                           op.chunk != 0 ? fmt::format("/{}", op.chunk) : "");
    }
    return out;
}

std::vector<random_op> random_ops(std::mt19937_64& rng) {
    std::uniform_int_distribution<int> count_dist(1, 60);
    std::uniform_int_distribution<int> kind_dist(0, 5);
    std::uniform_int_distribution<int> size_class(0, 9);
    std::vector<random_op> ops(static_cast<std::size_t>(count_dist(rng)));
    for (random_op& op : ops) {
        op.kind = static_cast<op_kind>(kind_dist(rng));
        int cls = size_class(rng);
        std::size_t max = cls < 5 ? 64 : cls < 8 ? 4096 : cls < 9 ? 65536 : 512 * 1024;
        op.size = std::uniform_int_distribution<std::size_t>(0, max)(rng);
        op.chunk = op.kind == op_kind::simple || op.kind == op_kind::custom
                       ? std::uniform_int_distribution<std::size_t>(
                             1, std::max<std::size_t>(1, op.size / 3 + 1))(rng)
                       : 0;
        if (op.kind == op_kind::drain) {
            op.size = 0;
        }
    }
    return ops;
}

task<void> run_random_ops(channel ch, std::vector<random_op> ops, std::uint64_t seed) {
    std::size_t offset = 0;
    for (const random_op& op : ops) {
        std::string bytes = pattern(seed, op.size, offset);
        offset += op.size;
        switch (op.kind) {
        case op_kind::view:
            ch.push(std::string_view(bytes));
            break;
        case op_kind::owned:
            ch.push(std::move(bytes));
            break;
        case op_kind::simple:
            ch.push(simple_producer(std::move(bytes), op.chunk));
            break;
        case op_kind::custom:
            ch.push(string_producer{std::move(bytes), op.chunk});
            break;
        case op_kind::write:
            co_await ch.write(bytes);
            break;
        case op_kind::drain:
            co_await ch.drain();
            CHECK(ch.queued_bytes() == 0);
            break;
        }
    }
    co_await ch.close_when_done();
}

task<std::string> random_round(io_context& ctx, std::vector<random_op> ops, std::uint64_t seed,
                               bool small_buffers) {
    test::socket_pair sp;
    channel_options options;
    if (small_buffers) {
        set_buffer_size(sp.a, SO_SNDBUF, 4096);
        options.high_water = 32 * 1024;
        options.low_water = 8 * 1024;
    }
    outcome handler;
    spawn_recorded(ctx, run_random_ops(make_channel(ctx, sp.release_a(), options), ops, seed),
                   handler);
    std::string got = co_await read_until_eof(ctx, sp.b);
    co_await handler.finished.wait();
    CHECK_FALSE(handler.error);
    co_return got;
}

TEST_CASE("seeded random pushes, producers and writes all arrive in order") {
    const std::uint64_t base_seed = 0x5eed'2024;
    io_context ctx(test::context_options());
    for (std::uint64_t round = 0; round < 40; ++round) {
        const std::uint64_t seed = base_seed + round;
        std::mt19937_64 rng(seed);
        std::vector<random_op> ops = random_ops(rng);
        std::size_t total = 0;
        for (const random_op& op : ops) {
            total += op.size;
        }
        const bool small_buffers = round % 2 == 1;
        CAPTURE(seed);
        CAPTURE(small_buffers);
        INFO("operations: " << describe(ops));
        std::string got = test::run_with_deadline(ctx, random_round(ctx, ops, seed, small_buffers));
        CHECK(got.size() == total);
        CHECK(first_pattern_mismatch(got, seed) == std::string_view::npos);
    }
}

} // namespace

TEST_CASE("more multi-buffer sends in one loop iteration than the context has scratch for") {
    // Each channel queues three separate buffers, so each send is a sendmsg whose iovecs
    // live in the context's scratch until submission; 200 of them in one iteration use the
    // 64 slots several times over.
    io_context ctx(test::context_options());
    constexpr int count = 200;
    std::vector<std::unique_ptr<test::socket_pair>> pairs;
    std::vector<channel> channels;
    for (int i = 0; i < count; ++i) {
        pairs.push_back(std::make_unique<test::socket_pair>());
        channels.emplace_back(stream(ctx, pairs.back()->release_a(), address{}));
    }
    auto expected = [](int i) {
        return fmt::format("{:040}", i) + std::string(40, 'x') + fmt::format("{:040}", -i);
    };
    auto body = [](std::vector<channel>& chans, decltype(expected) make) -> task<void> {
        for (int i = 0; i < count; ++i) {
            std::string whole = make(i);
            chans[i].push(whole.substr(0, 40));          // own entries: each is at least
            chans[i].push(std::string(whole.substr(40, 40))); // 32 bytes and moved in
            chans[i].push(std::string(whole.substr(80)));
        }
        for (auto& ch : chans) {
            co_await ch.drain();
        }
    };
    test::run_with_deadline(ctx, body(channels, expected));
    for (int i = 0; i < count; ++i) {
        std::string got(120, '\0');
        REQUIRE(::recv(pairs[i]->b, got.data(), got.size(), MSG_WAITALL) == 120);
        CHECK(got == expected(i));
    }
}

// ---- pushes of received bytes: sent from the shared receive buffer, without a copy

namespace {

// By completion: these tests count what the kernel's receives into the shared buffers do.
io_context_options four_receive_buffers() {
    io_context_options options = test::completion_options();
    options.receive_buffers = 4; // a quarter of them may be kept for sends: one
    return options;
}

// Channels on socket pairs whose peer ends have already sent `first_words` (one string per
// channel); received(i, n) reads what channel i sent to its peer.
struct peered_channels {
    std::vector<std::unique_ptr<test::socket_pair>> pairs;
    std::vector<channel> channels;

    peered_channels(io_context& ctx, std::vector<std::string_view> first_words,
                    int send_buffer = 0) {
        for (std::string_view words : first_words) {
            pairs.push_back(std::make_unique<test::socket_pair>());
            if (send_buffer > 0) {
                set_buffer_size(pairs.back()->a, SO_SNDBUF, send_buffer);
            }
            write_all(pairs.back()->b, words);
            channels.push_back(make_channel(ctx, pairs.back()->release_a()));
        }
    }
    channel& operator[](std::size_t i) { return channels[i]; }
    std::string received(std::size_t i, std::size_t n) {
        std::string got(n, '\0');
        REQUIRE(::recv(pairs[i]->b, got.data(), n, MSG_WAITALL) == static_cast<ssize_t>(n));
        return got;
    }
};

// Echoes `count` pieces back as read_some returns them.
task<void> echo_pieces(channel& ch, int count) {
    for (int i = 0; i < count; ++i) {
        std::string_view piece = co_await ch.read_some();
        co_await ch.write(piece);
    }
}

// Sends `count` messages of `size` bytes one at a time, each after the previous one's echo.
task<int> send_and_check(channel& ch, int count, std::size_t size) {
    int right = 0;
    for (int i = 0; i < count; ++i) {
        std::string message = pattern(static_cast<std::uint64_t>(i), size);
        co_await ch.write(message);
        right += co_await ch.read_exact(size) == message ? 1 : 0;
    }
    co_return right;
}

// The client sends `count` messages of `size` bytes, one at a time; the server writes back
// what each of its reads returns. Returns how many echoes came back right.
int echo_round_trips(io_context& ctx, channel& server, channel& client, int count,
                     std::size_t size) {
    auto both = [](channel& s, channel& c, int n, std::size_t bytes) -> task<int> {
        task<void> echo = test::start(echo_pieces(s, n));
        int right = co_await send_and_check(c, n, bytes);
        co_await std::move(echo);
        co_return right;
    };
    return test::run_with_deadline(ctx, both(server, client, count, size));
}

} // namespace

TEST_CASE("an echo of what a read returned is sent from the receive buffer, given back once sent") {
    io_context ctx(four_receive_buffers());
    test::socket_pair sp;
    channel server = make_channel(ctx, sp.release_a());
    channel client = make_channel(ctx, sp.release_b());
    constexpr int count = 50;
    constexpr std::size_t size = 100;
    CHECK(echo_round_trips(ctx, server, client, count, size) == count);
    // Every echo went out in place: with one buffer allowed to be kept at a time, each
    // hold must have been released (its entry sent) before the next message arrived.
    CHECK(server.stats().bytes_sent_in_place == count * size);
    CHECK(server.stats().bytes_sent == count * size);
    CHECK(client.stats().bytes_sent_in_place == 0); // its messages are its own strings
}

TEST_CASE("by readiness, an echo is sent from the spare buffer its request came in") {
    io_context ctx(test::readiness_options());
    test::socket_pair sp;
    channel server = make_channel(ctx, sp.release_a());
    channel client = make_channel(ctx, sp.release_b());
    constexpr int count = 50;
    constexpr std::size_t size = 100;
    CHECK(echo_round_trips(ctx, server, client, count, size) == count);
    CHECK(server.stats().direct_receives >= count); // each request: a recv of its own
    CHECK(server.stats().receive_submissions == 0);
    CHECK(server.stats().bytes_sent_in_place == count * size);
    CHECK(server.input_capacity() == 0); // no buffer of its own was needed
}

TEST_CASE("pieces of one receive buffer: contiguous ones share its entry, others are copied") {
    io_context ctx(four_receive_buffers());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "abcdefalpha\nbravo\n"); // one write: one shared receive buffer
    auto body = [](io_context& c, channel& x, int peer) -> task<std::string> {
        x.push(co_await x.read_exact(3));   // "abc": queued in place
        x.push(co_await x.read_exact(3));   // "def" follows it in the buffer: same entry
        x.push(co_await x.read_until("\n")); // "alpha" too
        x.push(co_await x.read_until("\n")); // "bravo" does not follow "alpha": copied
        x.push(std::string_view("!"));       // not received bytes: copied
        co_await x.drain();
        co_return co_await read_count(c, peer, 17);
    };
    CHECK(test::run_with_deadline(ctx, body(ctx, ch, sp.b)) == "abcdefalphabravo!");
    CHECK(ch.stats().bytes_sent_in_place == 11);
    CHECK(ch.stats().bytes_sent == 17);
}

TEST_CASE("only a quarter of the receive buffers are kept for sends; the rest are copied") {
    io_context ctx(four_receive_buffers());
    peered_channels chans(ctx, {"to a", "to b"});
    auto body = [](channel& x, channel& y) -> task<void> {
        std::string_view from_a = co_await x.read_some();
        std::string_view from_b = co_await y.read_some();
        x.push(from_a); // keeps the one buffer allowed
        y.push(from_b); // copied
        co_await x.drain();
        co_await y.drain();
    };
    test::run_with_deadline(ctx, body(chans[0], chans[1]));
    CHECK(chans[0].stats().bytes_sent_in_place == 4);
    CHECK(chans[1].stats().bytes_sent_in_place == 0);
    CHECK(chans.received(0, 4) == "to a");
    CHECK(chans.received(1, 4) == "to b");
}

TEST_CASE("a buffer kept for a send is let go when the channel closes before sending it") {
    // Through the ring: a direct send would take x's bytes at the flush that runs while y's
    // read waits, so nothing would be left queued when x closes.
    io_context_options options = four_receive_buffers();
    options.direct_sends = false;
    io_context ctx(options);
    peered_channels chans(ctx, {"never sent", "copied", "sent"});
    auto close_with_queued = [](channel& x, channel& y) -> task<void> {
        x.push(co_await x.read_some()); // queued in place; no send is started before close()
        y.push(co_await y.read_some()); // the one buffer allowed is kept by x: copied
        x.close();
        co_await y.drain();
    };
    test::run_with_deadline(ctx, close_with_queued(chans[0], chans[1]));
    CHECK(chans[0].stats().sends == 0);
    CHECK(chans[0].stats().bytes_sent_in_place == 0); // it counts bytes sent: none were
    CHECK(chans[1].stats().bytes_sent_in_place == 0);
    // The closed channel's hold is released: another channel may keep a buffer now.
    auto echo_once = [](channel& x) -> task<void> {
        x.push(co_await x.read_some());
        co_await x.drain();
    };
    test::run_with_deadline(ctx, echo_once(chans[2]));
    CHECK(chans[2].stats().bytes_sent_in_place == 4);
    CHECK(chans.received(2, 4) == "sent");
    CHECK(chans.received(1, 6) == "copied");
}

TEST_CASE("echoes queued behind output a slow peer never reads keep at most a quarter of the "
          "receive buffers, so other channels still receive into them") {
    io_context ctx(four_receive_buffers()); // a quarter: one buffer
    constexpr std::size_t slow = 4;
    peered_channels chans(ctx, {"ping", "ping", "ping", "ping", "fifth"}, 16 * 1024);
    auto next_read = [](channel& x) -> task<void> {
        try {
            co_await x.read_some(); // starting it ends the previous read's view
        } catch (const std::system_error& e) {
            CHECK(e.code() == errc::closed);
        }
    };
    auto body = [](peered_channels& cs, decltype(next_read) pending) -> task<void> {
        for (std::size_t i = 0; i < slow; ++i) {
            channel& x = cs[i];
            x.push(std::string(mib, 'f'));  // more than the socket takes; the peer never reads
            x.push(co_await x.read_some()); // the echo waits behind it
            spawn(x.context(), pending(x));
        }
        // Had every slow channel kept its buffer, none would be left for this receive.
        channel& fast = cs[slow];
        fast.push(co_await fast.read_some());
        co_await fast.drain();
        for (std::size_t i = 0; i < slow; ++i) {
            cs[i].close();
        }
    };
    test::run_with_deadline(ctx, body(chans, next_read));
    CHECK(chans[slow].stats().receive_submissions == 1); // its multishot recv never ran dry
    CHECK(chans.received(slow, 5) == "fifth");
}

TEST_CASE("a write() that need not wait may run while another coroutine waits in drain(); one "
          "that must wait then throws std::logic_error") {
    test::socket_pair sp;
    set_buffer_size(sp.a, SO_SNDBUF, 16 * 1024);
    io_context ctx(test::context_options());
    channel_options options;
    options.high_water = 512 * 1024;
    options.low_water = 128 * 1024;
    channel ch = make_channel(ctx, sp.release_a(), options);
    auto drainer = [](channel& x, bool& drained) -> task<void> {
        x.push(pattern(9, 256 * 1024)); // more than the socket takes while the peer waits
        co_await x.drain();
        drained = true;
    };
    bool drained = false;
    auto body = [](io_context& c, channel& x, int peer, decltype(drainer) d,
                   bool& done) -> task<std::string> {
        spawn(c, d(x, done)); // runs up to its wait in drain()
        co_await x.write("tail"); // below the high-water mark: no wait, no conflict
        // Above it: queued, then the wait conflicts with the drain.
        CHECK_THROWS_AS(co_await x.write(std::string(512 * 1024, 'w')), std::logic_error);
        co_return co_await read_count(c, peer, 256 * 1024 + 4 + 512 * 1024);
    };
    std::string got = test::run_with_deadline(ctx, body(ctx, ch, sp.b, drainer, drained));
    CHECK(drained); // run() returned: the spawned drain finished too
    REQUIRE(got.size() == 256 * 1024 + 4 + 512 * 1024);
    CHECK(got.substr(0, 256 * 1024) == pattern(9, 256 * 1024));
    CHECK(got.substr(256 * 1024, 4) == "tail");
    CHECK(got.substr(256 * 1024 + 4) == std::string(512 * 1024, 'w'));
}
