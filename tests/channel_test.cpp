#include "support/test_support.hpp"

#include <ringchat/channel.hpp>
#include <ringchat/error.hpp>

#include <fmt/core.h>
#include <fmt/ranges.h>

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <mutex>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>

using namespace ringchat;
using namespace std::chrono_literals;

namespace {

// Writes all of `bytes` to a blocking socket end (small amounts only: the socketpair
// buffer takes them at once).
using test::write_all;

struct reader_flag {
    bool done = false;
};

// Sends `input` split at `chunks`, waiting after each piece until the channel has received
// it (or the reader stopped), so every chunk reaches the reader as a receive of its own.
// Shuts down the write side at the end so the reader sees EOF.
task<void> feed(io_context& ctx, const channel& ch, int fd, std::string input,
                std::vector<std::size_t> chunks, const reader_flag& reader, bool close_after) {
    std::size_t offset = 0;
    for (std::size_t size : chunks) {
        write_all(fd, std::string_view(input).substr(offset, size));
        offset += size;
        while (ch.stats().bytes_received < offset && !reader.done) {
            co_await sleep_for(ctx, 0ns);
        }
    }
    if (close_after) {
        ::shutdown(fd, SHUT_WR);
    }
}

channel make_channel(io_context& ctx, int fd, channel_options options = {}) {
    return channel(stream(ctx, fd, address::unix_path("@ringchat-channel-test")), options);
}

// `count` socket pairs, each with a channel on its a end; the b ends stay with the test.
struct channel_fleet {
    std::vector<std::unique_ptr<test::socket_pair>> pairs;
    std::vector<channel> channels;

    channel_fleet(io_context& ctx, int count) {
        for (int i = 0; i < count; ++i) {
            pairs.push_back(std::make_unique<test::socket_pair>());
            channels.push_back(make_channel(ctx, pairs.back()->release_a()));
        }
    }
};

// Every way to cut a string of length n into non-empty pieces (2^(n-1) of them).
std::vector<std::vector<std::size_t>> all_chunkings(std::size_t n) {
    std::vector<std::vector<std::size_t>> out;
    for (std::size_t mask = 0; mask < (std::size_t{1} << (n - 1)); ++mask) {
        std::vector<std::size_t> pieces;
        std::size_t start = 0;
        for (std::size_t i = 1; i < n; ++i) {
            if ((mask >> (i - 1)) & 1) {
                pieces.push_back(i - start);
                start = i;
            }
        }
        pieces.push_back(n - start);
        out.push_back(std::move(pieces));
    }
    return out;
}

std::vector<std::size_t> random_chunking(std::size_t n, std::mt19937& rng, std::size_t max_chunk) {
    std::uniform_int_distribution<std::size_t> dist(1, max_chunk);
    std::vector<std::size_t> pieces;
    for (std::size_t left = n; left > 0;) {
        std::size_t piece = std::min(left, dist(rng));
        pieces.push_back(piece);
        left -= piece;
    }
    return pieces;
}

template <typename Task>
Task mark_done_after(Task inner, reader_flag& flag) {
    struct mark_done {
        reader_flag& f;
        ~mark_done() { f.done = true; }
    } guard{flag};
    co_return co_await std::move(inner);
}

// Runs `reader(ch)` (a function returning a task) while feeding `input` in `chunks`, and
// returns what the reader returned.
template <typename Reader>
auto run_chunked(io_context& ctx, std::string input, std::vector<std::size_t> chunks,
                 Reader reader, channel_options options = {}, bool close_after = true) {
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    reader_flag flag;
    spawn(ctx, feed(ctx, ch, sp.b, std::move(input), std::move(chunks), flag, close_after));
    return test::run_with_deadline(ctx, mark_done_after(reader(ch), flag));
}

// Collects every read_some() until EOF.
task<std::string> read_rest(channel& ch) {
    std::string rest;
    for (;;) {
        std::string_view piece = co_await ch.read_some();
        if (piece.empty()) {
            co_return rest;
        }
        rest += piece;
    }
}

task<std::vector<std::string>> protocol_reader(channel& ch) {
    // Terminator, byte count, terminator again, then unframed: asynchat's three modes.
    std::vector<std::string> out;
    out.emplace_back(co_await ch.read_until("\n"));
    out.emplace_back(co_await ch.read_exact(2));
    out.emplace_back(co_await ch.read_until("\r\n"));
    out.push_back(co_await read_rest(ch));
    co_return out;
}

task<std::vector<std::string>> frames_until_eof(channel& ch, std::string term) {
    std::vector<std::string> out;
    for (;;) {
        try {
            out.emplace_back(co_await ch.read_until(term));
        } catch (const std::system_error& e) {
            if (e.code() == errc::eof) {
                co_return out;
            }
            throw;
        }
    }
}

} // namespace

// Terminator, byte count, terminator, unframed, under every chunking of the input.
void check_every_chunking_of_the_three_modes(io_context& ctx) {
    const std::string input = "E 2\nhiX\r\nZ";
    const std::vector<std::string> expected{"E 2", "hi", "X", "Z"};
    for (const auto& chunks : all_chunkings(input.size())) {
        CAPTURE(fmt::format("{}", chunks));
        CHECK(run_chunked(ctx, input, chunks, protocol_reader) == expected);
    }
}

TEST_CASE("every chunking of a small input gives the same frames in all three modes") {
    io_context ctx(test::context_options());
    check_every_chunking_of_the_three_modes(ctx);
}

TEST_CASE("a multi-byte terminator that overlaps itself is found under every chunking") {
    io_context ctx(test::context_options());
    const std::string input = "xaaaabyaab";
    const std::vector<std::string> expected{"xaa", "y"};
    for (const auto& chunks : all_chunkings(input.size())) {
        CAPTURE(fmt::format("{}", chunks));
        auto reader = [](channel& ch) { return frames_until_eof(ch, "aab"); };
        CHECK(run_chunked(ctx, input, chunks, reader) == expected);
    }
}

TEST_CASE("read_until finds a terminator split across reads") {
    io_context ctx(test::context_options());
    auto reader = [](channel& ch) { return frames_until_eof(ch, "\r\n\r\n"); };
    CHECK(run_chunked(ctx, "head\r\n\r\nbody\r\n\r\n", {5, 1, 1, 1, 3, 2, 1, 1, 1},
                      reader) == std::vector<std::string>{"head", "body"});
}

TEST_CASE("many frames arriving in one receive are all returned without another receive") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "one\ntwo\nthree\n");
    auto reader = [](channel& c) -> task<std::vector<std::string>> {
        std::vector<std::string> out;
        for (int i = 0; i < 3; ++i) {
            out.emplace_back(co_await c.read_until("\n"));
        }
        co_return out;
    };
    CHECK(test::run_with_deadline(ctx, reader(ch)) ==
          std::vector<std::string>{"one", "two", "three"});
    CHECK(ch.stats().receives == 1);
}

