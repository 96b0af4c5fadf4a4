#pragma once

#include <ringchat/task.hpp>

#include <liburing.h>

#include <atomic>
#include <chrono>
#include <coroutine>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <sys/socket.h>
#include <sys/uio.h>

namespace ringchat {

class io_context;

namespace detail {

/// The record an io_uring SQE's user_data points at. `on_complete` receives the CQE's res
/// and flags on the context's thread; it must not throw. user_data 0 marks SQEs whose
/// completions are ignored (cancel requests, linked timeouts, fire-and-forget closes).
struct completion {
    void (*on_complete)(completion* self, int res, std::uint32_t flags) noexcept = nullptr;
};

class task_promise_base;

// Puts a spawned task on its context's list and returns its position (spawn; may throw
// std::bad_alloc).
std::uint32_t add_spawned(io_context& ctx, std::coroutine_handle<> frame,
                          task_promise_base* promise);
class provided_buffers;

/// A sendmsg's header and iovecs. The kernel reads them only while it consumes the SQE
/// (IORING_FEAT_SUBMIT_STABLE), so they can live in scratch memory of the context until the
/// next submission instead of in every connection.
struct send_scratch {
    static constexpr unsigned max_iovecs = 16;
    msghdr message{};
    iovec iov[max_iovecs]{};
};

/// A deadline on the context's coarse timer wheel (10 ms slots): `expire` runs on the io
/// thread at most one slot after `when`. Registering and removing one is a list operation
/// with no system call, unlike a linked timeout per operation; channel reads use it.
struct timer_entry {
    void (*expire)(timer_entry* self) noexcept = nullptr;
    std::chrono::steady_clock::time_point when{};
    timer_entry* prev = nullptr;
    timer_entry* next = nullptr;
    std::uint16_t slot = 0;
    bool linked = false;
};

/// What the kernel reported for an operation: a CQE's res and flags.
struct cqe_result {
    int res = 0;
    std::uint32_t flags = 0;
};

/// Something with output to prepare once per loop iteration, just before the context submits
/// its batch (a channel's writer): every push made while handling one batch of completions
/// then goes out in one sendmsg.
struct flush_node {
    void (*flush)(flush_node* self) noexcept = nullptr;
    flush_node* next_flush = nullptr;
    bool flush_queued = false;
};

/// An object the context owns until it finishes on its own or the context is destroyed (a
/// channel whose handle is gone but which still sends queued output, then closes).
struct owned_node {
    void (*destroy)(owned_node* self) noexcept = nullptr;
    owned_node* prev_owned = nullptr;
    owned_node* next_owned = nullptr;
};

} // namespace detail

/// How channels wait for input (io_context_options::receive).
enum class receive_mode : std::uint8_t {
    /// Readiness at light load with few channels, completion otherwise (the default).
    adaptive,
    /// Always a multishot recv: the kernel receives into a shared buffer as data arrives.
    completion,
    /// Always a multishot poll, then a recv system call of the channel's own.
    readiness,
};

/// Setup choices for an io_context.
struct io_context_options {
    /// Submission queue size (rounded up to a power of two by the kernel).
    unsigned sq_entries = 256;
    /// Completion queue size; 0 means 16 × sq_entries, so bursts of multishot completions
    /// fit without overflowing (the kernel keeps overflowed CQEs anyway, more slowly).
    unsigned cq_entries = 0;
    /// Ask for IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN, falling back to
    /// COOP_TASKRUN and then to no flags on kernels that reject them.
    bool defer_taskrun = true;
    /// Receive buffers shared by the context's channels (a provided buffer ring): a channel
    /// waiting for input with nothing buffered holds no receive memory of its own. Count
    /// (power of two) and size; 0 turns it off. Mapped lazily, faulted in only as used.
    unsigned receive_buffers = 1024;
    unsigned receive_buffer_size = 4096;
    /// Channels receive with one multishot recv that stays armed across reads (kernel 6.0+;
    /// needs the shared receive buffers) instead of submitting a recv for every read. Turned
    /// off by itself on a kernel that rejects it; false keeps single-shot receives.
    bool multishot_receive = true;
    /// At light load a channel sends with a send system call of its own instead of through
    /// the ring. Light load means that the last wait for completions returned exactly one
    /// (of an operation: cancellations and the timer wheel's ticks do not count).
    /// Bytes the socket cannot take at once still go through the ring, so nothing blocks.
    /// With one connection this saves the send's completion and a second trip through the
    /// loop per reply: about 2% of the server's CPU per message (docs/benchmarks.md). Once
    /// completions come in batches, sends go through the ring again, where one
    /// io_uring_enter carries them all. false: always through the ring.
    bool direct_sends = true;
    /// How a channel with nothing buffered waits for input.
    /// - completion: a multishot recv stays armed across reads and the kernel receives each
    ///   arrival into a shared buffer (receive_buffers), then reports it. Under load this
    ///   costs least: one completion per arrival and no system call.
    /// - readiness: a multishot poll stays armed; when it reports the socket readable, the
    ///   read receives with a recv system call of its own, into one of a few (8) spare
    ///   shared buffers kept out of the kernel's ring, or into the channel's own buffer for
    ///   a large frame or when no spare is free (under load, as an epoll server would).
    ///   Bytes that arrive between reads stay in the socket until the next read (no shared
    ///   buffers are parked meanwhile). Under load it costs a system call per arrival more.
    /// - adaptive (the default): readiness while the context has at most 8 channels and
    ///   each of the last few waits for completions returned exactly one; completion as
    ///   soon as one returns several, or once there are more channels. A channel switches
    ///   when its armed wait reports something, by cancelling it (one more completion).
    ///   The limit on channels keeps many connections whose load comes and goes from
    ///   switching back and forth, which cost about 2% of CPU at 1,000 connections.
    /// Readiness needs the shared receive buffers and a kernel with multishot poll (5.13+);
    /// without them channels receive by completion. Measured with the servers side by side
    /// (docs/benchmarks.md), adaptive answers one connection about 1% sooner (p50) than
    /// completion for about 3% less server CPU per message; with more than 8 channels it
    /// is completion.
    receive_mode receive = receive_mode::adaptive;
};

/// The executor: one io_uring, driven by run() on the thread that constructed it. Coroutines
/// suspended on operations are resumed from run() as their completions arrive; submissions
/// made while handling one batch of completions go to the kernel together in one
/// io_uring_submit_and_wait. Only post() and stop() may be called from other threads.
/// Non-copyable, non-movable (operations point at it).
class io_context {
public:
    /// Sets up the ring. Throws std::system_error with errc::io_uring_unavailable and a
    /// message saying what to do when io_uring is disabled (sysctl kernel.io_uring_disabled),
    /// blocked (seccomp, containers), missing (old kernel) or short of locked memory.
    explicit io_context(io_context_options options = {});

