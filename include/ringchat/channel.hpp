#pragma once

#include <ringchat/address.hpp>
#include <ringchat/buffer.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>
#include <ringchat/producer.hpp>
#include <ringchat/socket.hpp>

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>

namespace ringchat {

/// Limits and sizes of one channel.
struct channel_options {
    /// Longest frame read_until accepts (bytes before the terminator). 64 KiB.
    std::size_t max_frame = 64 * 1024;
    /// Largest read_exact(n) and read_to_eof() returned as a view into the input buffer.
    /// read_exact into a caller's span has no limit. 64 MiB.
    std::size_t max_buffer = 64 * 1024 * 1024;
    /// First allocation of the input buffer, and the free space each receive asks for at
    /// least. The buffer is allocated on the first read.
    std::size_t receive_size = 2048;
    /// An empty input buffer larger than this is freed when a read has to wait, so idle
    /// connections do not pin memory after a large frame. Also the most the channel keeps
    /// receiving between reads (into shared buffers, up to 16 of them) before it stops and
    /// leaves the rest to TCP's flow control until the next read.
    std::size_t keep_buffer = 64 * 1024;
    /// Back-pressure: write() waits while more than high_water bytes are queued, until
    /// at most low_water are.
    std::size_t high_water = 1024 * 1024;
    std::size_t low_water = 256 * 1024;
    /// After close_when_done() has sent everything and shut down the write side, input is
    /// read and discarded until the peer closes or this much time has passed, so the peer
    /// receives all of the reply (closing with unread input would make the kernel send a
    /// reset that can destroy it). Then the descriptor is closed.
    std::chrono::milliseconds linger = std::chrono::seconds(2);
    /// When non-zero, every read that has to wait fails with errc::timed_out (consuming
    /// nothing) unless it completes within this time: an idle timeout, counted per read
    /// from when it starts waiting, on the context's 10 ms timer wheel (no system call). A
    /// read's own with_timeout() replaces it for that read. 0: reads wait for ever.
    std::chrono::milliseconds read_timeout{0};
};

/// Counters of one channel, for tests and benchmarks.
struct channel_stats {
    std::uint64_t bytes_received = 0;
    std::uint64_t receives = 0;      ///< receives that brought data or EOF
    /// recv operations submitted for reads; a multishot recv counts once however many
    /// completions it brings.
    std::uint64_t receive_submissions = 0;
    std::uint64_t bytes_sent = 0;
    std::uint64_t sends = 0;         ///< send/sendmsg operations completed
    std::uint64_t bytes_searched = 0; ///< bytes read_until/skip_until examined
    /// bytes sent from the receive buffer they arrived in, without a copy (an echo of what
    /// a read returned; see push())
    std::uint64_t bytes_sent_in_place = 0;
    /// sends made with a send system call at light load rather than through the ring (also
    /// counted in sends; see io_context_options::direct_sends)
    std::uint64_t direct_sends = 0;
    /// receives made with a recv system call when a poll reported input, rather than by the
    /// kernel (also counted in receives; see io_context_options::receive)
    std::uint64_t direct_receives = 0;
};

namespace detail {
struct channel_core;

/// One read on a channel (read_until, read_exact, read_some, read_to_eof, skip,
/// skip_until). It takes received bytes into the channel's input buffer until its condition
/// holds, without resuming the coroutine in between, and consumes bytes only when it
/// succeeds: a read that fails, times out or is cancelled leaves every received byte in the
/// channel for the next read. Bytes come from the channel's multishot receive while traffic
/// is light (one recv stays armed across reads), else from receives the read submits itself
/// (a large frame or a stream: into the buffer, or straight into read_exact's span). When
/// the channel receives by readiness (io_context_options::receive), a multishot poll stays
/// armed instead and the read receives with recv system calls of its own.
class read_awaiter : public completion, public cancellable {
public:
    enum class kind : std::uint8_t { until, exact, exact_into, some, to_eof, skip, skip_until };

    // `ptr` and `count`: see ptr_ and count_ below.
    read_awaiter(channel_core* core, kind k, const char* ptr, std::size_t count) noexcept;
    read_awaiter(const read_awaiter& other) noexcept;
    read_awaiter& operator=(const read_awaiter&) = delete;
    ~read_awaiter();

    bool await_ready();
    bool await_suspend(std::coroutine_handle<> waiter) noexcept;
    /// Cancels the receive in flight, if any (cancel_source, channel::close()).
    void cancel_now() noexcept override;
    void forget_cancel_source() noexcept override { cancel_ = nullptr; }

protected:
    // Throws the failure, if any; otherwise consumes the frame and returns it (a view into
    // the input buffer or the caller's span), or for skips the number of bytes skipped.
    std::string_view finish();
    [[nodiscard]] std::size_t skipped() const noexcept;
    void set_deadline(std::chrono::nanoseconds timeout) noexcept;
    void set_cancel(cancel_source& source) noexcept { cancel_ = &source; }

private:
    friend struct channel_core;
    enum class state : std::uint8_t { pending, done, failed };

