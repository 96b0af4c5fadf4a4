#pragma once

#include <ringchat/address.hpp>
#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>

#include <liburing.h>

#include <chrono>
#include <coroutine>
#include <cstddef>
#include <cstdint>

#include <sys/socket.h>

namespace ringchat {

namespace detail {

/// Something a cancel_source can cancel: an operation awaiter or a channel read.
class cancellable {
public:
    /// Asks the pending operation to stop; it then completes with errc::cancelled.
    virtual void cancel_now() noexcept = 0;
    /// The cancel_source it was attached to is being destroyed: forget it.
    virtual void forget_cancel_source() noexcept = 0;

protected:
    ~cancellable() = default;
};

} // namespace detail

/// Lets one coroutine cancel another's pending operation: attach it with
/// `co_await op.cancel_on(source)`, then call `source.request_cancel()`; the operation then
/// throws std::system_error(errc::cancelled) (or returns normally if it had already
/// finished). A source serves one operation at a time; once requested, every operation
/// attached later is cancelled at once, until reset(). Io thread only; non-movable.
class cancel_source {
public:
    cancel_source() = default;
    cancel_source(const cancel_source&) = delete;
    cancel_source& operator=(const cancel_source&) = delete;
    ~cancel_source();

    /// Cancels the attached operation, if any, and all that get attached later.
    void request_cancel() noexcept;
    /// True once request_cancel() was called (until reset()).
    [[nodiscard]] bool cancel_requested() const noexcept { return requested_; }
    /// Forgets an earlier request so operations can be attached again.
    void reset() noexcept { requested_ = false; }

    /// For awaiters: registers the pending operation `op` (one at a time) / forgets it.
    void attach(detail::cancellable* op) noexcept { attached_ = op; }
    void detach(detail::cancellable* op) noexcept {
        if (attached_ == op) {
            attached_ = nullptr;
        }
    }

private:
    detail::cancellable* attached_ = nullptr;
    bool requested_ = false;
};

namespace detail {

/// The part every single-shot operation awaiter shares: the completion record the SQE's
/// user_data points at, the deadline, and the cancellation bookkeeping. Lives in the
/// awaiting coroutine's frame, so starting an operation allocates nothing. If the frame is
/// destroyed while the operation is in flight, the destructor cancels it and waits for its
/// completion, so the kernel never writes into freed memory.
class op_awaiter : public completion, public cancellable {
public:
    op_awaiter(const op_awaiter& other) noexcept;
    op_awaiter& operator=(const op_awaiter&) = delete;
    ~op_awaiter();

    bool await_ready() const noexcept { return false; }

protected:
    explicit op_awaiter(io_context& ctx, const char* op_name, const address* peer) noexcept;

    // Takes the SQE(s), lets `prepare` fill the first, links the deadline and records the
    // waiter. Returns false (do not suspend) if an attached cancel_source was already
    // triggered; res_ is then -ECANCELED.
    template <typename Prepare>
    bool start(std::coroutine_handle<> waiter, Prepare&& prepare) noexcept {
        if (cancel_ && cancel_->cancel_requested()) {
            res_ = -ECANCELED;
            cancelled_ = true;
            return false;
        }
        io_uring_sqe* sqe = ctx_->get_sqe(has_deadline_ ? 2 : 1);
        prepare(sqe);
        finish_start(sqe, waiter);
        return true;
    }

    // The CQE result, or a thrown std::system_error naming the operation and the peer.
    int checked_result() const {
        if (res_ < 0) {
            fail();
        }
        return res_;
    }
    [[noreturn]] void fail() const;

    void set_deadline(std::chrono::nanoseconds timeout) noexcept;
    void cancel_now() noexcept override;
    void forget_cancel_source() noexcept override { cancel_ = nullptr; }
    void set_cancel(cancel_source& source) noexcept { cancel_ = &source; }

    io_context* ctx_;
    int res_ = 0;
    std::uint32_t cqe_flags_ = 0;

private:
    static void complete(completion* self, int res, std::uint32_t flags) noexcept;
    void finish_start(io_uring_sqe* sqe, std::coroutine_handle<> waiter) noexcept;