    /// Destroys spawned tasks that have not finished (cancelling their I/O and waiting for the
    /// kernel to let go of their buffers), then closes the ring. Call on the context's thread.
    ~io_context();

    io_context(const io_context&) = delete;
    io_context& operator=(const io_context&) = delete;

    /// Processes completions and posted functions until stop() is called or no work is left
    /// (no operation in flight, nothing posted, no work_guard alive). Io thread only.
    void run();

    /// Makes run() return at its next step; later run() calls return at once until
    /// restart(). Callable from any thread.
    void stop() noexcept;

    /// True after stop(), until restart().
    [[nodiscard]] bool stopped() const noexcept { return stop_requested_.load(); }

    /// Clears a previous stop() so run() may be called again. Io thread only.
    void restart() noexcept { stop_requested_.store(false); }

    /// Queues `fn` to run on the context's thread inside run(), and wakes run() if it waits.
    /// Callable from any thread. Exceptions thrown by `fn` are logged and dropped.
    void post(std::function<void()> fn);

    /// Keeps run() from returning for lack of work while alive (like asio's work guard), so
    /// another thread can post() later. Create and destroy it on any thread.
    class work_guard {
    public:
        explicit work_guard(io_context& ctx) noexcept : ctx_(&ctx) { ctx_->work_count_++; }
        work_guard(work_guard&& other) noexcept : ctx_(std::exchange(other.ctx_, nullptr)) {}
        work_guard(const work_guard&) = delete;
        work_guard& operator=(const work_guard&) = delete;
        work_guard& operator=(work_guard&&) = delete;
        ~work_guard() { reset(); }
        /// Releases the guard early; run() may then return when idle.
        void reset() noexcept;

