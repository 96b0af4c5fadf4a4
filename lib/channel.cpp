#include <ringchat/channel.hpp>
#include <ringchat/error.hpp>
#include <ringchat/log.hpp>

#include "provided_buffers.hpp"

#include <fmt/core.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <new>
#include <stdexcept>
#include <vector>

#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>

namespace ringchat {

simple_producer::simple_producer(std::string data, std::size_t chunk_size)
    : data_(std::move(data)), chunk_size_(chunk_size) {
    if (chunk_size == 0) {
        throw std::invalid_argument("simple_producer: chunk size must be at least 1");
    }
}

std::string_view simple_producer::more() noexcept {
    std::size_t n = std::min(chunk_size_, data_.size() - position_);
    std::string_view chunk(data_.data() + position_, n);
    position_ += n;
    return chunk;
}

namespace detail {

namespace {

constexpr std::size_t max_iovecs = send_scratch::max_iovecs;

// Strings at least this large live on the heap, so moving one (when the queue grows) keeps
// its bytes where an in-flight sendmsg may be reading them. Short strings are stored
// inline by libstdc++ and would move with the string object.
constexpr std::size_t min_entry_capacity = 32;

// At most this many shared receive buffers wait parked in a channel between reads.
constexpr std::uint16_t max_parked = 16;

using deadline_clock = std::chrono::steady_clock; // CLOCK_MONOTONIC

// Where lingering connections put input they discard. Shared: nobody reads it.
char discard_area[16 * 1024];

} // namespace

/// One entry of the send queue: bytes (owned), bytes lent by a shared receive buffer, or a
/// producer and its current chunk. What a lent entry uses comes first: the first 48 bytes,
/// one cache line when the entry starts one (see entry_ring).
struct out_entry {
    int lender = -1; // the shared receive buffer `chunk` lies in (held for this entry), or -1
    std::size_t sent = 0;
    std::unique_ptr<producer_holder> producer;
    std::string_view chunk; // the producer's current chunk, or the lent bytes
    std::size_t chunk_sent = 0;
    std::string data;

    [[nodiscard]] bool is_producer() const noexcept { return producer != nullptr; }
    [[nodiscard]] bool is_lent() const noexcept { return lender >= 0; }
    /// What a bytes entry sends (from `sent` on).
    [[nodiscard]] std::string_view bytes() const noexcept {
        return is_lent() ? chunk : std::string_view(data);
    }
    [[nodiscard]] bool finished() const noexcept { return !producer && sent == bytes().size(); }
};

/// Allocates on cache-line boundaries (the send queue's slots: see entry_ring).
template <typename T>
struct line_aligned_allocator {
    using value_type = T;
    static constexpr std::align_val_t alignment{64};
    line_aligned_allocator() noexcept = default;
    template <typename U>
    line_aligned_allocator(const line_aligned_allocator<U>&) noexcept {}
    T* allocate(std::size_t n) {
        return static_cast<T*>(::operator new(n * sizeof(T), alignment));
    }
    void deallocate(T* p, std::size_t n) noexcept {
        ::operator delete(p, n * sizeof(T), alignment);
    }
    template <typename U>
    bool operator==(const line_aligned_allocator<U>&) const noexcept { return true; }
};

/// FIFO of out_entry slots in a vector used as a ring; popped slots keep their string
/// capacity, so a steady stream of pushes allocates nothing. The capacity is always a power
/// of two, so positions wrap with a mask (this is on every send's path). Popping a lent
/// entry gives its receive buffer back (entries are popped only when no send uses them).
/// A ring that empties starts again at its first slot, which starts a cache line: a
/// connection that sends one reply at a time uses the same line for each.
class entry_ring {
public:
    explicit entry_ring(provided_buffers* lenders) noexcept : lenders_(lenders) {}
    entry_ring(const entry_ring&) = delete;
    entry_ring& operator=(const entry_ring&) = delete;
    ~entry_ring() { clear(); }

    [[nodiscard]] bool empty() const noexcept { return count_ == 0; }
    [[nodiscard]] std::size_t size() const noexcept { return count_; }
    out_entry& operator[](std::size_t i) noexcept { return slots_[(head_ + i) & mask_]; }
    out_entry& front() noexcept { return (*this)[0]; }
    out_entry& back() noexcept { return (*this)[count_ - 1]; }
    /// Lent entries queued (each holds one shared receive buffer).
    [[nodiscard]] unsigned lent() const noexcept { return lent_; }

    out_entry& push_back() {
        if (count_ == slots_.size()) {
            grow();
        }
        ++count_;
        return back();
    }
    /// Queues `bytes`, which lie in shared receive buffer `bid`, already held for it.
    void push_lent(std::string_view bytes, std::uint16_t bid) {
        out_entry& e = push_back();
        e.chunk = bytes;
        e.lender = bid;
        ++lent_;
    }
    void pop_front() noexcept {
        reset(front());
        head_ = --count_ == 0 ? 0 : (head_ + 1) & mask_;
    }
    /// Asks the CPU to load the slot the next push_back() fills (see io_context's prefetch).
    void prefetch_next() const noexcept {
        if (count_ < slots_.size()) {
            __builtin_prefetch(&slots_[(head_ + count_) & mask_], 1);
        }
    }
    /// Empties `e` for reuse, giving a lent entry's receive buffer back (also how an
    /// exhausted producer's entry becomes an empty bytes entry).
    void reset(out_entry& e) noexcept {
        if (e.is_lent()) {
            lenders_->release_hold(static_cast<std::uint16_t>(e.lender));
            e.lender = -1;
            --lent_;
        }
        if (!e.data.empty()) {
            e.data.clear(); // keeps the capacity: the slot is reused without allocating
        }
        e.sent = 0;
        e.producer.reset();
        e.chunk = {};
        e.chunk_sent = 0;
    }
    void clear() noexcept {
        while (!empty()) {
            pop_front();
        }
    }

private:
    void grow() {
        slot_vector bigger(std::max<std::size_t>(4, slots_.size() * 2));
        for (std::size_t i = 0; i < count_; ++i) {
            bigger[i] = std::move((*this)[i]);
        }
        // Slots beyond count_ keep no useful capacity after the move; that is fine.
        slots_ = std::move(bigger);
        head_ = 0;
        mask_ = static_cast<unsigned>(slots_.size() - 1);
    }

    using slot_vector = std::vector<out_entry, line_aligned_allocator<out_entry>>;
    slot_vector slots_;
    std::size_t head_ = 0;
    std::size_t count_ = 0;
    unsigned lent_ = 0;
    // slots_.size() - 1, kept rather than computed: a vector's size is a subtraction and a
    // division, and every access to a slot needs the mask.
    unsigned mask_ = 0;
    provided_buffers* lenders_; // where lent entries' buffers go back (null: none lent)
};

/// The peer's address, kept for messages: in 32 bytes when it is IPv4 or IPv6 (what a
/// server's connections have), on the heap for anything longer (a Unix socket's path).
class peer_address {
public:
    explicit peer_address(const address& a) {
        if (a.native_size() <= sizeof(inline_)) {
            std::memcpy(&inline_, a.native(), a.native_size());
            length_ = a.native_size();
        } else {
            inline_.heap = new address(a);
            length_ = on_heap;
        }
    }
    ~peer_address() {
        if (length_ == on_heap) {
            delete inline_.heap;
        }
    }
    peer_address(const peer_address&) = delete;
    peer_address& operator=(const peer_address&) = delete;