TEST_CASE("switching from a terminator to a byte count keeps bytes already received") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "ECHO 5\nhello");
    auto reader = [](channel& c) -> task<std::string> {
        std::string command(co_await c.read_until("\n"));
        std::string payload(co_await c.read_exact(5));
        co_return command + "|" + payload;
    };
    CHECK(test::run_with_deadline(ctx, reader(ch)) == "ECHO 5|hello");
    CHECK(ch.stats().receives == 1);
}

TEST_CASE("seeded random chunking of a large input keeps every frame intact") {
    io_context ctx(test::context_options());
    const unsigned seed = 20261124;
    std::mt19937 rng(seed);
    std::vector<std::string> expected;
    std::string input;
    std::uniform_int_distribution<int> len(0, 3000);
    std::uniform_int_distribution<int> letter('a', 'z');
    while (input.size() < (1u << 20)) {
        std::string frame(static_cast<std::size_t>(len(rng)), 'x');
        for (char& c : frame) {
            c = static_cast<char>(letter(rng));
        }
        expected.push_back(frame);
        input += frame + "\r\n";
    }
    auto chunks = random_chunking(input.size(), rng, 5000);
    CAPTURE(seed);
    auto reader = [](channel& ch) { return frames_until_eof(ch, "\r\n"); };
    CHECK(run_chunked(ctx, input, chunks, reader) == expected);
}

TEST_CASE("a 1 MiB frame dribbled in small pieces is searched in linear time") {
    io_context ctx(test::context_options());
    const std::size_t size = 1u << 20;
    std::string input(size, 'a');
    input += "\r\n";
    std::vector<std::size_t> chunks(input.size() / 64, 64);
    chunks.push_back(input.size() % 64);
    if (chunks.back() == 0) {
        chunks.pop_back();
    }
    channel_options options;
    options.max_frame = 2u << 20;
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    reader_flag flag;
    spawn(ctx, feed(ctx, ch, sp.b, input, chunks, flag, true));
    auto reader = [](channel& c) -> task<std::size_t> {
        co_return (co_await c.read_until("\r\n")).size();
    };
    CHECK(test::run_with_deadline(ctx, mark_done_after(reader(ch), flag)) == size);
    // Each byte is examined once, plus term.size() - 1 bytes re-examined per receive.
    CHECK(ch.stats().bytes_searched <= input.size() + ch.stats().receives * 2);
    MESSAGE("searched " << ch.stats().bytes_searched << " bytes in " << ch.stats().receives
                        << " receives for a " << input.size() << "-byte frame");
}

TEST_CASE("a frame over the limit raises frame_too_large and keeps the bytes, then recovers") {
    io_context ctx(test::context_options());
    channel_options options;
    options.max_frame = 16;
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    const std::string junk(40, 'j');
    write_all(sp.b, junk);
    auto reader = [](channel& c, int peer) -> task<std::string> {
        try {
            co_await c.read_until("\n");
            FAIL("no exception");
        } catch (const frame_too_large_error& e) {
            CHECK(e.limit() == 16);
            CHECK(e.code() == errc::frame_too_large);
            CHECK(std::string_view(e.what()).find("16-byte limit") != std::string_view::npos);
        }
        CHECK(c.buffered().size() >= 17);
        CHECK(c.buffered().substr(0, 17) == std::string(17, 'j'));
        write_all(peer, "more junk\nnext\n");
        std::size_t skipped = co_await c.skip_until("\n");
        CHECK(skipped == 40 + 10);
        co_return std::string(co_await c.read_until("\n"));
    };
    CHECK(test::run_with_deadline(ctx, reader(ch, sp.b)) == "next");
}

TEST_CASE("discard drops buffered bytes after an oversized frame") {
    io_context ctx(test::context_options());
    channel_options options;
    options.max_frame = 4;
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    write_all(sp.b, "toolong\nok\n");
    auto reader = [](channel& c) -> task<std::string> {
        CHECK_THROWS_AS(co_await c.read_until("\n"), frame_too_large_error);
        c.discard(8);
        CHECK_THROWS_AS(c.discard(100), std::out_of_range);
        co_return std::string(co_await c.read_until("\n"));
    };
    CHECK(test::run_with_deadline(ctx, reader(ch)) == "ok");
}

TEST_CASE("EOF inside a frame is incomplete_read; EOF between frames is eof") {
    io_context ctx(test::context_options());
    SUBCASE("terminator mode") {
        auto reader = [](channel& ch) -> task<int> {
            CHECK(co_await ch.read_until("\n") == "abc");
            try {
                co_await ch.read_until("\n");
            } catch (const incomplete_read_error& e) {
                CHECK(e.received() == 2);
                CHECK(e.expected() == 0);
                CHECK(e.code() == errc::incomplete_read);
                CHECK(ch.buffered() == "de");
                co_return 1;
            }
            co_return 0;
        };
        CHECK(run_chunked(ctx, "abc\nde", {6}, reader) == 1);
    }
    SUBCASE("byte-count mode") {
        auto reader = [](channel& ch) -> task<int> {
            try {
                co_await ch.read_exact(10);
            } catch (const incomplete_read_error& e) {
                CHECK(e.received() == 4);
                CHECK(e.expected() == 10);
                co_return 1;
            }
            co_return 0;
        };
        CHECK(run_chunked(ctx, "abcd", {2, 2}, reader) == 1);
    }
    SUBCASE("into a caller's buffer, bytes are put back") {
        auto reader = [](channel& ch) -> task<std::string> {
            std::vector<char> dest(10);
            try {
                co_await ch.read_exact(std::span<char>(dest));
            } catch (const incomplete_read_error& e) {
                CHECK(e.received() == 6);
                CHECK(e.expected() == 10);
            }
            co_return std::string(ch.buffered());
        };
        CHECK(run_chunked(ctx, "abcdef", {2, 3, 1}, reader) == "abcdef");
    }
    SUBCASE("between frames") {
        auto reader = [](channel& ch) -> task<int> {
            CHECK(co_await ch.read_until("\n") == "abc");
            try {
                co_await ch.read_exact(3);
            } catch (const incomplete_read_error&) {
                co_return 2;
            } catch (const std::system_error& e) {
                CHECK(e.code() == errc::eof);
                co_return 1;
            }
            co_return 0;
        };
        CHECK(run_chunked(ctx, "abc\n", {4}, reader) == 1);
    }
    SUBCASE("read_some(max_bytes) yields at most max_bytes and keeps the rest for later") {
        // One send of 10 bytes: the first read receives them all and must still stop at 4.
        auto reader = [](channel& ch) -> task<std::vector<std::string>> {
            std::vector<std::string> out;
            out.emplace_back(co_await ch.read_some(4));
            out.emplace_back(co_await ch.read_some(4));
            out.emplace_back(co_await ch.read_some());
            co_return out;
        };
        CHECK(run_chunked(ctx, "abcdefghij", {10}, reader) ==
              std::vector<std::string>{"abcd", "efgh", "ij"});
    }
    SUBCASE("read_some returns an empty view at EOF and read_to_eof everything") {
        auto reader = [](channel& ch) -> task<std::string> {
            co_return std::string(co_await ch.read_to_eof());
        };
        CHECK(run_chunked(ctx, "all of it", {3, 3, 3}, reader) == "all of it");
    }
}