    private:
        io_context* ctx_;
    };

    /// Description of the setup the kernel accepted, e.g. "SINGLE_ISSUER|DEFER_TASKRUN,
    /// registered ring fd".
    [[nodiscard]] const std::string& setup_description() const noexcept { return setup_desc_; }

    /// The options the context was created with.
    [[nodiscard]] const io_context_options& options() const noexcept { return options_; }

    /// The io_uring setup flags the kernel accepted.
    [[nodiscard]] unsigned setup_flags() const noexcept { return setup_flags_; }

    /// Number of operations submitted (or prepared) whose completion has not been handled.
    [[nodiscard]] std::size_t operations_in_flight() const noexcept { return in_flight_; }

    /// Number of spawned tasks that have not finished yet.
    [[nodiscard]] std::size_t spawned_tasks() const noexcept { return spawned_.size(); }

    /// How many times the timer wheel (read deadlines, lingering closes) has woken the loop.
    /// It sleeps until the first 10 ms slot that holds a deadline (or one turn, 2.56 s, for
    /// deadlines further out), so a server whose connections wait with long idle timeouts
    /// is not woken in between; on kernels before 5.11, which cannot move an armed timeout,
    /// it wakes every 10 ms while it holds deadlines (setup_description() says so).
    [[nodiscard]] std::uint64_t wheel_wakeups() const noexcept { return wheel_wakeups_; }

    // ---- for awaiters (ops.hpp) and library internals; io thread only ----

    /// Makes room for `count` SQEs (submitting what is queued when the submission ring is
    /// full) and returns the first. Never fails. The caller takes the other count - 1 at once
    /// with io_uring_get_sqe(native()), which then cannot fail, and fills them all.
    io_uring_sqe* get_sqe(unsigned count = 1) noexcept;

    /// Counts one operation whose completion will reach a detail::completion.
    void operation_started() noexcept { ++in_flight_; }
    /// Takes back one operation_started() whose completion is not counted by itself: work
    /// that ends without a final CQE of its own (a read that stops waiting on a channel's
    /// multishot receive).
    void operation_finished() noexcept { --in_flight_; }

    /// SQE user_data for an operation that does not count as work by itself (run() may
    /// return while it is in flight): the completion's address with this bit set. Its
    /// completions reach it like any other; its owner counts the time someone waits on it
    /// with operation_started() / operation_finished(). A channel's multishot receive is
    /// one: an idle channel must not keep run() from returning.
    static constexpr std::uint64_t uncounted_bit = 1;
    static std::uint64_t uncounted(detail::completion* op) noexcept {
        return reinterpret_cast<std::uint64_t>(op) | uncounted_bit;
    }

    /// Cancels the operation whose SQE user_data is `target` and blocks until the kernel has
    /// posted its final completion, which is then dropped. Completions of other operations
    /// that arrive meanwhile are kept and dispatched later by run(). Called by the destructor
    /// of an awaiter whose coroutine is destroyed while its operation is in flight.
    /// Returns the final completion's result (its flags may name a provided buffer that the
    /// caller must recycle).
    /// `counted` false: the operation was submitted with uncounted(target) as user_data.
    detail::cqe_result cancel_and_wait(detail::completion* target, bool counted = true) noexcept;