    [[nodiscard]] address get() const noexcept {
        if (length_ == on_heap) {
            return *inline_.heap;
        }
        address::storage s{};
        std::memcpy(&s.sa, &inline_, length_);
        s.length = length_;
        return address{s};
    }

private:
    static constexpr socklen_t on_heap = ~socklen_t{0};
    union {
        sockaddr_in in4;
        sockaddr_in6 in6;
        address* heap;
    } inline_{};
    socklen_t length_ = 0;
};

/// How far the channel's current read got (one read at a time, so it lives here rather than
/// in every read awaiter's coroutine frame). Reset when a read starts.
struct read_progress {
    std::size_t searched = 0;    // until: bytes of the buffer known not to start the terminator
    std::size_t frame_size = 0;  // the frame found
    std::size_t from_buffer = 0; // exact_into: bytes copied from the input buffer
    std::size_t direct = 0;      // exact_into: bytes received straight into dest
    std::size_t skipped = 0;     // skip, skip_until
    std::size_t asked = 0;       // size of the receive in flight
};

// The completions of the channel's own operations: bases of channel_core, so a completion
// finds its core by a cast instead of a pointer stored in each.
struct send_completion : completion {};
struct close_completion : completion {}; // the shutdown, then the lingering receives
struct recv_completion : completion {};  // the multishot receive

// The timer_entry base is the current read's deadline on the context's timer wheel, and
// once the handle is gone (no reads any more) the end of the linger.
//
// Receiving: while reads find nothing buffered and traffic is light, the channel keeps one
// multishot recv armed across reads (`armed`); the kernel picks a shared provided buffer for
// each arrival. Bytes that arrive while a read waits go into the input buffer at once. Bytes
// that arrive between reads are parked (their buffers kept aside, in order) until the next
// read starts, so a view returned by the last read stays valid until then. Parking more than
// keep_buffer bytes disarms the receive: TCP's flow control takes over until reads catch up.
// A read that needs a receive of its own (a large frame, a stream, read_exact into a span)
// disarms it too and submits its own once the multishot one has ended.
//
// Receiving by readiness (io_context_options::receive, at light load by default): the armed
// operation is a multishot poll instead (`poll_armed`). It only marks the socket
// `readable`; a read then receives with recv system calls of its own (pull_ready), and bytes
// that arrive between reads stay in the socket, so there is nothing to park. Nothing else
// receives on the socket meanwhile, which keeps the bytes in order.
struct channel_core final : recv_completion, send_completion, flush_node, timer_entry,
                            close_completion, owned_node {
    enum class phase : std::uint8_t { open, shutdown_wanted, shutting_down, shut, lingering, closed };

    channel_core(stream&& s, const channel_options& o)
        : ctx(&s.context()), input(o.receive_size), queue(ctx->receive_buffers()), opts(o),
          peer_addr(s.peer()) {
        fd = s.release();
        receive_hint = o.receive_size;
        flush_node::flush = &channel_core::flush_thunk;
        owned_node::destroy = &channel_core::destroy_thunk;
        send_completion::on_complete = &channel_core::send_done;
        recv_completion::on_complete = &channel_core::multishot_done;
        ctx->channel_opened();
    }

    ~channel_core() {
        release_borrowed();
        drop_parked();
        ctx->channel_closed();
    }

    // Members in order of use per message (the first cache lines are the ones every
    // receive and send touches); the cold ones last.
    io_context* ctx;
    read_awaiter* reader = nullptr;
    writer_awaiter* writer = nullptr;
    int fd = -1;
    int borrowed_bid = -1; // provided buffer the input buffer borrows, or -1
    int read_error = 0;    // sticky failure of a receive (-errno)
    int write_error = 0;   // -errno of a failed send (or -EIO for a producer failure)
    bool eof = false;
    bool aborted = false;   // close() was called
    bool armed = false;     // the multishot receive is in flight
    bool disarming = false; // ... and its cancellation was asked for
    bool poll_armed = false; // ... and it is a multishot poll (receiving by readiness)
    bool readable = false;   // the poll reported input that no recv has drained yet
    bool sending = false;
    phase state = phase::open;
    bool handle_alive = true;
    // Flags of the end of a connection, one byte together, so the per-message members
    // after them keep their cache lines.
    bool adopted : 1 = false; // owned by the context (handle gone, work left)
    bool close_wanted : 1 = false;
    bool linger_over : 1 = false; // the linger's time is up: no more discarding receives
    bool linger_counted : 1 = false; // the multishot receive discards for the linger: counted
    provided_buffers::parked_list parked; // received between reads, for the next read
    // How much the next receive asks for: doubles while receives fill all the space they
    // were given (a stream), falls back when they come back small (request/response).
    std::size_t receive_hint = 0;
    buffer input;
    entry_ring queue;
    std::size_t queued = 0;
    std::size_t in_flight_entries = 0;
    channel_stats stats;
    read_progress progress;
    channel_options opts;
    std::exception_ptr producer_error;
    std::exception_ptr producer_failure; // more() threw; fails the writer when reached
    std::unique_ptr<send_scratch> own_scratch; // only where the kernel lacks SUBMIT_STABLE
    peer_address peer_addr;

    [[nodiscard]] address peer() const noexcept { return peer_addr.get(); }
    completion* send_op() noexcept { return static_cast<send_completion*>(this); }
    completion* close_op() noexcept { return static_cast<close_completion*>(this); }
    completion* recv_op() noexcept { return static_cast<recv_completion*>(this); }
    static channel_core* of_send(completion* op) noexcept {
        return static_cast<channel_core*>(static_cast<send_completion*>(op));
    }
    static channel_core* of_close(completion* op) noexcept {
        return static_cast<channel_core*>(static_cast<close_completion*>(op));
    }
    static channel_core* of_recv(completion* op) noexcept {
        return static_cast<channel_core*>(static_cast<recv_completion*>(op));
    }

    // Gives the borrowed provided buffer back to the kernel. Views into it die here, so
    // this happens only when a new read starts or its bytes were copied out.
    void release_borrowed() noexcept {
        if (borrowed_bid >= 0) {
            ctx->receive_buffers()->recycle(static_cast<std::uint16_t>(borrowed_bid));
            borrowed_bid = -1;
        }
    }

    // A new read starts: if the borrowed bytes were all consumed, return the buffer.
    void release_consumed_borrow() noexcept {
        if (borrowed_bid >= 0 && input.empty()) {
            input.stop_borrowing(); // nothing to copy: cannot throw
            release_borrowed();
        }
    }

    // More bytes must follow the borrowed ones in contiguous memory: copy them out.
    void copy_out_borrow() {
        if (borrowed_bid >= 0) {
            input.stop_borrowing();
            release_borrowed();
        }
    }

    void adapt_receive_hint(std::size_t asked, std::size_t got) noexcept {
        constexpr std::size_t max_hint = 256 * 1024;
        if (got == asked) {
            receive_hint = std::min(std::max(receive_hint, asked) * 2, max_hint);
        } else if (got < asked / 4) {
            // Traffic is small again: fall back at once, so a connection that goes idle
            // after a large frame waits in a shared buffer and releases its own.
            receive_hint = std::max(opts.receive_size, std::min(receive_hint, got * 2));
        }
    }

    // Adds received bytes that are in provided buffer `bid` to the input: borrowed when the
    // input is empty (no copy), else copied behind what is there.
    void take_provided(std::uint16_t bid, std::size_t size) {
        provided_buffers* pb = ctx->receive_buffers();
        if (input.empty() && borrowed_bid < 0) {
            input.borrow(pb->data(bid), size);
            borrowed_bid = bid;
            return;
        }
        try {
            copy_out_borrow(); // allocates too
            input.append(std::string_view(pb->data(bid), size));
        } catch (...) {
            pb->recycle(bid);
            throw;
        }
        pb->recycle(bid);
    }

    // Moves the parked buffers into the input, in order (a read starts).
    void take_parked() {
        if (parked.empty()) {
            return;
        }
        provided_buffers* pb = ctx->receive_buffers();
        try {
            while (!parked.empty()) {
                const std::uint16_t bid = parked.head;
                const std::uint32_t size = pb->parked_size(bid);
                pb->unpark_front(parked);
                take_provided(bid, size); // recycles bid if it throws
            }
        } catch (...) {
            pb->recycle_all(parked);
            throw;
        }
    }

    // Whether all of `bytes` lie in the shared receive buffer the input borrows.
    bool in_borrowed(std::string_view bytes) const noexcept {
        if (borrowed_bid < 0) {
            return false;
        }
        const provided_buffers* pb = ctx->receive_buffers();
        const auto start = reinterpret_cast<std::uintptr_t>(
            pb->data(static_cast<std::uint16_t>(borrowed_bid)));
        const auto first = reinterpret_cast<std::uintptr_t>(bytes.data());
        return bytes.size() <= pb->buffer_size() && first >= start &&
               first - start <= pb->buffer_size() - bytes.size();
    }

    // write() at light load with nothing queued or in flight: sends `bytes` with a system
    // call of its own, without queueing them. Returns how many the socket took; 0 when it
    // took none or the send failed, and the queue then sends them (and reports a failure).
    std::size_t send_now(std::string_view bytes) noexcept {
        const ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n <= 0) {
            return 0;
        }
        const auto sent = static_cast<std::size_t>(n);
        ++stats.sends;
        ++stats.direct_sends;
        stats.bytes_sent += sent;
        if (in_borrowed(bytes)) {
            stats.bytes_sent_in_place += sent;
        }
        if (log_enabled(log_level::trace)) {
            log(log_level::trace, "channel {}: sent {} bytes", peer().to_string(), sent);
        }
        return sent;
    }

    // push() of bytes that lie in the shared receive buffer the input borrows (an echo of
    // what a read returned): queues them where they are instead of copying them, the buffer
    // held until they are sent. Only when the queue holds no other lent entry (so a slow
    // peer holds at most one buffer this way), or the bytes continue the last lent entry.
    // Returns false, queueing nothing, when the bytes must be copied.
    bool lend(std::string_view bytes) {
        if (!in_borrowed(bytes)) {
            return false;
        }
        provided_buffers* pb = ctx->receive_buffers();
        const auto bid = static_cast<std::uint16_t>(borrowed_bid);
        if (queue.lent() != 0) {
            out_entry& last = queue.back();
            if (!last.is_lent() || last.lender != borrowed_bid ||
                queue.size() <= in_flight_entries ||
                last.chunk.data() + last.chunk.size() != bytes.data()) {
                return false;
            }
            last.chunk = std::string_view(last.chunk.data(), last.chunk.size() + bytes.size());
        } else {
            if (!pb->hold(bid)) {
                return false;
            }
            try {
                queue.push_lent(bytes, bid);
            } catch (...) {
                pb->release_hold(bid);
                throw;
            }
        }
        queued += bytes.size();
        ctx->request_flush(this);
        return true;
    }

