#define DOCTEST_CONFIG_IMPLEMENT
#include "test_support.hpp"

#include <ringchat/error.hpp>
#include <ringchat/io_context.hpp>

#include <cstdio>
#include <cstdlib>

int main(int argc, char** argv) {
    // A test binary that needs io_uring skips (exit 77, meson's SKIP) where the kernel or a
    // sandbox refuses it, instead of failing for a reason that is not ours.
    if (std::getenv("RINGCHAT_TEST_NEEDS_IO_URING") != nullptr) {
        try {
            ringchat::io_context probe;
        } catch (const std::system_error& e) {
            if (e.code() == ringchat::errc::io_uring_unavailable) {
                std::printf("SKIP: %s\n", e.what());
                return 77;
            }
            throw;
        }
    }
    doctest::Context context(argc, argv);
    return context.run();
}
