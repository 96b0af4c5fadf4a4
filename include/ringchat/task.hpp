#pragma once

#include <coroutine>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <new>
#include <stdexcept>
#include <type_traits>
#include <utility>

namespace ringchat {

template <typename T = void>
class task;

class io_context;

namespace detail {

/// Recycles coroutine frames: per-thread free lists by size class (16-byte steps up to
/// 2 KiB, at most 256 frames each), so a server that starts a few tasks per connection
/// reuses their frames instead of calling malloc for each. Larger frames, and every frame in
/// AddressSanitizer builds (so it still sees use after free), go to operator new directly.
class frame_pool {
public:
    static void* allocate(std::size_t size) {
        const std::size_t cls = size_class(size);
        if (cls < classes) {
            lists& l = local();
            if (free_frame* f = l.head[cls]) {
                l.head[cls] = f->next;
                --l.count[cls];
                return f;
            }
            return ::operator new((cls + 1) * granule);
        }
        return ::operator new(size);
    }

    static void deallocate(void* p, std::size_t size) noexcept {
        const std::size_t cls = size_class(size);
        if (cls < classes) {
            lists& l = local();
            if (!l.closed && l.count[cls] < max_per_class) {
                auto* f = static_cast<free_frame*>(p);
                f->next = l.head[cls];
                l.head[cls] = f;
                ++l.count[cls];
                return;
            }
        }
        ::operator delete(p);
    }

private:
    // malloc's own granule: a frame takes no more memory from the pool than from malloc.
    static constexpr std::size_t granule = 16;
    static constexpr std::size_t classes = 128; // frames up to 2 KiB
    static constexpr std::size_t max_per_class = 256;

    struct free_frame {
        free_frame* next;
    };

    // Trivially destructible, so it stays usable while the thread's other thread_local and
    // static objects are destroyed (an io_context among them may still free frames then).
    struct lists {
        free_frame* head[classes];
        std::uint16_t count[classes];
        bool closed; // drained at thread exit: frames freed later go to operator delete
    };

    // Empties the lists when the thread ends, and closes them.
    struct reaper {
        lists* l;
        ~reaper() {
            l->closed = true;
            for (free_frame*& f : l->head) {
                while (f != nullptr) {
                    free_frame* next = f->next;
                    ::operator delete(f);
                    f = next;
                }
            }
        }
    };

    static std::size_t size_class(std::size_t size) noexcept {
#if defined(__SANITIZE_ADDRESS__)
        (void)size;
        return classes; // never pooled: ASan must see frames freed
#else
        return (size + granule - 1) / granule - 1;
#endif
    }

    static lists& local() noexcept {
        thread_local constinit lists l{};
        thread_local reaper r{&l};
        (void)r;
        return l;
    }
};

// How a task's body relates to the coroutine awaiting it. Everything runs on one thread.
enum class task_state : unsigned char {
    not_started,
    running_inline,   // started from the awaiter's await_suspend, which is still on the stack
    completed_inline, // finished before await_suspend returned: the awaiter just continues
    detached_running, // suspended once; whoever resumes it later must resume the awaiter
    spawned,          // owned by an io_context (spawn): frees itself when it finishes
};

class task_promise_base;

// spawn's bookkeeping, in io_context.cpp: a spawned task finished (it is taken off its
// context's list), and an exception escaped one (it is logged).
void forget_spawned(io_context* ctx, std::uint32_t index) noexcept;
void report_spawned_exception() noexcept;

class task_promise_base {
public:
    static void* operator new(std::size_t size) { return frame_pool::allocate(size); }
    static void operator delete(void* p, std::size_t size) noexcept {
        frame_pool::deallocate(p, size);
    }

    std::suspend_always initial_suspend() noexcept { return {}; }

    struct final_awaiter {
        bool await_ready() noexcept { return false; }