    void drop_parked() noexcept {
        if (!parked.empty()) {
            ctx->receive_buffers()->recycle_all(parked);
        }
    }

    void arm_multishot(provided_buffers* pb) noexcept {
        io_uring_sqe* sqe = ctx->get_sqe();
        io_uring_prep_recv_multishot(sqe, fd, nullptr, 0, 0);
        sqe->flags |= IOSQE_BUFFER_SELECT;
        sqe->buf_group = pb->group();
        // Not counted as work by itself: an idle channel must not keep run() going. A read
        // that waits on it counts (read_awaiter::wait_on_shared), and so does a linger.
        io_uring_sqe_set_data64(sqe, io_context::uncounted(recv_op()));
        ++stats.receive_submissions;
        armed = true;
        readable = false; // what the socket holds, the multishot recv receives first
    }

    // Waits for input by readiness: a multishot poll that reports whenever the socket
    // becomes readable (edge-triggered; it also reports a socket readable when armed). Not
    // counted as work, like the multishot receive.
    void arm_readiness() noexcept {
        io_uring_sqe* sqe = ctx->get_sqe();
        io_uring_prep_poll_multishot(sqe, fd, POLLIN);
        io_uring_sqe_set_data64(sqe, io_context::uncounted(recv_op()));
        armed = true;
        poll_armed = true;
    }

    // Whether a read may receive with a recv of its own now: the poll said there is input,
    // and no receive of the kernel's could deliver bytes that came before it.
    [[nodiscard]] bool may_pull() const noexcept {
        return readable && (!armed || poll_armed) && parked.empty() && read_error == 0 && !eof;
    }

    // Asks the kernel to end the multishot receive; it reports the end with a completion
    // without IORING_CQE_F_MORE (-ECANCELED, or data or EOF that came first).
    void disarm() noexcept {
        if (armed && !disarming) {
            disarming = true;
            ctx->request_cancel_uncounted(recv_op());
        }
    }

    static void multishot_done(completion* op, int res, std::uint32_t flags) noexcept {
        of_recv(op)->on_multishot(res, flags);
    }

    void on_multishot(int res, std::uint32_t flags) noexcept;
    // Inlined into on_multishot, its one caller: a call fewer on the way to the request.
    [[gnu::always_inline]] void on_readiness(int res, bool ended) noexcept;

    // The current read's deadline passed: it fails with errc::timed_out once its receive
    // is back from the kernel (or at once, between receives).
    static void read_deadline_passed(timer_entry* self) noexcept;

    static void flush_thunk(flush_node* self) noexcept { static_cast<channel_core*>(self)->flush(); }
    static void destroy_thunk(owned_node* self) noexcept {
        static_cast<channel_core*>(self)->destroy_now();
    }

    bool writer_condition(writer_awaiter::kind k) const noexcept {
        if (write_error != 0 || aborted) {
            return true;
        }
        switch (k) {
        case writer_awaiter::kind::queued:
        case writer_awaiter::kind::no_wait:
            return true;
        case writer_awaiter::kind::drain:
            return queue.empty() && !sending;
        case writer_awaiter::kind::below_low_water:
            return queued <= opts.low_water;
        case writer_awaiter::kind::shut_down:
            return state >= phase::shut;
        }
        return true;
    }

    // Resumes the coroutine waiting on the writer if its condition now holds. Must be the
    // last thing a completion handler does: the resumed coroutine may destroy the channel.
    void notify_writer() noexcept {
        writer_awaiter* w = writer;
        if (w == nullptr || !writer_condition(w->kind_)) {
            return;
        }
        writer = nullptr;
        w->waiting_ = false;
        w->waiter_.resume();
    }

    void pop_finished_front() noexcept {
        while (!queue.empty() && queue.front().finished()) {
            queue.pop_front();
        }
    }

    void flush() noexcept {
        if (sending || write_error != 0 || aborted) {
            return;
        }
        pop_finished_front();
        iovec iov[max_iovecs];
        std::size_t iovcnt = 0;
        std::size_t entries = 0;
        for (; entries < queue.size() && iovcnt < max_iovecs; ++entries) {
            out_entry& e = queue[entries];
            if (e.is_producer()) {
                if (e.chunk_sent == e.chunk.size()) {
                    if (!producer_failure) {
                        try {
                            e.chunk = e.producer->next();
                        } catch (...) {
                            producer_failure = std::current_exception();
                        }
                    }
                    if (producer_failure) {
                        // The producer fails the writer once the bytes before it are sent.
                        if (iovcnt == 0) {
                            fail_writer(-EIO, std::exchange(producer_failure, nullptr));
                            return;
                        }
                        break;
                    }
                    e.chunk_sent = 0;
                    if (e.chunk.empty()) {
                        queue.reset(e); // exhausted: now an empty bytes entry, popped when reached
                        continue;
                    }
                    queued += e.chunk.size();
                }
                iov[iovcnt++] = {const_cast<char*>(e.chunk.data()) + e.chunk_sent,
                                 e.chunk.size() - e.chunk_sent};
                ++entries;
                break; // the producer's next chunk must come before anything after it
            }
            const std::string_view bytes = e.bytes();
            if (e.sent < bytes.size()) {
                iov[iovcnt++] = {const_cast<char*>(bytes.data()) + e.sent, bytes.size() - e.sent};
            }
        }
        if (iovcnt == 0) {
            // Only exhausted producers were left: the queue may have run dry without a send.
            pop_finished_front();
            if (queue.empty() && state == phase::shutdown_wanted) {
                start_shutdown();
            }
            notify_writer(); // last: the resumed coroutine may destroy the channel
            return;
        }
        if (ctx->direct_sends_now() && send_directly(iov, iovcnt, entries)) {
            return;
        }
        if (iovcnt == 1) {
            io_uring_sqe* sqe = ctx->get_sqe();
            io_uring_prep_send(sqe, fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL);
            start_send(sqe, entries);
            return;
        }
        // Before taking the SQE: taking scratch may submit, which must not carry an SQE
        // that is not filled in yet.
        send_scratch* scratch = ctx->take_send_scratch();
        if (scratch == nullptr) {
            if (!own_scratch) {
                own_scratch = std::make_unique<send_scratch>(); // once, on old kernels only
            }
            scratch = own_scratch.get();
        }
        std::copy(iov, iov + iovcnt, scratch->iov);
        scratch->message = {};
        scratch->message.msg_iov = scratch->iov;
        scratch->message.msg_iovlen = iovcnt;
        io_uring_sqe* sqe = ctx->get_sqe();
        io_uring_prep_sendmsg(sqe, fd, &scratch->message, MSG_NOSIGNAL);
        start_send(sqe, entries);
    }

    // Light load: sends with a system call of its own, and handles the result as the send's
    // completion would have been handled (on_send). Returns false if the socket took nothing
    // (its buffer is full): the ring sends it then. A partial send leaves the rest queued,
    // and on_send asks for another flush, which goes through the ring if the socket is
    // still full.
    bool send_directly(iovec* iov, std::size_t iovcnt, std::size_t entries) noexcept {
        ssize_t n;
        if (iovcnt == 1) {
            // A plain send spares the kernel copying in a message header and an iovec.
            n = ::send(fd, iov[0].iov_base, iov[0].iov_len, MSG_NOSIGNAL | MSG_DONTWAIT);
        } else {
            msghdr message{};
            message.msg_iov = iov;
            message.msg_iovlen = iovcnt;
            n = ::sendmsg(fd, &message, MSG_NOSIGNAL | MSG_DONTWAIT);
        }
        const int error = n < 0 ? errno : 0;
        if (error == EAGAIN || error == EWOULDBLOCK || error == EINTR) {
            return false;
        }
        if (n >= 0) {
            ++stats.direct_sends;
        }
        sending = true; // as on_send expects
        in_flight_entries = entries;
        // A single nonblocking send never takes more than the socket's buffer: fits an int.
        on_send(n >= 0 ? static_cast<int>(n) : -error);
        return true;
    }

    void start_send(io_uring_sqe* sqe, std::size_t entries) noexcept {
        io_uring_sqe_set_data(sqe, send_op());
        ctx->operation_started();
        sending = true;
        in_flight_entries = entries;
    }

    static void send_done(completion* op, int res, std::uint32_t) noexcept {
        of_send(op)->on_send(res);
    }