TEST_CASE("read_exact of zero bytes returns at once") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    auto reader = [](channel& c) -> task<std::size_t> { co_return (co_await c.read_exact(0)).size(); };
    CHECK(test::run_with_deadline(ctx, reader(ch)) == 0);
    CHECK(ch.stats().receives == 0);
}

TEST_CASE("read_exact above max_buffer is refused before reading") {
    io_context ctx(test::context_options());
    channel_options options;
    options.max_buffer = 1000;
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    auto reader = [](channel& c) -> task<std::size_t> {
        try {
            co_await c.read_exact(1001);
        } catch (const frame_too_large_error& e) {
            co_return e.limit();
        }
        co_return 0;
    };
    CHECK(test::run_with_deadline(ctx, reader(ch)) == 1000);
}

TEST_CASE("skip discards bytes whether buffered or not") {
    io_context ctx(test::context_options());
    auto reader = [](channel& ch) -> task<std::string> {
        CHECK(co_await ch.skip(5) == 5);
        co_return std::string(co_await ch.read_until("\n"));
    };
    CHECK(run_chunked(ctx, "12345tail\n", {2, 2, 2, 4}, reader) == "tail");
}

TEST_CASE("an owned read returns a string that outlives later reads") {
    io_context ctx(test::context_options());
    auto reader = [](channel& ch) -> task<std::string> {
        std::string first = co_await ch.read_until("\n").owned();
        co_await ch.read_until("\n");
        co_return first;
    };
    CHECK(run_chunked(ctx, "first\nsecond\n", {14}, reader) == "first");
}

TEST_CASE("a read cancelled at any point consumes nothing and can be retried") {
    const std::string input = "0123456789abcdef\r\n";
    const std::size_t pieces = 6;
    std::vector<std::size_t> chunks{3, 3, 3, 3, 3, 4};
    for (std::size_t cancel_after = 0; cancel_after <= pieces; ++cancel_after) {
        CAPTURE(cancel_after);
        io_context ctx(test::context_options());
        test::socket_pair sp;
        channel ch = make_channel(ctx, sp.release_a());
        cancel_source source;
        reader_flag flag;
        auto feeder = [](io_context& c, channel& chan, int fd, std::string in,
                         std::vector<std::size_t> sizes, std::size_t when,
                         cancel_source& src) -> task<void> {
            std::size_t offset = 0;
            for (std::size_t i = 0; i < sizes.size(); ++i) {
                if (i == when) {
                    src.request_cancel();
                }
                write_all(fd, std::string_view(in).substr(offset, sizes[i]));
                offset += sizes[i];
                while (chan.stats().bytes_received < offset) {
                    co_await sleep_for(c, 0ns);
                }
            }
            if (when == sizes.size()) {
                src.request_cancel();
            }
        };
        auto reader = [](channel& chan, cancel_source& src) -> task<std::string> {
            try {
                co_return std::string(co_await chan.read_until("\r\n").cancel_on(src));
            } catch (const std::system_error& e) {
                CHECK(e.code() == errc::cancelled);
            }
            co_return std::string(co_await chan.read_until("\r\n"));
        };
        spawn(ctx, feeder(ctx, ch, sp.b, input, chunks, cancel_after, source));
        CHECK(test::run_with_deadline(ctx, mark_done_after(reader(ch, source), flag)) ==
              "0123456789abcdef");
    }
}

TEST_CASE("read_exact into a span cancelled midway puts its bytes back") {
    for (std::size_t cancel_after = 1; cancel_after < 4; ++cancel_after) {
        CAPTURE(cancel_after);
        io_context ctx(test::context_options());
        test::socket_pair sp;
        channel ch = make_channel(ctx, sp.release_a());
        cancel_source source;
        auto feeder = [](io_context& c, channel& chan, int fd, std::size_t when,
                         cancel_source& src) -> task<void> {
            const std::string in = "AAAABBBBCCCCDDDD";
            for (std::size_t i = 0; i < 4; ++i) {
                if (i == when) {
                    src.request_cancel();
                }
                write_all(fd, std::string_view(in).substr(i * 4, 4));
                while (chan.stats().bytes_received < (i + 1) * 4) {
                    co_await sleep_for(c, 0ns);
                }
            }
        };
        auto reader = [](channel& chan, cancel_source& src) -> task<std::string> {
            // Two bytes buffered before the read starts exercise the copied part too.
            CHECK(co_await chan.read_exact(2) == "AA");
            std::vector<char> dest(14);
            try {
                co_await chan.read_exact(std::span<char>(dest)).cancel_on(src);
                co_return std::string(dest.begin(), dest.end());
            } catch (const std::system_error& e) {
                CHECK(e.code() == errc::cancelled);
            }
            std::fill(dest.begin(), dest.end(), '?');
            co_await chan.read_exact(std::span<char>(dest));
            co_return std::string(dest.begin(), dest.end());
        };
        spawn(ctx, feeder(ctx, ch, sp.b, cancel_after, source));
        CHECK(test::run_with_deadline(ctx, reader(ch, source)) == "AABBBBCCCCDDDD");
    }
}

namespace {

// The peer's side of a timing test: after `delay`, sends `what` on the peer socket `fd`.
task<void> answer_after(io_context& ctx, int fd, std::chrono::milliseconds delay,
                        std::string what) {
    co_await sleep_for(ctx, delay);
    write_all(fd, what);
}

// Awaits `read`, which must fail with errc::timed_out.
template <typename Read>
task<void> expect_timeout(Read read) {
    try {
        co_await read;
        FAIL("no timeout");
    } catch (const std::system_error& e) {
        CHECK(e.code() == errc::timed_out);
    }
}

} // namespace

TEST_CASE("a read that times out consumes nothing and the retry gets the whole frame") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "partial");
    auto reader = [](channel& c, int peer) -> task<std::string> {
        co_await expect_timeout(c.read_until("\n").with_timeout(20ms));
        CHECK(c.buffered() == "partial");
        write_all(peer, " frame\n");
        co_return std::string(co_await c.read_until("\n").with_timeout(10s));
    };
    CHECK(test::run_with_deadline(ctx, reader(ch, sp.b)) == "partial frame");
}

