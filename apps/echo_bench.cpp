// echo_bench: a load generator for echo servers, built on ringchat. See the usage text below.

#include "cli.hpp"
#include "echo_protocol.hpp"

#include <ringchat/ringchat.hpp>

#include <fmt/core.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <fcntl.h>
#include <sys/resource.h>
#include <unistd.h>

using namespace ringchat;

// ---- allocation counting: every operator new of the process goes through here, so the
// report can say how many heap allocations one round trip cost in steady state (the
// library's promise is none). One relaxed increment, and only when something allocates.

namespace {
std::atomic<std::uint64_t> allocations{0};
} // namespace

void* operator new(std::size_t size) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    if (void* p = std::malloc(size == 0 ? 1 : size)) {
        return p;
    }
    throw std::bad_alloc();
}

void* operator new(std::size_t size, std::align_val_t alignment) {
    allocations.fetch_add(1, std::memory_order_relaxed);
    auto align = static_cast<std::size_t>(alignment);
    std::size_t rounded = (std::max<std::size_t>(size, 1) + align - 1) / align * align;
    if (void* p = std::aligned_alloc(align, rounded)) {
        return p;
    }
    throw std::bad_alloc();
}

void operator delete(void* p) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::align_val_t) noexcept {
    std::free(p);
}
void operator delete(void* p, std::size_t, std::align_val_t) noexcept {
    std::free(p);
}

namespace {

const char* const usage =
    "usage: echo_bench --port N [--host ADDR] [--conns N] [--size BYTES] [--seconds S]\n"
    "                  [--warmup S] [--pipeline K] [--mode raw|echo|connect] [--reconnect]\n"
    "                  [--threads T] [--timeout S] [--server-pid PID] [--json]\n"
    "  Drives an echo server with round trips: each connection sends a request, waits for the\n"
    "  whole reply and checks every byte (a sequence number in the first 8 payload bytes\n"
    "  catches replies to the wrong request). Counts what completes in a window of --seconds\n"
    "  (default 5) that starts --warmup seconds (default 1) after all connections are up.\n"
    "  --conns N        connections (default 1), split among --threads io_contexts\n"
    "  --size BYTES     payload per request (default 64; K, M, G suffixes)\n"
    "  --pipeline K     requests in flight per connection (default 1)\n"
    "  --mode raw       send the payload, read as many bytes back (echo_server --raw)\n"
    "  --mode echo      send \"ECHO <size>\\n\" + payload (echo_server --keep-alive); default\n"
    "  --mode connect   the seed's mode: one ECHO per connection, then both sides close;\n"
    "                   reports connections/s (same as --mode echo --reconnect)\n"
    "  --reconnect      one request per connection (with --mode raw: for raw servers)\n"
    "  --timeout S      how long the end of the run waits for replies in flight (default 10)\n"
    "  --server-pid PID also report that process's CPU time (utime+stime from\n"
    "                   /proc/PID/stat) over the window, per round trip\n"
    "  --json           print one JSON object instead of the text report\n"
    "  Exit status: 0 all good, 1 a reply was wrong, 2 other errors (refused, reset, stalled),\n"
    "  64 bad usage.\n";

enum class bench_mode { raw, echo };

struct options {
    std::string host = "127.0.0.1";
    int port = -1;
    std::size_t conns = 1;
    std::size_t size = 64;
    std::size_t pipeline = 1;
    bench_mode mode = bench_mode::echo;
    bool reconnect = false;
    unsigned threads = 1;
    double seconds = 5;
    double warmup = 1;
    double timeout = 10;
    int server_pid = 0;
    bool json = false;
};

// Replies longer than this are read and checked in pieces of this size, so a 256 MiB
// request needs neither a 256 MiB receive buffer nor a copy in the send queue.
constexpr std::size_t chunk_size = std::size_t{1} << 20;

std::int64_t now_ns() noexcept {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(
               std::chrono::steady_clock::now().time_since_epoch())
        .count();
}

/// Log-linear latency histogram in nanoseconds: exact below 128 ns, then 64 buckets per
/// power of two (under 1.6% error) up to 2^47 ns. Fixed size, so recording never allocates.
class latency_histogram {
public:
    void record(std::uint64_t ns) noexcept {
        ++counts_[index(ns)];
        ++total_;
        sum_ += ns;
        max_ = std::max(max_, ns);
    }

