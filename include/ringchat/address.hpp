#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>

namespace ringchat {

/// A socket address: IPv4, IPv6 or Unix domain (path or Linux abstract name). A plain value,
/// cheap to copy (no heap).
class address {
public:
    /// Raw storage big enough for every family this class handles, plus its length.
    struct storage {
        union {
            sockaddr base;
            sockaddr_in in4;
            sockaddr_in6 in6;
            sockaddr_un un;
        } sa;
        socklen_t length = 0;
    };

    /// An empty address (family AF_UNSPEC).
    address() noexcept { storage_.sa.base.sa_family = AF_UNSPEC; }
    /// Wraps storage filled in by the kernel (accept, getsockname).
    explicit address(const storage& s) noexcept : storage_(s) {}

    /// Parses "1.2.3.4:80", "[::1]:80", "localhost:80" (127.0.0.1), "unix:/run/x.sock" or
    /// "unix:@abstract". No DNS lookups. Throws std::invalid_argument naming the text.
    static address parse(std::string_view text);
    /// An IP address (v4 or v6 literal, or "localhost") and a port. Throws
    /// std::invalid_argument if `host` is not a literal address.
    static address from_host_port(std::string_view host, std::uint16_t port);
    /// A Unix domain socket path; a leading '@' names an abstract socket. Throws
    /// std::invalid_argument if the path does not fit sockaddr_un.
    static address unix_path(std::string_view path);
    /// Copies a sockaddr of `length` bytes. Throws std::invalid_argument if it does not fit.
    static address from_native(const sockaddr* sa, socklen_t length);

    /// AF_INET, AF_INET6, AF_UNIX or AF_UNSPEC.
    [[nodiscard]] int family() const noexcept { return storage_.sa.base.sa_family; }
    /// The port of an IP address; 0 for other families.
    [[nodiscard]] std::uint16_t port() const noexcept;
    /// "1.2.3.4:80", "[::1]:80", "unix:/path", "unix:@name", or "(unspecified)".
    [[nodiscard]] std::string to_string() const;

    [[nodiscard]] const sockaddr* native() const noexcept { return &storage_.sa.base; }
    [[nodiscard]] socklen_t native_size() const noexcept { return storage_.length; }

    friend bool operator==(const address& a, const address& b) noexcept;

private:
    storage storage_{};
};

} // namespace ringchat