TEST_CASE("channel_options::read_timeout bounds every read that waits; with_timeout overrides it") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel_options options;
    options.read_timeout = 30ms;
    channel ch = make_channel(ctx, sp.release_a(), options);
    write_all(sp.b, "one\npart");
    auto reader = [](channel& c, int peer) -> task<std::string> {
        // Buffered frames complete without waiting, so the timeout never applies to them.
        std::string got(co_await c.read_until("\n"));
        for (int i = 0; i < 2; ++i) { // the timeout applies again to each later read
            co_await expect_timeout(c.read_until("\n"));
            CHECK(c.buffered() == "part"); // nothing consumed
        }
        // A read's own deadline replaces the channel's: this one outlives 30 ms.
        spawn(c.context(), answer_after(c.context(), peer, 100ms, "ial\n"));
        got += "|" + std::string(co_await c.read_until("\n").with_timeout(10s));
        co_return got;
    };
    CHECK(test::run_with_deadline(ctx, reader(ch, sp.b)) == "one|partial");
    CHECK(ch.options().read_timeout == 30ms);
    ch.set_read_timeout(0ms); // back to waiting for ever: the next read is not bounded
    CHECK(ch.options().read_timeout == 0ms);
    auto unbounded = [](channel& c, int peer) -> task<std::string> {
        // A read's own deadline applies even when it is zero and the channel has none.
        co_await expect_timeout(c.read_until("\n").with_timeout(0ms));
        spawn(c.context(), answer_after(c.context(), peer, 100ms, "late\n"));
        co_return std::string(co_await c.read_until("\n"));
    };
    CHECK(test::run_with_deadline(ctx, unbounded(ch, sp.b)) == "late");
}

TEST_CASE("read_timeout renewed by every read fires only for a read that waits too long") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel_options options;
    options.read_timeout = 150ms;
    channel ch = make_channel(ctx, sp.release_a(), options);
    auto reader = [](io_context& x, channel& c, int peer) -> task<int> {
        // Ten reads answered after 30 ms each: 300 ms in all, twice the timeout, so every
        // read must have renewed the deadline (the wheel moves the entry on when its old
        // slot comes up).
        int answered = 0;
        for (int i = 0; i < 10; ++i) {
            spawn(x, answer_after(x, peer, 30ms, "frame\n"));
            answered += co_await c.read_until("\n") == "frame" ? 1 : 0;
        }
        // No timeout now: the last read's deadline, still on the wheel, must not fire this
        // read, which waits longer than that.
        c.set_read_timeout(0ms);
        spawn(x, answer_after(x, peer, 400ms, "late\n"));
        answered += co_await c.read_until("\n") == "late" ? 1 : 0;
        // And with the timeout back, a read nobody answers times out.
        c.set_read_timeout(150ms);
        const auto start = std::chrono::steady_clock::now();
        try {
            co_await c.read_until("\n");
        } catch (const std::system_error& e) {
            CHECK(e.code() == errc::timed_out);
            CHECK(std::chrono::steady_clock::now() - start >= 150ms);
            co_return answered;
        }
        co_return -1;
    };
    CHECK(test::run_with_deadline(ctx, reader(ctx, ch, sp.b)) == 11);
}

TEST_CASE("channel::peer() gives back the address it was made with, for every family") {
    io_context ctx(test::context_options());
    const address addresses[] = {
        address::parse("127.0.0.1:4242"),
        address::parse("[::1]:65535"),
        address::parse("[fe80::1:2:3:4]:1"),
        address::unix_path("/run/ringchat/a-rather-long-path-that-needs-the-whole-sockaddr_un.sock"),
        address::unix_path("@abstract-name"),
        address{},
    };
    for (const address& a : addresses) {
        test::socket_pair sp;
        channel ch(stream(ctx, sp.release_a(), a));
        CHECK(ch.peer() == a);
        CHECK(ch.peer().to_string() == a.to_string());
        CHECK(ch.peer().native_size() == a.native_size());
    }
}

TEST_CASE("a second concurrent read on one channel is refused") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    auto first = [](channel& c) -> task<void> { co_await c.read_until("\n"); };
    auto second = [](channel& c, int peer) -> task<bool> {
        bool refused = false;
        try {
            co_await c.read_some();
        } catch (const std::logic_error&) {
            refused = true;
        }
        write_all(peer, "done\n");
        co_return refused;
    };
    spawn(ctx, first(ch));
    CHECK(test::run_with_deadline(ctx, second(ch, sp.b)));
}

TEST_CASE("an empty terminator is rejected") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    CHECK_THROWS_AS((void)ch.read_until(""), std::invalid_argument);
    CHECK_THROWS_AS((void)ch.skip_until(""), std::invalid_argument);
}

TEST_CASE("an idle channel releases a large input buffer") {
    io_context ctx(test::context_options());
    channel_options options;
    options.keep_buffer = 4096;
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    const std::string big(100000, 'b');
    auto reader = [](channel& c, int peer, std::string payload) -> task<std::size_t> {
        std::size_t got = (co_await c.read_exact(payload.size())).size();
        // The next read waits with an empty buffer: the 100 KB allocation is dropped.
        CHECK(c.input_capacity() >= payload.size());
        // The first small receive tells the channel that traffic is light again; the wait
        // after it releases the 100 KB allocation.
        write_all(peer, "x");
        co_await c.read_exact(1);
        write_all(peer, "y");
        co_await c.read_exact(1);
        CHECK(c.input_capacity() <= 4096);
        co_return got;
    };
    spawn(ctx, [](int fd, std::string payload) -> task<void> {
        write_all(fd, payload);
        co_return;
    }(sp.b, big));
    CHECK(test::run_with_deadline(ctx, reader(ch, sp.b, big)) == big.size());
}

TEST_CASE("a channel whose multishot recv stays armed still releases a large buffer when idle") {
    io_context ctx(test::completion_options());
    channel_options options;
    options.keep_buffer = 4096;
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a(), options);
    auto reader = [](io_context& x, channel& c, int peer) -> task<std::size_t> {
        // A 30 KB line in 1 KB pieces, each taken from the multishot recv while the read
        // waits: light traffic, so the receive stays armed and the input buffer grows.
        spawn(x, [](io_context& x2, const channel& c2, int fd) -> task<void> {
            for (std::size_t i = 0; i < 30; ++i) {
                write_all(fd, std::string(1000, 'a'));
                while (c2.stats().bytes_received < (i + 1) * 1000) {
                    co_await sleep_for(x2, 0ns);
                }
            }
            write_all(fd, "\n");
        }(x, c, peer));
        const std::size_t size = (co_await c.read_until("\n")).size();
        CHECK(c.input_capacity() >= 30000);
        // The next frame comes only once the next read waits, with nothing buffered: the
        // 30 KB allocation goes then, as it would with a receive of the read's own.
        spawn(x, [](io_context& x2, int fd) -> task<void> {
            co_await sleep_for(x2, 0ns);
            write_all(fd, "next\n");
        }(x, peer));
        CHECK(co_await c.read_until("\n") == "next");
        CHECK(c.input_capacity() <= 4096);
        co_return size;
    };
    CHECK(test::run_with_deadline(ctx, reader(ctx, ch, sp.b)) == 30000);
    if (ctx.multishot_receives()) { // not on a kernel before 6.0
        CHECK(ch.stats().receive_submissions == 1);
    }
}

