#include <ringchat/address.hpp>

#include <fmt/core.h>

#include <charconv>
#include <cstring>
#include <stdexcept>

#include <arpa/inet.h>

namespace ringchat {

namespace {

[[noreturn]] void bad_address(std::string_view text, const char* why) {
    throw std::invalid_argument(fmt::format("bad address \"{}\": {}", text, why));
}

// The builders take the caller's whole input as `text` so that an error names what the user
// wrote ("unix:", "example.com:80"), not just the part that was wrong.

address unix_address(std::string_view path, std::string_view text) {
    address::storage s{};
    auto& un = s.sa.un;
    if (path.empty()) {
        bad_address(text, "empty Unix socket path");
    }
    if (path.size() >= sizeof un.sun_path) {
        bad_address(text, "Unix socket path longer than 107 bytes");
    }
    un.sun_family = AF_UNIX;
    std::memcpy(un.sun_path, path.data(), path.size());
    if (path.front() == '@') {
        un.sun_path[0] = '\0'; // Linux abstract namespace: no file, length decides the name
        s.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size());
    } else {
        un.sun_path[path.size()] = '\0';
        s.length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + path.size() + 1);
    }
    return address{s};
}

address ip_address(std::string_view host, std::uint16_t port, std::string_view text) {
    if (host == "localhost") {
        host = "127.0.0.1";
    }
    if (host.size() >= INET6_ADDRSTRLEN) {
        bad_address(text, "not a literal IPv4 or IPv6 address");
    }
    char buf[INET6_ADDRSTRLEN] = {};
    std::memcpy(buf, host.data(), host.size());
    address::storage s{};
    if (inet_pton(AF_INET, buf, &s.sa.in4.sin_addr) == 1) {
        s.sa.in4.sin_family = AF_INET;
        s.sa.in4.sin_port = htons(port);
        s.length = sizeof(sockaddr_in);
    } else if (inet_pton(AF_INET6, buf, &s.sa.in6.sin6_addr) == 1) {
        s.sa.in6.sin6_family = AF_INET6;
        s.sa.in6.sin6_port = htons(port);
        s.length = sizeof(sockaddr_in6);
    } else {
        bad_address(text, "not a literal IPv4 or IPv6 address (no DNS lookups are made)");
    }
    return address{s};
}

} // namespace

address address::unix_path(std::string_view path) {
    return unix_address(path, path);
}

address address::from_host_port(std::string_view host, std::uint16_t port) {
    return ip_address(host, port, host);
}

address address::parse(std::string_view text) {
    if (text.starts_with("unix:")) {
        return unix_address(text.substr(5), text);
    }
    std::string_view host;
    std::string_view port_text;
    if (text.starts_with("[")) {
        auto close = text.find(']');
        if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
            bad_address(text, "expected [IPv6]:port");
        }
        host = text.substr(1, close - 1);
        port_text = text.substr(close + 2);
    } else {
        auto colon = text.rfind(':');
        if (colon == std::string_view::npos) {
            bad_address(text, "expected host:port, [IPv6]:port or unix:/path");
        }
        host = text.substr(0, colon);
        if (host.find(':') != std::string_view::npos) {
            bad_address(text, "an IPv6 address needs brackets: [::1]:port");
        }
        port_text = text.substr(colon + 1);
    }
    unsigned port = 0;
    auto [end, ec] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (ec != std::errc{} || end != port_text.data() + port_text.size() || port > 65535 ||
        port_text.empty()) {
        bad_address(text, "port must be a number from 0 to 65535");
    }
    return ip_address(host, static_cast<std::uint16_t>(port), text);
}

address address::from_native(const sockaddr* sa, socklen_t length) {
    address a;
    if (length > sizeof a.storage_.sa) {
        throw std::invalid_argument("socket address larger than ringchat::address can hold");
    }
    std::memcpy(&a.storage_.sa, sa, length);
    a.storage_.length = length;
    return a;
}

std::uint16_t address::port() const noexcept {
    switch (family()) {
    case AF_INET:
        return ntohs(storage_.sa.in4.sin_port);
    case AF_INET6:
        return ntohs(storage_.sa.in6.sin6_port);
    default:
        return 0;
    }
}

std::string address::to_string() const {
    char buf[INET6_ADDRSTRLEN] = {};
    switch (family()) {
    case AF_INET:
        inet_ntop(AF_INET, &storage_.sa.in4.sin_addr, buf, sizeof buf);
        return fmt::format("{}:{}", buf, port());
    case AF_INET6:
        inet_ntop(AF_INET6, &storage_.sa.in6.sin6_addr, buf, sizeof buf);
        return fmt::format("[{}]:{}", buf, port());
    case AF_UNIX: {
        const auto& un = storage_.sa.un;
        std::size_t path_len = storage_.length > offsetof(sockaddr_un, sun_path)
                                   ? storage_.length - offsetof(sockaddr_un, sun_path)
                                   : 0;
        if (path_len == 0) {
            return "unix:(unnamed)";
        }
        if (un.sun_path[0] == '\0') {
            return fmt::format("unix:@{}", std::string_view(un.sun_path + 1, path_len - 1));
        }
        return fmt::format("unix:{}", std::string_view(un.sun_path, strnlen(un.sun_path, path_len)));
    }
    default:
        return "(unspecified)";
    }
}

bool operator==(const address& a, const address& b) noexcept {
    return a.storage_.length == b.storage_.length &&
           std::memcmp(&a.storage_.sa, &b.storage_.sa, a.storage_.length) == 0;
}

} // namespace ringchat