    void on_send(int res) noexcept {
        sending = false;
        in_flight_entries = 0;
        if (res < 0) {
            log(log_level::info, "channel: send to {} failed: {}", peer().to_string(),
                std::strerror(-res));
            fail_writer(res, nullptr);
            return;
        }
        ++stats.sends;
        stats.bytes_sent += static_cast<std::size_t>(res);
        if (log_enabled(log_level::trace)) {
            log(log_level::trace, "channel {}: sent {} bytes", peer().to_string(), res);
        }
        auto remaining = static_cast<std::size_t>(res);
        for (std::size_t i = 0; remaining > 0 && i < queue.size(); ++i) {
            out_entry& e = queue[i];
            if (e.is_producer()) {
                std::size_t take = std::min(remaining, e.chunk.size() - e.chunk_sent);
                e.chunk_sent += take;
                queued -= take;
                remaining -= take;
                break;
            }
            std::size_t take = std::min(remaining, e.bytes().size() - e.sent);
            if (e.is_lent()) {
                stats.bytes_sent_in_place += take;
            }
            e.sent += take;
            queued -= take;
            remaining -= take;
        }
        pop_finished_front();
        if (!queue.empty()) {
            ctx->request_flush(this);
        } else if (state == phase::shutdown_wanted) {
            start_shutdown();
        }
        notify_writer();
    }

    void fail_writer(int err, std::exception_ptr error) noexcept {
        write_error = err;
        producer_error = std::move(error);
        queue.clear();
        queued = 0;
        if (!handle_alive) {
            close_fd();
            state = phase::closed;
            if (writer == nullptr) {
                maybe_delete();
                return;
            }
            // A coroutine elsewhere still waits on this writer: wake it; the core goes
            // when its awaiter does.
        }
        notify_writer();
    }

    void start_shutdown() noexcept {
        state = phase::shutting_down;
        io_uring_sqe* sqe = ctx->get_sqe();
        io_uring_prep_shutdown(sqe, fd, SHUT_WR);
        close_completion::on_complete = &channel_core::shutdown_done;
        io_uring_sqe_set_data(sqe, close_op());
        ctx->operation_started();
    }

    static void shutdown_done(completion* op, int res, std::uint32_t) noexcept {
        of_close(op)->on_shutdown(res);
    }

    void on_shutdown(int res) noexcept {
        state = phase::shut;
        // ENOTCONN: the peer already reset the connection; there is nothing left to shut.
        if (res < 0 && res != -ENOTCONN) {
            log(log_level::info, "channel: shutdown of connection to {} failed: {}",
                peer().to_string(), std::strerror(-res));
        }
        if (!handle_alive) {
            start_linger();
        }
        notify_writer();
    }

    void start_linger() noexcept {
        if (state != phase::lingering) {
            state = phase::lingering;
            // No read can be waiting any more (the handle is gone): the core's timer entry
            // is free for the linger's end.
            if (reader != nullptr) {
                reader->deadline_armed_ = false;
            }
            ctx->remove_timer(this);
            when = deadline_clock::now() + opts.linger;
            expire = &channel_core::linger_expired;
            ctx->add_timer(this);
        }
        if (armed) {
            // The multishot receive discards for the linger (on_multishot); count it as work
            // meanwhile, like the plain receive below, so run() waits for the linger. A poll
            // cannot discard: it ends, and the plain receive below takes over.
            if (poll_armed) {
                disarm();
            }
            if (!linger_counted) {
                linger_counted = true;
                ctx->operation_started();
            }
            return;
        }
        io_uring_sqe* sqe = ctx->get_sqe();
        io_uring_prep_recv(sqe, fd, discard_area, sizeof discard_area, 0);
        close_completion::on_complete = &channel_core::linger_done;
        io_uring_sqe_set_data(sqe, close_op());
        ctx->operation_started();
    }

    static void linger_expired(timer_entry* self) noexcept {
        auto* core = static_cast<channel_core*>(self);
        core->linger_over = true;
        if (core->armed) {
            core->disarm();
        } else {
            core->ctx->request_cancel(core->close_op());
        }
    }

    static void linger_done(completion* op, int res, std::uint32_t) noexcept {
        channel_core* core = of_close(op);
        if (res > 0 && !core->linger_over) {
            core->start_linger(); // discard and keep waiting for the peer's FIN
        } else {
            core->finish();
        }
    }

    void close_fd() noexcept {
        disarm(); // closing the descriptor alone would not end a receive in flight
        if (fd >= 0) {
            io_uring_sqe* sqe = ctx->get_sqe();
            io_uring_prep_close(sqe, fd);
            io_uring_sqe_set_data64(sqe, 0);
            fd = -1;
        }
    }

    // The connection is over: close it, and free the core if nothing refers to it.
    void finish() noexcept {
        ctx->remove_timer(this); // the linger's end, if it was lingering
        close_fd();
        state = phase::closed;
        maybe_delete();
    }

    // Frees the core once the handle is gone, the connection is closed and no awaiter
    // (a read or a writer wait in some other coroutine) still points at it. Until then the
    // context owns it, so ~io_context can still reclaim it.
    void maybe_delete() noexcept {
        if (handle_alive) {
            return;
        }
        if (state != phase::closed || reader != nullptr || writer != nullptr || armed) {
            if (!adopted) {
                ctx->adopt(this);
                adopted = true;
            }
            return;
        }
        if (adopted) {
            ctx->disown(this);
        }
        ctx->cancel_flush(this);
        ctx->remove_timer(this);
        delete this;
    }

    // Cancels whatever the core has in flight and waits for the kernel to let go of it.
    void cancel_in_flight() noexcept {
        if (sending) {
            ctx->cancel_and_wait(send_op());
            sending = false;
        }
        if (state == phase::shutting_down) {
            ctx->cancel_and_wait(close_op());
            state = phase::shut;
        }
        if (state == phase::lingering && !armed) { // else the multishot receive lingers
            ctx->cancel_and_wait(close_op());
            ctx->remove_timer(this);
        }
    }

    // The linger ends early (the context goes): discards what the peer has sent so far, so
    // that closing with input unread does not make the kernel reset the connection and
    // destroy the reply the peer has not read yet. A poll never took it; a receive may not
    // have yet. Bounded: a peer that keeps sending gets its reset.
    void discard_readable() noexcept {
        for (int i = 0; i < 64 && fd >= 0; ++i) {
            if (::recv(fd, discard_area, sizeof discard_area, MSG_DONTWAIT) <= 0) {
                return;
            }
        }
    }

    // ~io_context: the context is going away while this orphaned channel still works (it
    // has already disowned the core).
    void destroy_now() noexcept {
        cancel_in_flight();
        if (armed) {
            cqe_result last = ctx->cancel_and_wait(recv_op(), false);
            if ((last.flags & IORING_CQE_F_BUFFER) != 0) {
                ctx->receive_buffers()->recycle(
                    static_cast<std::uint16_t>(last.flags >> IORING_CQE_BUFFER_SHIFT));
            }
            armed = false;
            poll_armed = false;
        }
        if (linger_counted) {
            linger_counted = false;
            ctx->operation_finished();
        }
        if (state == phase::lingering) {
            discard_readable();
        }
        ctx->cancel_flush(this);
        ctx->remove_timer(this);
        close_fd();
        delete this;
    }

    // The channel handle is gone: finish sending what was pushed, then close.
    void handle_released() noexcept {
        handle_alive = false;
        drop_parked(); // nobody reads them now
        if (reader != nullptr) {
            reader->cancel_now(); // a read awaited elsewhere ends with errc::closed
        }
        const bool output_pending = !queue.empty() || sending;
        if (state != phase::closed && write_error == 0 &&
            (close_wanted || output_pending || state != phase::open)) {
            close_wanted = true;
            if (state == phase::open) {
                state = phase::shutdown_wanted;
            }
            if (state == phase::shut) {
                start_linger();
            } else if (state == phase::shutdown_wanted && !output_pending) {
                start_shutdown();
            }
            maybe_delete(); // adopts: the context owns the core until it finishes
            return;
        }
        finish();
    }