        // Returns to whoever resumed this coroutine. When that was the awaiting task's own
        // await_suspend (the body never suspended), only a flag is set, and await_suspend
        // continues the awaiter without a nested resume: a loop of a million synchronous
        // co_awaits keeps a constant stack depth at -O0 and under ASan, where g++ does not
        // turn symmetric transfer into a tail call. After a real suspension the awaiter is
        // resumed here, so the depth is bounded by how deeply tasks are nested.
        template <typename Promise>
        void await_suspend(std::coroutine_handle<Promise> self) noexcept {
            task_promise_base& promise = self.promise();
            if (promise.state_ == task_state::running_inline) {
                promise.state_ = task_state::completed_inline;
                return;
            }
            if (promise.state_ == task_state::spawned) {
                forget_spawned(promise.owner_, promise.spawn_index_);
                self.destroy();
                return;
            }
            if (promise.continuation_) {
                promise.continuation_.resume();
            }
        }

        void await_resume() noexcept {}
    };

    final_awaiter final_suspend() noexcept { return {}; }

    void unhandled_exception() noexcept {
        if (state_ == task_state::spawned) {
            report_spawned_exception(); // nobody awaits it
        } else {
            exception_ = std::current_exception();
        }
    }

    // Starts the body from the awaiter's await_suspend. Returns true if the body suspended
    // (the awaiter must suspend too) and false if it already finished.
    bool start_inline(std::coroutine_handle<> self, std::coroutine_handle<> continuation) {
        continuation_ = continuation;
        state_ = task_state::running_inline;
        self.resume();
        if (state_ == task_state::completed_inline) {
            return false;
        }
        state_ = task_state::detached_running;
        return true;
    }

    [[nodiscard]] bool finished_inline() const noexcept {
        return state_ == task_state::completed_inline;
    }

    // spawn: the task belongs to `ctx` from now on, at position `index` of its list.
    void make_spawned(io_context* ctx, std::uint32_t index) noexcept {
        owner_ = ctx;
        spawn_index_ = index;
        state_ = task_state::spawned;
    }
    void set_spawn_index(std::uint32_t index) noexcept { spawn_index_ = index; }

protected:
    void rethrow_if_failed() const {
        if (exception_) {
            std::rethrow_exception(exception_);
        }
    }

private:
    // A spawned task has no awaiter: the slot names its context instead. Nothing is added
    // to the frame for spawn (the index sits in what would be padding).
    union {
        std::coroutine_handle<> continuation_{};
        io_context* owner_;
    };
    std::exception_ptr exception_;
    task_state state_ = task_state::not_started;
    std::uint32_t spawn_index_ = 0;
};

template <typename T>
class task_promise final : public task_promise_base {
public:
    task_promise() noexcept {}
    ~task_promise() {
        if (has_value_) {
            value_.~T();
        }
    }

    task<T> get_return_object() noexcept;

    template <typename U>
        requires std::is_convertible_v<U&&, T>
    void return_value(U&& value) noexcept(std::is_nothrow_constructible_v<T, U&&>) {
        ::new (static_cast<void*>(std::addressof(value_))) T(std::forward<U>(value));
        has_value_ = true;
    }

    T take_result() {
        rethrow_if_failed();
        return std::move(value_);
    }

private:
    union {
        T value_;
    };
    bool has_value_ = false;
};

template <typename T>
class task_promise<T&> final : public task_promise_base {
public:
    task<T&> get_return_object() noexcept;
    void return_value(T& value) noexcept { value_ = std::addressof(value); }
    T& take_result() {
        rethrow_if_failed();
        return *value_;
    }

private:
    T* value_ = nullptr;
};

template <>
class task_promise<void> final : public task_promise_base {
public:
    task<void> get_return_object() noexcept;
    void return_void() noexcept {}
    void take_result() { rethrow_if_failed(); }
};

} // namespace detail

/// A lazy coroutine returning T (a value, a reference, or void). The body starts when the
/// task is awaited, runs on the awaiting coroutine's thread, and its value or exception
/// reaches the awaiter. Move-only; the task object owns the coroutine frame and destroys it
/// (cancelling any I/O the body still has in flight) when it goes away. Await a task once.
/// Parameters of task coroutines should be taken by value: a task that refers to caller
/// objects must be awaited before they end (in the same full-expression is safest).
template <typename T>
class [[nodiscard]] task {
public:
    using promise_type = detail::task_promise<T>;
    using handle_type = std::coroutine_handle<promise_type>;

