#pragma once

#include <ringchat/address.hpp>
#include <ringchat/io_context.hpp>
#include <ringchat/ops.hpp>
#include <ringchat/task.hpp>

#include <span>
#include <string_view>
#include <utility>

#include <sys/socket.h>

namespace ringchat {

/// A connected stream socket (TCP or Unix domain) that owns its descriptor and remembers its
/// peer's address for error messages. Move-only. Destruction closes the descriptor through the
/// ring without waiting (pending operations on it must have finished: they belong to
/// coroutines that await them). Io thread only.
class stream {
public:
    stream() noexcept = default;
    /// Takes ownership of `fd`, a connected socket used with `ctx`.
    stream(io_context& ctx, int fd, address peer) noexcept
        : ctx_(&ctx), fd_(fd), peer_(peer) {}
    stream(stream&& other) noexcept
        : ctx_(other.ctx_), fd_(std::exchange(other.fd_, -1)), peer_(other.peer_) {}
    stream& operator=(stream&& other) noexcept;
    stream(const stream&) = delete;
    stream& operator=(const stream&) = delete;
    ~stream() { close_now(); }

    /// True while the stream owns a descriptor.
    [[nodiscard]] bool is_open() const noexcept { return fd_ >= 0; }
    [[nodiscard]] int native_handle() const noexcept { return fd_; }
    [[nodiscard]] io_context& context() const noexcept { return *ctx_; }
    /// The peer's address as known at connect or accept time.
    [[nodiscard]] const address& peer() const noexcept { return peer_; }
    /// The local address (getsockname). Throws std::system_error.
    [[nodiscard]] address local_address() const;

    /// Receives up to `buffer.size()` bytes; yields the count, 0 when the peer closed.
    /// `buffer` must stay valid until the co_await returns.
    [[nodiscard]] detail::recv_awaiter recv(std::span<char> buffer) noexcept {
        return {*ctx_, fd_, buffer.data(), buffer.size(), &peer_};
    }
    /// Sends some of `bytes` (maybe fewer); yields the count. Never raises SIGPIPE.
    [[nodiscard]] detail::send_awaiter send(std::string_view bytes) noexcept {
        return {*ctx_, fd_, bytes.data(), bytes.size(), &peer_};
    }
    /// Scatter/gather send of `message`'s iovecs; yields the count sent.
    [[nodiscard]] detail::sendmsg_awaiter sendmsg(const msghdr& message) noexcept {
        return {*ctx_, fd_, &message, &peer_};
    }
    /// Sends all of `bytes`, looping over short writes. The view must outlive the co_await.
    task<void> send_all(std::string_view bytes);
    /// shutdown(2): SHUT_WR sends FIN (half-close) and keeps reading possible.
    [[nodiscard]] detail::shutdown_awaiter shutdown(int how = SHUT_WR) noexcept {
        return {*ctx_, fd_, how, &peer_};
    }
    /// Closes now and reports errors; the stream no longer owns a descriptor afterwards.
    [[nodiscard]] detail::close_awaiter close() noexcept {
        return {*ctx_, std::exchange(fd_, -1)};
    }
    /// Closes without waiting (the close goes through the ring with the next submission).
    void close_now() noexcept;

    /// TCP_NODELAY on or off. Throws std::system_error.
    void set_nodelay(bool on);
    /// Hands the descriptor to the caller, who must close it.
    int release() noexcept { return std::exchange(fd_, -1); }

private:
    io_context* ctx_ = nullptr;
    int fd_ = -1;
    address peer_;
};

/// Options for a listening socket.
struct listen_options {
    int backlog = 1024;
    bool reuse_address = true; ///< SO_REUSEADDR (restarts do not wait for TIME_WAIT)
    bool reuse_port = false;   ///< SO_REUSEPORT (one listener per io_context/thread)
    bool nodelay = true;       ///< TCP_NODELAY, inherited by accepted sockets
    bool v6_only = false;      ///< IPV6_V6ONLY for an IPv6 listener
};

/// A listening socket bound to an address. Port 0 lets the kernel choose; local_address()
/// then tells which. Owns its descriptor. Io thread only.
class listener {
public:
    /// Creates, binds and listens. Throws std::system_error naming the address (e.g.
    /// "bind to 127.0.0.1:80: Permission denied").
    listener(io_context& ctx, const address& where, listen_options options = {});
    listener(listener&& other) noexcept
        : ctx_(other.ctx_), fd_(std::exchange(other.fd_, -1)), local_(other.local_) {}
    listener& operator=(listener&&) = delete;
    listener(const listener&) = delete;
    listener& operator=(const listener&) = delete;
    ~listener() { close(); }

    /// The bound address, with the port the kernel chose.
    [[nodiscard]] const address& local_address() const noexcept { return local_; }
    [[nodiscard]] int native_handle() const noexcept { return fd_; }
    [[nodiscard]] io_context& context() const noexcept { return *ctx_; }

    /// Awaiter for the next connection; yields a stream. Throws std::system_error on
    /// failure (EMFILE when out of descriptors: the listener stays usable).
    class [[nodiscard]] accept_awaiter : public detail::basic_accept_awaiter<accept_awaiter> {
    public:
        using basic_accept_awaiter::basic_accept_awaiter;
        stream await_resume() const { return stream{*ctx_, accepted_fd(), peer()}; }
    };
    [[nodiscard]] accept_awaiter accept() noexcept { return {*ctx_, fd_, &local_}; }

    /// Closes the listening socket now; pending accepts fail.
    void close() noexcept;

private:
    io_context* ctx_;
    int fd_ = -1;
    address local_;
};

/// Connects to `to` (TCP or Unix domain); TCP streams get TCP_NODELAY. Throws
/// std::system_error, e.g. "connect to 127.0.0.1:9: Connection refused".
task<stream> connect(io_context& ctx, address to);

} // namespace ringchat