    static void complete(completion* self, int res, std::uint32_t flags) noexcept;
    void evaluate() noexcept;
    bool start_receive() noexcept;
    bool finish_start(io_uring_sqe* sqe) noexcept;
    // Space in the channel's own buffer for a receive, as much as the receive hint (or the
    // rest of a read_exact frame) asks; empty, with the read failed, if it cannot grow.
    std::span<char> own_space() noexcept;
    // The channel's multishot receive brought data, EOF or its end (starved: it ended for
    // lack of shared buffers): re-evaluates, and resumes the reader unless it goes on waiting.
    void on_shared(bool starved) noexcept;
    // The input may grow by receiving (the poll said the socket is readable, or on_shared
    // has evaluated what arrived): receives what the read still needs, then resumes the
    // reader unless it goes on waiting. The read's last evaluate() must still hold.
    void on_readable() noexcept;
    [[nodiscard]] bool may_wait_armed() const noexcept;
    // Receiving by readiness: takes what the socket holds with recv system calls while the
    // read still needs bytes and the channel may receive itself (channel_core::may_pull).
    void pull_ready() noexcept;
    // One such recv; false if the read failed before it (no memory).
    bool receive_ready() noexcept;
    void wake() noexcept; // clears the channel's reader and resumes the coroutine
    void wait_on_shared() noexcept; // counts the wait as work; attaches the cancel source
    void uncount_wait() noexcept;
    bool keep_received(cqe_result last) noexcept;
    void fail_receive(int res) noexcept;
    void restore_direct_bytes() noexcept;
    void disarm_deadline() noexcept;
    [[noreturn]] void throw_failure() const;

    [[nodiscard]] std::string_view term() const noexcept { return {ptr_, count_}; }
    // read_exact(span) got ptr_ from a std::span<char>: writing through it is fine.
    [[nodiscard]] char* dest() const noexcept { return const_cast<char*>(ptr_); }

    // What a read is lives here; how far it got lives in the channel (one read at a time),
    // so each co_await of a read costs its coroutine frame only this much.
    channel_core* core_;
    const char* ptr_;    // until, skip_until: the terminator; exact_into: the destination
    std::size_t count_;  // the terminator's length, or the byte count of the read
    cancel_source* cancel_ = nullptr;
    std::coroutine_handle<> waiter_;
    std::chrono::nanoseconds timeout_{};
    int error_ = 0; // -errno, or a negated ringchat::errc value below error_base
    kind kind_;
    state state_ = state::pending;
    bool has_deadline_ = false;
    bool deadline_armed_ = false; // the channel's read deadline is this read's
    bool in_flight_ = false;
    bool cancelled_ = false;
    bool timed_out_ = false; // the deadline passed while a receive was in flight
    bool into_dest_ = false; // exact_into: the receive in flight targets dest
    bool no_shared_buffer_ = false; // the provided buffers ran out: use the channel's own
    bool counted_wait_ = false; // waits on the multishot receive, counted as context work
};

template <typename Derived>
using read_options = awaiter_options<Derived, read_awaiter>;

class [[nodiscard]] read_string_awaiter;

/// A read whose result is a view: into the channel's input buffer (valid until the next
/// read on the channel starts), or into the caller's span for read_exact(span).
class [[nodiscard]] read_view_awaiter : public read_options<read_view_awaiter> {
public:
    using awaiter_options::awaiter_options;
    std::string_view await_resume() { return finish(); }
    /// The same read, yielding an owned std::string instead of a view.
    [[nodiscard]] read_string_awaiter owned() && noexcept;
};

/// A read whose result is copied into a std::string the caller owns.
class [[nodiscard]] read_string_awaiter : public read_options<read_string_awaiter> {
public:
    using awaiter_options::awaiter_options;
    explicit read_string_awaiter(const read_awaiter& base) noexcept : awaiter_options(base) {}
    std::string await_resume() { return std::string(finish()); }
};

inline read_string_awaiter read_view_awaiter::owned() && noexcept {
    return read_string_awaiter{static_cast<const read_awaiter&>(*this)};
}

/// skip and skip_until: yields how many bytes were discarded.
class [[nodiscard]] skip_awaiter : public read_options<skip_awaiter> {
public:
    using awaiter_options::awaiter_options;
    std::size_t await_resume() {
        finish();
        return skipped();
    }
};

/// Waits for the channel's writer: drain (queue empty), write (below the low-water mark, or
/// no wait when below the high-water mark), or shutdown (write side shut down). Rethrows a
/// send failure that happened before or while waiting.
class writer_awaiter {
public:
    /// `queued`: write() queued its bytes below the high-water mark with no send failure
    /// pending, so there is nothing to wait for or rethrow (kept inline: every write of a
    /// request/response loop takes this path).
    enum class kind : std::uint8_t { queued, no_wait, drain, below_low_water, shut_down };
    writer_awaiter(channel_core* core, kind k) noexcept : core_(core), kind_(k) {}
    writer_awaiter(const writer_awaiter&) = delete;
    writer_awaiter& operator=(const writer_awaiter&) = delete;
    ~writer_awaiter() {
        if (kind_ != kind::queued) {
            release();
        }
    }
    bool await_ready() { return kind_ == kind::queued || check_ready(); }
    void await_suspend(std::coroutine_handle<> waiter) noexcept;
    void await_resume() {
        if (kind_ != kind::queued) {
            check_failure();
        }
    }

private:
    void release() noexcept;
    bool check_ready();
    void check_failure();

