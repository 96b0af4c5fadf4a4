#include <ringchat/log.hpp>

#include <cstdio>
#include <mutex>

namespace ringchat::detail {

void write_log(log_level level, std::string_view line) noexcept {
    static std::mutex mutex;
    static constexpr const char* names[] = {"", "error", "warn", "info", "trace"};
    std::lock_guard lock(mutex);
    if (level == log_level::trace) {
        std::fprintf(stderr, "%.*s\n", static_cast<int>(line.size()), line.data());
    } else {
        std::fprintf(stderr, "ringchat %s: %.*s\n", names[static_cast<int>(level)],
                     static_cast<int>(line.size()), line.data());
    }
}

} // namespace ringchat::detail