    void merge(const latency_histogram& other) noexcept {
        for (std::size_t i = 0; i < buckets; ++i) {
            counts_[i] += other.counts_[i];
        }
        total_ += other.total_;
        sum_ += other.sum_;
        max_ = std::max(max_, other.max_);
    }

    /// The value below which a fraction `q` of the samples lie (bucket midpoint), in ns.
    [[nodiscard]] double percentile(double q) const noexcept {
        if (total_ == 0) {
            return 0;
        }
        auto rank = static_cast<std::uint64_t>(q * static_cast<double>(total_));
        rank = std::clamp<std::uint64_t>(rank, 1, total_);
        std::uint64_t seen = 0;
        for (std::size_t i = 0; i < buckets; ++i) {
            seen += counts_[i];
            if (seen >= rank) {
                return std::min(midpoint(i), static_cast<double>(max_));
            }
        }
        return static_cast<double>(max_);
    }
    [[nodiscard]] double mean() const noexcept {
        return total_ == 0 ? 0 : static_cast<double>(sum_) / static_cast<double>(total_);
    }
    [[nodiscard]] std::uint64_t max() const noexcept { return max_; }

private:
    static constexpr unsigned sub_bits = 6;
    static constexpr std::uint64_t exact_below = std::uint64_t{2} << sub_bits;
    static constexpr unsigned octaves = 40;
    static constexpr std::size_t buckets = exact_below + octaves * (std::size_t{1} << sub_bits);

    static std::size_t index(std::uint64_t v) noexcept {
        if (v < exact_below) {
            return static_cast<std::size_t>(v);
        }
        unsigned exponent = static_cast<unsigned>(std::bit_width(v)) - 1; // >= sub_bits + 1
        unsigned shift = exponent - sub_bits;
        std::size_t i = exact_below + (exponent - sub_bits - 1) * (std::size_t{1} << sub_bits) +
                        static_cast<std::size_t>((v >> shift) - (std::uint64_t{1} << sub_bits));
        return std::min(i, buckets - 1);
    }
    static double midpoint(std::size_t i) noexcept {
        if (i < exact_below) {
            return static_cast<double>(i);
        }
        std::size_t j = i - exact_below;
        unsigned shift = static_cast<unsigned>(j >> sub_bits) + 1;
        std::uint64_t top = (std::uint64_t{1} << sub_bits) + (j & ((1u << sub_bits) - 1));
        return static_cast<double>(top << shift) +
               static_cast<double>((std::uint64_t{1} << shift) - 1) / 2;
    }

    std::array<std::uint64_t, buckets> counts_{};
    std::uint64_t total_ = 0;
    std::uint64_t sum_ = 0;
    std::uint64_t max_ = 0;
};

/// What every thread shares: the options, the request template and the measuring window.
struct shared_state {
    const options* opts = nullptr;
    address server;
    std::string wire;            // one request: "ECHO <size>\n" in echo mode, then the payload
    std::size_t header_size = 0; // bytes of wire before the payload
    bool stamped = false;        // the first 8 payload bytes carry a sequence number
    std::atomic<std::int64_t> window_start{INT64_MAX};
    std::atomic<std::int64_t> window_end{INT64_MAX};
    std::atomic<std::size_t> ready{0}; // connections set up (or failed to)
    std::atomic<unsigned> errors_printed{0};

    [[nodiscard]] std::string_view payload() const noexcept {
        return std::string_view(wire).substr(header_size);
    }
};

/// One thread: its io_context, its connections and their counters (touched by that thread
/// only until it has finished).
struct worker {
    shared_state* shared = nullptr;
    std::size_t first_id = 0;
    std::size_t count = 0;
    std::string wire; // this thread's copy of the request, restamped before each push

    std::uint64_t messages = 0; // round trips completed inside the window
    std::uint64_t bytes = 0;    // reply bytes received inside the window
    std::uint64_t errors = 0;
    std::uint64_t mismatches = 0;
    std::size_t active = 0;  // connection tasks still running
    std::size_t stalled = 0; // tasks still running when the context had to be stopped
    latency_histogram latency;