    friend struct channel_core;
    channel_core* core_;
    std::coroutine_handle<> waiter_;
    kind kind_;
    bool waiting_ = false;
};

} // namespace detail

/// Reads framed messages from a connected stream and queues replies, like asynchat's
/// async_chat: read_until() frames by a terminator, read_exact() by a byte count,
/// read_some() takes what arrives (asynchat's set_terminator(None)); push() queues bytes or
/// producers that one writer sends in order with batched scatter/gather sends.
///
/// Owns the stream, the input buffer and the send queue. One read at a time (a second
/// concurrent read throws std::logic_error) and one coroutine waiting on the writer at a
/// time (a write() below the high-water mark does not wait); io thread only. Move-only.
/// Destroying the channel keeps nothing pushed from being lost: queued output is still
/// sent, then the connection is shut down and closed (after a bounded linger), unless
/// close() aborted it.
class channel {
public:
    /// Takes ownership of the connected stream `s`. Throws std::invalid_argument for an
    /// empty stream or inconsistent options (low_water > high_water, zero sizes).
    explicit channel(stream s, channel_options options = {});
    channel(channel&& other) noexcept : core_(std::exchange(other.core_, nullptr)) {}
    channel& operator=(channel&& other) noexcept;
    channel(const channel&) = delete;
    channel& operator=(const channel&) = delete;
    ~channel();

    // ---- reading: every read throws std::system_error with errc::eof when the peer
    // closed before the first byte of the frame, incomplete_read_error when it closed
    // inside the frame, the errno code of a failed receive (e.g. ECONNRESET), errc::closed
    // after close(), and errc::timed_out / errc::cancelled from with_timeout / cancel_on.
    // None of these consume bytes. Reads are awaited one at a time.

    /// Waits for `term` (any non-empty byte string) and yields the bytes before it; the
    /// terminator is consumed too. The view points into the input buffer and lives until
    /// the next read on this channel starts (`.owned()` yields a std::string instead).
    /// Throws frame_too_large_error when no terminator starts within max_frame bytes; the
    /// bytes stay buffered (see discard(), skip_until()). Never rescans bytes it searched.
    /// `term` must outlive the co_await. Throws std::invalid_argument for an empty term.
    [[nodiscard]] detail::read_view_awaiter read_until(std::string_view term);

    /// Waits for exactly `n` bytes (0 is allowed) and yields them as a view into the input
    /// buffer, valid until the next read starts. Throws frame_too_large_error if `n` is
    /// above max_buffer (nothing is read): use the span overload for large payloads.
    [[nodiscard]] detail::read_view_awaiter read_exact(std::size_t n);

    /// Fills all of `dest` and yields a view of it. Bytes already buffered are copied; the
    /// rest is received straight into `dest` with no intermediate copy. On failure the
    /// bytes that had arrived are put back into the channel, so nothing is consumed.
    /// `dest` must outlive the co_await and must not be touched until it returns.
    [[nodiscard]] detail::read_view_awaiter read_exact(std::span<char> dest);

    /// Yields whatever is buffered (at most `max_bytes`; the rest stays buffered), or waits
    /// for the next receive; an empty view means the peer closed (no exception). View valid
    /// until the next read starts. Throws std::invalid_argument if `max_bytes` is 0.
    [[nodiscard]] detail::read_view_awaiter read_some(std::size_t max_bytes = SIZE_MAX);

    /// Waits until the peer closes and yields everything received (at most max_buffer
    /// bytes, else frame_too_large_error). View valid until the next read starts.
    [[nodiscard]] detail::read_view_awaiter read_to_eof();

    /// Discards the next `n` bytes, buffered or not; yields n. Unlike the reads above, a
    /// skip discards as it goes: after a failure the skipped bytes are gone.
    [[nodiscard]] detail::skip_awaiter skip(std::size_t n);