    void request_shutdown() {
        if (aborted) {
            return;
        }
        if (state == phase::open) {
            state = phase::shutdown_wanted;
            if (write_error == 0) {
                ctx->request_flush(this); // starts the shutdown if nothing is queued
            }
        }
    }
};

// ---------------------------------------------------------------- read_awaiter

read_awaiter::read_awaiter(channel_core* core, kind k, const char* ptr, std::size_t count) noexcept
    : completion{&read_awaiter::complete}, core_(core), ptr_(ptr), count_(count), kind_(k) {}

read_awaiter::read_awaiter(const read_awaiter& other) noexcept
    : completion{other.on_complete}, core_(other.core_), ptr_(other.ptr_), count_(other.count_),
      cancel_(other.cancel_), timeout_(other.timeout_), kind_(other.kind_),
      has_deadline_(other.has_deadline_) {}

read_awaiter::~read_awaiter() {
    if (in_flight_) {
        // The awaiting coroutine is being destroyed: take the receive back from the kernel
        // before the frame (and maybe the destination) goes away. If it had completed after
        // all, its bytes stay in the channel like those of any read that did not finish.
        cqe_result last = core_->ctx->cancel_and_wait(this);
        in_flight_ = false;
        keep_received(last);
        restore_direct_bytes();
    }
    uncount_wait();
    disarm_deadline();
    if (core_->reader == this) {
        core_->reader = nullptr;
    }
    if (cancel_ != nullptr) {
        cancel_->detach(this);
    }
    core_->maybe_delete(); // the channel may have been dropped while this read was pending
}

std::size_t read_awaiter::skipped() const noexcept { return core_->progress.skipped; }

void read_awaiter::disarm_deadline() noexcept {
    // The entry stays on the wheel: the next read usually renews it (io_context::set_timer),
    // and if it expires first, read_deadline_passed finds no armed deadline and does nothing.
    deadline_armed_ = false;
}

void read_awaiter::set_deadline(std::chrono::nanoseconds timeout) noexcept {
    timeout_ = timeout;
    has_deadline_ = true;
}

void read_awaiter::cancel_now() noexcept {
    if (in_flight_) {
        cancelled_ = true;
        core_->ctx->request_cancel(this);
    } else if (core_->reader == this && core_->armed) {
        // Waiting on the channel's multishot receive: end it; its last completion fails
        // this read (data that comes first may still complete it).
        cancelled_ = true;
        core_->disarm();
    }
}

namespace {
// Reasons a read failed, besides an errno value.
constexpr int fail_eof = 1;
constexpr int fail_incomplete = 2;
constexpr int fail_too_large = 3;
constexpr int fail_timed_out = 4;
constexpr int fail_cancelled = 5;
constexpr int fail_closed = 6;
} // namespace

bool read_awaiter::await_ready() {
    if (core_->reader != nullptr) {
        throw std::logic_error("ringchat::channel: a read is already in progress on this channel");
    }
    if (core_->aborted || !core_->handle_alive) {
        error_ = fail_closed;
        state_ = state::failed;
        return true;
    }
    core_->release_consumed_borrow(); // views from the previous read end here
    try {
        core_->take_parked(); // what arrived since the last read
    } catch (const std::bad_alloc&) {
        core_->read_error = -ENOMEM; // those bytes are lost: the stream cannot go on
    }
    core_->progress = {};
    if (kind_ == kind::exact && count_ > core_->opts.max_buffer) {
        error_ = fail_too_large;
        state_ = state::failed;
        return true;
    }
    const channel_core& c = *core_;
    if (c.input.empty() && count_ != 0 && !c.eof && c.read_error == 0 && !c.readable) {
        // Nothing buffered, and a read of more than 0 bytes (or up to a terminator) needs
        // some: the usual case between requests, decided without evaluate().
        return false;
    }
    evaluate();
    pull_ready(); // bytes a poll reported that are still in the socket
    return state_ != state::pending;
}

void read_awaiter::pull_ready() noexcept {
    while (state_ == state::pending && core_->may_pull()) {
        if (!receive_ready()) {
            return;
        }
        if (kind_ == kind::some && !core_->input.empty()) {
            // What evaluate() decides for read_some given bytes, without its dispatch: this
            // is the receive of a request at light load, which the peer waits on.
            core_->progress.frame_size = std::min(core_->input.size(), count_);
            state_ = state::done;
            return;
        }
        evaluate();
    }
}

bool read_awaiter::receive_ready() noexcept {
    channel_core& c = *core_;
    read_progress& p = c.progress;
    provided_buffers* pb = c.ctx->receive_buffers();
    char* target;
    std::size_t size;
    int bid = -1;
    const bool into_dest = kind_ == kind::exact_into;
    if (into_dest) {
        // evaluate() has copied what the buffer held into dest: the rest goes straight there.
        target = dest() + p.from_buffer + p.direct;
        size = count_ - p.from_buffer - p.direct;
    } else {
        c.release_consumed_borrow();
        const std::size_t shared_size = pb != nullptr ? pb->buffer_size() : 0;
        // As a multishot recv would: an empty input borrows a shared buffer (a spare, kept
        // out of the kernel's ring for this), so no receive memory stays with the channel.
        if (c.input.empty() && c.receive_hint <= shared_size &&
            (kind_ != kind::exact || count_ <= shared_size)) {
            bid = pb->take_spare();
        }
        if (bid >= 0) {
            target = pb->data(static_cast<std::uint16_t>(bid));
            size = shared_size;
        } else {
            const std::span<char> space = own_space();
            if (space.empty()) {
                return false;
            }
            target = space.data();
            size = space.size();
        }
    }
    ssize_t n;
    do {
        n = ::recv(c.fd, target, size, MSG_DONTWAIT);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        const int error = n < 0 ? errno : 0;
        if (bid >= 0) {
            pb->recycle(static_cast<std::uint16_t>(bid));
        }
        c.readable = false;
        if (n == 0) {
            ++c.stats.receives;
            c.eof = true; // evaluate() tells the read
        } else if (error != EAGAIN && error != EWOULDBLOCK) {
            c.read_error = -error; // a reset: fails this read (evaluate()) and every later one
        }
        return true;
    }
    const auto got = static_cast<std::size_t>(n);
    ++c.stats.receives;
    ++c.stats.direct_receives;
    c.stats.bytes_received += got;
    if (log_enabled(log_level::trace)) {
        log(log_level::trace, "channel {}: received {} bytes", c.peer().to_string(), got);
    }
    c.readable = got == size; // a short receive took all there was
    if (into_dest) {
        p.direct += got;
    } else if (bid >= 0) {
        c.adapt_receive_hint(size, got);
        c.take_provided(static_cast<std::uint16_t>(bid), got); // borrowed: cannot throw
    } else {
        c.adapt_receive_hint(size, got);
        c.input.commit(got);
    }
    return true;
}

void read_awaiter::evaluate() noexcept {
    channel_core& c = *core_;
    read_progress& p = c.progress;
    std::string_view data = c.input.data();
    switch (kind_) {
    case kind::until:
    case kind::skip_until: {
        const std::size_t t = count_;
        if (data.size() > p.searched) {
            c.stats.bytes_searched += data.size() - p.searched;
        }
        std::size_t pos = data.find(term(), p.searched);
        if (pos != std::string_view::npos) {
            if (kind_ == kind::skip_until) {
                c.input.consume(pos + t);
                p.skipped += pos + t;
                state_ = state::done;
            } else if (pos > c.opts.max_frame) {
                error_ = fail_too_large;
                state_ = state::failed;
            } else {
                p.frame_size = pos; // finish() consumes the terminator too
                state_ = state::done;
            }
            return;
        }
        // No match starts before here; back up by t - 1 so that a terminator split across
        // receives is still found when its tail arrives.
        std::size_t cleared = data.size() >= t ? data.size() - t + 1 : 0;
        if (kind_ == kind::skip_until) {
            c.input.consume(cleared);
            p.skipped += cleared;
            p.searched = 0;
        } else {
            p.searched = cleared;
            if (cleared > c.opts.max_frame) {
                error_ = fail_too_large;
                state_ = state::failed;
                return;
            }
        }
        break;
    }
    case kind::exact:
        if (data.size() >= count_) {
            p.frame_size = count_;
            state_ = state::done;
            return;
        }
        break;
    case kind::exact_into:
        // Buffered bytes are copied to dest as they come, until receives go straight into
        // dest (then nothing arrives in the buffer any more).
        if (p.direct == 0 && data.size() > p.from_buffer && p.from_buffer < count_) {
            const std::size_t more = std::min(data.size(), count_) - p.from_buffer;
            std::memcpy(dest() + p.from_buffer, data.data() + p.from_buffer, more);
            p.from_buffer += more;
        }
        if (p.from_buffer + p.direct == count_) {
            state_ = state::done;
            return;
        }
        break;
    case kind::some:
        if (!data.empty() || c.eof) {
            p.frame_size = std::min(data.size(), count_);
            state_ = state::done;
            return;
        }
        break;
    case kind::to_eof:
        if (c.eof) {
            p.frame_size = data.size();
            state_ = state::done;
            return;
        }
        if (data.size() > c.opts.max_buffer) {
            error_ = fail_too_large;
            state_ = state::failed;
            return;
        }
        break;
    case kind::skip: {
        std::size_t take = std::min(data.size(), count_ - p.skipped);
        c.input.consume(take);
        p.skipped += take;
        if (p.skipped == count_) {
            state_ = state::done;
            return;
        }
        break;
    }
    }
    if (c.read_error != 0) {
        error_ = c.read_error;
        state_ = state::failed;
    } else if (c.eof) {
        std::size_t got = kind_ == kind::exact_into ? p.from_buffer + p.direct
                          : (kind_ == kind::skip || kind_ == kind::skip_until)
                              ? p.skipped
                              : c.input.size();
        error_ = got == 0 ? fail_eof : fail_incomplete;
        state_ = state::failed;
    }
}

bool read_awaiter::await_suspend(std::coroutine_handle<> waiter) noexcept {
    waiter_ = waiter;
    core_->reader = this;
    if (!start_receive()) {
        core_->reader = nullptr;
        restore_direct_bytes();
        return false;
    }
    // A read's own with_timeout() always applies, even a zero one (it fails at the next
    // tick); the channel's read_timeout only when set.
    if (has_deadline_ || core_->opts.read_timeout.count() > 0) {
        const std::chrono::nanoseconds timeout =
            has_deadline_ ? timeout_ : std::chrono::nanoseconds(core_->opts.read_timeout);
        channel_core& c = *core_;
        c.expire = &channel_core::read_deadline_passed;
        c.ctx->set_timer(&c, std::chrono::steady_clock::now() + timeout);
        deadline_armed_ = true;
    }
    return true;
}

void channel_core::read_deadline_passed(timer_entry* self) noexcept {
    read_awaiter* r = static_cast<channel_core*>(self)->reader;
    if (r == nullptr || !r->deadline_armed_) {
        return; // an earlier read's deadline, left on the wheel when that read finished
    }
    r->deadline_armed_ = false;
    r->timed_out_ = true;
    if (r->in_flight_) {
        r->core_->ctx->request_cancel(r);
    } else {
        r->core_->disarm(); // waiting on the multishot receive
    }
}

void channel_core::on_multishot(int res, std::uint32_t flags) noexcept {
    const bool ended = (flags & IORING_CQE_F_MORE) == 0;
    const bool readiness = poll_armed; // res is then the poll's events, or -errno
    if (ended) {
        armed = false;
        disarming = false;
        poll_armed = false;
    }
    if (readiness && !aborted && handle_alive) [[likely]] {
        on_readiness(res, ended); // first: the one completion per request at light load
        return;
    }
    provided_buffers* pb = ctx->receive_buffers();
    const bool has_buffer = !readiness && (flags & IORING_CQE_F_BUFFER) != 0;
    const auto bid = static_cast<std::uint16_t>(flags >> IORING_CQE_BUFFER_SHIFT);
    read_awaiter* r = reader;
    if (r != nullptr && has_buffer) {
        // The waiting read is about to return these bytes, and its coroutine most likely
        // replies (an echo sends them in place): start loading what that will touch.
        pb->prefetch_holders(bid);
        queue.prefetch_next();
    }
    if (aborted || !handle_alive) {
        // Closing: nobody takes input any more, and a lingering close discards it until
        // the peer's FIN. A read still waiting elsewhere fails with errc::closed.
        if (has_buffer) {
            pb->recycle(bid);
        }
        if (!ended) {
            return;
        }
        if (linger_counted) {
            linger_counted = false;
            ctx->operation_finished();
        }
        if (state == phase::lingering) {
            const bool go_on = !linger_over && (res > 0 || res == -ECANCELED || res == -ENOBUFS);
            if (go_on) {
                start_linger(); // with a plain receive from now on
            } else {
                finish();
            }
        } else if (r == nullptr) {
            maybe_delete(); // last: may free the core
            return;
        }
        if (r != nullptr) {
            r->on_shared(false); // last: the resumed coroutine may free the core
        }
        return;
    }
    if (res > 0 && !has_buffer) {
        res = -EIO; // never expected: data from a buffer-select receive always names one
    }
    if (res > 0) {
        const auto size = static_cast<std::uint32_t>(res);
        if (r != nullptr && !ended && !disarming && ctx->readiness_receives_now()) {
            disarm(); // light load: the next read that waits arms a poll instead
        }
        ++stats.receives;
        stats.bytes_received += size;
        if (log_enabled(log_level::trace)) {
            log(log_level::trace, "channel {}: received {} bytes", peer().to_string(), res);
        }
        adapt_receive_hint(pb->buffer_size(), size);
        if (r == nullptr) {
            // Between reads: keep the bytes aside so the last read's view stays valid, and
            // stop receiving once that holds enough.
            pb->park(parked, bid, size);
            if (parked.bytes >= opts.keep_buffer || parked.count >= max_parked) {
                disarm();
            }
            return;
        }
        try {
            take_provided(bid, size);
        } catch (const std::bad_alloc&) {
            read_error = -ENOMEM; // the bytes are lost: the stream cannot go on
        }
    } else {
        if (has_buffer) {
            pb->recycle(bid);
        }
        if (res == 0) {
            ++stats.receives;
            eof = true;
        } else if (res == -EINVAL) {
            // An old kernel (5.19 has buffer rings, not multishot recv). Each channel that
            // armed one before the first EINVAL arrived gets one too: not a read error.
            ctx->disable_multishot_receives(); // the read receives again, single-shot
        } else if (res != -ECANCELED && res != -ENOBUFS) {
            read_error = res; // a failed receive (a reset) fails every later read too
        }
    }
    if (r != nullptr) {
        r->on_shared(res == -ENOBUFS); // last: the resumed coroutine may free the core
    }
}

inline void channel_core::on_readiness(int res, bool ended) noexcept {
    if (res > 0) {
        readable = true;
    } else if (res == -EINVAL) {
        ctx->disable_readiness_receives(); // a kernel without multishot poll (before 5.13)
    } else if (res != -ECANCELED) {
        read_error = res;
    }
    if (!ended && !disarming && ctx->completion_receives_now()) {
        disarm(); // completions come in batches: the next read that waits arms a recv
    }
    if (reader == nullptr) {
        return;
    }
    // Last: the resumed coroutine may free the core. A poll's report adds nothing to the
    // input, so what the read last evaluated still holds: on to the receive.
    if (res > 0) {
        reader->on_readable();
    } else {
        reader->on_shared(false);
    }
}

bool read_awaiter::may_wait_armed() const noexcept {
    const channel_core& c = *core_;
    if (c.poll_armed) {
        return true; // the read's own recv takes what it needs, whatever the size
    }
    const std::size_t shared = c.ctx->options().receive_buffer_size;
    if (no_shared_buffer_ || c.receive_hint > shared) {
        return false; // a stream: receives of its own, as large as the hint, cost less
    }
    switch (kind_) {
    case kind::exact:
        return count_ <= c.input.size() + shared;
    case kind::exact_into:
        return c.progress.direct == 0 && count_ - c.progress.from_buffer <= shared;
    default:
        return true;
    }
}

void read_awaiter::on_shared(bool starved) noexcept {
    channel_core& c = *core_;
    if (c.aborted || !c.handle_alive) {
        error_ = fail_closed;
        state_ = state::failed;
        wake();
        return;
    }
    no_shared_buffer_ = no_shared_buffer_ || starved;
    evaluate();
    on_readable();
}

void read_awaiter::on_readable() noexcept {
    channel_core& c = *core_;
    pull_ready();
    if (state_ == state::pending) {
        if (timed_out_) {
            error_ = fail_timed_out;
            state_ = state::failed;
        } else if (cancelled_) {
            error_ = fail_cancelled;
            state_ = state::failed;
        } else if (c.armed) {
            if (!may_wait_armed()) {
                c.disarm(); // then receive into the buffer or dest directly
            }
            return;
        } else if (start_receive()) {
            return;
        }
    }
    wake();
}

void read_awaiter::wait_on_shared() noexcept {
    if (!counted_wait_) {
        counted_wait_ = true; // the multishot receive is uncounted: this wait is the work
        core_->ctx->operation_started();
    }
    if (cancel_ != nullptr) {
        cancel_->attach(this);
    }
}

void read_awaiter::uncount_wait() noexcept {
    if (counted_wait_) {
        counted_wait_ = false;
        core_->ctx->operation_finished();
    }
}

void read_awaiter::wake() noexcept {
    uncount_wait();
    if (state_ == state::failed) {
        restore_direct_bytes();
    }
    if (cancel_ != nullptr) {
        cancel_->detach(this);
    }
    disarm_deadline();
    core_->reader = nullptr;
    waiter_.resume();
}

bool read_awaiter::start_receive() noexcept {
    channel_core& c = *core_;
    if (cancel_ != nullptr && cancel_->cancel_requested()) {
        error_ = fail_cancelled;
        state_ = state::failed;
        return false;
    }
    // Called again when a receive came back without completing the read: a read cancelled
    // meanwhile (whose cancel found nothing left to cancel), or a channel closed or dropped
    // meanwhile (lingering now, or closed), must not receive again.
    if (c.aborted || !c.handle_alive) {
        error_ = fail_closed;
        state_ = state::failed;
        return false;
    }
    if (cancelled_) {
        error_ = fail_cancelled;
        state_ = state::failed;
        return false;
    }
    if (c.armed) {
        // The multishot receive delivers (on_shared); a read that needs a receive of its
        // own ends it first and submits one when it has ended.
        if (!may_wait_armed()) {
            c.disarm();
        }
        c.release_consumed_borrow();
        if (c.input.empty()) {
            c.input.release_if_idle(c.opts.keep_buffer); // as below: idle holds no big buffer
        }
        wait_on_shared();
        return true;
    }
    uncount_wait(); // a receive of its own counts by itself
    void* target;
    std::size_t size;
    if (kind_ == kind::exact_into) {
        // Everything buffered is already in dest: receive the rest straight into it.
        into_dest_ = true;
        const read_progress& p = c.progress;
        target = dest() + p.from_buffer + p.direct;
        size = count_ - p.from_buffer - p.direct;
    } else {
        c.release_consumed_borrow();
        const std::size_t shared_size = c.ctx->options().receive_buffer_size;
        const bool light_traffic = c.receive_hint <= shared_size;
        if (c.input.empty() && light_traffic) {
            // A stream keeps its buffer (no allocation per receive); light traffic lets a
            // large one go.
            c.input.release_if_idle(c.opts.keep_buffer);
        }
        // Waiting with nothing buffered: let the kernel pick a shared buffer when data
        // arrives, so a connection that waits holds no receive memory. A frame known to be
        // larger than one such buffer goes straight into the channel's own buffer instead.
        // While data streams in (the hint has grown past a shared buffer), large receives
        // into the channel's own buffer cost fewer system calls than small shared ones.
        provided_buffers* shared = nullptr;
        if (c.input.empty() && !no_shared_buffer_ && light_traffic &&
            (kind_ != kind::exact || count_ <= shared_size)) {
            shared = c.ctx->receive_buffers();
        }
        if (shared != nullptr && c.ctx->readiness_receives_now()) {
            c.arm_readiness();
            wait_on_shared();
            return true;
        }
        if (shared != nullptr && c.ctx->multishot_receives()) {
            c.arm_multishot(shared);
            wait_on_shared();
            return true;
        }
        if (shared != nullptr) {
            io_uring_sqe* sqe = c.ctx->get_sqe();
            io_uring_prep_recv(sqe, c.fd, nullptr, shared->buffer_size(), 0);
            sqe->flags |= IOSQE_BUFFER_SELECT;
            sqe->buf_group = shared->group();
            c.progress.asked = shared->buffer_size();
            return finish_start(sqe);
        }
        const std::span<char> space = own_space();
        if (space.empty()) {
            return false;
        }
        target = space.data();
        size = space.size();
    }
    c.progress.asked = size;
    io_uring_sqe* sqe = c.ctx->get_sqe();
    io_uring_prep_recv(sqe, c.fd, target, size, 0);
    return finish_start(sqe);
}

std::span<char> read_awaiter::own_space() noexcept {
    channel_core& c = *core_;
    std::size_t want = c.receive_hint;
    if (kind_ == kind::exact) {
        want = std::max(want, count_ - c.input.size());
    }
    std::span<char> space;
    try {
        c.copy_out_borrow();
        space = c.input.prepare(want);
    } catch (const std::bad_alloc&) {
        error_ = -ENOMEM;
        state_ = state::failed;
        return {};
    }
    return space.first(std::min(space.size(), std::max(want, c.opts.receive_size)));
}

bool read_awaiter::finish_start(io_uring_sqe* sqe) noexcept {
    channel_core& c = *core_;
    io_uring_sqe_set_data(sqe, static_cast<completion*>(this));
    in_flight_ = true;
    c.ctx->operation_started();
    ++c.stats.receive_submissions;
    if (cancel_ != nullptr) {
        cancel_->attach(this);
    }
    return true;
}

void read_awaiter::fail_receive(int res) noexcept {
    channel_core& c = *core_;
    state_ = state::failed;
    if (c.aborted || !c.handle_alive) {
        error_ = fail_closed;
    } else if (res == -ECANCELED && cancelled_) {
        error_ = fail_cancelled;
    } else if (res == -ECANCELED && timed_out_) {
        error_ = fail_timed_out;
    } else {
        c.read_error = res; // a failed receive (a reset) fails every later read too
        error_ = res;
    }
}

bool read_awaiter::keep_received(cqe_result last) noexcept {
    if (last.res <= 0) {
        if ((last.flags & IORING_CQE_F_BUFFER) != 0) {
            core_->ctx->receive_buffers()->recycle(
                static_cast<std::uint16_t>(last.flags >> IORING_CQE_BUFFER_SHIFT));
        }
        return true;
    }
    const auto size = static_cast<std::size_t>(last.res);
    if (!into_dest_) {
        core_->adapt_receive_hint(core_->progress.asked, size);
    }
    try {
        if ((last.flags & IORING_CQE_F_BUFFER) != 0) {
            core_->take_provided(static_cast<std::uint16_t>(last.flags >> IORING_CQE_BUFFER_SHIFT),
                                 size);
        } else if (into_dest_) {
            core_->progress.direct += size;
        } else {
            core_->input.commit(size);
        }
    } catch (const std::bad_alloc&) {
        return false;
    }
    return true;
}

void read_awaiter::complete(completion* self, int res, std::uint32_t flags) noexcept {
    auto* r = static_cast<read_awaiter*>(self);
    channel_core& c = *r->core_;
    r->in_flight_ = false;
    if (r->cancel_ != nullptr) {
        r->cancel_->detach(r);
    }
    if (res > 0) {
        ++c.stats.receives;
        c.stats.bytes_received += static_cast<std::size_t>(res);
        if (log_enabled(log_level::trace)) {
            log(log_level::trace, "channel {}: received {} bytes", c.peer().to_string(), res);
        }
        if (!r->keep_received({res, flags})) {
            r->error_ = -ENOMEM;
            r->state_ = state::failed;
        } else {
            r->evaluate();
            if (r->state_ == state::pending) {
                if (r->timed_out_) {
                    r->error_ = fail_timed_out; // the deadline passed as these bytes came
                    r->state_ = state::failed;
                } else if (r->start_receive()) {
                    return; // not there yet: receive again without resuming the coroutine
                }
            }
        }
    } else if (res == -ENOBUFS) {
        // Every shared receive buffer is in use: receive into the channel's own this time.
        r->no_shared_buffer_ = true;
        if (r->start_receive()) {
            return;
        }
    } else {
        r->keep_received({res, flags}); // no data, but it may name a buffer to give back
        if (res == 0) {
            ++c.stats.receives;
            c.eof = true;
            r->evaluate();
        } else {
            r->fail_receive(res);
        }
    }
    r->wake();
}

void read_awaiter::restore_direct_bytes() noexcept {
    // read_exact(span) received these straight into dest; put them back behind the bytes
    // still buffered (which were copied but never consumed), so the channel holds exactly
    // what it would have held had the read never started.
    read_progress& p = core_->progress;
    if (kind_ == kind::exact_into && p.direct != 0) {
        try {
            core_->input.append(std::string_view(dest() + p.from_buffer, p.direct));
        } catch (const std::bad_alloc&) {
            core_->read_error = -ENOMEM;
        }
        p.direct = 0;
    }
}

std::string_view read_awaiter::finish() {
    if (state_ == state::failed) {
        throw_failure();
    }
    buffer& input = core_->input;
    switch (kind_) {
    case kind::exact_into:
        input.consume(core_->progress.from_buffer);
        return {ptr_, count_};
    case kind::skip:
    case kind::skip_until:
        return {};
    default: {
        const std::size_t size = core_->progress.frame_size;
        std::string_view frame = input.data().substr(0, size);
        input.consume(kind_ == kind::until ? size + count_ : size); // with the terminator
        return frame;
    }
    }
}

void read_awaiter::throw_failure() const {
    const channel_core& c = *core_;
    std::string what;
    switch (kind_) {
    case kind::until:
        what = fmt::format("read_until {:?} from {}", term(), c.peer().to_string());
        break;
    case kind::skip_until:
        what = fmt::format("skip_until {:?} from {}", term(), c.peer().to_string());
        break;
    case kind::exact:
    case kind::exact_into:
        what = fmt::format("read_exact({}) from {}", count_, c.peer().to_string());
        break;
    case kind::some:
        what = fmt::format("read_some from {}", c.peer().to_string());
        break;
    case kind::to_eof:
        what = fmt::format("read_to_eof from {}", c.peer().to_string());
        break;
    case kind::skip:
        what = fmt::format("skip({}) from {}", count_, c.peer().to_string());
        break;
    }
    switch (error_) {
    case fail_eof:
        throw std::system_error(make_error_code(errc::eof), what + ": connection closed by peer");
    case fail_incomplete: {
        // read_exact(span) has put what it received back into the buffer by now.
        std::size_t got =
            kind_ == kind::skip || kind_ == kind::skip_until ? c.progress.skipped : c.input.size();
        std::size_t expected =
            kind_ == kind::exact || kind_ == kind::exact_into || kind_ == kind::skip ? count_ : 0;
        std::string detail = expected != 0
                                 ? fmt::format("after {} of {} bytes", got, expected)
                                 : fmt::format("after {} bytes without the terminator", got);
        throw incomplete_read_error(got, expected,
                                    what + ": connection closed by peer inside a frame, " + detail);
    }
    case fail_too_large: {
        std::size_t limit = kind_ == kind::until ? c.opts.max_frame : c.opts.max_buffer;
        throw frame_too_large_error(limit, fmt::format("{}: frame larger than the {}-byte limit",
                                                       what, limit));
    }
    case fail_timed_out:
        throw std::system_error(make_error_code(errc::timed_out), what);
    case fail_cancelled:
        throw std::system_error(make_error_code(errc::cancelled), what);
    case fail_closed:
        throw std::system_error(make_error_code(errc::closed), what);
    default:
        throw std::system_error(io_error_code(error_), what);
    }
}

// ---------------------------------------------------------------- writer_awaiter

void writer_awaiter::release() noexcept {
    if (waiting_ && core_->writer == this) {
        core_->writer = nullptr;
    }
    core_->maybe_delete();
}

bool writer_awaiter::check_ready() {
    // Only an awaiter that may wait takes the writer; write() below the high-water mark
    // (kinds queued and no_wait) never does.
    if (kind_ != kind::no_wait && core_->writer != nullptr) {
        throw std::logic_error("ringchat::channel: another coroutine already waits on the writer");
    }
    return core_->writer_condition(kind_);
}

void writer_awaiter::await_suspend(std::coroutine_handle<> waiter) noexcept {
    waiter_ = waiter;
    waiting_ = true;
    core_->writer = this;
}

void writer_awaiter::check_failure() {
    const channel_core& c = *core_;
    if (c.producer_error) {
        std::rethrow_exception(c.producer_error);
    }
    if (c.write_error != 0) {
        const address peer = c.peer();
        throw_io_error(c.write_error, "send to", &peer);
    }
    if (c.aborted) {
        throw std::system_error(make_error_code(errc::closed),
                                fmt::format("send to {}", c.peer().to_string()));
    }
}

} // namespace detail