    /// Puts `entry` on the timer wheel (entry->when and expire set by the caller); its
    /// expire function runs once, unless remove_timer() comes first. Io thread only.
    void add_timer(detail::timer_entry* entry) noexcept;
    /// Takes `entry` off the wheel if it is on it.
    void remove_timer(detail::timer_entry* entry) noexcept;
    /// Makes `entry` expire at `when` (expire set by the caller), whether or not it is on the
    /// wheel. Moving a linked entry's deadline later only stores `when`; the wheel moves the
    /// entry to its new slot when the old one comes up. So an idle timeout renewed on every
    /// read costs no list operation, and an entry may stay linked after its owner stopped
    /// caring: its expire function must check that it still applies.
    void set_timer(detail::timer_entry* entry,
                   std::chrono::steady_clock::time_point when) noexcept;

    /// Scratch for one sendmsg prepared now and submitted with the next submission; null
    /// if the kernel does not promise IORING_FEAT_SUBMIT_STABLE (the caller keeps its own).
    detail::send_scratch* take_send_scratch() noexcept;

    /// The context's provided receive buffers, set up on first use; null if turned off or
    /// unsupported by the kernel.
    detail::provided_buffers* receive_buffers() noexcept {
        return receive_buffers_tried_ ? receive_buffers_.get() : set_up_receive_buffers();
    }

    /// Whether channels may arm multishot receives: asked for in the options, and not
    /// rejected by the kernel yet.
    [[nodiscard]] bool multishot_receives() const noexcept { return multishot_receive_; }
    /// The kernel rejected a multishot receive (EINVAL): later receives are single-shot.
    void disable_multishot_receives() noexcept;

    /// Whether a flush should try a send system call before the ring: direct_sends is on,
    /// and the last wait returned one completion (io_context_options::direct_sends). False
    /// while run() hands the last SQEs to the kernel on its way out.
    [[nodiscard]] bool direct_sends_now() const noexcept {
        return last_reaped_ == 1 && options_.direct_sends;
    }

    /// Whether a channel that starts waiting for input should wait by readiness: always in
    /// receive_mode::readiness; in adaptive mode once the last light_streak_needed waits
    /// each returned one completion, while the context has at most adaptive_max_channels
    /// channels (io_context_options::receive).
    [[nodiscard]] bool readiness_receives_now() const noexcept {
        return readiness_receive_ &&
               (options_.receive == receive_mode::readiness ||
                (light_streak_ >= light_streak_needed && channels_ <= adaptive_max_channels));
    }
    /// Whether a channel waiting by readiness should go back to waiting by completion: the
    /// last wait returned several completions or the context has more than
    /// adaptive_max_channels channels, and the mode is not receive_mode::readiness
    /// (in completion mode no channel waits by readiness, so only adaptive mode asks).
    [[nodiscard]] bool completion_receives_now() const noexcept {
        return options_.receive != receive_mode::readiness &&
               (light_streak_ == 0 || channels_ > adaptive_max_channels);
    }
    /// A channel's core counts itself while it exists (adaptive mode's limit on channels).
    void channel_opened() noexcept { ++channels_; }
    void channel_closed() noexcept { --channels_; }
    /// The kernel rejected a multishot poll (EINVAL): channels receive by completion.
    void disable_readiness_receives() noexcept;

    /// Queues an asynchronous cancel of the operation `target`; its CQE then reports
    /// -ECANCELED (or its result, if it already finished).
    void request_cancel(detail::completion* target) noexcept;
    /// The same for an operation submitted with uncounted(target) as user_data.
    void request_cancel_uncounted(detail::completion* target) noexcept;

    /// Calls `node->flush` once before the next submission (no-op if already queued).
    void request_flush(detail::flush_node* node) noexcept {
        if (!node->flush_queued) {
            node->flush_queued = true;
            node->next_flush = flush_head_;
            flush_head_ = node;
        }
    }
    /// Removes `node` from the flush list (before it is destroyed).
    void cancel_flush(detail::flush_node* node) noexcept;

    /// Takes ownership of `node`: ~io_context calls its destroy function if it is still
    /// there. The object calls disown() when it finishes by itself.
    void adopt(detail::owned_node* node) noexcept;
    void disown(detail::owned_node* node) noexcept;

