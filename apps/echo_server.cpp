// echo_server: the seed's ECHO protocol served by ringchat. See the usage text below.

#include "cli.hpp"
#include "echo_protocol.hpp"

#include <ringchat/ringchat.hpp>

#include <fmt/core.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <memory>
#include <thread>
#include <vector>

#include <sys/signalfd.h>

using namespace ringchat;
using namespace std::chrono_literals;

namespace {

const char* const usage =
    "usage: echo_server [--host ADDR] [--port N] [--keep-alive] [--raw] [--max-payload BYTES]\n"
    "                   [--idle-timeout SECONDS] [--grace SECONDS] [--threads N]\n"
    "                   [--receive adaptive|completion|readiness] [-v]\n"
    "  Serves the ECHO protocol: a client sends \"ECHO <len>\\n\" and <len> bytes, the server\n"
    "  echoes the bytes and closes. Prints \"listening on ADDR:PORT\" first (port 0: any).\n"
    "  --keep-alive    serve ECHO commands until the client closes\n"
    "  --raw           echo bytes as they arrive, no framing (benchmark baseline)\n"
    "  --max-payload   longest ECHO length accepted (default 64M)\n"
    "  --idle-timeout  longest wait for a command or payload bytes (default 30; 0: none)\n"
    "  --grace         on SIGINT/SIGTERM, how long connections may finish (default 5)\n"
    "  --threads N     N event loops, one SO_REUSEPORT listener each (default 1)\n"
    "  --receive MODE  how connections wait for input (io_context_options::receive; default\n"
    "                  adaptive): for measuring\n"
    "  -v              trace every step\n";

struct options {
    std::string host = "127.0.0.1";
    std::uint16_t port = 0;
    echo::server_config config;
    std::chrono::milliseconds grace{5000};
    unsigned threads = 1;
    io_context_options context;
};

// One event loop with its own listener; several share the port through SO_REUSEPORT.
class server_loop {
public:
    server_loop(const options& opts, const address& where)
        : opts_(opts), config_(opts.config), ctx_(opts.context),
          listener_(ctx_, where, listen_options{.reuse_port = opts.threads > 1}) {
        config_.on_finished = &server_loop::connection_finished;
        config_.finished_context = this;
    }

    [[nodiscard]] const address& local_address() const { return listener_.local_address(); }
    io_context& context() { return ctx_; }

    void run() {
        spawn(ctx_, accept_loop(this));
        ctx_.run();
    }

    // Stops accepting; connections in progress may finish for the grace period. Posted from
    // the signal-handling loop to every loop.
    void begin_drain() {
        if (draining_) {
            return;
        }
        draining_ = true;
        listener_.close();
        if (active_ == 0) {
            ctx_.stop();
            return;
        }
        log(log_level::info, "echo_server: waiting up to {} ms for {} connection(s)",
            opts_.grace.count(), active_);
        spawn(ctx_, grace_timer(this));
    }

private:
    static task<void> accept_loop(server_loop* self) {
        channel_options channel_opts;
        // Payloads above stream_above are echoed as they arrive, so no read needs more.
        channel_opts.max_buffer = self->opts_.config.stream_above;
        while (!self->draining_) {
            bool back_off = false;
            try {
                stream s = co_await self->listener_.accept();
                if (log_enabled(log_level::trace)) {
                    log(log_level::trace, "echo_server: accepted connection from {}",
                        s.peer().to_string());
                }
                ++self->active_;
                spawn(self->ctx_, echo::serve_connection(channel(std::move(s), channel_opts),
                                                         self->config_));
            } catch (const std::system_error& e) {
                if (self->draining_) {
                    break;
                }
                int err = e.code().value();
                back_off = e.code().category() == std::generic_category() &&
                           (err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM);
                log(log_level::warn, "echo_server: {}{}", e.what(),
                    back_off ? "; pausing accepts for 100 ms" : "");
            }
            if (back_off) {
                // Out of descriptors or memory: existing connections keep being served, and
                // accepting resumes once some have closed.
                co_await sleep_for(self->ctx_, 100ms);
            }
        }
    }

    static void connection_finished(void* context) {
        auto* self = static_cast<server_loop*>(context);
        if (--self->active_ == 0 && self->draining_) {
            self->ctx_.stop();
        }
    }

    static task<void> grace_timer(server_loop* self) {
        co_await sleep_for(self->ctx_, self->opts_.grace);
        log(log_level::warn, "echo_server: grace period over, closing {} connection(s)",
            self->active_);
        self->ctx_.stop();
    }