    task() noexcept = default;
    explicit task(handle_type h) noexcept : coro_(h) {}
    task(task&& other) noexcept : coro_(std::exchange(other.coro_, {})) {}
    task& operator=(task&& other) noexcept {
        if (this != &other) {
            destroy();
            coro_ = std::exchange(other.coro_, {});
        }
        return *this;
    }
    task(const task&) = delete;
    task& operator=(const task&) = delete;
    ~task() { destroy(); }

    /// True if this task owns a coroutine (default-constructed and moved-from tasks don't).
    [[nodiscard]] bool valid() const noexcept { return static_cast<bool>(coro_); }

    /// True once the body has run to completion (with a value or an exception).
    [[nodiscard]] bool done() const noexcept { return coro_ && coro_.done(); }

    class awaiter {
    public:
        explicit awaiter(handle_type h) noexcept : coro_(h) {}
        bool await_ready() const noexcept { return coro_.done(); }
        bool await_suspend(std::coroutine_handle<> waiting) {
            return coro_.promise().start_inline(coro_, waiting);
        }
        decltype(auto) await_resume() { return coro_.promise().take_result(); }

    private:
        handle_type coro_;
    };

    /// Starts the body and suspends the caller until it finishes; yields the body's value
    /// (moved out) or rethrows its exception. Throws std::logic_error on an empty task.
    awaiter operator co_await() && { return awaiter{checked()}; }
    awaiter operator co_await() & { return awaiter{checked()}; }

    /// Releases the frame to the caller, who becomes responsible for destroying it.
    handle_type release() noexcept { return std::exchange(coro_, {}); }

private:
    handle_type checked() const {
        if (!coro_) {
            throw std::logic_error("co_await on an empty ringchat::task");
        }
        return coro_;
    }

    void destroy() noexcept {
        if (coro_) {
            coro_.destroy();
            coro_ = {};
        }
    }

    handle_type coro_;
};

namespace detail {

template <typename T>
task<T> task_promise<T>::get_return_object() noexcept {
    return task<T>{std::coroutine_handle<task_promise<T>>::from_promise(*this)};
}

template <typename T>
task<T&> task_promise<T&>::get_return_object() noexcept {
    return task<T&>{std::coroutine_handle<task_promise<T&>>::from_promise(*this)};
}

inline task<void> task_promise<void>::get_return_object() noexcept {
    return task<void>{std::coroutine_handle<task_promise<void>>::from_promise(*this)};
}

} // namespace detail

/// Runs a task that needs no I/O to completion on the calling thread and returns its value
/// (or rethrows its exception). If the task suspends (it waits for I/O or a timer), it is
/// destroyed and std::logic_error is thrown: use sync_wait(io_context&, task) for those.
template <typename T>
decltype(auto) sync_wait(task<T> t) {
    auto handle = t.release();
    if (!handle) {
        throw std::logic_error("sync_wait on an empty ringchat::task");
    }
    struct destroy_guard {
        std::coroutine_handle<detail::task_promise<T>> h;
        ~destroy_guard() { h.destroy(); }
    } guard{handle};
    if (handle.promise().start_inline(handle, std::noop_coroutine())) {
        throw std::logic_error(
            "sync_wait(task): the task suspended; run it with sync_wait(io_context&, task)");
    }
    if constexpr (std::is_reference_v<T> || std::is_void_v<T>) {
        return handle.promise().take_result();
    } else {
        T value = handle.promise().take_result();
        return value;
    }
}

} // namespace ringchat
