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

// A read bounded by the idle timeout, or unbounded when it is 0.
template <typename Read>
Read idle_bounded(Read read, const server_config& config) {
    if (config.idle_timeout.count() == 0) {
        return read;
    }
    return std::move(read).with_timeout(config.idle_timeout);
}

// Echoes a large payload as it arrives, so memory stays bounded by the channel's
// high-water mark instead of twice the payload.
task<void> echo_streaming(channel& ch, std::size_t length, const server_config& config) {
    for (std::size_t remaining = length; remaining > 0;) {
        std::string_view piece = co_await idle_bounded(ch.read_some(remaining), config);
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

// The seed's EchoHandler as one straight-line coroutine: read the command, switch to a
// byte count, echo, close when everything is sent.
task<void> echo_commands(channel& ch, const server_config& config) {
    const char* name = config.trace_name;
    do {
        std::string_view command;
        try {
            command = co_await idle_bounded(ch.read_until("\n"), config);
        } catch (const std::system_error& e) {
            if (e.code() == errc::eof && config.keep_alive) {
                break; // the client closed between commands: a normal end
            }
            throw;
        }
        if (tracing()) {
            log(log_level::trace, "{}: read_until(\"\\n\") -> ({} bytes) {}", name, command.size(),
                preview(command));
        }
        std::size_t length = parse_echo_command(command, config.max_payload);
        if (tracing()) {
            log(log_level::trace, "{}: command ECHO {}: switching to read_exact({})", name, length,
                length);
        }
        if (length > config.stream_above) {
            co_await echo_streaming(ch, length, config);
        } else {
            std::string_view payload =
                co_await idle_bounded(ch.read_exact(length), config);
            if (tracing()) {
                log(log_level::trace, "{}: read_exact({}) -> ({} bytes) {}; pushing it back", name,
                    length, payload.size(), preview(payload));
            }
            ch.push(payload);
        }
    } while (config.keep_alive);
    if (tracing()) {
        log(log_level::trace, "{}: close_when_done()", name);
    }
    co_await ch.close_when_done();
}

task<void> echo_raw(channel& ch, const server_config& config) {
    for (;;) {
        std::string_view piece = co_await idle_bounded(ch.read_some(), config);
        if (piece.empty()) {
            break;
        }
        co_await ch.write(piece);
    }
    co_await ch.close_when_done();
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

} // namespace

task<void> serve_connection(channel ch, server_config config) {
    struct notify_on_exit {
        const server_config& config;
        ~notify_on_exit() {
            if (config.on_finished != nullptr) {
                config.on_finished(config.finished_context);
            }
        }
    } notify{config};
    const std::string peer = ch.peer().to_string();
    try {
        if (config.raw) {
            co_await echo_raw(ch, config);
        } else {
            co_await echo_commands(ch, config);
        }
        co_return;
    } catch (const protocol_error& e) {
        log(log_level::warn, "{}: bad request: {}", peer, e.what());
        reply_error(ch, e.what());
    } catch (const frame_too_large_error& e) {
        log(log_level::warn, "{}: command line longer than {} bytes", peer, e.limit());
        reply_error(ch, fmt::format("command line longer than {} bytes", e.limit()));
    } catch (const incomplete_read_error& e) {
        log(log_level::warn, "{}: client disconnected mid-payload ({} of {} bytes)", peer,
            e.received(), e.expected());
    } catch (const std::system_error& e) {
        if (e.code() == errc::timed_out) {
            log(log_level::info, "{}: idle for {} ms, closing", peer, config.idle_timeout.count());
            reply_error(ch, "idle timeout");
        } else if (e.code() == errc::eof) {
            log(log_level::info, "{}: client closed before sending a command", peer);
        } else {
            log(log_level::info, "{}: {}", peer, e.what());
        }
    } catch (const std::exception& e) {
        log(log_level::error, "{}: unexpected failure: {}", peer, e.what());
    }
}

} // namespace echo
