#pragma once

#include <concepts>
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace ringchat {

/// A source of outgoing data pulled by a channel's writer, like asynchat's producers:
/// `more()` returns the next chunk (anything convertible to std::string_view), and an empty
/// chunk means the producer is done. A returned view must stay valid until the next more()
/// call or the producer's destruction; a returned std::string is kept by the channel.
template <typename P>
concept producer = requires(P& p) {
    { p.more() } -> std::convertible_to<std::string_view>;
};

/// asynchat's simple_producer: hands out `data` in chunks of `chunk_size` bytes. Owns the data.
class simple_producer {
public:
    /// Throws std::invalid_argument if `chunk_size` is 0.
    explicit simple_producer(std::string data, std::size_t chunk_size = 512);

    /// The next chunk (at most chunk_size bytes), empty when everything was handed out.
    /// The view lives as long as the producer.
    std::string_view more() noexcept;

    /// Bytes not handed out yet.
    [[nodiscard]] std::size_t remaining() const noexcept { return data_.size() - position_; }

private:
    std::string data_;
    std::size_t position_ = 0;
    std::size_t chunk_size_;
};

namespace detail {

/// Type-erased producer owned by a channel's send queue.
class producer_holder {
public:
    virtual ~producer_holder() = default;
    /// Calls the producer's more(); the view lives until the next call or destruction.
    virtual std::string_view next() = 0;
};

template <producer P>
class producer_holder_for final : public producer_holder {
public:
    explicit producer_holder_for(P&& p) : producer_(std::move(p)) {}
    std::string_view next() override {
        current_ = producer_.more();
        return std::string_view(current_);
    }

private:
    using chunk_type = std::remove_cvref_t<decltype(std::declval<P&>().more())>;
    P producer_;
    chunk_type current_{};
};

} // namespace detail

} // namespace ringchat