    const options& opts_;
    echo::server_config config_; // the options' config, reporting finished connections here
    io_context ctx_;
    listener listener_;
    std::size_t active_ = 0;
    bool draining_ = false;
};

options parse(int argc, char** argv) {
    options o;
    cli::args a(argc, argv, usage);
    while (a.next()) {
        if (a.is("--host")) {
            o.host = a.value();
        } else if (a.is("--port")) {
            o.port = a.port_value(true);
        } else if (a.is("--keep-alive")) {
            o.config.keep_alive = true;
        } else if (a.is("--raw")) {
            o.config.raw = true;
        } else if (a.is("--max-payload")) {
            o.config.max_payload = a.size_value();
        } else if (a.is("--idle-timeout")) {
            o.config.idle_timeout = std::chrono::seconds(a.size_value());
        } else if (a.is("--grace")) {
            o.grace = std::chrono::seconds(a.size_value());
        } else if (a.is("--threads")) {
            o.threads = static_cast<unsigned>(std::max<std::size_t>(1, a.size_value()));
        } else if (a.is("--receive")) {
            const std::string_view mode = a.value();
            if (mode == "adaptive") {
                o.context.receive = receive_mode::adaptive;
            } else if (mode == "completion") {
                o.context.receive = receive_mode::completion;
            } else if (mode == "readiness") {
                o.context.receive = receive_mode::readiness;
            } else {
                a.fail("--receive: adaptive, completion or readiness");
            }
        } else if (a.is("-v") || a.is("--verbose")) {
            set_log_level(log_level::trace);
        } else if (a.is("-h") || a.is("--help")) {
            a.help();
        } else {
            a.unknown();
        }
    }
    return o;
}

// Reads SIGINT/SIGTERM through a signalfd on the first loop, then drains every loop.
task<void> watch_signals(io_context& ctx, int fd, std::vector<server_loop*> loops) {
    signalfd_siginfo info{};
    co_await ops::read(ctx, fd, &info, sizeof info);
    log(log_level::warn, "echo_server: {} received, stopping",
        strsignal(static_cast<int>(info.ssi_signo)));
    for (std::size_t i = 1; i < loops.size(); ++i) {
        server_loop* loop = loops[i];
        loop->context().post([loop] { loop->begin_drain(); });
    }
    loops[0]->begin_drain();
}

} // namespace

int main(int argc, char** argv) {
    options opts = parse(argc, argv);
    // Signals are taken from a signalfd, read by the event loop: block their delivery.
    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &signals, nullptr);
    int signal_fd = signalfd(-1, &signals, SFD_CLOEXEC);
    if (signal_fd < 0) {
        std::perror("echo_server: signalfd");
        return 1;
    }
    try {
        address where = address::from_host_port(opts.host, opts.port);
        // Each loop must be created on the thread that runs it (one io_uring issuer each).
        auto first = std::make_unique<server_loop>(opts, where);
        address bound = first->local_address();
        std::printf("listening on %s\n", bound.to_string().c_str());
        std::fflush(stdout);

        std::vector<std::unique_ptr<server_loop>> others(opts.threads - 1);
        std::vector<std::thread> threads;
        std::vector<server_loop*> loops{first.get()};
        loops.resize(opts.threads);
        std::atomic<unsigned> ready{0};
        std::atomic<bool> failed{false};
        // Set by the main thread once every loop is built: 1 to run them, -1 as one failed.
        std::atomic<int> go{0};
        for (unsigned i = 1; i < opts.threads; ++i) {
            threads.emplace_back([&, i] {
                try {
                    others[i - 1] = std::make_unique<server_loop>(opts, bound);
                    loops[i] = others[i - 1].get();
                } catch (const std::exception& e) {
                    std::fprintf(stderr, "echo_server: loop %u: %s\n", i, e.what());
                    failed = true;
                }
                ready.fetch_add(1);
                ready.notify_all();
                go.wait(0);
                if (go.load() > 0) {
                    loops[i]->run();
                }
                // An io_context is destroyed on the thread that created it: its destructor
                // cancels and waits for the loop's operations, which only that thread may
                // submit (IORING_SETUP_SINGLE_ISSUER; another thread gets EEXIST).
                others[i - 1].reset();
            });
        }
        for (unsigned seen = ready.load(); seen < opts.threads - 1; seen = ready.load()) {
            ready.wait(seen);
        }
        go = failed ? -1 : 1;
        go.notify_all();
        if (failed) {
            for (auto& t : threads) {
                t.join();
            }
            return 1;
        }
        spawn(first->context(), watch_signals(first->context(), signal_fd, loops));
        first->run();
        for (auto& t : threads) {
            t.join();
        }
        log(log_level::info, "echo_server: stopped");
    } catch (const std::exception& e) {
        std::fprintf(stderr, "echo_server: %s\n", e.what());
        return 1;
    }
    return 0;
}
