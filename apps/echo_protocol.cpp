#include "echo_protocol.hpp"

#include <ringchat/error.hpp>
#include <ringchat/log.hpp>

#include <fmt/core.h>

#include <charconv>

namespace echo {

using namespace ringchat;

std::size_t parse_echo_command(std::string_view line, std::size_t max_payload) {
    if (line.ends_with('\r')) {
        line.remove_suffix(1);
    }
    constexpr std::string_view verb = "ECHO ";
    if (!line.starts_with(verb)) {
        throw protocol_error("expected 'ECHO <length>'");
    }
    std::string_view number = line.substr(verb.size());
    if (number.empty()) {
        throw protocol_error("missing length after ECHO");
    }
    if (number.front() < '0' || number.front() > '9') {
        throw protocol_error("length must be a non-negative decimal number");
    }
    std::size_t length = 0;
    auto [end, ec] = std::from_chars(number.data(), number.data() + number.size(), length);
    if (ec == std::errc::result_out_of_range) {
        throw protocol_error(fmt::format("length exceeds the maximum payload of {} bytes",
                                         max_payload));
    }
    if (end != number.data() + number.size()) {
        throw protocol_error("unexpected characters after the length");
    }
    if (length > max_payload) {
        throw protocol_error(fmt::format("length {} exceeds the maximum payload of {} bytes",
                                         length, max_payload));
    }
    return length;
}

std::string echo_command(std::size_t length) { return fmt::format("ECHO {}\n", length); }

std::string preview(std::string_view bytes) {
    constexpr std::size_t shown = 64;
    std::string out = fmt::format("{:?}", bytes.substr(0, shown));
    if (bytes.size() > shown) {
        out += "...";
    }
    return out;
}

std::string_view traced_producer::more() {
    std::string_view chunk = inner_.more();
    log(log_level::trace, "EchoProducer: more() -> ({} bytes) {}", chunk.size(), preview(chunk));
    return chunk;
}

std::string make_message(std::size_t size) {
    std::string message;
    message.reserve(size);
    while (message.size() < size) {
        message.append(lorem.substr(0, std::min(lorem.size(), size - message.size())));
    }
    return message;
}

namespace {

bool tracing() { return log_enabled(log_level::trace); }

// Echoes a large payload as it arrives, so memory stays bounded by the channel's
// high-water mark instead of twice the payload.
task<void> echo_streaming(channel& ch, std::size_t length) {
    for (std::size_t remaining = length; remaining > 0;) {
        std::string_view piece = co_await ch.read_some(remaining);
        if (piece.empty()) {
            throw incomplete_read_error(length - remaining, length,
                                        fmt::format("payload from {}: connection closed after "
                                                    "{} of {} bytes",
                                                    ch.peer().to_string(), length - remaining,
                                                    length));
        }
        remaining -= piece.size();
        co_await ch.write(piece);
    }
}

// Says what went wrong, to the peer when the protocol allows it, then closes only this
// connection (lingering, so the peer receives the line even while it is still sending).
void reply_error(channel& ch, std::string_view reason) {
    try {
        ch.push(fmt::format("ERROR {}\n", reason));
        ch.close_when_done();
    } catch (const std::logic_error&) {
        // Already shutting down: nothing more can be said.
    }
}

// Logs the exception being handled, and answers the peer where the protocol has an answer.
// Called from a catch block. A plain function, so the handler's coroutine frame holds none
// of this (the peer's address is only formatted here, when something went wrong).
void report_failure(channel& ch, const server_config& config) noexcept {
    try {
        try {
            throw;
        } catch (const protocol_error& e) {
            log(log_level::warn, "{}: bad request: {}", ch.peer().to_string(), e.what());
            reply_error(ch, e.what());
        } catch (const frame_too_large_error& e) {
            log(log_level::warn, "{}: command line longer than {} bytes", ch.peer().to_string(),
                e.limit());
            reply_error(ch, fmt::format("command line longer than {} bytes", e.limit()));
        } catch (const incomplete_read_error& e) {
            log(log_level::warn, "{}: client disconnected mid-payload ({} of {} bytes)",
                ch.peer().to_string(), e.received(), e.expected());
        } catch (const std::system_error& e) {
            if (e.code() == errc::timed_out) {
                log(log_level::info, "{}: idle for {} ms, closing", ch.peer().to_string(),
                    config.idle_timeout.count());
                reply_error(ch, "idle timeout");
            } else if (e.code() == errc::eof) {
                log(log_level::info, "{}: client closed before sending a command",
                    ch.peer().to_string());
            } else {
                log(log_level::info, "{}: {}", ch.peer().to_string(), e.what());
            }
        } catch (const std::exception& e) {
            log(log_level::error, "{}: unexpected failure: {}", ch.peer().to_string(), e.what());
        } catch (...) {
            log(log_level::error, "{}: unexpected failure (not a std::exception)",
                ch.peer().to_string());
        }
    } catch (...) {
        // Formatting the report failed (out of memory): the connection closes regardless.
    }
}

// Runs the server's on_finished callback however the handler ends.
struct finished_notice {
    const server_config& config;
    ~finished_notice() {
        if (config.on_finished != nullptr) {
            config.on_finished(config.finished_context);
        }
    }
};

// Raw mode: echoes bytes as they arrive.
task<void> serve_raw(channel ch, const server_config& config) {
    finished_notice notice{config};
    ch.set_read_timeout(config.idle_timeout);
    try {
        for (;;) {
            std::string_view piece = co_await ch.read_some();
            if (piece.empty()) {
                break;
            }
            co_await ch.write(piece);
        }
        co_await ch.close_when_done();
    } catch (...) {
        report_failure(ch, config);
    }
}

// The seed's EchoHandler as one straight-line coroutine: read the command, switch to a
// byte count, echo, close when everything is sent (with keep_alive: the next command).
task<void> serve_commands(channel ch, const server_config& config) {
    finished_notice notice{config};
    ch.set_read_timeout(config.idle_timeout);
    try {
        do {
            std::string_view command;
            try {
                command = co_await ch.read_until("\n");
            } catch (const std::system_error& e) {
                if (e.code() == errc::eof && config.keep_alive) {
                    break; // the client closed between commands: a normal end
                }
                throw;
            }
            if (tracing()) {
                log(log_level::trace, "{}: read_until(\"\\n\") -> ({} bytes) {}",
                    config.trace_name, command.size(), preview(command));
            }
            std::size_t length = parse_echo_command(command, config.max_payload);
            if (tracing()) {
                log(log_level::trace, "{}: command ECHO {}: switching to read_exact({})",
                    config.trace_name, length, length);
            }
            if (length > config.stream_above) {
                co_await echo_streaming(ch, length);
                continue;
            }
            std::string_view payload = co_await ch.read_exact(length);
            if (tracing()) {
                log(log_level::trace, "{}: read_exact({}) -> ({} bytes) {}; pushing it back",
                    config.trace_name, length, payload.size(), preview(payload));
            }
            ch.push(payload);
        } while (config.keep_alive);
        if (tracing()) {
            log(log_level::trace, "{}: close_when_done()", config.trace_name);
        }
        co_await ch.close_when_done();
    } catch (...) {
        report_failure(ch, config);
    }
}

} // namespace

// Not a coroutine itself: each mode is one coroutine frame, the only one an idle
// connection holds besides the channel. The idle timeout is the channel's read timeout,
// so the reads need no deadline of their own.
task<void> serve_connection(channel ch, const server_config& config) {
    return config.raw ? serve_raw(std::move(ch), config) : serve_commands(std::move(ch), config);
}

} // namespace echo
