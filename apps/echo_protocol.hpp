#pragma once

// The seed's ECHO protocol, shared by echo_server, echo_client, echo_demo and echo_bench:
// the client sends "ECHO <len>\n" and then <len> bytes; the server echoes the bytes back.
// Application code, not part of the library.

#include <ringchat/channel.hpp>
#include <ringchat/task.hpp>

#include <chrono>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <string_view>

namespace echo {

/// The seed's lorem-ipsum message (166 bytes: producer chunks of 64, 64 and 38).
inline constexpr std::string_view lorem =
    "Lorem ipsum dolor sit amet, consectetuer adipiscing elit. Donec\n"
    "egestas, enim et consectetuer ullamcorper, lectus ligula rutrum leo, a\n"
    "elementum elit tortor eu quam.\n";

/// A command line the protocol does not allow; what() is the reason sent to the peer.
class protocol_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Parses "ECHO <decimal length>" (the line without its "\n"; one trailing "\r" is
/// accepted for telnet users) and returns the length. Throws protocol_error saying what is
/// wrong: not an ECHO command, a missing, negative or non-decimal length, trailing junk, or
/// a length above `max_payload`.
std::size_t parse_echo_command(std::string_view line, std::size_t max_payload);

/// "ECHO <length>\n".
std::string echo_command(std::size_t length);

/// How echo_server serves a connection.
struct server_config {
    bool keep_alive = false;                ///< serve commands until the client closes
    bool raw = false;                       ///< echo bytes as they arrive, no framing
    std::size_t max_payload = 64u << 20;    ///< longest accepted ECHO length
    std::chrono::milliseconds idle_timeout{30'000}; ///< longest wait for input; 0: no limit
    std::size_t stream_above = 1u << 20;    ///< payloads above this are echoed as they arrive
    const char* trace_name = "EchoHandler"; ///< prefix of -v trace lines
    /// Called with `finished_context` when serve_connection ends, however it ends (the
    /// server counts its connections with it); may be null. A plain function pointer keeps
    /// a wrapper coroutine frame per connection out of the server.
    void (*on_finished)(void* finished_context) = nullptr;
    void* finished_context = nullptr;
};

/// Serves one connection: the seed's handler (one ECHO, then close), or with keep_alive
/// many, or raw echo. Answers bad input with "ERROR <reason>\n" and a lingering close.
/// Sets the channel's read timeout to config.idle_timeout. Never throws: failures are
/// logged with the peer's address. `config` is referred to, not copied (one copy per
/// connection would be memory every idle connection holds): it must outlive the task.
ringchat::task<void> serve_connection(ringchat::channel ch, const server_config& config);

/// asynchat's simple_producer, tracing each more() at log level trace like the seed's
/// EchoProducer ("EchoProducer: more() -> (64 bytes) ...").
class traced_producer {
public:
    traced_producer(std::string_view data, std::size_t chunk) : inner_(std::string(data), chunk) {}
    std::string_view more();

private:
    ringchat::simple_producer inner_;
};

/// A short, printable preview of `bytes` for trace lines ("Lorem ipsum..." with escapes).
std::string preview(std::string_view bytes);

/// Deterministic message of `size` bytes (the lorem text repeated).
std::string make_message(std::size_t size);

} // namespace echo
