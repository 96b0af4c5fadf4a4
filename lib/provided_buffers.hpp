#pragma once

#include <liburing.h>

#include <cstdint>
#include <memory>

namespace ringchat::detail {

/// A ring of receive buffers registered with io_uring (IORING_REGISTER_PBUF_RING): receives
/// with IOSQE_BUFFER_SELECT take a buffer only when data arrives, so connections waiting for
/// input hold none. The memory is mapped once and touched only as buffers are used.
/// Io thread only.
class provided_buffers {
public:
    /// Registers `count` (a power of two) buffers of `size` bytes as buffer group `group`.
    /// Returns null if the kernel does not support provided buffer rings (before 5.19) or the
    /// memory cannot be mapped; callers then receive into their own buffers.
    static std::unique_ptr<provided_buffers> create(io_uring* ring, unsigned count, unsigned size,
                                                    std::uint16_t group) noexcept;
    provided_buffers(const provided_buffers&) = delete;
    provided_buffers& operator=(const provided_buffers&) = delete;
    /// Unregisters the group and unmaps the memory (no receive may still be pending).
    ~provided_buffers();

    [[nodiscard]] std::uint16_t group() const noexcept { return group_; }
    [[nodiscard]] unsigned buffer_size() const noexcept { return size_; }
    /// The memory of buffer `bid`, as named by a CQE's IORING_CQE_BUFFER_SHIFT bits.
    [[nodiscard]] char* data(std::uint16_t bid) const noexcept {
        return memory_ + static_cast<std::size_t>(bid) * size_;
    }
    /// Gives buffer `bid` back to the kernel (no system call).
    void recycle(std::uint16_t bid) noexcept;

private:
    provided_buffers() = default;

    io_uring* ring_ = nullptr;
    io_uring_buf_ring* buf_ring_ = nullptr;
    std::size_t ring_bytes_ = 0;
    char* memory_ = nullptr;
    std::size_t memory_bytes_ = 0;
    unsigned count_ = 0;
    unsigned size_ = 0;
    std::uint16_t group_ = 0;
    bool registered_ = false;
};

} // namespace ringchat::detail
