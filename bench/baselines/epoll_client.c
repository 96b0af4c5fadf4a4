// epoll_client: the plain epoll load generator that echo_bench --mode raw is compared with.
//
// Raw echo, pipeline 1: each connection sends a request of --size bytes, waits for the
// whole reply, checks every byte and sends the next one. The first 8 bytes of a request
// carry a sequence number unique to the connection (when --size is at least 8), the rest
// is a fixed pattern, so a reply to the wrong request is caught. The connections are split
// among --threads threads, each with its own level-triggered epoll loop over non-blocking
// sockets with TCP_NODELAY (as echo_bench's connect sets it). One recv per readiness, into
// a per-thread scratch buffer, compared with the request in flight.
//
// Round trips are counted when they complete inside a window of --seconds that starts
// --warmup seconds after every connection is up; a round trip's time is taken once per
// epoll_wait return (one clock read per batch of events). After the window no new request
// is sent; replies in flight get --timeout seconds. The client's own CPU time is
// getrusage(RUSAGE_SELF) over the window, the server's (--server-pid) utime+stime from
// /proc/PID/stat at the window's edges, both per round trip.
//
// usage: epoll_client --port N [--host ADDR] [--conns N] [--size BYTES] [--seconds S]
//                     [--warmup S] [--threads T] [--timeout S] [--server-pid PID] [--json]
// Exit status: 0 all good, 1 a reply was wrong, 2 other errors, 64 bad usage.

#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "measure.h"

#define SCRATCH_SIZE 65536
#define MAX_EVENTS 256

enum state { connecting, running, done, failed };

struct conn {
    int fd;
    enum state state;
    int want_out;    // registered for EPOLLOUT too: the request is not all sent yet
    uint64_t id;     // stamp base: id << 40
    uint64_t seq;    // sequence number of the request in flight
    size_t sent;     // bytes of the request sent
    size_t received; // bytes of its reply received and checked
    char* request;   // the request in flight (--size bytes)
};

struct worker {
    pthread_t thread;
    int ep;
    int wake; // eventfd: the main thread asks the worker to stop
    size_t first, count;
    struct conn* conns;
    uint64_t messages, bytes, errors, wrong, stalled;
};

// Options and what every thread shares.
static const char* host = "127.0.0.1";
static long port = -1;
static size_t conns = 1, size = 64;
static unsigned threads = 1;
static double seconds = 5, warmup = 1, timeout_s = 10;
static long server_pid = 0;
static int json = 0;
static struct sockaddr_in server;
static char* pattern; // the request without its stamp
static _Atomic int64_t window_start = INT64_MAX, window_end = INT64_MAX;
static atomic_int stop;
static atomic_uint errors_printed;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t changed; // ready or finished moved (CLOCK_MONOTONIC)
static size_t ready, finished; // connections set up or failed; workers finished

static struct timespec to_timespec(int64_t ns) {
    return (struct timespec){.tv_sec = ns / 1000000000, .tv_nsec = ns % 1000000000};
}

static void report(size_t id, const char* what, int err) {
    if (atomic_fetch_add(&errors_printed, 1) < 5) {
        fprintf(stderr, "epoll_client: connection %zu: %s%s%s\n", id, what, err ? ": " : "",
                err ? strerror(err) : "");
    }
}

static void add_count(size_t* counter, size_t n) {
    pthread_mutex_lock(&lock);
    *counter += n;
    pthread_cond_broadcast(&changed);
    pthread_mutex_unlock(&lock);
}