// ---------------------------------------------------------------- channel

channel::channel(stream s, channel_options options) {
    if (!s.is_open()) {
        throw std::invalid_argument("ringchat::channel needs an open stream");
    }
    if (options.low_water > options.high_water || options.receive_size == 0 ||
        options.max_frame == 0) {
        throw std::invalid_argument(
            "ringchat::channel_options: need low_water <= high_water and non-zero sizes");
    }
    core_ = new detail::channel_core(std::move(s), options);
}

channel& channel::operator=(channel&& other) noexcept {
    if (this != &other) {
        if (core_ != nullptr) {
            core_->handle_released();
        }
        core_ = std::exchange(other.core_, nullptr);
    }
    return *this;
}

channel::~channel() {
    if (core_ != nullptr) {
        core_->handle_released();
    }
}

detail::channel_core& channel::core() const {
    if (core_ == nullptr) {
        throw std::logic_error("ringchat::channel used after it was moved from");
    }
    return *core_;
}

detail::read_view_awaiter channel::read_until(std::string_view term) {
    if (term.empty()) {
        throw std::invalid_argument("channel::read_until: the terminator must not be empty");
    }
    return {&core(), detail::read_awaiter::kind::until, term.data(), term.size()};
}

detail::read_view_awaiter channel::read_exact(std::size_t n) {
    return {&core(), detail::read_awaiter::kind::exact, nullptr, n};
}