    /// Resumes `h` from run() at the next step instead of on the current stack.
    void schedule(std::coroutine_handle<> h) { ready_handles_.push_back(h); }

    /// The ring, for code that prepares SQEs itself. Io thread only.
    io_uring* native() noexcept { return &ring_; }

private:
    friend std::uint32_t detail::add_spawned(io_context& ctx, std::coroutine_handle<> frame,
                                             detail::task_promise_base* promise);
    friend void detail::forget_spawned(io_context* ctx, std::uint32_t index) noexcept;

    struct cqe_copy {
        std::uint64_t user_data;
        int res;
        std::uint32_t flags;
    };

    static constexpr std::uint64_t wake_tag = 1;
    static constexpr std::uint64_t tick_tag = 2;
    static constexpr std::size_t wheel_slots = 256;
    static constexpr std::chrono::milliseconds wheel_tick{10};

    void setup(const io_context_options& options);
    void arm_wake_read() noexcept;
    detail::provided_buffers* set_up_receive_buffers() noexcept;
    void reap() noexcept;
    void dispatch_completions() noexcept;
    void run_ready_handles() noexcept;
    void run_posted() noexcept;
    void run_flushes() noexcept;
    void arm_tick() noexcept;
    void set_tick_timeout(std::chrono::steady_clock::time_point when) noexcept;
    [[nodiscard]] std::chrono::steady_clock::time_point slot_end(std::uint16_t slot) const noexcept;
    [[nodiscard]] bool probe_timeout_update() noexcept;
    [[nodiscard]] std::uint16_t slot_for(std::chrono::steady_clock::time_point when) const noexcept;
    void link_timer(detail::timer_entry* entry) noexcept;
    void unlink_timer(detail::timer_entry* entry) noexcept;
    void advance_wheel() noexcept;
    [[nodiscard]] bool has_work() const noexcept;

    io_uring ring_{};
    unsigned setup_flags_ = 0;
    io_context_options options_;
    static constexpr unsigned scratch_slots = 64;
    std::unique_ptr<detail::send_scratch[]> send_scratch_;
    unsigned send_scratch_used_ = 0;
    bool submit_stable_ = false;
    bool ring_fd_registered_ = false;
    std::unique_ptr<detail::provided_buffers> receive_buffers_;
    bool receive_buffers_tried_ = false;
    bool multishot_receive_ = false;
    std::string setup_desc_;

    std::vector<cqe_copy> completions_; // reaped, not yet dispatched
    // Completions of operations (not of ignored SQEs, wake-ups or ticks) that the last reap()
    // took from the ring.
    unsigned last_reaped_ = 0;
    // Consecutive reap()s that took exactly one such completion, up to light_streak_needed;
    // 0 after one that took several (a reap that took none leaves it as it is).
    unsigned light_streak_ = 0;
    static constexpr unsigned light_streak_needed = 4;
    // Channels whose core exists (open, closing or lingering). Adaptive mode waits by
    // readiness only while there are at most adaptive_max_channels: with many connections
    // a load that comes and goes would switch channels back and forth, a cancel each way.
    unsigned channels_ = 0;
    static constexpr unsigned adaptive_max_channels = 8;
    bool readiness_receive_ = false;
    std::size_t completions_pos_ = 0;
    std::vector<std::coroutine_handle<>> ready_handles_;
    std::vector<std::coroutine_handle<>> running_handles_;
    std::size_t in_flight_ = 0;

    int wake_fd_ = -1;
    std::uint64_t wake_buffer_ = 0;
    bool wake_armed_ = false;
    std::atomic<bool> stop_requested_{false};
    std::atomic<std::size_t> work_count_{0};
    std::mutex posted_mutex_;
    std::vector<std::function<void()>> posted_;
    std::vector<std::function<void()>> posted_running_;
    std::atomic<bool> has_posted_{false};