TEST_CASE("framing is the same with the shared receive buffers turned off") {
    io_context_options options = test::context_options();
    options.receive_buffers = 0;
    io_context ctx(options);
    check_every_chunking_of_the_three_modes(ctx);
}

TEST_CASE("framing is the same with multishot receives turned off") {
    io_context_options options = test::context_options();
    options.multishot_receive = false;
    io_context ctx(options);
    check_every_chunking_of_the_three_modes(ctx);
}

namespace {
// The peer sends `count` requests, each once the channel has read the one before; returns
// how many the channel read right.
task<int> conversation(channel& c, int peer, int count) {
    int answered = 0;
    for (int i = 0; i < count; ++i) {
        write_all(peer, fmt::format("request {}\n", i));
        answered += co_await c.read_until("\n") == fmt::format("request {}", i) ? 1 : 0;
    }
    co_return answered;
}
} // namespace

TEST_CASE("one multishot receive serves a whole conversation; without it, one recv per read") {
    for (bool multishot : {true, false}) {
        CAPTURE(multishot);
        io_context_options options = test::completion_options();
        options.multishot_receive = multishot;
        io_context ctx(options);
        test::socket_pair sp;
        channel ch = make_channel(ctx, sp.release_a());
        CHECK(test::run_with_deadline(ctx, conversation(ch, sp.b, 50)) == 50);
        CHECK(ch.stats().receives == 50);
        const std::uint64_t submissions = ch.stats().receive_submissions;
        if (ctx.multishot_receives()) {
            CHECK(submissions == 1);
        } else if (!multishot) {
            CHECK(submissions == 50);
        } else {
            CHECK(submissions == 51); // a kernel before 6.0 rejected the multishot recv
        }
        if (!multishot) {
            CHECK_FALSE(ctx.multishot_receives()); // the option turns it off
        }
    }
}