detail::read_view_awaiter channel::read_exact(std::span<char> dest) {
    return {&core(), detail::read_awaiter::kind::exact_into, dest.data(), dest.size()};
}

detail::read_view_awaiter channel::read_some(std::size_t max_bytes) {
    if (max_bytes == 0) {
        throw std::invalid_argument("channel::read_some: max_bytes must be at least 1");
    }
    return {&core(), detail::read_awaiter::kind::some, nullptr, max_bytes};
}

detail::read_view_awaiter channel::read_to_eof() {
    return {&core(), detail::read_awaiter::kind::to_eof, nullptr, 0};
}

detail::skip_awaiter channel::skip(std::size_t n) {
    return {&core(), detail::read_awaiter::kind::skip, nullptr, n};
}

detail::skip_awaiter channel::skip_until(std::string_view term) {
    if (term.empty()) {
        throw std::invalid_argument("channel::skip_until: the terminator must not be empty");
    }
    return {&core(), detail::read_awaiter::kind::skip_until, term.data(), term.size()};
}

std::string_view channel::buffered() const noexcept {
    return core_ != nullptr ? core_->input.data() : std::string_view{};
}

void channel::discard(std::size_t n) {
    auto& c = core();
    if (n > c.input.size()) {
        throw std::out_of_range(fmt::format("channel::discard({}): only {} bytes are buffered", n,
                                            c.input.size()));
    }
    c.input.consume(n);
}