    detail::timer_entry* wheel_[wheel_slots] = {};
    std::size_t wheel_pos_ = 0;
    std::chrono::steady_clock::time_point wheel_time_{}; // start of slot wheel_pos_
    std::size_t timers_ = 0;
    bool tick_armed_ = false;
    // The kernel can move an armed timeout (IORING_TIMEOUT_UPDATE, 5.11+): the wheel's
    // timeout then waits for the first slot that holds an entry, and an earlier entry moves
    // it. Without it the wheel ticks every wheel_tick while it holds entries.
    bool tick_updates_ = false;
    std::chrono::steady_clock::time_point tick_when_{}; // when the armed tick fires
    std::uint64_t wheel_wakeups_ = 0;
    __kernel_timespec tick_timeout_{};
    detail::flush_node* flush_head_ = nullptr;
    detail::owned_node* owned_head_ = nullptr;
    // Live spawned tasks, unordered: each promise knows its index (removal swaps the last in).
    struct spawned_task {
        std::coroutine_handle<> frame;
        detail::task_promise_base* promise;
    };
    std::vector<spawned_task> spawned_;
};

/// Starts `t` now, on the calling thread, and lets it run on its own: the context owns it
/// from here on, an exception escaping it is logged (the process keeps running), and
/// ~io_context destroys it if it has not finished. Io thread only. The task's result value,
/// if any, is discarded. Throws std::logic_error for an empty task, and std::bad_alloc if
/// the context's list of tasks cannot grow (the task is then destroyed without running).
template <typename T>
void spawn(io_context& ctx, task<T> t) {
    auto handle = t.release();
    if (!handle) {
        throw std::logic_error("spawn of an empty ringchat::task");
    }
    std::uint32_t index;
    try {
        index = detail::add_spawned(ctx, handle, &handle.promise());
    } catch (...) {
        handle.destroy();
        throw;
    }
    // No wrapper coroutine: the task's own frame is all a spawned task costs.
    handle.promise().make_spawned(&ctx, index);
    handle.resume();
}

/// Runs `t` on `ctx` (driving ctx.run() until `t` finishes) and returns its value or rethrows
/// its exception. Throws std::system_error(errc::cancelled) if the context was stopped, or
/// ran out of work, before `t` finished. Call on the context's thread, outside run().
template <typename T>
T sync_wait(io_context& ctx, task<T> t);

namespace detail {

template <typename T>
struct sync_wait_state {
    std::exception_ptr error;
    std::optional<std::conditional_t<std::is_void_v<T>, char, std::remove_reference_t<T>*>>
        ref_or_flag;
    std::optional<std::conditional_t<std::is_void_v<T> || std::is_reference_v<T>, char, T>>
        value;
    bool finished = false;
};

template <typename T>
task<void> sync_wait_driver(io_context& ctx, task<T> t, sync_wait_state<T>& state) {
    try {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(t);
        } else if constexpr (std::is_reference_v<T>) {
            state.ref_or_flag = std::addressof(co_await std::move(t));
        } else {
            state.value.emplace(co_await std::move(t));
        }
    } catch (...) {
        state.error = std::current_exception();
    }
    state.finished = true;
    ctx.stop();
}

[[noreturn]] void throw_sync_wait_unfinished();

} // namespace detail

template <typename T>
T sync_wait(io_context& ctx, task<T> t) {
    detail::sync_wait_state<T> state;
    // The driver is owned here, not spawned: if run() returns before it finishes, the
    // guard destroys it (cancelling its I/O) before `state` goes out of scope.
    struct destroy_guard {
        std::coroutine_handle<detail::task_promise<void>> h;
        ~destroy_guard() { h.destroy(); }
    };
    auto handle = detail::sync_wait_driver(ctx, std::move(t), state).release();
    destroy_guard guard{handle};
    if (handle.promise().start_inline(handle, std::noop_coroutine())) {
        ctx.run();
    }
    ctx.restart();
    if (!state.finished) {
        detail::throw_sync_wait_unfinished();
    }
    if (state.error) {
        std::rethrow_exception(state.error);
    }
    if constexpr (std::is_void_v<T>) {
        return;
    } else if constexpr (std::is_reference_v<T>) {
        return **state.ref_or_flag;
    } else {
        return std::move(*state.value);
    }
}

} // namespace ringchat
