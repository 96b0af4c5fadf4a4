#include <ringchat/buffer.hpp>

#include <algorithm>
#include <cstring>
#include <utility>

namespace ringchat {

buffer::buffer(buffer&& other) noexcept
    : borrowed_(std::exchange(other.borrowed_, nullptr)), storage_(std::move(other.storage_)), capacity_(std::exchange(other.capacity_, 0)),
      begin_(std::exchange(other.begin_, 0)), end_(std::exchange(other.end_, 0)),
      initial_(other.initial_) {}

buffer& buffer::operator=(buffer&& other) noexcept {
    if (this != &other) {
        borrowed_ = std::exchange(other.borrowed_, nullptr);
        storage_ = std::move(other.storage_);
        capacity_ = std::exchange(other.capacity_, 0);
        begin_ = std::exchange(other.begin_, 0);
        end_ = std::exchange(other.end_, 0);
        initial_ = other.initial_;
    }
    return *this;
}

void buffer::copy_borrowed() {
    // Own storage holds nothing while borrowing (borrow() requires empty()). Allocate before
    // letting go of the borrowed bytes, so a std::bad_alloc leaves the buffer as it was.
    const std::size_t unread = end_ - begin_;
    if (capacity_ < unread) {
        const std::size_t wanted = std::max(unread, initial_);
        storage_ = std::make_unique_for_overwrite<char[]>(wanted);
        capacity_ = wanted;
    }
    if (unread != 0) {
        std::memcpy(storage_.get(), borrowed_ + begin_, unread);
    }
    borrowed_ = nullptr;
    begin_ = 0;
    end_ = unread;
}

std::span<char> buffer::prepare(std::size_t min_free) {
    stop_borrowing();
    if (capacity_ - end_ < min_free) {
        const std::size_t unread = size();
        if (capacity_ - unread >= min_free && storage_) {
            std::memmove(storage_.get(), storage_.get() + begin_, unread);
        } else {
            std::size_t wanted = std::max({capacity_ * 2, unread + min_free, initial_});
            auto grown = std::make_unique_for_overwrite<char[]>(wanted);
            if (unread != 0) {
                std::memcpy(grown.get(), storage_.get() + begin_, unread);
            }
            storage_ = std::move(grown);
            capacity_ = wanted;
        }
        begin_ = 0;
        end_ = unread;
    }
    return {storage_.get() + end_, capacity_ - end_};
}

void buffer::append(std::string_view bytes) {
    auto space = prepare(bytes.size());
    if (!bytes.empty()) {
        std::memcpy(space.data(), bytes.data(), bytes.size());
    }
    commit(bytes.size());
}

} // namespace ringchat
