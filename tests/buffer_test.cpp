#include "support/test_support.hpp"

#include <ringchat/buffer.hpp>

#include <cstring>
#include <string>

using ringchat::buffer;

TEST_CASE("a buffer allocates on first use and appends after unread bytes") {
    buffer b(16);
    CHECK(b.capacity() == 0);
    CHECK(b.empty());
    b.append("hello ");
    CHECK(b.capacity() >= 16);
    b.append("world");
    CHECK(b.data() == "hello world");
    b.consume(6);
    CHECK(b.data() == "world");
}

TEST_CASE("a buffer compacts before it grows and keeps the unread bytes") {
    buffer b(16);
    b.append("0123456789abcdef"); // full
    b.consume(10);
    const std::size_t capacity = b.capacity();
    auto space = b.prepare(8); // fits after moving "abcdef" to the front
    CHECK(b.capacity() == capacity);
    CHECK(space.size() >= 8);
    CHECK(b.data() == "abcdef");
    auto more = b.prepare(100); // must grow
    CHECK(more.size() >= 100);
    CHECK(b.data() == "abcdef");
}

TEST_CASE("consuming everything starts the next bytes at the front without freeing") {
    buffer b(16);
    b.append("abc");
    b.consume(3);
    CHECK(b.empty());
    CHECK(b.capacity() >= 16);
    b.append("x");
    CHECK(b.data() == "x");
}

TEST_CASE("a borrowed range is read in place and copied out when more must follow") {
    buffer b(8);
    const char shared[] = "frame\nrest";
    b.borrow(shared, 10);
    CHECK(b.borrowing());
    CHECK(b.data().data() == shared); // no copy
    b.consume(6);
    CHECK(b.data() == "rest");
    b.append("+more"); // contiguous with "rest": copies it out first
    CHECK_FALSE(b.borrowing());
    CHECK(b.data() == "rest+more");
    CHECK(b.data().data() != shared + 6);
}

TEST_CASE("stop_borrowing keeps unread bytes larger than the buffer's own storage") {
    buffer b(4);
    const std::string shared(100, 's');
    b.borrow(shared.data(), shared.size());
    b.consume(10);
    b.stop_borrowing();
    CHECK_FALSE(b.borrowing());
    CHECK(b.data() == std::string(90, 's'));
}

TEST_CASE("an idle buffer above the kept size is released; a borrowing one is not") {
    buffer b(8);
    b.append(std::string(1000, 'x'));
    b.consume(1000);
    b.release_if_idle(4096);
    CHECK(b.capacity() >= 1000); // small enough to keep
    b.release_if_idle(64);
    CHECK(b.capacity() == 0);
    const char shared[] = "abc";
    b.borrow(shared, 3);
    b.consume(3);
    b.release_if_idle(0);
    CHECK(b.borrowing()); // the channel returns the borrowed memory itself
}
