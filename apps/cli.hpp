#pragma once

// Command-line parsing shared by the apps: "--name value" options and flags.

#include <charconv>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>

namespace cli {

/// Walks argv; the app asks flag("--x") / value("--x") for each argument in turn.
class args {
public:
    args(int argc, char** argv, const char* usage) : argc_(argc), argv_(argv), usage_(usage) {}

    /// Advances to the next argument; false at the end.
    bool next() { return ++index_ < argc_; }
    [[nodiscard]] std::string_view current() const { return argv_[index_]; }
    [[nodiscard]] bool is(std::string_view name) const { return current() == name; }

    /// The value after the current option; exits with usage (status 64) if missing.
    std::string_view value() {
        if (index_ + 1 >= argc_) {
            fail("missing value for " + std::string(current()));
        }
        return argv_[++index_];
    }

    /// A non-negative integer value, with an optional K, M or G suffix (powers of 1024).
    std::size_t size_value() {
        std::string_view name = current();
        std::string_view text = value();
        std::size_t multiplier = 1;
        if (!text.empty()) {
            switch (text.back()) {
            case 'K': multiplier = std::size_t{1} << 10; break;
            case 'M': multiplier = std::size_t{1} << 20; break;
            case 'G': multiplier = std::size_t{1} << 30; break;
            default: break;
            }
            if (multiplier != 1) {
                text.remove_suffix(1);
            }
        }
        std::size_t n = 0;
        auto [end, ec] = std::from_chars(text.data(), text.data() + text.size(), n);
        if (ec != std::errc{} || end != text.data() + text.size() || text.empty()) {
            fail(std::string(name) + " needs a non-negative number, not \"" + std::string(text) +
                 "\"");
        }
        return n * multiplier;
    }

    /// A TCP port value: 1 to 65535, or 0 too when `allow_zero` (a server: any free port).
    std::uint16_t port_value(bool allow_zero) {
        std::size_t port = size_value();
        if (port > 65535 || (port == 0 && !allow_zero)) {
            fail(allow_zero ? "--port must be 0 to 65535" : "--port must be 1 to 65535");
        }
        return static_cast<std::uint16_t>(port);
    }

    /// Prints `why` and the usage, exits 64 (EX_USAGE).
    [[noreturn]] void fail(const std::string& why) const {
        std::fprintf(stderr, "%s: %s\n%s", argv_[0], why.c_str(), usage_);
        std::exit(64);
    }

    /// Prints the usage to stdout and exits 0 (for --help).
    [[noreturn]] void help() const {
        std::fputs(usage_, stdout);
        std::exit(0);
    }

    [[noreturn]] void unknown() const { fail("unknown argument " + std::string(current())); }

private:
    int argc_;
    char** argv_;
    const char* usage_;
    int index_ = 0;
};

} // namespace cli
