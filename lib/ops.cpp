#include <ringchat/ops.hpp>

#include <cassert>
#include <cerrno>

namespace ringchat {

cancel_source::~cancel_source() {
    // The source should outlive what it cancels; if it does not, the operation must not
    // reach back into it when it completes.
    if (attached_ != nullptr) {
        attached_->forget_cancel_source();
    }
}

void cancel_source::request_cancel() noexcept {
    requested_ = true;
    if (attached_ != nullptr) {
        attached_->cancel_now();
    }
}

namespace detail {

op_awaiter::op_awaiter(io_context& ctx, const char* op_name, const address* peer) noexcept
    : completion{&op_awaiter::complete}, ctx_(&ctx), op_name_(op_name), peer_(peer) {}

op_awaiter::op_awaiter(const op_awaiter& other) noexcept
    : completion{other.on_complete}, ctx_(other.ctx_), res_(other.res_),
      cqe_flags_(other.cqe_flags_), op_name_(other.op_name_), peer_(other.peer_),
      cancel_(other.cancel_), deadline_(other.deadline_), has_deadline_(other.has_deadline_) {
    // Copies happen only while building the awaiter (with_timeout, cancel_on), never
    // once the operation is in the kernel's hands.
    assert(!other.in_flight_);
}

op_awaiter::~op_awaiter() {
    if (in_flight_) {
        // The coroutine was destroyed while suspended here: the kernel may still write into
        // its frame, so cancel and wait for the final completion before the frame goes.
        ctx_->cancel_and_wait(this);
        in_flight_ = false;
    }
    if (cancel_ != nullptr) {
        cancel_->detach(this);
    }
}

void op_awaiter::cancel_now() noexcept {
    if (in_flight_) {
        cancelled_ = true;
        ctx_->request_cancel(this);
    }
}

void op_awaiter::set_deadline(std::chrono::nanoseconds timeout) noexcept {
    auto ns = timeout.count() < 0 ? 0 : timeout.count();
    deadline_.tv_sec = ns / 1'000'000'000;
    deadline_.tv_nsec = ns % 1'000'000'000;
    has_deadline_ = true;
}

void op_awaiter::finish_start(io_uring_sqe* sqe, std::coroutine_handle<> waiter) noexcept {
    waiter_ = waiter;
    io_uring_sqe_set_data(sqe, static_cast<completion*>(this));
    if (has_deadline_) {
        // get_sqe(2) reserved the slot after `sqe`, so the pair goes in one submission.
        sqe->flags |= IOSQE_IO_LINK;
        io_uring_sqe* timeout = io_uring_get_sqe(ctx_->native());
        io_uring_prep_link_timeout(timeout, &deadline_, 0);
        io_uring_sqe_set_data64(timeout, 0);
        // The kernel copies the timespec when it prepares the SQE, so deadline_ may move
        // with a copy of this awaiter only before submission; we are past that point.
    }
    (void)sqe;
    in_flight_ = true;
    if (cancel_ != nullptr) {
        cancel_->attach(this);
    }
    ctx_->operation_started();
}

void op_awaiter::complete(completion* self, int res, std::uint32_t flags) noexcept {
    auto* op = static_cast<op_awaiter*>(self);
    op->res_ = res;
    op->cqe_flags_ = flags;
    op->in_flight_ = false;
    if (op->cancel_ != nullptr) {
        op->cancel_->detach(op);
    }
    op->waiter_.resume();
}

void op_awaiter::fail() const {
    int res = res_;
    // With a linked timeout, the operation itself completes with -ECANCELED when the
    // deadline passes; only a cancel_source request makes it a real cancellation.
    if (res == -ECANCELED && has_deadline_ && !cancelled_) {
        res = -ETIME;
    }
    throw_io_error(res, op_name_, peer_);
}

void prepare_accept(io_uring_sqe* sqe, int listen_fd, address::storage& peer) noexcept {
    peer.length = sizeof peer.sa;
    io_uring_prep_accept(sqe, listen_fd, &peer.sa.base, &peer.length, SOCK_CLOEXEC);
}

bool connect_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) {
        io_uring_prep_connect(sqe, fd_, to_->native(), to_->native_size());
    });
}

bool recv_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) { io_uring_prep_recv(sqe, fd_, data_, size_, 0); });
}

bool read_fd_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    // Offset -1: read from the current file position, as read(2) does.
    return start(h, [this](io_uring_sqe* sqe) {
        io_uring_prep_read(sqe, fd_, data_, static_cast<unsigned>(size_), -1);
    });
}

bool send_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) {
        io_uring_prep_send(sqe, fd_, data_, size_, MSG_NOSIGNAL);
    });
}

bool sendmsg_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) {
        io_uring_prep_sendmsg(sqe, fd_, message_, MSG_NOSIGNAL);
    });
}

bool close_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) { io_uring_prep_close(sqe, fd_); });
}

bool shutdown_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) { io_uring_prep_shutdown(sqe, fd_, how_); });
}

sleep_awaiter::sleep_awaiter(io_context& ctx, std::chrono::nanoseconds duration) noexcept
    : awaiter_options(ctx, "sleep", nullptr) {
    auto ns = duration.count() < 0 ? 0 : duration.count();
    duration_.tv_sec = ns / 1'000'000'000;
    duration_.tv_nsec = ns % 1'000'000'000;
}

bool sleep_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    if (!start(h, [this](io_uring_sqe* sqe) { io_uring_prep_timeout(sqe, &duration_, 0, 0); })) {
        return false;
    }
    // The kernel starts a relative timeout when it reads the SQE. Submitted with the rest of
    // the batch, a sleep would start only when the io thread gets there, and a timer started
    // later with an earlier deadline could fire first. Submitting now makes the duration
    // count from this co_await. (IORING_TIMEOUT_ABS would save the system call, but io_uring
    // does not apply a time namespace's CLOCK_MONOTONIC offset, so it breaks in containers
    // that use one.) If the submission fails, the SQE goes with the next one as before.
    io_uring_submit(ctx_->native());
    return true;
}

void sleep_awaiter::await_resume() const {
    // The timer expiring is the normal outcome of a sleep.
    if (res_ != -ETIME) {
        checked_result();
    }
}

bool cancel_fd_awaiter::await_suspend(std::coroutine_handle<> h) noexcept {
    return start(h, [this](io_uring_sqe* sqe) {
        io_uring_prep_cancel_fd(sqe, fd_, IORING_ASYNC_CANCEL_ALL);
    });
}

int cancel_fd_awaiter::await_resume() const {
    // ENOENT: nothing was pending on the descriptor, which is not a failure.
    if (res_ == -ENOENT) {
        return 0;
    }
    return checked_result();
}

} // namespace detail

} // namespace ringchat