static void watch(struct worker* w, struct conn* c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(w->ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void fail(struct worker* w, struct conn* c, const char* what, int err) {
    if (c->state == connecting) {
        add_count(&ready, 1);
    }
    c->state = failed;
    ++w->errors;
    report(c->id, what, err);
    epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
}

// Sends what is left of the request; waits for EPOLLOUT when the socket is full.
static void send_rest(struct worker* w, struct conn* c) {
    while (c->sent < size) {
        ssize_t n = send(c->fd, c->request + c->sent, size - c->sent, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                if (!c->want_out) {
                    c->want_out = 1;
                    watch(w, c, EPOLLIN | EPOLLOUT);
                }
                return;
            }
            fail(w, c, "send", errno);
            return;
        }
        c->sent += (size_t)n;
    }
    if (c->want_out) {
        c->want_out = 0;
        watch(w, c, EPOLLIN);
    }
}

static void start_request(struct worker* w, struct conn* c) {
    if (size >= sizeof(uint64_t)) {
        uint64_t stamp = (c->id << 40) + c->seq;
        memcpy(c->request, &stamp, sizeof stamp);
    }
    c->sent = c->received = 0;
    send_rest(w, c);
}

// One recv of the reply; checks the bytes against the request; on a whole reply, counts it
// (if `now` is inside the window) and sends the next request unless the window is over.
static void on_readable(struct worker* w, struct conn* c, char* scratch, int64_t now) {
    size_t want = size - c->received;
    ssize_t n = recv(c->fd, scratch, want < SCRATCH_SIZE ? want : SCRATCH_SIZE, 0);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
        return;
    }
    if (n <= 0) {
        fail(w, c, n == 0 ? "server closed the connection mid-reply" : "recv", n == 0 ? 0 : errno);
        return;
    }
    if (c->received + (size_t)n > c->sent || memcmp(scratch, c->request + c->received, (size_t)n)) {
        c->state = failed;
        ++w->wrong;
        report(c->id, "wrong reply", 0);
        epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        return;
    }
    int in_window = now >= atomic_load_explicit(&window_start, memory_order_relaxed) &&
                    now < atomic_load_explicit(&window_end, memory_order_relaxed);
    if (in_window) {
        w->bytes += (size_t)n;
    }
    c->received += (size_t)n;
    if (c->received < size) {
        return;
    }
    if (in_window) {
        ++w->messages;
    }
    ++c->seq;
    if (now >= atomic_load_explicit(&window_end, memory_order_relaxed)) {
        c->state = done; // the connection stays open until the exit
        epoll_ctl(w->ep, EPOLL_CTL_DEL, c->fd, NULL);
        return;
    }
    start_request(w, c);
}

static void on_connected(struct worker* w, struct conn* c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err != 0) {
        fail(w, c, "connect", err);
        return;
    }
    c->state = running;
    add_count(&ready, 1);
    watch(w, c, EPOLLIN);
    start_request(w, c);
}

static void* run_worker(void* arg) {
    struct worker* w = arg;
    char* scratch = malloc(SCRATCH_SIZE);
    size_t active = 0; // connections not done or failed
    for (size_t i = 0; i < w->count; ++i) {
        struct conn* c = &w->conns[i];
        c->id = w->first + i;
        c->request = malloc(size);
        memcpy(c->request, pattern, size);
        c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        int one = 1;
        if (c->fd < 0 || setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0) {
            c->state = connecting;
            fail(w, c, "socket", errno);
            continue;
        }
        c->state = connecting;
        if (connect(c->fd, (struct sockaddr*)&server, sizeof server) < 0 && errno != EINPROGRESS) {
            fail(w, c, "connect", errno);
            continue;
        }
        struct epoll_event ev = {.events = EPOLLOUT, .data.ptr = c};
        epoll_ctl(w->ep, EPOLL_CTL_ADD, c->fd, &ev);
        ++active;
    }
    struct epoll_event wake_ev = {.events = EPOLLIN, .data.ptr = NULL};
    epoll_ctl(w->ep, EPOLL_CTL_ADD, w->wake, &wake_ev);

    struct epoll_event events[MAX_EVENTS];
    while (active > 0 && !atomic_load(&stop)) {
        // Bounded: events, or the main thread's wake-up, normally come much sooner.
        int n = epoll_wait(w->ep, events, MAX_EVENTS, 1000);
        if (n < 0 && errno != EINTR) {
            perror("epoll_client: epoll_wait");
            break;
        }
        int64_t now = measure_now_ns();
        for (int i = 0; i < n; ++i) {
            struct conn* c = events[i].data.ptr;
            if (c == NULL || c->state == done || c->state == failed) {
                continue; // the wake-up, or a connection finished earlier in this batch
            }
            if (c->state == connecting) {
                on_connected(w, c);
            } else {
                if (events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                    on_readable(w, c, scratch, now);
                }
                if (c->state == running && c->want_out && (events[i].events & EPOLLOUT)) {
                    send_rest(w, c);
                }
            }
            if (c->state == done || c->state == failed) {
                --active;
            }
        }
    }
    for (size_t i = 0; i < w->count; ++i) {
        if (w->conns[i].state == running || w->conns[i].state == connecting) {
            ++w->stalled; // still waiting when it had to stop
        }
    }
    free(scratch);
    add_count(&finished, 1);
    return NULL;
}

