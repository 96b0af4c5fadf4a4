#include "support/test_support.hpp"

#include "echo_protocol.hpp"

#include <string>

using echo::parse_echo_command;
using echo::protocol_error;

TEST_CASE("a well-formed ECHO command yields its length") {
    CHECK(parse_echo_command("ECHO 166", 1000) == 166);
    CHECK(parse_echo_command("ECHO 0", 1000) == 0);
    CHECK(parse_echo_command("ECHO 1000", 1000) == 1000);
    CHECK(parse_echo_command("ECHO 7\r", 1000) == 7);
}

TEST_CASE("malformed ECHO commands are refused with the reason") {
    struct bad_case {
        const char* line;
        const char* reason;
    };
    const bad_case cases[] = {
        {"", "expected 'ECHO <length>'"},
        {"ECHO", "expected 'ECHO <length>'"},
        {"ECHO ", "missing length after ECHO"},
        {"ECHO -5", "length must be a non-negative decimal number"},
        {"ECHO +5", "length must be a non-negative decimal number"},
        {"ECHO abc", "length must be a non-negative decimal number"},
        {" ECHO 5", "expected 'ECHO <length>'"},
        {"echo 5", "expected 'ECHO <length>'"},
        {"ECHO 5x", "unexpected characters after the length"},
        {"ECHO 5 6", "unexpected characters after the length"},
        {"ECHO 1001", "length 1001 exceeds the maximum payload of 1000 bytes"},
        {"ECHO 99999999999999999999999", "length exceeds the maximum payload of 1000 bytes"},
    };
    for (const auto& c : cases) {
        CAPTURE(c.line);
        CHECK_THROWS_WITH_AS(parse_echo_command(c.line, 1000), c.reason, protocol_error);
    }
}

TEST_CASE("make_message repeats the seed's text to the requested size") {
    CHECK(echo::make_message(0).empty());
    CHECK(echo::make_message(166) == echo::lorem);
    std::string big = echo::make_message(1000);
    CHECK(big.size() == 1000);
    CHECK(big.substr(166, 10) == echo::lorem.substr(0, 10));
}

TEST_CASE("preview escapes control characters and shortens long text") {
    CHECK(echo::preview("ECHO 5\n") == "\"ECHO 5\\n\"");
    CHECK(echo::preview(std::string(100, 'a')).ends_with("\"..."));
}
