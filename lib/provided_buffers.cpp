#include "provided_buffers.hpp"

#include <sys/mman.h>

namespace ringchat::detail {

std::unique_ptr<provided_buffers> provided_buffers::create(io_uring* ring, unsigned count,
                                                           unsigned size, std::uint16_t group,
                                                           bool spares) noexcept {
    if (count == 0 || (count & (count - 1)) != 0 || count > 32768 || size == 0) {
        return nullptr;
    }
    std::unique_ptr<provided_buffers> self(new (std::nothrow) provided_buffers);
    if (!self) {
        return nullptr;
    }
    self->links_.reset(new (std::nothrow) link[count]);
    self->holders_.reset(new (std::nothrow) std::uint8_t[count]());
    if (!self->links_ || !self->holders_) {
        return nullptr;
    }
    self->ring_ = ring;
    self->count_ = count;
    self->size_ = size;
    self->group_ = group;
    // The ring of buffer descriptors must be page-aligned; mmap gives that. Both mappings are
    // private and anonymous: untouched buffers cost no RSS.
    self->ring_bytes_ = sizeof(io_uring_buf) * count;
    void* ring_memory = ::mmap(nullptr, self->ring_bytes_, PROT_READ | PROT_WRITE,
                               MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (ring_memory == MAP_FAILED) {
        return nullptr;
    }
    self->buf_ring_ = static_cast<io_uring_buf_ring*>(ring_memory);
    self->memory_bytes_ = static_cast<std::size_t>(count) * size;
    void* memory = ::mmap(nullptr, self->memory_bytes_, PROT_READ | PROT_WRITE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (memory == MAP_FAILED) {
        ::munmap(ring_memory, self->ring_bytes_);
        self->buf_ring_ = nullptr;
        return nullptr;
    }
    self->memory_ = static_cast<char*>(memory);

    io_uring_buf_reg reg{};
    reg.ring_addr = reinterpret_cast<std::uint64_t>(ring_memory);
    reg.ring_entries = count;
    reg.bgid = group;
    if (io_uring_register_buf_ring(ring, &reg, 0) != 0) {
        return nullptr; // the destructor unmaps; nothing was registered
    }
    io_uring_buf_ring_init(self->buf_ring_);
    const int mask = io_uring_buf_ring_mask(count);
    // The last few buffers are the spares (none if the ring is tiny): the kernel gets the rest.
    self->spare_limit_ = spares && count >= 4 * spare_capacity ? spare_capacity : 0;
    const unsigned to_kernel = count - self->spare_limit_;
    for (unsigned bid = 0; bid < to_kernel; ++bid) {
        io_uring_buf_ring_add(self->buf_ring_, self->data(static_cast<std::uint16_t>(bid)), size,
                              static_cast<unsigned short>(bid), mask, static_cast<int>(bid));
    }
    io_uring_buf_ring_advance(self->buf_ring_, static_cast<int>(to_kernel));
    for (unsigned bid = to_kernel; bid < count; ++bid) {
        self->spares_[self->spare_count_++] = static_cast<std::uint16_t>(bid);
    }
    self->registered_ = true;
    return self;
}

provided_buffers::~provided_buffers() {
    if (registered_) {
        io_uring_unregister_buf_ring(ring_, group_);
    }
    if (memory_ != nullptr) {
        ::munmap(memory_, memory_bytes_);
    }
    if (buf_ring_ != nullptr) {
        ::munmap(buf_ring_, ring_bytes_);
    }
}

void provided_buffers::give_back(std::uint16_t bid) noexcept {
    if (spare_count_ < spare_limit_) {
        spares_[spare_count_++] = bid;
        return;
    }
    io_uring_buf_ring_add(buf_ring_, data(bid), size_, bid, io_uring_buf_ring_mask(count_), 0);
    io_uring_buf_ring_advance(buf_ring_, 1);
}

} // namespace ringchat::detail