    std::atomic<io_context*> ctx{nullptr};
    std::atomic<bool> finished{false};
    std::atomic<bool> released{false};
    std::thread thread;
};

void report_error(worker& w, std::size_t id, std::string_view what) {
    if (w.shared->errors_printed.fetch_add(1, std::memory_order_relaxed) < 5) {
        fmt::print(stderr, "echo_bench: connection {}: {}\n", id, what);
    }
}

// Hands a long request out as views of the shared template, so it is not copied into the
// send queue. The template outlives every connection.
class view_producer {
public:
    explicit view_producer(std::string_view data) noexcept : data_(data) {}
    std::string_view more() noexcept {
        std::string_view piece = data_.substr(0, chunk_size);
        data_.remove_prefix(piece.size());
        return piece;
    }

private:
    std::string_view data_;
};

// The requests of one connection: pushes them (stamped with a sequence number unique to
// the connection), remembers when each was pushed, and checks the replies in order.
class request_log {
public:
    request_log(worker& w, std::size_t id, std::size_t depth)
        : w_(w), shared_(*w.shared), sent_at_(depth),
          stamp_base_(static_cast<std::uint64_t>(id) << 40) {}

    void send(channel& ch) {
        if (shared_.wire.size() > chunk_size) {
            ch.push(view_producer(shared_.wire));
        } else {
            if (shared_.stamped) {
                std::uint64_t stamp = stamp_base_ + sent_;
                std::memcpy(w_.wire.data() + shared_.header_size, &stamp, sizeof stamp);
            }
            ch.push(std::string_view(w_.wire)); // copied into a recycled queue slot
        }
        sent_at_[sent_ % sent_at_.size()] = now_ns();
        ++sent_;
    }

    [[nodiscard]] bool outstanding() const noexcept { return received_ < sent_; }

    /// Checks `piece`, the reply bytes at `offset` of the oldest outstanding request. On a
    /// mismatch, says where.
    [[nodiscard]] std::optional<std::string> check(std::string_view piece,
                                                   std::size_t offset) const {
        std::string_view expected = shared_.payload().substr(offset, piece.size());
        std::size_t from = 0;
        if (offset == 0 && shared_.stamped) {
            std::uint64_t stamp = stamp_base_ + received_;
            from = std::min(sizeof stamp, piece.size()); // a partial reply may be shorter
            if (std::memcmp(piece.data(), &stamp, from) != 0) {
                return fmt::format("reply {} does not start with its request's sequence number",
                                   received_);
            }
        }
        if (piece.substr(from) == expected.substr(from)) {
            return std::nullopt;
        }
        auto [got, want] =
            std::mismatch(piece.begin() + static_cast<std::ptrdiff_t>(from), piece.end(),
                          expected.begin() + static_cast<std::ptrdiff_t>(from));
        return fmt::format("reply {} differs from the request at payload byte {}", received_,
                           offset + static_cast<std::size_t>(got - piece.begin()));
    }

