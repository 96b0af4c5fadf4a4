#include "support/test_support.hpp"

#include <ringchat/address.hpp>

#include <stdexcept>
#include <string>
#include <string_view>

#include <sys/socket.h>
#include <sys/un.h>

using namespace ringchat;

namespace {

/// parse(text) prints as `printed`, and parsing the printed form gives the same address.
void check_round_trip(std::string_view text, std::string_view printed) {
    CAPTURE(text);
    const address a = address::parse(text);
    CHECK(a.to_string() == printed);
    const address again = address::parse(a.to_string());
    CHECK(again == a);
    CHECK(again.to_string() == printed);
}

void check_rejected(std::string_view text) {
    CAPTURE(text);
    try {
        (void)address::parse(text);
        FAIL_CHECK("parse accepted a bad address");
    } catch (const std::invalid_argument& e) {
        const std::string what = e.what();
        CHECK_MESSAGE(what.find(std::string("\"") + std::string(text) + "\"") != std::string::npos,
                      what);
    }
}

} // namespace

TEST_CASE("IPv4 addresses parse and print back the same") {
    check_round_trip("127.0.0.1:80", "127.0.0.1:80");
    check_round_trip("0.0.0.0:0", "0.0.0.0:0");
    check_round_trip("255.255.255.255:65535", "255.255.255.255:65535");
    const address a = address::parse("10.1.2.3:4567");
    CHECK(a.family() == AF_INET);
    CHECK(a.port() == 4567);
    CHECK(a.native_size() == sizeof(sockaddr_in));
}

TEST_CASE("bracketed IPv6 addresses parse and print back the same") {
    check_round_trip("[::1]:8080", "[::1]:8080");
    check_round_trip("[::]:0", "[::]:0");
    check_round_trip("[2001:db8::42]:443", "[2001:db8::42]:443");
    // Printing uses the canonical short form.
    check_round_trip("[2001:0db8:0000:0000:0000:0000:0000:0001]:1", "[2001:db8::1]:1");
    const address a = address::parse("[::1]:9");
    CHECK(a.family() == AF_INET6);
    CHECK(a.port() == 9);
    CHECK(a.native_size() == sizeof(sockaddr_in6));
}

TEST_CASE("localhost means 127.0.0.1") {
    check_round_trip("localhost:1234", "127.0.0.1:1234");
    CHECK(address::parse("localhost:1234") == address::parse("127.0.0.1:1234"));
    CHECK(address::from_host_port("localhost", 5) == address::parse("127.0.0.1:5"));
}

TEST_CASE("Unix socket paths parse and print back the same") {
    check_round_trip("unix:/run/ringchat.sock", "unix:/run/ringchat.sock");
    check_round_trip("unix:relative.sock", "unix:relative.sock");
    const address a = address::parse("unix:/tmp/x");
    CHECK(a.family() == AF_UNIX);
    CHECK(a.port() == 0);
    CHECK(a.native_size() == offsetof(sockaddr_un, sun_path) + 7); // "/tmp/x" and its NUL
}

TEST_CASE("abstract Unix socket names parse and print back the same") {
    check_round_trip("unix:@ringchat-name", "unix:@ringchat-name");
    const address a = address::parse("unix:@abc");
    CHECK(a.family() == AF_UNIX);
    // No terminating NUL: the length decides an abstract name.
    CHECK(a.native_size() == offsetof(sockaddr_un, sun_path) + 4);
    CHECK(a.native()->sa_family == AF_UNIX);
    CHECK_FALSE(address::parse("unix:@abc") == address::parse("unix:@abcd"));
    CHECK_FALSE(address::parse("unix:@abc") == address::parse("unix:abc"));
}

TEST_CASE("an empty address prints as unspecified") {
    const address a;
    CHECK(a.family() == AF_UNSPEC);
    CHECK(a.port() == 0);
    CHECK(a.to_string() == "(unspecified)");
}

TEST_CASE("from_native copies a sockaddr") {
    const address a = address::parse("[::1]:77");
    const address b = address::from_native(a.native(), a.native_size());
    CHECK(b == a);
    CHECK(b.to_string() == "[::1]:77");
    sockaddr_storage big{};
    CHECK_THROWS_AS((void)address::from_native(reinterpret_cast<sockaddr*>(&big), sizeof big + 1),
                    std::invalid_argument);
}

TEST_CASE("bad addresses throw invalid_argument naming the text") {
    check_rejected("");
    check_rejected("127.0.0.1");       // missing port
    check_rejected("127.0.0.1:");      // empty port
    check_rejected("127.0.0.1:70000"); // port out of range
    check_rejected("127.0.0.1:-1");
    check_rejected("127.0.0.1:80x");
    check_rejected("::1:80");  // IPv6 without brackets
    check_rejected("[::1]");   // no port
    check_rejected("[::1]80"); // no colon after the bracket
    check_rejected("[::1:80"); // no closing bracket
    check_rejected("[127.0.0.1]:80x");
    check_rejected("example.com:80"); // no DNS lookups
    check_rejected("256.1.1.1:80");
    check_rejected("unix:");                         // empty path
    check_rejected("unix:" + std::string(200, 'p')); // longer than sun_path
}

TEST_CASE("bad addresses say what is wrong") {
    CHECK_THROWS_WITH_AS((void)address::parse("127.0.0.1:70000"), doctest::Contains("65535"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS((void)address::parse("::1:80"), doctest::Contains("brackets"),
                         std::invalid_argument);
    CHECK_THROWS_WITH_AS((void)address::parse("127.0.0.1"), doctest::Contains("host:port"),
                         std::invalid_argument);
}