    std::coroutine_handle<> waiter_;
    const char* op_name_;
    const address* peer_;
    cancel_source* cancel_ = nullptr;
    __kernel_timespec deadline_{};
    bool has_deadline_ = false;
    bool in_flight_ = false;
    bool cancelled_ = false; // a cancel_source asked for it: -ECANCELED means cancelled
};

/// Adds with_timeout() and cancel_on() to an awaiter `Base` (an operation, or a channel read,
/// which provides set_deadline and set_cancel), returning the awaiter by value so the result
/// can be awaited directly: `co_await s.recv(buf).with_timeout(2s)`.
template <typename Derived, typename Base>
class awaiter_options : public Base {
public:
    /// Fails with errc::timed_out if the operation has not completed after `timeout`. For
    /// an operation: an IORING_OP_LINK_TIMEOUT linked to it. For a channel read: one
    /// deadline for all the receives it takes, on the context's 10 ms timer wheel (so it may
    /// fire up to 10 ms late, and costs no system call), and nothing is consumed.
    [[nodiscard]] Derived with_timeout(std::chrono::nanoseconds timeout) && noexcept {
        this->set_deadline(timeout);
        return static_cast<Derived&&>(*this);
    }
    /// Lets `source` cancel the operation (errc::cancelled); `source` must outlive the
    /// co_await.
    [[nodiscard]] Derived cancel_on(cancel_source& source) && noexcept {
        this->set_cancel(source);
        return static_cast<Derived&&>(*this);
    }

protected:
    using Base::Base;
    explicit awaiter_options(const Base& base) noexcept : Base(base) {}
};

template <typename Derived>
using op_options = awaiter_options<Derived, op_awaiter>;

/// Fills an accept SQE that stores the peer's address in `peer`.
void prepare_accept(io_uring_sqe* sqe, int listen_fd, address::storage& peer) noexcept;

/// Accept, parameterised by what await_resume makes of the descriptor (Derived adds it).
template <typename Derived>
class basic_accept_awaiter : public op_options<Derived> {
public:
    basic_accept_awaiter(io_context& ctx, int listen_fd, const address* local) noexcept
        : op_options<Derived>(ctx, "accept on", local), fd_(listen_fd) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept {
        return this->start(h, [this](io_uring_sqe* sqe) {
            prepare_accept(sqe, fd_, peer_storage_);
        });
    }
    /// The peer's address; valid after the operation completed.
    [[nodiscard]] address peer() const noexcept { return address{peer_storage_}; }

protected:
    int accepted_fd() const { return this->checked_result(); }

private:
    int fd_;
    address::storage peer_storage_{};
};

class [[nodiscard]] accept_awaiter : public basic_accept_awaiter<accept_awaiter> {
public:
    using basic_accept_awaiter::basic_accept_awaiter;
    /// The accepted descriptor (SOCK_CLOEXEC); peer() is its address.
    int await_resume() const { return accepted_fd(); }
};

class [[nodiscard]] connect_awaiter : public op_options<connect_awaiter> {
public:
    connect_awaiter(io_context& ctx, int fd, const address& to) noexcept
        : awaiter_options(ctx, "connect to", &to), fd_(fd), to_(&to) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    void await_resume() const { checked_result(); }

private:
    int fd_;
    const address* to_;
};

class [[nodiscard]] recv_awaiter : public op_options<recv_awaiter> {
public:
    recv_awaiter(io_context& ctx, int fd, void* data, std::size_t size,
                 const address* peer) noexcept
        : awaiter_options(ctx, "recv from", peer), fd_(fd), data_(data), size_(size) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    /// Bytes received; 0 means the peer closed its side (EOF).
    std::size_t await_resume() const { return static_cast<std::size_t>(checked_result()); }

private:
    int fd_;
    void* data_;
    std::size_t size_;
};

class [[nodiscard]] read_fd_awaiter : public op_options<read_fd_awaiter> {
public:
    read_fd_awaiter(io_context& ctx, int fd, void* data, std::size_t size) noexcept
        : awaiter_options(ctx, "read", nullptr), fd_(fd), data_(data), size_(size) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    /// Bytes read; 0 at end of file.
    std::size_t await_resume() const { return static_cast<std::size_t>(checked_result()); }

private:
    int fd_;
    void* data_;
    std::size_t size_;
};

class [[nodiscard]] send_awaiter : public op_options<send_awaiter> {
public:
    send_awaiter(io_context& ctx, int fd, const void* data, std::size_t size,
                 const address* peer) noexcept
        : awaiter_options(ctx, "send to", peer), fd_(fd), data_(data), size_(size) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    /// Bytes sent, possibly fewer than asked.
    std::size_t await_resume() const { return static_cast<std::size_t>(checked_result()); }

private:
    int fd_;
    const void* data_;
    std::size_t size_;
};

class [[nodiscard]] sendmsg_awaiter : public op_options<sendmsg_awaiter> {
public:
    sendmsg_awaiter(io_context& ctx, int fd, const msghdr* message,
                    const address* peer) noexcept
        : awaiter_options(ctx, "send to", peer), fd_(fd), message_(message) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    /// Bytes sent, possibly fewer than the iovecs hold.
    std::size_t await_resume() const { return static_cast<std::size_t>(checked_result()); }

private:
    int fd_;
    const msghdr* message_;
};

class [[nodiscard]] close_awaiter : public op_options<close_awaiter> {
public:
    close_awaiter(io_context& ctx, int fd) noexcept : awaiter_options(ctx, "close", nullptr), fd_(fd) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    void await_resume() const { checked_result(); }

private:
    int fd_;
};

class [[nodiscard]] shutdown_awaiter : public op_options<shutdown_awaiter> {
public:
    shutdown_awaiter(io_context& ctx, int fd, int how, const address* peer) noexcept
        : awaiter_options(ctx, "shutdown of connection to", peer), fd_(fd), how_(how) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    void await_resume() const { checked_result(); }

private:
    int fd_;
    int how_;
};

class [[nodiscard]] sleep_awaiter : public op_options<sleep_awaiter> {
public:
    sleep_awaiter(io_context& ctx, std::chrono::nanoseconds duration) noexcept;
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    /// Returns when the time has passed; throws errc::cancelled if cancelled.
    void await_resume() const;

private:
    __kernel_timespec duration_{};
};

class [[nodiscard]] cancel_fd_awaiter : public op_options<cancel_fd_awaiter> {
public:
    cancel_fd_awaiter(io_context& ctx, int fd) noexcept
        : awaiter_options(ctx, "cancel on descriptor", nullptr), fd_(fd) {}
    bool await_suspend(std::coroutine_handle<> h) noexcept;
    /// How many operations were cancelled (0 if none was pending).
    int await_resume() const;

private:
    int fd_;
};

} // namespace detail

/// The raw operations, one awaiter each. They take descriptors the caller owns and keep
/// using; buffers must stay valid until the co_await returns (they do if they live in the
/// awaiting coroutine's frame). Each throws std::system_error on failure, with the errno
/// code (or errc::timed_out / errc::cancelled) and a message naming the operation and peer.
/// Io thread only. Most code uses stream, listener and channel instead.
namespace ops {

/// Accepts one connection on `listen_fd`; yields the new descriptor.
inline detail::accept_awaiter accept(io_context& ctx, int listen_fd,
                                     const address* local = nullptr) noexcept {
    return {ctx, listen_fd, local};
}
/// Connects `fd` to `to` (which must outlive the co_await).
inline detail::connect_awaiter connect(io_context& ctx, int fd, const address& to) noexcept {
    return {ctx, fd, to};
}
/// Receives up to `size` bytes into `data`; yields the count, 0 at EOF.
inline detail::recv_awaiter recv(io_context& ctx, int fd, void* data, std::size_t size,
                                 const address* peer = nullptr) noexcept {
    return {ctx, fd, data, size, peer};
}
/// read(2) of up to `size` bytes from any descriptor (a pipe, an eventfd, a signalfd).
inline detail::read_fd_awaiter read(io_context& ctx, int fd, void* data, std::size_t size) noexcept {
    return {ctx, fd, data, size};
}
/// Sends up to `size` bytes (MSG_NOSIGNAL: a reset peer is an error, never SIGPIPE).
inline detail::send_awaiter send(io_context& ctx, int fd, const void* data, std::size_t size,
                                 const address* peer = nullptr) noexcept {
    return {ctx, fd, data, size, peer};
}
/// Sends the iovecs of `message` in one system call (MSG_NOSIGNAL); `message` and its
/// iovecs must stay valid until the co_await returns.
inline detail::sendmsg_awaiter sendmsg(io_context& ctx, int fd, const msghdr& message,
                                       const address* peer = nullptr) noexcept {
    return {ctx, fd, &message, peer};
}
/// Closes `fd` through the ring.
inline detail::close_awaiter close(io_context& ctx, int fd) noexcept { return {ctx, fd}; }
/// shutdown(2) through the ring; `how` is SHUT_RD, SHUT_WR or SHUT_RDWR.
inline detail::shutdown_awaiter shutdown(io_context& ctx, int fd, int how,
                                         const address* peer = nullptr) noexcept {
    return {ctx, fd, how, peer};
}
/// Cancels every operation pending on `fd`; yields how many were cancelled.
inline detail::cancel_fd_awaiter cancel(io_context& ctx, int fd) noexcept { return {ctx, fd}; }

} // namespace ops

/// Suspends the calling coroutine for `duration`, counted from the co_await (an
/// IORING_OP_TIMEOUT, submitted at once; no thread blocks). Io thread only.
inline detail::sleep_awaiter sleep_for(io_context& ctx, std::chrono::nanoseconds duration) noexcept {
    return {ctx, duration};
}

} // namespace ringchat