TEST_CASE("by readiness, one poll serves a whole conversation with one recv per request") {
    io_context ctx(test::readiness_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    CHECK(test::run_with_deadline(ctx, conversation(ch, sp.b, 50)) == 50);
    CHECK(ch.stats().receives == 50);
    CHECK(ch.stats().direct_receives == 50);   // each request: one recv of the channel's own
    CHECK(ch.stats().receive_submissions == 0); // and no recv through the ring
    CHECK(ch.input_capacity() == 0); // each request came in a spare shared buffer, given back
}

namespace {

// Requests "light <from>" to "light <from + count - 1>", each written by the peer only
// after the channel has read the one before: every wait of the loop returns one completion.
// Returns how many the channel read right.
task<int> light_requests(channel& c, int peer, int from, int count) {
    int right = 0;
    for (int i = from; i < from + count; ++i) {
        write_all(peer, fmt::format("light {}\n", i));
        right += co_await c.read_until("\n") == fmt::format("light {}", i) ? 1 : 0;
    }
    co_return right;
}

io_context_options adaptive_options() {
    io_context_options options;
    options.receive = receive_mode::adaptive;
    return options;
}

} // namespace

TEST_CASE("by readiness, a read takes one recv even when the socket holds more: a busy peer "
          "cannot keep the loop in one channel") {
    io_context ctx(test::readiness_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    const std::string burst = test::pattern(3, 20000); // more than one shared buffer holds
    write_all(sp.b, burst);
    auto body = [](channel& c, std::size_t total) -> task<std::string> {
        std::string got(co_await c.read_some());
        CHECK(c.stats().direct_receives == 1); // one recv for the first read
        CHECK(got.size() < total);             // the rest is still in the socket
        std::size_t reads = 1;
        while (got.size() < total) {
            got += co_await c.read_some();
            ++reads;
        }
        CHECK(c.stats().direct_receives == reads); // and one for each read after it
        co_return got;
    };
    CHECK(test::run_with_deadline(ctx, body(ch, burst.size())) == burst);
}

TEST_CASE("adaptive receives switch to readiness at light load and back when completions "
          "come in batches, losing and reordering nothing") {
    io_context ctx(adaptive_options());
    constexpr int channels = 4;
    constexpr int rounds = 20;
    channel_fleet fleet(ctx, channels);
    auto& pairs = fleet.pairs;
    auto& chans = fleet.channels;
    // One channel alone: each wait returns one completion, so after a few the channel ends
    // its multishot recv and waits by readiness.
    CHECK(test::run_with_deadline(ctx, light_requests(chans[0], pairs[0]->b, 0, rounds)) ==
          rounds);
    const channel_stats alone = chans[0].stats();
    CHECK(alone.receive_submissions >= 1); // it began with a multishot recv
    CHECK(alone.direct_receives > 0);      // and went on by readiness
    CHECK(alone.receives == rounds);
    // Then every peer writes before the loop waits, round after round: their arrivals
    // come in batches, and the channels go back to multishot receives.
    auto one = [](channel& c, int round, int& right, int& done) -> task<void> {
        right += co_await c.read_until("\n") == fmt::format("request {}", round) ? 1 : 0;
        ++done;
    };
    auto batched = [](io_context& x, std::vector<channel>& cs,
                      std::vector<std::unique_ptr<test::socket_pair>>& ps,
                      decltype(one) read) -> task<int> {
        int right = 0;
        for (int round = 0; round < rounds; ++round) {
            for (auto& p : ps) {
                write_all(p->b, fmt::format("request {}\n", round));
            }
            int done = 0;
            for (auto& c : cs) {
                spawn(x, read(c, round, right, done));
            }
            while (done < channels) {
                co_await sleep_for(x, 0ns);
            }
        }
        co_return right;
    };
    CHECK(test::run_with_deadline(ctx, batched(ctx, chans, pairs, one)) == channels * rounds);
    for (int i = 0; i < channels; ++i) {
        CAPTURE(i);
        const channel_stats& st = chans[i].stats();
        CHECK(chans[i].buffered().empty());
        CHECK(st.receives == (i == 0 ? 2 * rounds : rounds)); // one receive per frame
        // The batches ended any poll, and a multishot recv took over.
        CHECK(st.receive_submissions > (i == 0 ? alone.receive_submissions : 0));
    }
}

TEST_CASE("adaptive receives stay by completion while the context has more than 8 channels, "
          "and switch to readiness once it has 8") {
    io_context ctx(adaptive_options());
    constexpr int rounds = 20;
    auto fleet = std::make_unique<channel_fleet>(ctx, 9);
    // One channel of nine talks alone: each wait returns one completion, as in the test
    // above, but with nine channels it keeps its multishot recv.
    channel& first = fleet->channels[0];
    const int peer = fleet->pairs[0]->b;
    CHECK(test::run_with_deadline(ctx, light_requests(first, peer, 0, rounds)) == rounds);
    CHECK(first.stats().receives == rounds);
    CHECK(first.stats().direct_receives == 0);
    CHECK(first.stats().receive_submissions == 1); // one multishot recv throughout
    // The ninth channel goes: with eight left, the same conversation goes on by readiness.
    fleet->channels.pop_back();
    CHECK(test::run_with_deadline(ctx, light_requests(first, peer, rounds, rounds)) == rounds);
    CHECK(first.stats().receives == 2 * rounds);
    CHECK(first.stats().direct_receives > 0);
    CHECK(first.buffered().empty());
}

TEST_CASE("bytes that arrive between reads wait aside; the last read's view stays intact") {
    io_context_options options = test::completion_options();
    options.receive_buffers = 4; // the first frame's buffer, three to park, then none left
    io_context ctx(options);
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "first\n");
    auto reader = [](io_context& x, channel& c, int peer) -> task<std::vector<std::string>> {
        std::string_view first = co_await c.read_until("\n"); // a view into a shared buffer
        // Three frames arrive (one receive each) while no read is in progress; two more find
        // no shared buffer left and stay in the socket. Had the channel given the first
        // frame's buffer back to take them, the kernel would have written one of them over it.
        for (int i = 0; i < 5; ++i) {
            const std::uint64_t before = c.stats().bytes_received;
            write_all(peer, fmt::format("more {}\n", i));
            for (int turn = 0; turn < 100 && i < 3 && c.stats().bytes_received == before;
                 ++turn) {
                co_await sleep_for(x, 0ns);
            }
        }
        for (int turn = 0; turn < 10; ++turn) {
            co_await sleep_for(x, 0ns);
        }
        // Without multishot recv (a kernel before 6.0) nothing is received between reads.
        CHECK(c.stats().bytes_received == (x.multishot_receives() ? 6 + 3 * 7 : 6));
        CHECK(c.buffered().empty()); // parked bytes join the buffer when the next read starts
        std::vector<std::string> out{std::string(first)};
        for (int i = 0; i < 5; ++i) {
            out.emplace_back(co_await c.read_until("\n"));
        }
        co_return out;
    };
    CHECK(test::run_with_deadline(ctx, reader(ctx, ch, sp.b)) ==
          std::vector<std::string>{"first", "more 0", "more 1", "more 2", "more 3", "more 4"});
}

namespace {
// Sends all of `bytes` from a thread, blocking as the socket fills; stops early if the
// other end goes away (the test failed).
std::thread send_from_thread(int fd, const std::string& bytes) {
    return std::thread([fd, &bytes] {
        std::size_t off = 0;
        while (off < bytes.size()) {
            ssize_t n = ::send(fd, bytes.data() + off, bytes.size() - off, MSG_NOSIGNAL);
            if (n <= 0) {
                return;
            }
            off += static_cast<std::size_t>(n);
        }
    });
}
} // namespace

TEST_CASE("between reads a channel parks about keep_buffer bytes, then leaves the rest to TCP") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel_options options;
    options.keep_buffer = 16 * 1024;
    channel ch = make_channel(ctx, sp.release_a(), options);
    const std::string payload = test::pattern(1, 4 * 1024 * 1024); // more than the socket holds
    std::thread writer = send_from_thread(sp.b, payload);
    auto reader = [](io_context& x, channel& c, const std::string& expected) -> task<bool> {
        std::string got(co_await c.read_exact(1)); // arms the multishot receive
        // Idle for a while: the receive must stop once keep_buffer bytes are parked. What
        // the socket held when the kernel ran the receive comes anyway (a few hundred KiB:
        // the kernel posts it all before the channel sees the first completion). Not a
        // timing assertion: a channel that went on receiving would have all 4 MiB by now.
        for (int turn = 0; turn < 20; ++turn) {
            co_await sleep_for(x, 1ms);
        }
        CHECK(c.stats().bytes_received <= 1024 * 1024);
        std::vector<char> rest(expected.size() - 1);
        co_await c.read_exact(std::span<char>(rest));
        got.append(rest.begin(), rest.end());
        co_return got == expected;
    };
    const bool same = test::run_with_deadline(ctx, reader(ctx, ch, payload));
    writer.join();
    CHECK(same);
    CHECK(ch.stats().bytes_received == payload.size());
}

TEST_CASE("by readiness, bytes that arrive between reads stay in the socket until a read") {
    io_context ctx(test::readiness_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "first\n");
    auto reader = [](io_context& x, channel& c, int peer) -> task<std::vector<std::string>> {
        std::string_view first = co_await c.read_until("\n"); // a view into a spare buffer
        for (int i = 0; i < 5; ++i) {
            write_all(peer, fmt::format("more {}\n", i));
            for (int turn = 0; turn < 3; ++turn) {
                co_await sleep_for(x, 0ns); // the poll reports them; nobody receives
            }
        }
        CHECK(c.stats().bytes_received == 6);
        CHECK(first == "first"); // nothing was written over the view
        std::vector<std::string> out{std::string(first)};
        for (int i = 0; i < 5; ++i) {
            out.emplace_back(co_await c.read_until("\n"));
        }
        // The five frames were in the socket together: the first read's recv took them all.
        CHECK(c.stats().direct_receives == 2);
        co_return out;
    };
    CHECK(test::run_with_deadline(ctx, reader(ctx, ch, sp.b)) ==
          std::vector<std::string>{"first", "more 0", "more 1", "more 2", "more 3", "more 4"});
}

