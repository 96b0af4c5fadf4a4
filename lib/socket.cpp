#include <ringchat/error.hpp>
#include <ringchat/socket.hpp>

#include <fmt/core.h>

#include <cerrno>

#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <unistd.h>

namespace ringchat {

namespace {

[[noreturn]] void throw_errno(int err, const std::string& what) {
    throw std::system_error(err, std::generic_category(), what);
}

void set_int_option(int fd, int level, int name, int value, const char* what) {
    if (::setsockopt(fd, level, name, &value, sizeof value) != 0) {
        throw_errno(errno, what);
    }
}

address local_address_of(int fd) {
    address::storage s{};
    s.length = sizeof s.sa;
    if (::getsockname(fd, &s.sa.base, &s.length) != 0) {
        throw_errno(errno, "getsockname");
    }
    return address{s};
}

} // namespace

stream& stream::operator=(stream&& other) noexcept {
    if (this != &other) {
        close_now();
        ctx_ = other.ctx_;
        fd_ = std::exchange(other.fd_, -1);
        peer_ = other.peer_;
    }
    return *this;
}

address stream::local_address() const { return local_address_of(fd_); }

void stream::close_now() noexcept {
    if (fd_ < 0) {
        return;
    }
    // Through the ring, so closing costs no system call of its own: the SQE rides along with
    // the next submission. Its completion is ignored (user_data 0).
    io_uring_sqe* sqe = ctx_->get_sqe();
    io_uring_prep_close(sqe, fd_);
    io_uring_sqe_set_data64(sqe, 0);
    fd_ = -1;
}

void stream::set_nodelay(bool on) {
    set_int_option(fd_, IPPROTO_TCP, TCP_NODELAY, on ? 1 : 0,
                   fmt::format("TCP_NODELAY on connection to {}", peer_.to_string()).c_str());
}

task<void> stream::send_all(std::string_view bytes) {
    while (!bytes.empty()) {
        std::size_t sent = co_await send(bytes);
        bytes.remove_prefix(sent);
    }
}

listener::listener(io_context& ctx, const address& where, listen_options options) : ctx_(&ctx) {
    fd_ = ::socket(where.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) {
        throw_errno(errno, fmt::format("socket for {}", where.to_string()));
    }
    try {
        const bool ip = where.family() == AF_INET || where.family() == AF_INET6;
        if (ip && options.reuse_address) {
            set_int_option(fd_, SOL_SOCKET, SO_REUSEADDR, 1, "SO_REUSEADDR");
        }
        if (ip && options.reuse_port) {
            set_int_option(fd_, SOL_SOCKET, SO_REUSEPORT, 1, "SO_REUSEPORT");
        }
        if (where.family() == AF_INET6) {
            set_int_option(fd_, IPPROTO_IPV6, IPV6_V6ONLY, options.v6_only ? 1 : 0,
                           "IPV6_V6ONLY");
        }
        if (ip && options.nodelay) {
            set_int_option(fd_, IPPROTO_TCP, TCP_NODELAY, 1, "TCP_NODELAY");
        }
        if (::bind(fd_, where.native(), where.native_size()) != 0) {
            throw_errno(errno, fmt::format("bind to {}", where.to_string()));
        }
        if (::listen(fd_, options.backlog) != 0) {
            throw_errno(errno, fmt::format("listen on {}", where.to_string()));
        }
        local_ = local_address_of(fd_);
    } catch (...) {
        ::close(fd_);
        throw;
    }
}

void listener::close() noexcept {
    if (fd_ < 0) {
        return;
    }
    // A pending io_uring accept holds its own reference to the socket, so closing the
    // descriptor alone would leave it waiting: cancel what is pending on it first. The
    // hard link keeps the order and still closes when there was nothing to cancel.
    io_uring_sqe* cancel = ctx_->get_sqe(2);
    io_uring_prep_cancel_fd(cancel, fd_, IORING_ASYNC_CANCEL_ALL);
    io_uring_sqe_set_data64(cancel, 0);
    cancel->flags |= IOSQE_IO_HARDLINK;
    io_uring_sqe* close = io_uring_get_sqe(ctx_->native());
    io_uring_prep_close(close, fd_);
    io_uring_sqe_set_data64(close, 0);
    fd_ = -1;
}

task<stream> connect(io_context& ctx, address to) {
    int fd = ::socket(to.family(), SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        throw_errno(errno, fmt::format("socket to connect to {}", to.to_string()));
    }
    stream s{ctx, fd, to};
    if (to.family() == AF_INET || to.family() == AF_INET6) {
        s.set_nodelay(true);
    }
    co_await ops::connect(ctx, fd, s.peer());
    co_return s;
}

} // namespace ringchat
