#pragma once

#include <cstddef>
#include <memory>
#include <span>
#include <string_view>

namespace ringchat {

/// A contiguous byte buffer for received data: unread bytes sit in [begin, end) of one
/// allocation, new bytes are appended at the end. Compacts (moves unread bytes to the front)
/// before it grows, and allocates nothing until the first prepare(). Single-threaded.
class buffer {
public:
    /// `initial_capacity` is what the first prepare() allocates at least.
    explicit buffer(std::size_t initial_capacity = 2048) noexcept : initial_(initial_capacity) {}
    buffer(buffer&& other) noexcept;
    buffer& operator=(buffer&& other) noexcept;
    buffer(const buffer&) = delete;
    buffer& operator=(const buffer&) = delete;
    ~buffer() = default;

    /// The unread bytes. The view lives until the next prepare(), append() or release().
    [[nodiscard]] std::string_view data() const noexcept {
        return {base() + begin_, end_ - begin_};
    }
    [[nodiscard]] std::size_t size() const noexcept { return end_ - begin_; }
    [[nodiscard]] bool empty() const noexcept { return begin_ == end_; }
    /// Bytes allocated (0 before the first prepare() and after release()).
    [[nodiscard]] std::size_t capacity() const noexcept { return capacity_; }

    /// Marks the first `n` unread bytes (n <= size()) as read. Their memory stays intact
    /// until the next prepare(), so views of them remain valid until then.
    void consume(std::size_t n) noexcept {
        begin_ += n;
        if (begin_ == end_) {
            // Start again at the front: no memmove needed before the next receive.
            begin_ = end_ = 0;
        }
    }

    /// Returns writable space of at least `min_free` bytes after the unread ones (possibly
    /// more: all the free space), compacting or growing as needed. Invalidates views.
    /// Throws std::bad_alloc.
    std::span<char> prepare(std::size_t min_free);

    /// Marks `n` bytes written into the span from prepare() as unread data.
    void commit(std::size_t n) noexcept { end_ += n; }

    /// Copies `bytes` to the end (prepare + copy + commit).
    void append(std::string_view bytes);

    /// Makes `n` bytes of memory the buffer does not own (a provided receive buffer) its
    /// unread data, without copying. Requires empty(). The memory must stay valid until
    /// stop_borrowing() or the next prepare()/append(), which copy what is unread into the
    /// buffer's own storage first.
    void borrow(const char* data, std::size_t n) noexcept {
        borrowed_ = data;
        begin_ = 0;
        end_ = n;
    }
    /// True while the unread bytes (or, once consumed, the last ones) are borrowed memory.
    [[nodiscard]] bool borrowing() const noexcept { return borrowed_ != nullptr; }
    /// Stops borrowing, copying unread borrowed bytes into own storage. Throws std::bad_alloc
    /// (not when nothing is unread).
    void stop_borrowing() {
        if (borrowed_ != nullptr) {
            if (begin_ == end_) {
                borrowed_ = nullptr; // nothing unread: the usual case, a request read whole
                begin_ = end_ = 0;
            } else {
                copy_borrowed();
            }
        }
    }

    /// Frees the memory if nothing is unread and more than `keep` bytes are allocated, so an
    /// idle connection does not pin a large buffer. Invalidates views.
    void release_if_idle(std::size_t keep) noexcept {
        if (empty() && borrowed_ == nullptr && capacity_ > keep) {
            storage_.reset();
            capacity_ = 0;
            begin_ = end_ = 0;
        }
    }

private:
    void copy_borrowed();

    [[nodiscard]] const char* base() const noexcept {
        return borrowed_ != nullptr ? borrowed_ : storage_.get();
    }

    const char* borrowed_ = nullptr;
    std::unique_ptr<char[]> storage_;
    std::size_t capacity_ = 0;
    std::size_t begin_ = 0;
    std::size_t end_ = 0;
    std::size_t initial_;
};

} // namespace ringchat