    /// The oldest outstanding reply is complete at `now`: yields its round-trip time.
    std::int64_t complete(std::int64_t now) noexcept {
        std::int64_t rtt = now - sent_at_[received_ % sent_at_.size()];
        ++received_;
        return rtt;
    }

private:
    worker& w_;
    const shared_state& shared_;
    std::vector<std::int64_t> sent_at_;
    std::uint64_t stamp_base_;
    std::uint64_t sent_ = 0;
    std::uint64_t received_ = 0;
};

// Counts a connection task as running for as long as its frame lives.
struct active_guard {
    worker* w;
    explicit active_guard(worker* owner) noexcept : w(owner) { ++w->active; }
    ~active_guard() { --w->active; }
    active_guard(const active_guard&) = delete;
    active_guard& operator=(const active_guard&) = delete;
};

bool in_window(const shared_state& s, std::int64_t t) noexcept {
    return t >= s.window_start.load(std::memory_order_relaxed) &&
           t < s.window_end.load(std::memory_order_relaxed);
}

// One connection task. Steady mode: one long-lived connection keeping `pipeline` requests
// in flight until the window ends, then collecting the replies still due. Reconnect mode
// (the seed's): connect, one request, read the reply, half-close, wait for the server to
// close too, again and again until the window ends; a round trip is then the whole cycle.
// Everything a round trip needs is in this frame or preallocated, so steady mode allocates
// nothing per message (a helper coroutine per reply would allocate its frame).
task<void> run_connection(worker* w, std::size_t id) {
    active_guard guard(w);
    shared_state& s = *w->shared;
    const options& o = *s.opts;
    io_context& ctx = *w->ctx.load(std::memory_order_relaxed);
    request_log log(*w, id, o.pipeline);
    std::vector<char> reply(std::min(o.size, chunk_size));
    bool counted_ready = false;
    std::size_t offset = 0; // of the reply piece being read
    do {
        std::int64_t started = now_ns();
        std::optional<channel> ch;
        try {
            ch.emplace(co_await connect(ctx, s.server));
        } catch (const std::exception& e) {
            ++w->errors;
            report_error(*w, id, e.what());
        }
        if (!counted_ready) {
            s.ready.fetch_add(1);
            counted_ready = true;
        }
        if (!ch) {
            co_return;
        }
        try {
            for (std::size_t i = 0; i < o.pipeline; ++i) {
                log.send(*ch);
            }
            bool stopping = false;
            while (log.outstanding()) {
                // The reply to the oldest request, a piece at a time when it is long.
                std::int64_t now = 0;
                for (offset = 0; offset < o.size;) {
                    std::size_t n = std::min(reply.size(), o.size - offset);
                    std::string_view piece =
                        co_await ch->read_exact(std::span<char>(reply.data(), n));
                    now = now_ns();
                    if (auto wrong = log.check(piece, offset)) {
                        ++w->mismatches;
                        report_error(*w, id, *wrong);
                        co_return;
                    }
                    if (in_window(s, now)) {
                        w->bytes += n;
                    }
                    offset += n;
                }
                std::int64_t rtt = log.complete(now);
                if (o.reconnect) {
                    break;
                }
                if (in_window(s, now)) {
                    ++w->messages;
                    w->latency.record(static_cast<std::uint64_t>(rtt));
                }
                stopping = stopping || now >= s.window_end.load(std::memory_order_relaxed);
                if (!stopping) {
                    log.send(*ch);
                }
            }
            if (o.reconnect) {
                co_await ch->shutdown_send();
                std::string_view extra = co_await ch->read_some();
                if (!extra.empty()) {
                    ++w->mismatches;
                    report_error(*w, id, fmt::format("{} bytes after the reply", extra.size()));
                    co_return;
                }
                ch->close(); // both sides are shut down: release the descriptor now
                std::int64_t now = now_ns();
                if (in_window(s, now)) {
                    ++w->messages;
                    w->latency.record(static_cast<std::uint64_t>(now - started));
                }
            }
        } catch (const incomplete_read_error& e) {
            // The server closed mid-reply: a wrong reply if what did arrive (put back into
            // the channel) differs, e.g. an "ERROR ..." line.
            std::string_view partial = ch->buffered().substr(0, e.received());
            if (auto wrong = log.check(partial, offset)) {
                ++w->mismatches;
                report_error(*w, id,
                             *wrong + fmt::format(": got {}, then EOF", echo::preview(partial)));
            } else {
                ++w->errors;
                report_error(*w, id, e.what());
            }
            co_return;
        } catch (const std::exception& e) {
            ++w->errors;
            report_error(*w, id, e.what());
            co_return;
        }
        // In steady mode, destroying the channel shuts the connection down gracefully in
        // the background.
    } while (o.reconnect && now_ns() < s.window_end.load(std::memory_order_relaxed));
}

void run_worker(worker* w) {
    const options& o = *w->shared->opts;
    std::optional<io_context> ctx;
    try {
        // Room for a send and a receive per connection in one batch without extra submits.
        unsigned entries = static_cast<unsigned>(
            std::clamp<std::size_t>(std::bit_ceil(2 * w->count * o.pipeline), 256, 4096));
        ctx.emplace(io_context_options{.sq_entries = entries});
    } catch (const std::exception& e) {
        fmt::print(stderr, "echo_bench: {}\n", e.what());
        w->errors += w->count;
        w->shared->ready.fetch_add(w->count);
        w->finished = true;
        return;
    }
    w->ctx.store(&*ctx);
    for (std::size_t i = 0; i < w->count; ++i) {
        std::size_t id = w->first_id + i;
        spawn(*ctx, run_connection(w, id));
    }
    ctx->run();
    w->stalled = w->active;
    w->finished = true;
    // Keep the context alive until the main thread no longer may call stop() on it.
    w->released.wait(false);
    w->ctx.store(nullptr);
}

double seconds_value(cli::args& a) {
    std::string name(a.current());
    std::string text(a.value());
    char* end = nullptr;
    double v = std::strtod(text.c_str(), &end);
    if (end == text.c_str() || *end != '\0' || !(v >= 0) || v > 1e6) {
        a.fail(name + " needs a number of seconds, not \"" + text + "\"");
    }
    return v;
}

options parse(int argc, char** argv) {
    options o;
    cli::args a(argc, argv, usage);
    while (a.next()) {
        if (a.is("--host")) {
            o.host = a.value();
        } else if (a.is("--port")) {
            o.port = a.port_value(false);
        } else if (a.is("--conns")) {
            o.conns = a.size_value();
        } else if (a.is("--size")) {
            o.size = a.size_value();
        } else if (a.is("--pipeline")) {
            o.pipeline = a.size_value();
        } else if (a.is("--mode")) {
            std::string_view m = a.value();
            if (m == "raw") {
                o.mode = bench_mode::raw;
            } else if (m == "echo") {
                o.mode = bench_mode::echo;
            } else if (m == "connect") {
                o.mode = bench_mode::echo;
                o.reconnect = true;
            } else {
                a.fail("--mode must be raw, echo or connect");
            }
        } else if (a.is("--reconnect")) {
            o.reconnect = true;
        } else if (a.is("--threads")) {
            o.threads = static_cast<unsigned>(std::clamp<std::size_t>(a.size_value(), 1, 256));
        } else if (a.is("--seconds")) {
            o.seconds = seconds_value(a);
        } else if (a.is("--warmup")) {
            o.warmup = seconds_value(a);
        } else if (a.is("--timeout")) {
            o.timeout = seconds_value(a);
        } else if (a.is("--server-pid")) {
            o.server_pid = static_cast<int>(std::min<std::size_t>(a.size_value(), INT32_MAX));
        } else if (a.is("--json")) {
            o.json = true;
        } else if (a.is("-h") || a.is("--help")) {
            a.help();
        } else {
            a.unknown();
        }
    }
    if (o.port < 0) {
        a.fail("--port is required");
    }
    if (o.conns == 0 || o.size == 0 || o.pipeline == 0) {
        a.fail("--conns, --size and --pipeline must be at least 1");
    }
    if (o.seconds <= 0) {
        a.fail("--seconds must be above 0");
    }
    if (o.reconnect && o.pipeline != 1) {
        a.fail("--pipeline needs a long-lived connection: not with --reconnect or --mode connect");
    }
    if (o.size > chunk_size && o.pipeline != 1) {
        a.fail("requests above 1 MiB are not pipelined");
    }
    o.threads = static_cast<unsigned>(std::min<std::size_t>(o.threads, o.conns));
    return o;
}

double self_cpu_seconds() {
    rusage ru{};
    getrusage(RUSAGE_SELF, &ru);
    auto seconds = [](const timeval& tv) {
        return static_cast<double>(tv.tv_sec) + static_cast<double>(tv.tv_usec) / 1e6;
    };
    return seconds(ru.ru_utime) + seconds(ru.ru_stime);
}

// CPU time of a process (all its threads) from /proc/PID/stat, in seconds: utime (user
// space) and stime (kernel). The kernel splits them by sampling at each clock tick, so the
// split is statistical; the sum is exact to a tick.
struct cpu_times {
    double user = 0;
    double system = 0;
    [[nodiscard]] double total() const { return user + system; }
};

std::optional<cpu_times> process_cpu_seconds(int pid) {
    char path[64];
    std::snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = ::open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return std::nullopt;
    }
    char text[2048];
    ssize_t n = ::read(fd, text, sizeof text - 1);
    ::close(fd);
    if (n <= 0) {
        return std::nullopt;
    }
    text[n] = '\0';
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    const char* p = std::strrchr(text, ')');
    if (p == nullptr) {
        return std::nullopt;
    }
    unsigned long long ticks[2] = {0, 0};
    // Fields after ')' start with field 3 (state); utime and stime are fields 14 and 15.
    for (int field = 3; field <= 15 && p != nullptr; ++field) {
        p = std::strchr(p + 1, ' ');
        if (p != nullptr && field >= 14) {
            ticks[field - 14] = std::strtoull(p + 1, nullptr, 10);
        }
    }
    if (p == nullptr) {
        return std::nullopt;
    }
    const auto hz = static_cast<double>(sysconf(_SC_CLK_TCK));
    return cpu_times{static_cast<double>(ticks[0]) / hz, static_cast<double>(ticks[1]) / hz};
}