namespace {

[[noreturn]] [[gnu::noinline]] void refuse_push(const detail::channel_core& c) {
    if (c.aborted) {
        // After close() writes fail like reads do, not as a programming error: close() is
        // often called from another coroutine (a timeout) while a handler still pushes.
        throw std::system_error(make_error_code(errc::closed),
                                fmt::format("push to {}", c.peer().to_string()));
    }
    // Not open: the write side was shut down or is being.
    throw std::logic_error("ringchat::channel: push after shutdown_send() or close_when_done()");
}

// Every push checks this: the test inline, the throwing out of line.
inline void check_can_push(const detail::channel_core& c) {
    if (c.aborted || c.state != detail::channel_core::phase::open) [[unlikely]] {
        refuse_push(c);
    }
}

} // namespace

void channel::push(std::string_view bytes) {
    auto& c = core();
    check_can_push(c);
    if (c.write_error != 0 || bytes.empty()) {
        return;
    }
    if (c.borrowed_bid >= 0 && c.lend(bytes)) {
        return;
    }
    // Coalesce with the last queued buffer unless a send in flight covers it.
    if (!c.queue.empty() && c.queue.size() > c.in_flight_entries && !c.queue.back().is_producer() &&
        !c.queue.back().is_lent()) {
        c.queue.back().data.append(bytes);
    } else {
        detail::out_entry& e = c.queue.push_back();
        e.data.reserve(std::max(bytes.size(), detail::min_entry_capacity));
        e.data.assign(bytes);
    }
    c.queued += bytes.size();
    c.ctx->request_flush(&c);
}

void channel::push(std::string&& bytes) {
    auto& c = core();
    check_can_push(c);
    if (c.write_error != 0 || bytes.empty()) {
        return;
    }
    if (bytes.capacity() < detail::min_entry_capacity) {
        push(std::string_view(bytes)); // short: copying is as cheap, and keeps it on the heap
        return;
    }
    detail::out_entry& e = c.queue.push_back();
    c.queued += bytes.size();
    e.data = std::move(bytes);
    c.ctx->request_flush(&c);
}

void channel::push_producer(std::unique_ptr<detail::producer_holder> p) {
    auto& c = core();
    check_can_push(c);
    if (c.write_error != 0) {
        return;
    }
    detail::out_entry& e = c.queue.push_back();
    e.producer = std::move(p);
    c.ctx->request_flush(&c);
}

detail::writer_awaiter channel::drain() {
    return {&core(), detail::writer_awaiter::kind::drain};
}

detail::writer_awaiter channel::write(std::string_view bytes) {
    detail::channel_core& c = core();
    // At light load the reply goes out now rather than when the loop next flushes, after
    // the handler has set up its next read: the send is what the peer waits for. With
    // nothing queued before it, straight from `bytes` (no queue entry); else with what is
    // queued. Not while another coroutine waits on the writer, which a flush could resume
    // from here.
    bool send_at_once = c.ctx->direct_sends_now() && !c.sending && c.writer == nullptr &&
                        c.write_error == 0;
    if (send_at_once && c.queue.empty() && !bytes.empty()) {
        check_can_push(c);
        const std::size_t sent = c.send_now(bytes);
        if (sent == bytes.size()) {
            return {&c, detail::writer_awaiter::kind::queued}; // all sent: nothing queued
        }
        // Partly sent: the socket is full, and the loop's flush sends the rest by the ring.
        send_at_once = sent == 0;
        bytes.remove_prefix(sent);
    }
    push(bytes); // changes none of what send_at_once was computed from
    if (send_at_once && c.flush_queued) {
        c.ctx->cancel_flush(&c);
        c.flush();
    }
    if (c.queued <= c.opts.high_water) {
        // Below the high mark: nothing to wait for, whatever low_water says; a send failure
        // (write_error, also set with producer_error) is still rethrown by await_resume.
        return {&c, c.write_error == 0 ? detail::writer_awaiter::kind::queued
                                       : detail::writer_awaiter::kind::no_wait};
    }
    return {&c, detail::writer_awaiter::kind::below_low_water};
}

detail::writer_awaiter channel::shutdown_send() {
    core().request_shutdown();
    return {&core(), detail::writer_awaiter::kind::shut_down};
}

detail::writer_awaiter channel::close_when_done() {
    auto& c = core();
    c.close_wanted = true;
    c.request_shutdown();
    return {&c, detail::writer_awaiter::kind::shut_down};
}

void channel::close() noexcept {
    if (core_ == nullptr || core_->aborted) {
        return;
    }
    auto& c = *core_;
    c.aborted = true;
    c.drop_parked();
    if (c.reader != nullptr) {
        c.reader->cancel_now();
    }
    c.cancel_in_flight();
    c.queue.clear();
    c.queued = 0;
    c.ctx->cancel_flush(&c);
    c.close_fd();
    c.state = detail::channel_core::phase::closed;
    c.notify_writer();
}

void channel::set_read_timeout(std::chrono::milliseconds timeout) {
    core().opts.read_timeout = std::max(timeout, std::chrono::milliseconds::zero());
}

std::size_t channel::input_capacity() const noexcept {
    return core_ ? core_->input.capacity() : 0;
}
std::size_t channel::queued_bytes() const noexcept { return core_ ? core_->queued : 0; }
// These four require a channel that was not moved from.
address channel::peer() const noexcept { return core_->peer(); }
io_context& channel::context() const noexcept { return *core_->ctx; }
int channel::native_handle() const noexcept { return core_ ? core_->fd : -1; }
const channel_stats& channel::stats() const noexcept { return core_->stats; }
const channel_options& channel::options() const noexcept { return core_->opts; }

} // namespace ringchat
