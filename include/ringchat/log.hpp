#pragma once

#include <fmt/core.h>

#include <atomic>
#include <string_view>

namespace ringchat {

/// How much the library and the apps print to stderr. `warn` (the default) prints
/// errors that would otherwise be lost, such as an exception escaping a spawned task;
/// `trace` prints every step of the protocol, like the seed's asynchat example.
enum class log_level { off = 0, error = 1, warn = 2, info = 3, trace = 4 };

namespace detail {
inline std::atomic<log_level> current_log_level{log_level::warn};
void write_log(log_level level, std::string_view line) noexcept;
} // namespace detail

/// Sets the level for the whole process; callable from any thread.
inline void set_log_level(log_level level) noexcept {
    detail::current_log_level.store(level, std::memory_order_relaxed);
}

/// True if a message at `level` would be printed. Check it before building costly arguments.
[[nodiscard]] inline bool log_enabled(log_level level) noexcept {
    return level <= detail::current_log_level.load(std::memory_order_relaxed);
}

namespace detail {
// The formatting, out of line and cold: a log call in a function on the message path then
// costs that path a test and a call in a block the compiler moves out of the way, instead of
// the formatting code spread over its cache lines.
template <typename... Args>
[[gnu::cold, gnu::noinline]] void format_log(log_level level, fmt::format_string<Args...> format,
                                             Args&&... args) noexcept {
    try {
        write_log(level, fmt::format(format, std::forward<Args>(args)...));
    } catch (...) {
        write_log(level, "(log line could not be formatted)");
    }
}
} // namespace detail

/// Formats one line with fmt and writes it to stderr if `level` is enabled. Never throws:
/// a formatting failure is reported in place of the line. Callable from any thread.
template <typename... Args>
void log(log_level level, fmt::format_string<Args...> format, Args&&... args) noexcept {
    if (log_enabled(level)) {
        detail::format_log(level, format, std::forward<Args>(args)...);
    }
}

} // namespace ringchat