TEST_CASE("read_exact into a large span ends the multishot receive and receives into the span") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    const std::string payload = test::pattern(2, 4'000'000); // more than the socket holds
    write_all(sp.b, "size 4000000\n");
    std::thread writer = send_from_thread(sp.b, payload);
    auto reader = [](channel& c, const std::string& expected) -> task<bool> {
        CHECK(co_await c.read_until("\n") == "size 4000000"); // through the multishot receive
        std::vector<char> dest(expected.size());
        co_await c.read_exact(std::span<char>(dest));
        co_return std::string_view(dest.data(), dest.size()) == expected;
    };
    const bool same = test::run_with_deadline(ctx, reader(ch, payload));
    writer.join();
    CHECK(same);
    // The multishot receive, ended once the span's read started, then receives of its own
    // straight into the span for what the socket could not hold at first; or, by
    // readiness, recv system calls straight into the span. Adaptive does either, depending
    // on how many completions each wait brought.
    if (ctx.options().receive == receive_mode::readiness) {
        CHECK(ch.stats().direct_receives >= 2);
    } else if (ctx.options().receive == receive_mode::completion) {
        CHECK(ch.stats().receive_submissions >= 2);
    } else {
        CHECK(ch.stats().receive_submissions + ch.stats().direct_receives >= 2);
    }
    CHECK(ch.stats().receives >= 2);
}

TEST_CASE("run() returns when nothing waits, though an idle channel's multishot recv is armed") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "hello\n");
    std::string got;
    spawn(ctx, [](channel& c, std::string& out) -> task<void> {
        out = std::string(co_await c.read_until("\n"));
    }(ch, got));
    // If run() does not return by itself, the watchdog stops it after 10 s.
    std::mutex m;
    std::condition_variable cv;
    bool returned = false;
    std::atomic<bool> stopped{false};
    std::thread watchdog([&] {
        std::unique_lock lock(m);
        if (!cv.wait_for(lock, 10s, [&] { return returned; })) {
            stopped = true;
            ctx.stop();
        }
    });
    ctx.run();
    {
        std::lock_guard lock(m);
        returned = true;
    }
    cv.notify_all();
    watchdog.join();
    CHECK_FALSE(stopped.load());
    CHECK(got == "hello");
    CHECK(ctx.operations_in_flight() == 0);
    ctx.restart();
    // The receive is still armed: what arrives now is read without another submission.
    write_all(sp.b, "again\n");
    auto again = [](channel& c) -> task<std::string> {
        co_return std::string(co_await c.read_until("\n"));
    };
    CHECK(test::run_with_deadline(ctx, again(ch)) == "again");
    if (ctx.options().receive == receive_mode::readiness) {
        // The poll stays armed too: each read's bytes come with one recv of its own.
        CHECK(ch.stats().receive_submissions == 0);
        CHECK(ch.stats().direct_receives == 2);
    } else if (ctx.options().receive == receive_mode::completion) {
        // A kernel before 6.0: the rejected multishot recv, then one receive per read.
        CHECK(ch.stats().receive_submissions == (ctx.multishot_receives() ? 1 : 3));
    }
}

TEST_CASE("a linger on the multishot recv keeps run() going; the context can end it early") {
    for (bool destroy_early : {false, true}) {
        CAPTURE(destroy_early);
        test::socket_pair sp;
        std::chrono::steady_clock::duration ran{};
        {
            io_context ctx(test::context_options());
            {
                channel_options options;
                options.linger = destroy_early ? std::chrono::milliseconds(10'000) : 50ms;
                channel ch = make_channel(ctx, sp.release_a(), options);
                write_all(sp.b, "hello\n");
                auto handler = [](channel& c) -> task<void> {
                    CHECK(co_await c.read_until("\n") == "hello"); // arms the multishot recv
                    c.push("bye");
                    co_await c.close_when_done(); // sent, write side shut down
                };
                test::run_with_deadline(ctx, handler(ch));
            } // the handle goes: the channel lingers, its multishot recv discarding input
            write_all(sp.b, "ignored");
            if (!destroy_early) {
                // The peer never closes: run() returns when the linger is over, not before.
                const auto start = std::chrono::steady_clock::now();
                ctx.run();
                ran = std::chrono::steady_clock::now() - start;
            }
        } // ~io_context: cancels a linger still in progress and frees the channel
        if (!destroy_early) {
            CHECK(ran >= 45ms); // the linger started just before `start`
        }
        char buf[16];
        CHECK(::recv(sp.b, buf, sizeof buf, 0) == 3); // "bye"
        CHECK(::recv(sp.b, buf, sizeof buf, 0) == 0); // then the shutdown's EOF
    }
}

TEST_CASE("a read whose own receive returns as its channel is dropped fails; the linger ends") {
    // A read with a receive of its own in flight (after a stream, the hint is large) gets a
    // few bytes in the same batch in which another coroutine drops the shut-down channel.
    // It must fail with errc::closed rather than receive again (it used to arm a multishot
    // recv next to the linger's receive, and the core was freed with one still in flight).
    test::socket_pair tp;
    test::socket_pair op;
    io_context ctx(test::completion_options()); // counts the multishot recv's submissions
    channel_options options;
    options.linger = 50ms;
    auto target = std::make_unique<channel>(make_channel(ctx, tp.release_a(), options));
    channel other = make_channel(ctx, op.release_a());
    auto skip_reader = [](channel* ch, std::string* out) -> task<void> {
        try {
            co_await ch->skip(10);
            *out = "skipped";
        } catch (const std::system_error& e) {
            *out = e.code() == errc::closed ? "closed" : e.what();
        }
    };
    auto dropper = [](channel& o, std::unique_ptr<channel>& t) -> task<void> {
        co_await o.read_until("\n");
        t.reset(); // in the batch that also brings the skip's bytes
    };
    auto steps = [](io_context& x, std::unique_ptr<channel>& t, channel& o, int tpeer,
                    int opeer, auto skipper, auto drop) -> task<std::string> {
        std::string result;
        co_await t->shutdown_send();
        write_all(tpeer, std::string(4096, 's'));
        co_await t->skip(4096); // a whole shared buffer: the receive hint grows past it
        spawn(x, skipper(t.get(), &result));
        // The skip ends the multishot recv (the hint says stream) and submits its own.
        while (t->stats().receive_submissions < 2) {
            co_await sleep_for(x, 0ns);
        }
        co_await sleep_for(x, 0ns); // ... which is in the kernel now
        spawn(x, drop(o, t));
        co_await sleep_for(x, 0ns); // and so is the other channel's
        // Both arrive in one batch, the dropper's first (it was written first).
        write_all(opeer, "go\n");
        write_all(tpeer, "12345");
        while (result.empty()) {
            co_await sleep_for(x, 0ns);
        }
        // The linger discards what comes and ends after 50 ms; then the descriptor is closed
        // for good (no receive left holding the socket) and sends to it fail.
        while (::send(tpeer, "x", 1, MSG_NOSIGNAL) == 1) {
            co_await sleep_for(x, 1ms);
        }
        co_return result;
    };
    CHECK(test::run_with_deadline(ctx, steps(ctx, target, other, tp.b, op.b, skip_reader,
                                             dropper)) == "closed");
}

TEST_CASE("a channel waiting with nothing buffered holds no receive buffer of its own") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    write_all(sp.b, "ECHO 3\nabc");
    auto reader = [](channel& c, int peer) -> task<std::size_t> {
        CHECK(co_await c.read_until("\n") == "ECHO 3");
        CHECK(co_await c.read_exact(3) == "abc");
        // The bytes came in a shared buffer and were handed out without a copy.
        CHECK(c.input_capacity() == 0);
        write_all(peer, "next\n");
        CHECK(co_await c.read_until("\n") == "next");
        co_return c.input_capacity();
    };
    CHECK(test::run_with_deadline(ctx, reader(ch, sp.b)) == 0);
}

