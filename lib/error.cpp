#include <ringchat/address.hpp>
#include <ringchat/error.hpp>

#include <fmt/core.h>

#include <cerrno>
#include <cstring>

namespace ringchat {

namespace {

class ringchat_category final : public std::error_category {
public:
    const char* name() const noexcept override { return "ringchat"; }
    std::string message(int value) const override {
        switch (static_cast<errc>(value)) {
        case errc::eof:
            return "end of stream";
        case errc::incomplete_read:
            return "connection closed inside a frame";
        case errc::frame_too_large:
            return "frame larger than the limit";
        case errc::timed_out:
            return "operation timed out";
        case errc::cancelled:
            return "operation cancelled";
        case errc::bad_request:
            return "bad request";
        case errc::io_uring_unavailable:
            return "io_uring is unavailable";
        case errc::closed:
            return "channel closed";
        }
        return "unknown ringchat error";
    }
    std::error_condition default_error_condition(int value) const noexcept override {
        switch (static_cast<errc>(value)) {
        case errc::timed_out:
            return std::errc::timed_out;
        case errc::cancelled:
            return std::errc::operation_canceled;
        default:
            return {value, *this};
        }
    }
};

} // namespace

const std::error_category& error_category() noexcept {
    static const ringchat_category category;
    return category;
}

std::error_code make_error_code(errc e) noexcept {
    return {static_cast<int>(e), error_category()};
}

incomplete_read_error::incomplete_read_error(std::size_t received, std::size_t expected,
                                             const std::string& what)
    : std::system_error(make_error_code(errc::incomplete_read), what), received_(received),
      expected_(expected) {}

frame_too_large_error::frame_too_large_error(std::size_t limit, const std::string& what)
    : std::system_error(make_error_code(errc::frame_too_large), what), limit_(limit) {}

namespace detail {

std::error_code io_error_code(int res) noexcept {
    switch (-res) {
    case ETIME:
        return make_error_code(errc::timed_out);
    case ECANCELED:
        return make_error_code(errc::cancelled);
    default:
        return {-res, std::generic_category()};
    }
}

void throw_io_error(int res, std::string_view op, const address* peer) {
    std::error_code code = io_error_code(res);
    if (peer != nullptr && peer->family() != AF_UNSPEC) {
        throw std::system_error(code, fmt::format("{} {}", op, peer->to_string()));
    }
    throw std::system_error(code, std::string(op));
}

} // namespace detail

} // namespace ringchat