static double self_cpu_seconds(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

// utime + stime of a process in seconds; < 0 if /proc cannot tell.
static double process_cpu_seconds(long pid) {
    double user, system;
    return measure_process_cpu(pid, &user, &system) == 0 ? user + system : -1;
}

static int usage(const char* why, const char* arg) {
    fprintf(stderr,
            "epoll_client: %s%s\nusage: epoll_client --port N [--host ADDR] [--conns N] "
            "[--size BYTES] [--seconds S]\n                    [--warmup S] [--threads T] "
            "[--timeout S] [--server-pid PID] [--json]\n",
            why, arg ? arg : "");
    return 64;
}

static int parse_size(const char* text, size_t* out) {
    char* end;
    unsigned long long v = strtoull(text, &end, 10);
    int shift = *end == 'K' ? 10 : *end == 'M' ? 20 : *end == 'G' ? 30 : 0;
    end += shift != 0;
    if (end == text || *end != '\0' || text[0] == '-') {
        return 0;
    }
    *out = (size_t)(v << shift);
    return 1;
}

static int parse_seconds(const char* text, double* out) {
    char* end;
    *out = strtod(text, &end);
    return end != text && *end == '\0' && *out >= 0 && *out <= 1e6;
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        size_t n;
        int ok = v != NULL;
        if (strcmp(a, "--json") == 0) {
            json = 1;
            continue;
        } else if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage("drives a raw echo server, see bench/baselines/epoll_client.c", NULL);
            return 0;
        } else if (strcmp(a, "--host") == 0) {
            host = v;
        } else if (strcmp(a, "--port") == 0) {
            ok = ok && parse_size(v, &n) && n >= 1 && n <= 65535;
            port = ok ? (long)n : -1;
        } else if (strcmp(a, "--conns") == 0) {
            ok = ok && parse_size(v, &conns) && conns >= 1;
        } else if (strcmp(a, "--size") == 0) {
            ok = ok && parse_size(v, &size) && size >= 1;
        } else if (strcmp(a, "--threads") == 0) {
            ok = ok && parse_size(v, &n) && n >= 1 && n <= 256;
            threads = ok ? (unsigned)n : 1;
        } else if (strcmp(a, "--seconds") == 0) {
            ok = ok && parse_seconds(v, &seconds) && seconds > 0;
        } else if (strcmp(a, "--warmup") == 0) {
            ok = ok && parse_seconds(v, &warmup);
        } else if (strcmp(a, "--timeout") == 0) {
            ok = ok && parse_seconds(v, &timeout_s);
        } else if (strcmp(a, "--server-pid") == 0) {
            ok = ok && parse_size(v, &n) && n >= 1 && n <= INT32_MAX;
            server_pid = ok ? (long)n : 0;
        } else {
            ok = 0;
        }
        if (!ok) {
            return usage(v == NULL ? "missing value or unknown argument: " : "bad argument: ", a);
        }
        ++i;
    }
    if (port < 0) {
        return usage("--port is required", NULL);
    }
    server = (struct sockaddr_in){.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1) {
        return usage("--host must be an IPv4 address", NULL);
    }
    if (threads > conns) {
        threads = (unsigned)conns;
    }
    pattern = malloc(size);
    for (size_t i = 0; i < size; ++i) {
        pattern[i] = (char)('a' + i % 26);
    }
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&changed, &attr);

    struct worker* workers = calloc(threads, sizeof *workers);
    for (unsigned i = 0, first = 0; i < threads; ++i) {
        struct worker* w = &workers[i];
        w->first = first;
        w->count = conns / threads + (i < conns % threads ? 1 : 0);
        first += (unsigned)w->count;
        w->conns = calloc(w->count, sizeof *w->conns);
        w->ep = epoll_create1(EPOLL_CLOEXEC);
        w->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (w->conns == NULL || w->ep < 0 || w->wake < 0 ||
            pthread_create(&w->thread, NULL, run_worker, w) != 0) {
            perror("epoll_client: setting up a thread");
            return 2;
        }
    }

    // The window opens --warmup seconds after every connection is up (or failed).
    struct timespec deadline = to_timespec(measure_now_ns() + 30000000000LL);
    pthread_mutex_lock(&lock);
    while (ready < conns &&
           pthread_cond_timedwait(&changed, &lock, &deadline) != ETIMEDOUT) {
    }
    if (ready < conns) {
        fprintf(stderr, "epoll_client: only %zu of %zu connections set up after 30 s\n", ready,
                conns);
    }
    pthread_mutex_unlock(&lock);
    int64_t start = measure_now_ns() + (int64_t)(warmup * 1e9);
    int64_t end = start + (int64_t)(seconds * 1e9);
    atomic_store(&window_start, start);
    atomic_store(&window_end, end);

    struct timespec t = to_timespec(start);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
    double self_before = self_cpu_seconds();
    double server_before = server_pid > 0 ? process_cpu_seconds(server_pid) : -1;
    t = to_timespec(end);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &t, NULL) == EINTR) {
    }
    double client_cpu = self_cpu_seconds() - self_before;
    double server_after = server_pid > 0 ? process_cpu_seconds(server_pid) : -1;
    double server_cpu = server_before >= 0 && server_after >= 0 ? server_after - server_before : -1;

    // Replies in flight get --timeout seconds; then the workers are told to stop.
    deadline = to_timespec(end + (int64_t)(timeout_s * 1e9));
    pthread_mutex_lock(&lock);
    while (finished < threads &&
           pthread_cond_timedwait(&changed, &lock, &deadline) != ETIMEDOUT) {
    }
    pthread_mutex_unlock(&lock);
    atomic_store(&stop, 1);
    uint64_t messages = 0, bytes = 0, errors = 0, wrong = 0, stalled = 0;
    for (unsigned i = 0; i < threads; ++i) {
        uint64_t one = 1;
        if (write(workers[i].wake, &one, sizeof one) < 0) {
            perror("epoll_client: waking a thread");
        }
        pthread_join(workers[i].thread, NULL);
        messages += workers[i].messages;
        bytes += workers[i].bytes;
        errors += workers[i].errors;
        wrong += workers[i].wrong;
        stalled += workers[i].stalled;
        for (size_t j = 0; j < workers[i].count; ++j) {
            if (workers[i].conns[j].fd >= 0) {
                close(workers[i].conns[j].fd);
            }
            free(workers[i].conns[j].request);
        }
        free(workers[i].conns);
        close(workers[i].ep);
        close(workers[i].wake);
    }
    free(workers);
    free(pattern);
    if (stalled > 0) {
        fprintf(stderr,
                "epoll_client: %llu connection(s) still waiting for replies %.0f s after the "
                "window\n",
                (unsigned long long)stalled, timeout_s);
    }
    errors += stalled;

    double per_s = (double)messages / seconds;
    double mib_s = (double)bytes / seconds / (1024.0 * 1024.0);
    char client_us[32] = "null", server_us[32] = "null", server_s[32] = "null";
    if (messages > 0) {
        snprintf(client_us, sizeof client_us, "%.6g", client_cpu * 1e6 / (double)messages);
        if (server_cpu >= 0) {
            snprintf(server_us, sizeof server_us, "%.6g", server_cpu * 1e6 / (double)messages);
        }
    }
    if (server_cpu >= 0) {
        snprintf(server_s, sizeof server_s, "%.6g", server_cpu);
    }
    if (json) {
        printf("{\"client\":\"epoll_client\",\"mode\":\"raw\",\"conns\":%zu,\"size\":%zu,"
               "\"pipeline\":1,\"threads\":%u,\"window_s\":%g,\"warmup_s\":%g,\"messages\":%llu,"
               "\"bytes\":%llu,\"msgs_per_s\":%.6g,\"mib_per_s\":%.6g,\"errors\":%llu,"
               "\"wrong_replies\":%llu,\"stalled\":%llu,\"client_cpu_s\":%.6g,"
               "\"client_cpu_us_per_msg\":%s,\"server_pid\":%ld,\"server_cpu_s\":%s,"
               "\"server_cpu_us_per_msg\":%s}\n",
               conns, size, threads, seconds, warmup, (unsigned long long)messages,
               (unsigned long long)bytes, per_s, mib_s, (unsigned long long)errors,
               (unsigned long long)wrong, (unsigned long long)stalled, client_cpu, client_us,
               server_pid, server_s, server_us);
    } else {
        printf("epoll_client: %zu connection(s) x %zu B, %u thread(s), %.2f s window after "
               "%.2f s warm-up\n",
               conns, size, threads, seconds, warmup);
        printf("  round trips  %llu (%.0f/s), %.2f MiB/s of replies\n",
               (unsigned long long)messages, per_s, mib_s);
        printf("  errors       %llu (wrong replies: %llu)\n", (unsigned long long)errors,
               (unsigned long long)wrong);
        printf("  client CPU   %.3f s: %s us per round trip\n", client_cpu,
               messages > 0 ? client_us : "-");
        if (server_pid > 0) {
            printf("  server CPU   %s s: %s us per round trip (pid %ld, utime+stime)\n",
                   server_cpu >= 0 ? server_s : "unreadable", server_cpu >= 0 ? server_us : "-",
                   server_pid);
        }
    }
    fflush(stdout);
    return wrong > 0 ? 1 : errors > 0 ? 2 : 0;
}