TEST_CASE("when every shared receive buffer is taken, reads fall back to the channel's own") {
    io_context_options options = test::context_options();
    options.receive_buffers = 1; // one buffer for the whole context
    io_context ctx(options);
    test::socket_pair first;
    test::socket_pair second;
    channel a = make_channel(ctx, first.release_a());
    channel b = make_channel(ctx, second.release_a());
    write_all(first.b, "held\nrest");
    write_all(second.b, "from b\n");
    auto reader = [](channel& x, channel& y) -> task<std::string> {
        // a's frame is a view into the only shared buffer, kept until a's next read.
        std::string_view held = co_await x.read_until("\n");
        std::string from_b(co_await y.read_until("\n"));
        co_return std::string(held) + "|" + from_b;
    };
    CHECK(test::run_with_deadline(ctx, reader(a, b)) == "held|from b");
    CHECK(a.buffered() == "rest");
}

TEST_CASE("read deadlines on the timer wheel: short ones fire, answered reads complete") {
    io_context ctx(test::context_options());
    constexpr int count = 40;
    channel_fleet fleet(ctx, count);
    auto& pairs = fleet.pairs;
    auto& channels = fleet.channels;
    // Odd channels get their frame; even ones never do and must time out.
    for (int i = 1; i < count; i += 2) {
        write_all(pairs[i]->b, "frame\n");
    }
    struct tally {
        int timed_out = 0;
        int answered = 0;
    } result;
    auto one = [](channel& ch, int index, tally& t) -> task<void> {
        try {
            auto frame = co_await ch.read_until("\n").with_timeout(
                std::chrono::milliseconds(index % 2 == 0 ? 30 : 10'000));
            t.answered += frame == "frame" ? 1 : 0;
        } catch (const std::system_error& e) {
            CHECK(e.code() == errc::timed_out);
            ++t.timed_out;
        }
    };
    auto all = [](std::vector<channel>& chans, tally& t, decltype(one) f) -> task<void> {
        for (int i = 0; i < count; ++i) {
            spawn(chans[i].context(), f(chans[i], i, t));
        }
        while (t.timed_out + t.answered < count) {
            co_await sleep_for(chans[0].context(), std::chrono::milliseconds(5));
        }
    };
    test::run_with_deadline(ctx, all(channels, result, one));
    CHECK(result.timed_out == count / 2);
    CHECK(result.answered == count / 2);
}

TEST_CASE("a read deadline longer than one turn of the wheel fires, and not early") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    const auto timeout = std::chrono::milliseconds(2700); // the wheel spans 2.56 s
    auto reader = [](channel& c, std::chrono::milliseconds limit) -> task<bool> {
        try {
            co_await c.read_some().with_timeout(limit);
        } catch (const std::system_error& e) {
            co_return e.code() == errc::timed_out;
        }
        co_return false;
    };
    const auto start = std::chrono::steady_clock::now();
    CHECK(test::run_with_deadline(ctx, reader(ch, timeout)));
    const auto took = std::chrono::steady_clock::now() - start;
    CHECK(took >= timeout);
    // Not a speed limit: a deadline parked in the wrong slot fires a whole turn (2.56 s) late.
    CHECK(took < timeout + std::chrono::milliseconds(2000));
}

TEST_CASE("a read waiting with a long deadline does not wake the loop every 10 ms") {
    io_context ctx(test::context_options());
    test::socket_pair sp;
    channel ch = make_channel(ctx, sp.release_a());
    auto reader = [](channel& c) -> task<std::string> {
        co_return std::string(co_await c.read_until("\n").with_timeout(std::chrono::seconds(30)));
    };
    auto peer = [](io_context& x, int fd) -> task<void> {
        co_await sleep_for(x, std::chrono::milliseconds(300)); // a kernel timeout, not the wheel
        write_all(fd, "late\n");
    };
    auto both = [](io_context& x, channel& c, int fd, decltype(reader) r,
                   decltype(peer) p) -> task<std::string> {
        spawn(x, p(x, fd));
        co_return co_await r(c);
    };
    CHECK(test::run_with_deadline(ctx, both(ctx, ch, sp.b, reader, peer)) == "late");
    if (ctx.setup_description().find("ticking") == std::string::npos) {
        // The deadline's slot is 1.84 s ahead (30 s is past one turn): nothing in 300 ms.
        CHECK(ctx.wheel_wakeups() == 0);
    } else {
        CHECK(ctx.wheel_wakeups() > 0); // a kernel before 5.11: every 10 ms
    }
}

TEST_CASE("a short read deadline set while the wheel sleeps toward a later one fires first") {
    io_context ctx(test::context_options());
    channel_fleet fleet(ctx, 2);
    channel& slow = fleet.channels[0];
    channel& quick = fleet.channels[1];
    const int slow_peer = fleet.pairs[0]->b;
    struct outcome {
        bool quick_timed_out = false;
        bool slow_done = false;
        std::string slow_frame;
    } got;
    auto slow_read = [](channel& c, outcome& o) -> task<void> {
        // 2 s: the wheel's timeout is armed for 2 s ahead once this read waits.
        try {
            o.slow_frame = co_await c.read_until("\n").with_timeout(std::chrono::seconds(2));
        } catch (const std::system_error& e) {
            o.slow_frame = e.what();
        }
        o.slow_done = true;
    };
    auto body = [](channel& s, channel& q, int s_peer, outcome& o,
                   decltype(slow_read) sr) -> task<void> {
        spawn(s.context(), sr(s, o)); // runs until its read waits
        try {
            co_await q.read_until("\n").with_timeout(std::chrono::milliseconds(50));
        } catch (const std::system_error& e) {
            CHECK(e.code() == errc::timed_out);
            o.quick_timed_out = true;
        }
        // Had the wheel kept sleeping toward the 2 s deadline, both would have expired in
        // the same slot: the slow read would have failed too instead of getting this.
        write_all(s_peer, "in time\n");
        while (!o.slow_done) {
            co_await sleep_for(s.context(), std::chrono::milliseconds(1));
        }
    };
    test::run_with_deadline(ctx, body(slow, quick, slow_peer, got, slow_read));
    CHECK(got.quick_timed_out);
    CHECK(got.slow_frame == "in time");
}