std::string json_number(std::optional<double> v) {
    return v ? fmt::format("{:.6g}", *v) : std::string("null");
}

} // namespace

int main(int argc, char** argv) {
    options o = parse(argc, argv);
    shared_state s;
    s.opts = &o;
    try {
        s.server = address::from_host_port(o.host, static_cast<std::uint16_t>(o.port));
    } catch (const std::exception& e) {
        std::fprintf(stderr, "echo_bench: %s\n", e.what());
        return 64;
    }
    if (o.mode == bench_mode::echo) {
        s.wire = echo::echo_command(o.size);
    }
    s.header_size = s.wire.size();
    s.wire += echo::make_message(o.size);
    s.stamped = o.size >= sizeof(std::uint64_t) && s.wire.size() <= chunk_size;

    std::vector<std::unique_ptr<worker>> workers;
    for (unsigned i = 0, first = 0; i < o.threads; ++i) {
        auto w = std::make_unique<worker>();
        w->shared = &s;
        w->first_id = first;
        w->count = o.conns / o.threads + (i < o.conns % o.threads ? 1 : 0);
        w->wire = s.wire;
        first += static_cast<unsigned>(w->count);
        workers.push_back(std::move(w));
    }
    for (auto& w : workers) {
        w->thread = std::thread(run_worker, w.get());
    }

    using std::chrono::nanoseconds;
    auto sleep_until_ns = [](std::int64_t t) {
        std::this_thread::sleep_until(std::chrono::steady_clock::time_point(nanoseconds(t)));
    };
    // The window opens once every connection is up (or failed), after the warm-up.
    std::int64_t setup_deadline = now_ns() + 30'000'000'000LL;
    while (s.ready.load() < o.conns && now_ns() < setup_deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
    if (s.ready.load() < o.conns) {
        std::fprintf(stderr, "echo_bench: only %zu of %zu connections set up after 30 s\n",
                     s.ready.load(), o.conns);
    }
    auto to_ns = [](double seconds) { return static_cast<std::int64_t>(seconds * 1e9); };
    std::int64_t start = now_ns() + to_ns(o.warmup);
    std::int64_t end = start + to_ns(o.seconds);
    s.window_start.store(start);
    s.window_end.store(end);

    sleep_until_ns(start);
    double self_before = self_cpu_seconds();
    std::uint64_t allocs_before = allocations.load();
    std::optional<cpu_times> server_before;
    if (o.server_pid > 0) {
        server_before = process_cpu_seconds(o.server_pid);
    }
    sleep_until_ns(end);
    double self_after = self_cpu_seconds();
    std::uint64_t allocs_after = allocations.load();
    std::optional<double> server_cpu;
    std::optional<double> server_user; // the user-space part of server_cpu
    if (server_before) {
        if (auto after = process_cpu_seconds(o.server_pid)) {
            server_cpu = after->total() - server_before->total();
            server_user = after->user - server_before->user;
        }
    }

    // Replies still in flight get --timeout to arrive; then the stragglers are stopped.
    std::int64_t finish_deadline = end + to_ns(o.timeout);
    auto all_finished = [&] {
        return std::all_of(workers.begin(), workers.end(),
                           [](auto& w) { return w->finished.load(); });
    };
    while (!all_finished() && now_ns() < finish_deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    for (auto& w : workers) {
        if (!w->finished.load()) {
            if (io_context* ctx = w->ctx.load()) {
                ctx->stop();
            }
        }
    }
    while (!all_finished()) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    for (auto& w : workers) {
        w->released = true;
        w->released.notify_all();
        w->thread.join();
    }

    latency_histogram latency;
    std::uint64_t messages = 0;
    std::uint64_t bytes = 0;
    std::uint64_t errors = 0;
    std::uint64_t mismatches = 0;
    std::uint64_t stalled = 0;
    for (auto& w : workers) {
        latency.merge(w->latency);
        messages += w->messages;
        bytes += w->bytes;
        errors += w->errors;
        mismatches += w->mismatches;
        stalled += w->stalled;
    }
    if (stalled > 0) {
        std::fprintf(stderr,
                     "echo_bench: %llu connection(s) still waiting for replies %.0f s "
                     "after the window\n",
                     static_cast<unsigned long long>(stalled), o.timeout);
    }
    errors += stalled;

    double window = o.seconds;
    double per_s = static_cast<double>(messages) / window;
    double mib_s = static_cast<double>(bytes) / window / (1024.0 * 1024.0);
    double client_cpu = self_after - self_before;
    std::optional<double> client_us, server_us, server_user_us, allocs_per_msg;
    if (messages > 0) {
        client_us = client_cpu * 1e6 / static_cast<double>(messages);
        allocs_per_msg =
            static_cast<double>(allocs_after - allocs_before) / static_cast<double>(messages);
        if (server_cpu) {
            server_us = *server_cpu * 1e6 / static_cast<double>(messages);
            server_user_us = *server_user * 1e6 / static_cast<double>(messages);
        }
    }
    const char* mode_name = o.mode == bench_mode::raw ? "raw" : "echo";
    if (o.json) {
        fmt::print("{{\"mode\":\"{}\",\"reconnect\":{},\"conns\":{},\"size\":{},\"pipeline\":{},"
                   "\"threads\":{},\"window_s\":{},\"warmup_s\":{},\"messages\":{},\"bytes\":{},"
                   "\"msgs_per_s\":{:.6g},\"mib_per_s\":{:.6g},\"lat_p50_us\":{:.6g},"
                   "\"lat_p99_us\":{:.6g},\"lat_p999_us\":{:.6g},\"lat_max_us\":{:.6g},"
                   "\"lat_mean_us\":{:.6g},\"errors\":{},\"wrong_replies\":{},\"stalled\":{},"
                   "\"client_cpu_s\":{:.6g},\"client_cpu_us_per_msg\":{},"
                   "\"client_allocs\":{},\"client_allocs_per_msg\":{},\"server_pid\":{},\"server_"
                   "cpu_s\":{},"
                   "\"server_cpu_us_per_msg\":{},\"server_user_us_per_msg\":{}}}\n",
                   mode_name, o.reconnect, o.conns, o.size, o.pipeline, o.threads, o.seconds,
                   o.warmup, messages, bytes, per_s, mib_s, latency.percentile(0.5) / 1e3,
                   latency.percentile(0.99) / 1e3, latency.percentile(0.999) / 1e3,
                   static_cast<double>(latency.max()) / 1e3, latency.mean() / 1e3, errors,
                   mismatches, stalled, client_cpu, json_number(client_us),
                   allocs_after - allocs_before, json_number(allocs_per_msg),
                   o.server_pid > 0 ? o.server_pid : 0, json_number(server_cpu),
                   json_number(server_us), json_number(server_user_us));
    } else {
        const char* unit = o.reconnect ? "connections" : "round trips";
        fmt::print("echo_bench: {} mode{}, {} connection(s) x {} B, pipeline {}, {} thread(s), "
                   "{:.2f} s window after {:.2f} s warm-up\n",
                   mode_name, o.reconnect ? " (one request per connection)" : "", o.conns, o.size,
                   o.pipeline, o.threads, o.seconds, o.warmup);
        fmt::print("  {:<12} {} ({:.0f}/s), {:.2f} MiB/s of replies\n", unit, messages, per_s,
                   mib_s);
        fmt::print("  {:<12} p50 {:.1f} us  p99 {:.1f} us  p99.9 {:.1f} us  max {:.1f} us\n",
                   "latency", latency.percentile(0.5) / 1e3, latency.percentile(0.99) / 1e3,
                   latency.percentile(0.999) / 1e3, static_cast<double>(latency.max()) / 1e3);
        fmt::print("  {:<12} {} (wrong replies: {})\n", "errors", errors, mismatches);
        fmt::print("  {:<12} {:.3f} s: {} us and {} allocations per {}\n", "client CPU", client_cpu,
                   client_us ? fmt::format("{:.2f}", *client_us) : "-",
                   allocs_per_msg ? fmt::format("{:.3f}", *allocs_per_msg) : "-",
                   o.reconnect ? "connection" : "round trip");
        if (o.server_pid > 0) {
            fmt::print("  {:<12} {}: {} us per {} (pid {}, utime+stime; {} us of it in user "
                       "space)\n",
                       "server CPU",
                       server_cpu ? fmt::format("{:.3f} s", *server_cpu) : "unreadable",
                       server_us ? fmt::format("{:.2f}", *server_us) : "-",
                       o.reconnect ? "connection" : "round trip", o.server_pid,
                       server_user_us ? fmt::format("{:.2f}", *server_user_us) : "-");
        }
    }
    std::fflush(stdout);
    if (mismatches > 0) {
        return 1;
    }
    return errors > 0 ? 2 : 0;
}