    /// Discards everything up to and including the next `term`, without buffering it (for
    /// recovering after frame_too_large_error); yields how many bytes were discarded.
    /// Discards as it goes, like skip(). Throws std::invalid_argument for an empty term.
    [[nodiscard]] detail::skip_awaiter skip_until(std::string_view term);

    /// Bytes received but not consumed yet. The view lives until the next read starts.
    /// Bytes that arrived after the last read finished are not in it yet: they wait aside
    /// (so views from that read stay valid) and join the buffer when the next read starts.
    [[nodiscard]] std::string_view buffered() const noexcept;

    /// Discards the first `n` buffered bytes. Throws std::out_of_range if fewer are buffered.
    void discard(std::size_t n);

    // ---- writing: the queue is sent in order by the channel's writer, in batches of up
    // to 16 buffers per sendmsg, started once per event-loop iteration. A send failure
    // (e.g. the peer reset) empties the queue and is rethrown by drain(), write(),
    // shutdown_send() and close_when_done(); later pushes are dropped.

    /// Queues a copy of `bytes` and returns at once (asynchat's push). Throws
    /// std::logic_error after shutdown_send() or close_when_done(), and
    /// std::system_error(errc::closed) after close(); all push overloads do.
    /// Bytes that lie in the shared receive buffer the last read's view points into (an
    /// echo of what was read) are queued where they are instead: the channel keeps that
    /// buffer until they are sent (stats().bytes_sent_in_place counts them as they go). Nothing
    /// changes for the caller; it is a copy saved. It copies anyway when a quarter of the
    /// context's receive buffers are already kept this way, or this channel keeps one for an
    /// earlier push.
    void push(std::string_view bytes);

    /// Queues `bytes`, taking ownership without copying.
    void push(std::string&& bytes);

    /// Queues a copy of the NUL-terminated `bytes` (so that push("literal") is unambiguous).
    void push(const char* bytes) { push(std::string_view(bytes)); }

    /// Queues a producer (asynchat's push_with_producer): the writer calls its more() when
    /// it reaches it and sends each chunk before the next, and before anything pushed
    /// later. An exception from more() fails the writer like a send error.
    template <producer P>
        requires(!std::convertible_to<P, std::string_view>)
    void push(P p) {
        push_producer(std::make_unique<detail::producer_holder_for<P>>(std::move(p)));
    }

    /// Waits until everything queued has been sent.
    [[nodiscard]] detail::writer_awaiter drain();

    /// Queues `bytes` as push() does, then waits while more than high_water bytes are
    /// queued, until at most low_water are: back-pressure against a peer that does not read.
    /// At light load (io_context_options::direct_sends) it also sends what is queued at
    /// once, where push() leaves the send to the loop's next flush so that several pushes
    /// go out in one system call: use push() for pieces of a reply, write() for its end.
    /// Throws std::logic_error if it must wait while another coroutine waits on the writer.
    [[nodiscard]] detail::writer_awaiter write(std::string_view bytes);

    /// Half-close: sends everything queued, then shuts down the write side (the peer reads
    /// EOF) while reading goes on. Waits for the shutdown.
    [[nodiscard]] detail::writer_awaiter shutdown_send();

    /// Sends everything queued, then shuts the connection down and closes it (after the
    /// linger described in channel_options). Takes effect when called: awaiting it waits
    /// until the write side is shut down, but if the caller does not await it (or destroys
    /// the channel right after), the channel still finishes on its own.
    detail::writer_awaiter close_when_done();

    /// Aborts: drops queued output, cancels what is in flight and closes the descriptor now.
    /// Later reads and writes fail with errc::closed.
    void close() noexcept;

    /// Sets channel_options::read_timeout from the next read on (0: reads wait for ever).
    void set_read_timeout(std::chrono::milliseconds timeout);

    /// Bytes allocated for the input buffer now (0 until the first read; see keep_buffer).
    [[nodiscard]] std::size_t input_capacity() const noexcept;
    /// Bytes pushed and not yet sent (producers count only for the chunk being sent).
    [[nodiscard]] std::size_t queued_bytes() const noexcept;
    /// The peer's address as known when the connection was made, for messages (a copy).
    [[nodiscard]] address peer() const noexcept;
    [[nodiscard]] io_context& context() const noexcept;
    [[nodiscard]] int native_handle() const noexcept;
    [[nodiscard]] const channel_stats& stats() const noexcept;
    [[nodiscard]] const channel_options& options() const noexcept;

private:
    void push_producer(std::unique_ptr<detail::producer_holder> p);
    detail::channel_core& core() const;

    detail::channel_core* core_ = nullptr;
};

} // namespace ringchat
