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
    /// Registers `count` (a power of two) buffers of `size` bytes as buffer group `group`;
    /// with `spares`, a few of them (none if count < 32) are kept out of the kernel's ring
    /// for take_spare(). Returns null if the kernel does not support provided buffer rings
    /// (before 5.19) or the memory cannot be mapped; callers then receive into their own
    /// buffers.
    static std::unique_ptr<provided_buffers> create(io_uring* ring, unsigned count, unsigned size,
                                                    std::uint16_t group, bool spares) noexcept;
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
    /// Gives buffer `bid` back (no system call), or, while others hold it too (hold()), only
    /// drops one holder: the last one to recycle it gives it back. Given back, it first
    /// refills the spares (take_spare()), then goes to the kernel.
    void recycle(std::uint16_t bid) noexcept {
        std::uint8_t& holders = holders_[bid];
        if (holders != 0) {
            --holders;
            return;
        }
        give_back(bid);
    }

    /// Adds a holder to buffer `bid`, which its owner has and keeps (a channel's send queue
    /// sending bytes straight from the buffer they arrived in, while the input still views
    /// them): the buffer goes back to the kernel once every holder has recycled it. Returns
    /// false, adding nothing, when holds not yet released (release_hold()) already number a
    /// quarter of the ring, whoever else still has their buffers (so slow peers cannot
    /// starve receives), or `bid` has all the holders it can count; the caller then copies.
    [[nodiscard]] bool hold(std::uint16_t bid) noexcept {
        std::uint8_t& holders = holders_[bid];
        if (held_ >= count_ / 4 || holders == 0xff) {
            return false;
        }
        ++holders;
        ++held_;
        return true;
    }
    /// Asks the CPU to load what recycle() and hold() read for `bid`, soon to be used.
    void prefetch_holders(std::uint16_t bid) const noexcept {
        __builtin_prefetch(&holders_[bid], 1);
    }
    /// A buffer kept out of the kernel's ring for receives the program makes itself (a
    /// channel's recv system call when the socket is readable), or -1 if none is left. It is
    /// the caller's, like one a completion named, until recycled. Spares are handed out last
    /// in, first out, so the one just given back, still in the cache, is taken again.
    [[nodiscard]] int take_spare() noexcept {
        return spare_count_ == 0 ? -1 : spares_[--spare_count_];
    }

    /// Ends a hold(): recycles `bid` for the holder that asked for it.
    void release_hold(std::uint16_t bid) noexcept {
        --held_;
        recycle(bid);
    }

    /// Buffers a channel keeps aside, in arrival order, until its next read takes them:
    /// chained through per-buffer links kept here, so a channel holds only this list head
    /// and parking a buffer never allocates.
    struct parked_list {
        static constexpr std::uint16_t none = 0xffff;
        std::uint16_t head = none;
        std::uint16_t tail = none;
        std::uint16_t count = 0;
        std::uint32_t bytes = 0;
        [[nodiscard]] bool empty() const noexcept { return count == 0; }
    };
    /// Appends buffer `bid`, holding `size` received bytes, to `list`.
    void park(parked_list& list, std::uint16_t bid, std::uint32_t size) noexcept {
        links_[bid].next = parked_list::none;
        links_[bid].size = size;
        if (list.count == 0) {
            list.head = bid;
        } else {
            links_[list.tail].next = bid;
        }
        list.tail = bid;
        ++list.count;
        list.bytes += size;
    }
    /// The size parked with buffer `bid` (the list's head is the first to take).
    [[nodiscard]] std::uint32_t parked_size(std::uint16_t bid) const noexcept {
        return links_[bid].size;
    }
    /// Takes the first buffer off `list` (it is the caller's to recycle).
    void unpark_front(parked_list& list) noexcept {
        const std::uint16_t bid = list.head;
        list.head = links_[bid].next;
        list.bytes -= links_[bid].size;
        if (--list.count == 0) {
            list.tail = parked_list::none;
        }
    }
    /// Recycles every buffer on `list` and empties it.
    void recycle_all(parked_list& list) noexcept {
        while (!list.empty()) {
            const std::uint16_t bid = list.head;
            unpark_front(list);
            recycle(bid);
        }
    }

private:
    provided_buffers() = default;
    void give_back(std::uint16_t bid) noexcept;

    io_uring* ring_ = nullptr;
    io_uring_buf_ring* buf_ring_ = nullptr;
    std::size_t ring_bytes_ = 0;
    char* memory_ = nullptr;
    std::size_t memory_bytes_ = 0;
    unsigned count_ = 0;
    unsigned size_ = 0;
    unsigned held_ = 0; // hold() calls not yet matched by release_hold()
    std::uint16_t group_ = 0;
    bool registered_ = false;
    // Buffers kept out of the kernel's ring for take_spare(): a few, as only a channel
    // receiving by readiness uses one, and only from its recv until its next read.
    static constexpr unsigned spare_capacity = 8;
    std::uint16_t spares_[spare_capacity] = {};
    unsigned spare_count_ = 0;
    unsigned spare_limit_ = 0; // spare_capacity, or 0 without spares
    struct link {
        std::uint16_t next = parked_list::none;
        std::uint32_t size = 0;
    };
    std::unique_ptr<link[]> links_; // one per buffer: parked_list chains
    // One per buffer: hold() calls not yet matched by a recycle(). Apart from the links and
    // a byte each, so that the buffers in use (the ring hands them out in order) share a
    // few cache lines: every receive and send in place reads them.
    std::unique_ptr<std::uint8_t[]> holders_;
};

} // namespace ringchat::detail
