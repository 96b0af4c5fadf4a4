#pragma once

#include <cstddef>
#include <string>
#include <string_view>
#include <system_error>

namespace ringchat {

class address;

/// The library's own error conditions, in the "ringchat" error category. Errors from the
/// kernel keep their errno value in std::generic_category instead.
enum class errc {
    eof = 1,              ///< the peer closed the connection cleanly between frames
    incomplete_read,      ///< the peer closed the connection inside a frame
    frame_too_large,      ///< a frame grew past the channel's configured limit
    timed_out,            ///< an operation's deadline passed before it completed
    cancelled,            ///< an operation was cancelled through a cancel_source
    bad_request,          ///< the peer sent something the protocol does not allow
    io_uring_unavailable, ///< io_uring cannot be set up on this machine
    closed,               ///< the channel was shut down or closed by this side
};

/// The "ringchat" error category. Thread-safe; lives for the whole program.
const std::error_category& error_category() noexcept;

/// Makes an error_code in the "ringchat" category; lets `errc` values compare with codes.
std::error_code make_error_code(errc e) noexcept;

/// Thrown when the peer closes inside a frame; received() is how many bytes of the frame
/// had arrived (they stay in the channel's buffer), expected() the size that was awaited
/// (0 when the frame was delimited by a terminator and its size was unknown).
class incomplete_read_error : public std::system_error {
public:
    incomplete_read_error(std::size_t received, std::size_t expected, const std::string& what);
    [[nodiscard]] std::size_t received() const noexcept { return received_; }
    [[nodiscard]] std::size_t expected() const noexcept { return expected_; }

private:
    std::size_t received_;
    std::size_t expected_;
};

/// Thrown when a frame grows past the channel's limit; limit() names that limit. Nothing
/// was consumed: the bytes stay buffered so the caller can reply, skip or close.
class frame_too_large_error : public std::system_error {
public:
    frame_too_large_error(std::size_t limit, const std::string& what);
    [[nodiscard]] std::size_t limit() const noexcept { return limit_; }

private:
    std::size_t limit_;
};

namespace detail {

/// Throws std::system_error for a negative CQE result `res` (a -errno value, or -ETIME /
/// -ECANCELED after a deadline or a cancel, which become errc::timed_out and
/// errc::cancelled). The message is "<op> <peer>: <reason>", e.g.
/// "recv from [::1]:40123: Connection reset by peer"; `peer` may be null.
[[noreturn]] void throw_io_error(int res, std::string_view op, const address* peer);

/// The std::error_code for a negative CQE result, mapped as throw_io_error maps it.
std::error_code io_error_code(int res) noexcept;

} // namespace detail

} // namespace ringchat

template <>
struct std::is_error_code_enum<ringchat::errc> : std::true_type {};
