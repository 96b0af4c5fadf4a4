#include <ringchat/buffer.hpp>

#include <algorithm>
#include <cstring>
#include <utility>

namespace ringchat {

buffer::buffer(buffer&& other) noexcept
    : storage_(std::move(other.storage_)), capacity_(std::exchange(other.capacity_, 0)),
      begin_(std::exchange(other.begin_, 0)), end_(std::exchange(other.end_, 0)),
      initial_(other.initial_) {}

buffer& buffer::operator=(buffer&& other) noexcept {
    if (this != &other) {
        storage_ = std::move(other.storage_);
        capacity_ = std::exchange(other.capacity_, 0);
        begin_ = std::exchange(other.begin_, 0);
        end_ = std::exchange(other.end_, 0);
        initial_ = other.initial_;
    }
    return *this;
}

void buffer::consume(std::size_t n) noexcept {
    begin_ += n;
    if (begin_ == end_) {
        // Start again at the front: no memmove needed before the next receive.
        begin_ = end_ = 0;
    }
}

std::span<char> buffer::prepare(std::size_t min_free) {
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

void buffer::release_if_idle(std::size_t keep) noexcept {
    if (empty() && capacity_ > keep) {
        storage_.reset();
        capacity_ = 0;
        begin_ = end_ = 0;
    }
}

} // namespace ringchat
