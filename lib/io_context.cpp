#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/log.hpp>

#include "provided_buffers.hpp"

#include <fmt/core.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <system_error>

#include <sys/eventfd.h>
#include <sys/resource.h>
#include <unistd.h>

namespace ringchat {

namespace {

int read_io_uring_disabled_sysctl() noexcept {
    std::FILE* f = std::fopen("/proc/sys/kernel/io_uring_disabled", "r");
    if (f == nullptr) {
        return -1;
    }
    int value = -1;
    if (std::fscanf(f, "%d", &value) != 1) {
        value = -1;
    }
    std::fclose(f);
    return value;
}

[[noreturn]] void throw_setup_error(int res) {
    std::string why;
    int disabled = read_io_uring_disabled_sysctl();
    switch (-res) {
    case EPERM:
        if (disabled > 0) {
            why = fmt::format("io_uring is disabled (sysctl kernel.io_uring_disabled={}); set it "
                              "to 0, or for value 1 add this user to kernel.io_uring_group",
                              disabled);
        } else {
            why = "io_uring_setup was refused (EPERM): a seccomp filter or container policy "
                  "blocks io_uring; allow the io_uring_setup/enter/register system calls or run "
                  "where io_uring is allowed";
        }
        break;
    case ENOSYS:
        why = "this kernel has no io_uring (ENOSYS), or a seccomp filter hides it; ringchat "
              "needs Linux 5.19 or later with io_uring enabled";
        break;
    case ENOMEM: {
        rlimit limit{};
        getrlimit(RLIMIT_MEMLOCK, &limit);
        why = fmt::format("not enough locked memory for the ring (ENOMEM, RLIMIT_MEMLOCK={} "
                          "bytes); raise 'ulimit -l' or use a kernel of 5.12 or later, which "
                          "does not charge rings to it",
                          static_cast<unsigned long long>(limit.rlim_cur));
        break;
    }
    default:
        why = fmt::format("io_uring_queue_init failed: {}", std::strerror(-res));
        break;
    }
    throw std::system_error(make_error_code(errc::io_uring_unavailable), why);
}

std::string describe_flags(unsigned flags) {
    std::string out;
    auto add = [&](unsigned bit, const char* name) {
        if ((flags & bit) != 0) {
            out += out.empty() ? "" : "|";
            out += name;
        }
    };
    add(IORING_SETUP_SINGLE_ISSUER, "SINGLE_ISSUER");
    add(IORING_SETUP_DEFER_TASKRUN, "DEFER_TASKRUN");
    add(IORING_SETUP_COOP_TASKRUN, "COOP_TASKRUN");
    add(IORING_SETUP_TASKRUN_FLAG, "TASKRUN_FLAG");
    return out.empty() ? std::string("no setup flags") : out;
}

} // namespace

io_context::io_context(io_context_options options)
    : options_(options), multishot_receive_(options.multishot_receive),
      readiness_receive_(options.receive != receive_mode::completion) {
    setup(options);
    wake_fd_ = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (wake_fd_ < 0) {
        int err = errno;
        io_uring_queue_exit(&ring_);
        throw std::system_error(err, std::generic_category(), "eventfd for io_context wake-ups");
    }
    completions_.reserve(ring_.cq.ring_entries);
    ready_handles_.reserve(64);
    running_handles_.reserve(64);
}

void io_context::setup(const io_context_options& options) {
    unsigned cq = options.cq_entries != 0 ? options.cq_entries : options.sq_entries * 16;
    const unsigned base = IORING_SETUP_CQSIZE;
    const unsigned attempts[] = {
        IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
        IORING_SETUP_COOP_TASKRUN | IORING_SETUP_TASKRUN_FLAG,
        0,
    };
    int res = -EINVAL;
    for (unsigned extra : attempts) {
        if (!options.defer_taskrun && (extra & IORING_SETUP_DEFER_TASKRUN) != 0) {
            continue;
        }
        io_uring_params params{};
        params.flags = base | extra;
        params.cq_entries = cq;
        res = io_uring_queue_init_params(options.sq_entries, &ring_, &params);
        if (res == 0) {
            setup_flags_ = params.flags;
            submit_stable_ = (params.features & IORING_FEAT_SUBMIT_STABLE) != 0;
            break;
        }
        if (res != -EINVAL) {
            break; // not a question of flags: report it
        }
    }
    if (res < 0) {
        throw_setup_error(res);
    }
    // A registered ring descriptor spares io_uring_enter the descriptor lookup (5.18+);
    // without it liburing keeps using the plain one.
    if (io_uring_register_ring_fd(&ring_) == 1) {
        ring_fd_registered_ = true;
    }
    tick_updates_ = probe_timeout_update();
    setup_desc_ = describe_flags(setup_flags_);
    if (ring_fd_registered_) {
        setup_desc_ += ", registered ring fd";
    }
    if (!tick_updates_) {
        setup_desc_ += ", timer wheel ticking every 10 ms";
    }
    log(log_level::info, "io_context: ring with {} SQ / {} CQ entries, {}", ring_.sq.ring_entries,
        ring_.cq.ring_entries, setup_desc_);
}

io_context::~io_context() {
    // Destroying a suspended task destroys its awaiters, which cancel their operations and
    // wait for the kernel to finish with them: the ring must still be alive for that.
    while (!spawned_.empty()) {
        std::coroutine_handle<> frame = spawned_.back().frame;
        spawned_.pop_back(); // first: a destroyed frame does not take itself off the list
        frame.destroy();
    }
    while (owned_head_ != nullptr) {
        detail::owned_node* node = owned_head_;
        disown(node);
        node->destroy(node);
    }
    // Nothing can be receiving into the provided buffers any more.
    receive_buffers_.reset();
    // Fire-and-forget closes may still sit in the SQ ring; socket closes run at submission.
    io_uring_submit(&ring_);
    io_uring_queue_exit(&ring_);
    ::close(wake_fd_);
}

void io_context::stop() noexcept {
    stop_requested_.store(true);
    std::uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

void io_context::post(std::function<void()> fn) {
    {
        std::lock_guard lock(posted_mutex_);
        posted_.push_back(std::move(fn));
        has_posted_.store(true, std::memory_order_release);
    }
    std::uint64_t one = 1;
    [[maybe_unused]] ssize_t n = ::write(wake_fd_, &one, sizeof one);
}

void io_context::work_guard::reset() noexcept {
    if (ctx_ != nullptr) {
        // Wake run() so it can notice that the last guard is gone and return.
        if (ctx_->work_count_.fetch_sub(1) == 1) {
            std::uint64_t one = 1;
            [[maybe_unused]] ssize_t n = ::write(ctx_->wake_fd_, &one, sizeof one);
        }
        ctx_ = nullptr;
    }
}

io_uring_sqe* io_context::get_sqe(unsigned count) noexcept {
    if (io_uring_sq_space_left(&ring_) < count) {
        // A full submission ring is normal under load: hand what is queued to the kernel.
        // EBUSY means the completion side is backed up; reap into completions_ (dispatched
        // later by run()) so the kernel can make room, and try again.
        while (io_uring_sq_space_left(&ring_) < count) {
            int res = io_uring_submit(&ring_);
            if (res == -EBUSY || res == -EAGAIN) {
                reap();
                io_uring_get_events(&ring_);
                reap();
            }
        }
    }
    // Only the first is taken: the caller takes the others with io_uring_get_sqe, which then
    // cannot fail. Taking them here too would leave unfilled SQEs between a linked pair.
    return io_uring_get_sqe(&ring_);
}

void io_context::request_cancel(detail::completion* target) noexcept {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_cancel(sqe, target, 0);
    io_uring_sqe_set_data64(sqe, 0);
}

void io_context::request_cancel_uncounted(detail::completion* target) noexcept {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_cancel64(sqe, uncounted(target), 0);
    io_uring_sqe_set_data64(sqe, 0);
}

detail::send_scratch* io_context::take_send_scratch() noexcept {
    if (!submit_stable_) {
        return nullptr;
    }
    if (!send_scratch_) {
        send_scratch_.reset(new (std::nothrow) detail::send_scratch[scratch_slots]);
        if (!send_scratch_) {
            return nullptr;
        }
    }
    if (send_scratch_used_ == scratch_slots) {
        // All slots belong to SQEs not submitted yet: submit them, then start over.
        io_uring_submit(&ring_);
        if (io_uring_sq_ready(&ring_) != 0) {
            return nullptr;
        }
        send_scratch_used_ = 0;
    }
    return &send_scratch_[send_scratch_used_++];
}

// First use: maps the provided buffer ring (once; a failure leaves channels on their own
// buffers).
detail::provided_buffers* io_context::set_up_receive_buffers() noexcept {
    receive_buffers_tried_ = true;
    if (options_.receive_buffers != 0) {
        receive_buffers_ = detail::provided_buffers::create(
            &ring_, options_.receive_buffers, options_.receive_buffer_size, 0,
            options_.receive != receive_mode::completion);
        log(log_level::info, "io_context: {}", receive_buffers_
                ? fmt::format("{} provided receive buffers of {} bytes",
                              options_.receive_buffers, options_.receive_buffer_size)
                : std::string("no provided buffer ring (kernel before 5.19?); channels "
                              "receive into their own buffers"));
    }
    return receive_buffers_.get();
}

void io_context::disable_multishot_receives() noexcept {
    if (multishot_receive_) {
        multishot_receive_ = false;
        log(log_level::info, "io_context: the kernel rejects multishot recv; channels submit a "
                             "recv per read");
    }
}

void io_context::disable_readiness_receives() noexcept {
    if (readiness_receive_) {
        readiness_receive_ = false;
        log(log_level::info, "io_context: the kernel rejects multishot poll; channels receive "
                             "by completion only");
    }
}

detail::cqe_result io_context::cancel_and_wait(detail::completion* target,
                                               bool counted) noexcept {
    const std::uint64_t key = counted ? reinterpret_cast<std::uint64_t>(target)
                                      : uncounted(target);
    detail::cqe_result final_result;
    // Removes the target's final completion if it has been reaped already: before we ask,
    // or while get_sqe made room for the cancel, or by the waits below. Other completions
    // stay in completions_ for run() to dispatch.
    auto take_final = [&]() noexcept {
        for (std::size_t i = completions_pos_; i < completions_.size(); ++i) {
            cqe_copy& entry = completions_[i];
            if (entry.user_data == key) {
                entry.user_data = 0;
                if ((entry.flags & IORING_CQE_F_MORE) != 0) {
                    // A multishot receive's data that nobody will take: give its buffer
                    // back. (The final completion's buffer is the caller's to recycle.)
                    if ((entry.flags & IORING_CQE_F_BUFFER) != 0 && receive_buffers_) {
                        receive_buffers_->recycle(
                            static_cast<std::uint16_t>(entry.flags >> IORING_CQE_BUFFER_SHIFT));
                    }
                } else {
                    if (counted) {
                        --in_flight_;
                    }
                    final_result = {entry.res, entry.flags};
                    return true;
                }
            }
        }
        return false;
    };
    if (take_final()) {
        return final_result;
    }
    if (counted) {
        request_cancel(target);
    } else {
        request_cancel_uncounted(target);
    }
    while (!take_final()) {
        int res = io_uring_submit_and_wait(&ring_, 1);
        if (res < 0 && res != -EINTR && res != -EBUSY && res != -ETIME) {
            log(log_level::error, "io_context: waiting for a cancelled operation failed: {}",
                std::strerror(-res));
            std::abort(); // continuing would let the kernel write into freed memory
        }
        reap();
    }
    return final_result;
}

// Whether the kernel can move an armed timeout: an update of a timeout that does not exist
// fails with ENOENT where it can, EINVAL where it cannot. Once, at setup, before anything
// else is in the ring.
bool io_context::probe_timeout_update() noexcept {
    io_uring_sqe* sqe = io_uring_get_sqe(&ring_);
    if (sqe == nullptr) {
        return false;
    }
    __kernel_timespec ts{};
    io_uring_prep_timeout_update(sqe, &ts, tick_tag, 0);
    io_uring_sqe_set_data64(sqe, 0);
    io_uring_cqe* cqe = nullptr;
    if (io_uring_submit_and_wait(&ring_, 1) < 0 || io_uring_peek_cqe(&ring_, &cqe) != 0) {
        return false;
    }
    const bool supported = cqe->res == -ENOENT;
    io_uring_cqe_seen(&ring_, cqe);
    return supported;
}

void io_context::add_timer(detail::timer_entry* entry) noexcept {
    if (timers_ == 0) {
        // The wheel was idle: restart it at the current time.
        wheel_time_ = std::chrono::steady_clock::now();
    }
    link_timer(entry);
    entry->linked = true;
    ++timers_;
    if (!tick_armed_) {
        arm_tick();
    } else if (tick_updates_ && slot_end(entry->slot) < tick_when_) {
        // Due before the armed tick: bring the tick forward. If it has fired already, its
        // completion is on its way and advance_wheel arms the next one (the update then
        // fails with ENOENT, ignored like every user_data 0 completion).
        set_tick_timeout(slot_end(entry->slot));
        io_uring_sqe* sqe = get_sqe();
        io_uring_prep_timeout_update(sqe, &tick_timeout_, tick_tag, IORING_TIMEOUT_ABS);
        io_uring_sqe_set_data64(sqe, 0);
    }
}

void io_context::set_timer(detail::timer_entry* entry,
                           std::chrono::steady_clock::time_point when) noexcept {
    if (entry->linked && when >= entry->when) {
        // Later than the slot it is in: the wheel moves it on when that slot comes up. A
        // deadline renewed for every read thus costs no list operation.
        entry->when = when;
        return;
    }
    remove_timer(entry);
    entry->when = when;
    add_timer(entry);
}

std::uint16_t io_context::slot_for(std::chrono::steady_clock::time_point when) const noexcept {
    std::size_t ahead = 0;
    if (when > wheel_time_) {
        ahead = static_cast<std::size_t>((when - wheel_time_) / wheel_tick);
    }
    // An entry further out than one turn wraps around: its slot comes up every turn, and
    // it stays until a turn finds its `when` has passed.
    return static_cast<std::uint16_t>((wheel_pos_ + ahead) % wheel_slots);
}

void io_context::link_timer(detail::timer_entry* entry) noexcept {
    entry->slot = slot_for(entry->when);
    detail::timer_entry*& head = wheel_[entry->slot];
    entry->prev = nullptr;
    entry->next = head;
    if (head != nullptr) {
        head->prev = entry;
    }
    head = entry;
}

void io_context::unlink_timer(detail::timer_entry* entry) noexcept {
    if (entry->prev != nullptr) {
        entry->prev->next = entry->next;
    } else {
        wheel_[entry->slot] = entry->next;
    }
    if (entry->next != nullptr) {
        entry->next->prev = entry->prev;
    }
    entry->prev = entry->next = nullptr;
}

void io_context::remove_timer(detail::timer_entry* entry) noexcept {
    if (!entry->linked) {
        return;
    }
    unlink_timer(entry);
    entry->linked = false;
    --timers_;
}

// The end of `slot`'s 10 ms, when advance_wheel handles its entries.
std::chrono::steady_clock::time_point io_context::slot_end(std::uint16_t slot) const noexcept {
    const std::size_t ahead = (slot + wheel_slots - wheel_pos_) % wheel_slots;
    return wheel_time_ + wheel_tick * static_cast<long>(ahead + 1);
}

// steady_clock is CLOCK_MONOTONIC, the clock of absolute io_uring timeouts.
void io_context::set_tick_timeout(std::chrono::steady_clock::time_point when) noexcept {
    const auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(when.time_since_epoch());
    tick_timeout_.tv_sec = ns.count() / 1'000'000'000;
    tick_timeout_.tv_nsec = ns.count() % 1'000'000'000;
    tick_when_ = when;
}

// Arms the wheel's timeout: for the end of the first slot that holds an entry (an entry
// further out than one turn sits in a slot that comes up every turn), or every wheel_tick
// on a kernel that cannot move a timeout.
void io_context::arm_tick() noexcept {
    io_uring_sqe* sqe;
    if (tick_updates_) {
        std::size_t ahead = 0;
        while (ahead + 1 < wheel_slots && wheel_[(wheel_pos_ + ahead) % wheel_slots] == nullptr) {
            ++ahead;
        }
        set_tick_timeout(slot_end(static_cast<std::uint16_t>((wheel_pos_ + ahead) % wheel_slots)));
        sqe = get_sqe();
        io_uring_prep_timeout(sqe, &tick_timeout_, 0, IORING_TIMEOUT_ABS);
    } else {
        tick_timeout_.tv_sec = 0;
        tick_timeout_.tv_nsec = std::chrono::nanoseconds(wheel_tick).count();
        sqe = get_sqe();
        io_uring_prep_timeout(sqe, &tick_timeout_, 0, 0);
    }
    io_uring_sqe_set_data64(sqe, tick_tag);
    tick_armed_ = true;
}

void io_context::advance_wheel() noexcept {
    const auto now = std::chrono::steady_clock::now();
    while (timers_ != 0 && wheel_time_ + wheel_tick <= now) {
        detail::timer_entry* entry = wheel_[wheel_pos_];
        while (entry != nullptr) {
            detail::timer_entry* next = entry->next;
            if (entry->when <= now) {
                remove_timer(entry);
                entry->expire(entry); // must not touch other entries (it queues a cancel)
            } else if (slot_for(entry->when) != entry->slot) {
                unlink_timer(entry); // set_timer moved its `when` on: move it to its slot
                link_timer(entry);
            }
            entry = next;
        }
        wheel_pos_ = (wheel_pos_ + 1) % wheel_slots;
        wheel_time_ += wheel_tick;
    }
    if (timers_ != 0 && !tick_armed_) {
        arm_tick();
    }
}

void io_context::arm_wake_read() noexcept {
    io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, wake_fd_, &wake_buffer_, sizeof wake_buffer_, 0);
    io_uring_sqe_set_data64(sqe, wake_tag);
    wake_armed_ = true;
}

void io_context::reap() noexcept {
    unsigned head;
    unsigned seen = 0;
    unsigned events = 0;
    io_uring_cqe* cqe;
    io_uring_for_each_cqe(&ring_, head, cqe) {
        ++seen;
        // The load is what operations report: not the completions of cancel requests and
        // other ignored SQEs (user_data 0), nor the wake-up and the timer wheel's tick.
        events += cqe->user_data > tick_tag ? 1 : 0;
        completions_.push_back({cqe->user_data, cqe->res, cqe->flags});
    }
    io_uring_cq_advance(&ring_, seen);
    last_reaped_ = events;
    if (events > 1) {
        light_streak_ = 0;
    } else if (events == 1 && light_streak_ < light_streak_needed) {
        ++light_streak_;
    }
}

namespace {

// Asks the CPU to start loading the lines around `p`, about to be used, for writing. With
// a thousand connections, the objects completions point at (a channel's state, ~8 lines)
// are no longer in the cache when their next completion comes: loading them a few
// completions ahead overlaps those misses with the work in between. A prefetch never
// faults, so lines past the end of a smaller object cost only bandwidth.
void prefetch_object(const void* p, int lines) noexcept {
    // A completion record may sit a few bytes into its object (a channel's send record does).
    const char* at = static_cast<const char*>(p) - 16;
    for (int i = 0; i < lines; ++i) {
        __builtin_prefetch(at + i * 64, 1);
    }
}

constexpr std::size_t prefetch_distance = 4; // completions ahead
constexpr int prefetch_lines = 8;

} // namespace

void io_context::dispatch_completions() noexcept {
    // By index: a resumed coroutine may destroy another's frame, whose awaiter then removes
    // its own entry (cancel_and_wait), or may append entries while waiting for a cancel.
    while (completions_pos_ < completions_.size()) {
        if (completions_pos_ + prefetch_distance < completions_.size()) {
            const std::uint64_t ahead =
                completions_[completions_pos_ + prefetch_distance].user_data & ~uncounted_bit;
            if (ahead > tick_tag) {
                prefetch_object(reinterpret_cast<const void*>(ahead), prefetch_lines);
            }
        }
        const cqe_copy entry = completions_[completions_pos_++];
        if (entry.user_data == 0) {
            continue;
        }
        if (entry.user_data == wake_tag) {
            wake_armed_ = false;
            continue;
        }
        if (entry.user_data == tick_tag) {
            ++wheel_wakeups_;
            tick_armed_ = false;
            advance_wheel();
            continue;
        }
        if ((entry.flags & IORING_CQE_F_MORE) == 0 && (entry.user_data & uncounted_bit) == 0) {
            --in_flight_;
        }
        auto* target = reinterpret_cast<detail::completion*>(entry.user_data & ~uncounted_bit);
        target->on_complete(target, entry.res, entry.flags);
    }
    completions_.clear();
    completions_pos_ = 0;
}

void io_context::run_ready_handles() noexcept {
    while (!ready_handles_.empty()) {
        running_handles_.swap(ready_handles_);
        for (std::coroutine_handle<> h : running_handles_) {
            h.resume();
        }
        running_handles_.clear();
    }
}

void io_context::run_posted() noexcept {
    if (!has_posted_.load(std::memory_order_acquire)) {
        return;
    }
    {
        std::lock_guard lock(posted_mutex_);
        posted_running_.swap(posted_);
        has_posted_.store(false, std::memory_order_relaxed);
    }
    for (auto& fn : posted_running_) {
        try {
            fn();
        } catch (const std::exception& e) {
            log(log_level::error, "io_context: a posted function threw: {}", e.what());
        } catch (...) {
            log(log_level::error, "io_context: a posted function threw a non-exception");
        }
    }
    posted_running_.clear();
}

void io_context::cancel_flush(detail::flush_node* node) noexcept {
    if (!node->flush_queued) {
        return;
    }
    for (detail::flush_node** link = &flush_head_; *link != nullptr; link = &(*link)->next_flush) {
        if (*link == node) {
            *link = node->next_flush;
            break;
        }
    }
    node->flush_queued = false;
}

void io_context::adopt(detail::owned_node* node) noexcept {
    node->prev_owned = nullptr;
    node->next_owned = owned_head_;
    if (owned_head_ != nullptr) {
        owned_head_->prev_owned = node;
    }
    owned_head_ = node;
}

void io_context::disown(detail::owned_node* node) noexcept {
    if (node->prev_owned != nullptr) {
        node->prev_owned->next_owned = node->next_owned;
    } else if (owned_head_ == node) {
        owned_head_ = node->next_owned;
    }
    if (node->next_owned != nullptr) {
        node->next_owned->prev_owned = node->prev_owned;
    }
    node->prev_owned = node->next_owned = nullptr;
}

void io_context::run_flushes() noexcept {
    while (flush_head_ != nullptr) {
        detail::flush_node* node = flush_head_;
        flush_head_ = node->next_flush;
        node->flush_queued = false;
        node->flush(node);
    }
}

bool io_context::has_work() const noexcept {
    return in_flight_ != 0 || flush_head_ != nullptr || !ready_handles_.empty() || completions_pos_ < completions_.size() ||
           work_count_.load() != 0 || has_posted_.load(std::memory_order_acquire);
}

void io_context::run() {
    for (;;) {
        run_posted();
        dispatch_completions();
        run_ready_handles();
        if (stop_requested_.load(std::memory_order_relaxed)) {
            break;
        }
        if (completions_pos_ < completions_.size() || !ready_handles_.empty()) {
            continue;
        }
        run_flushes();
        // A flush may resume a coroutine (a writer that was waiting), which may schedule
        // more: run that before blocking in the kernel.
        if (completions_pos_ < completions_.size() || !ready_handles_.empty()) {
            continue;
        }
        if (!has_work()) {
            break;
        }
        if (!wake_armed_) {
            arm_wake_read();
        }
        int res = io_uring_submit_and_wait(&ring_, 1);
        if (io_uring_sq_ready(&ring_) == 0) {
            send_scratch_used_ = 0; // the kernel has consumed every SQE that used them
        }
        if (res < 0 && res != -EINTR && res != -ETIME && res != -EBUSY && res != -EAGAIN) {
            log(log_level::error, "io_context: io_uring_submit_and_wait failed: {}",
                std::strerror(-res));
            throw std::system_error(-res, std::generic_category(), "io_uring_submit_and_wait");
        }
        reap();
    }
    // Hand prepared SQEs (sends, closes, cancels) to the kernel even when returning; through
    // the ring only, so that no send completes (and resumes a writer) after run() is done.
    last_reaped_ = 0;
    run_flushes();
    io_uring_submit(&ring_);
}

namespace detail {

std::uint32_t add_spawned(io_context& ctx, std::coroutine_handle<> frame,
                          task_promise_base* promise) {
    if (ctx.spawned_.size() >= UINT32_MAX) {
        throw std::length_error("ringchat::spawn: too many tasks");
    }
    ctx.spawned_.push_back({frame, promise});
    return static_cast<std::uint32_t>(ctx.spawned_.size() - 1);
}

void forget_spawned(io_context* ctx, std::uint32_t index) noexcept {
    auto& list = ctx->spawned_;
    if (index + 1 != list.size()) {
        list[index] = list.back();
        list[index].promise->set_spawn_index(index);
    }
    list.pop_back();
}

void report_spawned_exception() noexcept {
    try {
        throw;
    } catch (const std::exception& e) {
        log(log_level::error, "a spawned task ended with an exception: {}", e.what());
    } catch (...) {
        log(log_level::error, "a spawned task ended with a non-standard exception");
    }
}

void throw_sync_wait_unfinished() {
    throw std::system_error(make_error_code(errc::cancelled),
                            "sync_wait: the io_context stopped before the task finished");
}

} // namespace detail

} // namespace ringchat
