// cpu_slices: server CPU time per message of several echo servers, measured in turns.
//
// On a noisy 2-core VM the CPU a server spends per message drifts by 10-20% within seconds,
// so servers measured one after the other for a second or two each differ mostly by when
// they ran. This client connects --conns connections to each server (2 to 8 of them) and
// loads one server at a time for a short slice (--slice-ms, default 200): every connection of
// that server keeps one request in flight, the others stay idle. A turn gives every server
// one slice, in a fresh random order whose first server is never the last one of the turn
// before. At a slice's end no new request is sent and the replies in flight are awaited, so
// each slice measures its server alone, and drift slower than a turn is shared by all.
//
// A server's CPU time is the sum over its threads of the scheduler's run time
// (/proc/PID/task/*/schedstat, in nanoseconds) from the start of its slice to the end of the
// drain; utime from /proc/PID/stat (clock ticks) gives the user-space part, pooled over the
// window. A request is --size bytes (at least 8; the first 8 carry a sequence number, the
// rest a fixed pattern) and the reply must be the same bytes. Servers given with --echo-port
// instead of --port get "ECHO <size>\n" before the bytes (echo_server --keep-alive).
//
// One thread, level-triggered epoll over non-blocking TCP_NODELAY sockets. Turns run for
// --warmup seconds unmeasured, then for --seconds measured. Per server the report gives the
// messages, the CPU per message pooled over the window, and the median and quartiles of the
// per-turn ratios to the first server's CPU per message (with --json, also every turn's CPU
// per message, for pairing any two servers turn by turn).
//
// usage: cpu_slices (--port N | --echo-port N) ... --server-pid PID ... [--host ADDR]
//                   [--conns N] [--size BYTES] [--slice-ms MS] [--seconds S] [--warmup S]
//                   [--timeout S] [--json]
// --server-pid is given once per server, in the same order. Exit status: 0 all good, 1 a
// reply was wrong, 2 other errors, 64 bad usage.

#define _GNU_SOURCE

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "measure.h"

#define MAX_SERVERS 8
#define MAX_TURNS 4096
#define MAX_EVENTS 256

struct conn {
    int fd;
    unsigned server;
    int in_flight;   // a request is out and its reply not complete
    int want_out;    // registered for EPOLLOUT: the request is not all sent yet
    uint64_t seq;    // sequence number of the request in flight
    size_t sent;     // bytes of the request sent
    size_t received; // bytes of its reply received and checked
    char* request;   // the request in flight: the server's template, stamped
};

struct server {
    long port;
    long pid;
    int echo;        // ECHO framing
    size_t header;   // bytes of "ECHO <size>\n"
    char* request;   // header + payload template
    struct conn* conns;
    size_t in_flight;
    uint64_t messages;   // replies completed in measured slices
    double cpu_ns;       // run time in measured slices
    double user_start, user_end;
    double turn_cpu_per_msg[MAX_TURNS];
};

static const char* host = "127.0.0.1";
static size_t conns = 64, size = 64;
static double slice_s = 0.2, seconds = 10, warmup = 1, timeout_s = 10;
static int json = 0;
static struct server servers[MAX_SERVERS];
static size_t nservers, npids;
static int ep;
static char scratch[65536];

static void usage(const char* why) {
    if (why != NULL) {
        fprintf(stderr, "cpu_slices: %s\n", why);
    }
    fprintf(stderr,
            "usage: cpu_slices (--port N | --echo-port N) ... --server-pid PID ... [--host ADDR]\n"
            "                  [--conns N] [--size BYTES] [--slice-ms MS] [--seconds S]\n"
            "                  [--warmup S] [--timeout S] [--json]\n");
    exit(64);
}

static void fail(const char* what, int err) {
    fprintf(stderr, "cpu_slices: %s: %s\n", what, strerror(err));
    exit(2);
}

// Sum of the scheduler's run time (ns) over the threads of a process; < 0 if unreadable
// (no such process, or a kernel without CONFIG_SCHED_INFO, which has no schedstat files).
static double run_time_ns(long pid) {
    char path[64];
    snprintf(path, sizeof path, "/proc/%ld/task", pid);
    DIR* dir = opendir(path);
    if (dir == NULL) {
        return -1;
    }
    double total = 0;
    int read_any = 0;
    struct dirent* d;
    while ((d = readdir(dir)) != NULL) {
        if (d->d_name[0] == '.') {
            continue;
        }
        char file[320], text[128];
        snprintf(file, sizeof file, "/proc/%ld/task/%s/schedstat", pid, d->d_name);
        int fd = open(file, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            continue; // the thread ended meanwhile
        }
        ssize_t n = read(fd, text, sizeof text - 1);
        close(fd);
        if (n > 0) {
            text[n] = '\0';
            total += strtod(text, NULL);
            read_any = 1;
        }
    }
    closedir(dir);
    return read_any ? total : -1;
}

// utime of a process in seconds; < 0 if /proc cannot tell.
static double user_seconds(long pid) {
    double user, system;
    return measure_process_cpu(pid, &user, &system) == 0 ? user : -1;
}

static void watch(struct conn* c, int out) {
    struct epoll_event ev = {.events = EPOLLIN | (out ? EPOLLOUT : 0), .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) != 0) {
        fail("epoll_ctl", errno);
    }
    c->want_out = out;
}

static void send_rest(struct conn* c) {
    const size_t total = servers[c->server].header + size;
    while (c->sent < total) {
        ssize_t n = send(c->fd, c->request + c->sent, total - c->sent, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                if (!c->want_out) {
                    watch(c, 1);
                }
                return;
            }
            fail("send", errno);
        }
        c->sent += (size_t)n;
    }
    if (c->want_out) {
        watch(c, 0);
    }
}

static void start_request(struct conn* c) {
    ++c->seq;
    memcpy(c->request + servers[c->server].header, &c->seq, sizeof c->seq);
    c->sent = 0;
    c->received = 0;
    c->in_flight = 1;
    ++servers[c->server].in_flight;
    send_rest(c);
}

// Reads what arrived; returns 1 when the reply completed.
static int on_readable(struct conn* c) {
    struct server* s = &servers[c->server];
    ssize_t n = recv(c->fd, scratch, sizeof scratch, MSG_DONTWAIT);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) {
            return 0;
        }
        fail("recv", errno);
    }
    if (n == 0) {
        fprintf(stderr, "cpu_slices: the server on port %ld closed a connection\n", s->port);
        exit(2);
    }
    if (!c->in_flight || c->received + (size_t)n > size) {
        fprintf(stderr, "cpu_slices: unexpected bytes from port %ld\n", s->port);
        exit(1);
    }
    for (ssize_t i = 0; i < n; ++i) {
        size_t at = c->received + (size_t)i;
        char want = c->request[s->header + at];
        if (scratch[i] != want) {
            fprintf(stderr, "cpu_slices: wrong reply from port %ld to request %llu\n", s->port,
                    (unsigned long long)c->seq);
            exit(1);
        }
    }
    c->received += (size_t)n;
    if (c->received < size) {
        return 0;
    }
    c->in_flight = 0;
    --s->in_flight;
    return 1;
}

static void connect_all(void) {
    struct sockaddr_in addr = {.sin_family = AF_INET};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        usage("--host must be an IPv4 address");
    }
    struct timeval tv = {.tv_sec = (time_t)timeout_s};
    for (size_t k = 0; k < nservers; ++k) {
        struct server* s = &servers[k];
        addr.sin_port = htons((uint16_t)s->port);
        char header[64];
        s->header = s->echo ? (size_t)snprintf(header, sizeof header, "ECHO %zu\n", size) : 0;
        s->request = malloc(s->header + size);
        s->conns = calloc(conns, sizeof *s->conns);
        if (s->request == NULL || s->conns == NULL) {
            fail("malloc", ENOMEM);
        }
        memcpy(s->request, header, s->header);
        for (size_t i = 0; i < size; ++i) {
            s->request[s->header + i] = (char)('a' + i % 26);
        }
        for (size_t i = 0; i < conns; ++i) {
            struct conn* c = &s->conns[i];
            c->server = (unsigned)k;
            c->request = malloc(s->header + size);
            if (c->request == NULL) {
                fail("malloc", ENOMEM);
            }
            memcpy(c->request, s->request, s->header + size);
            c->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
            if (c->fd < 0) {
                fail("socket", errno);
            }
            int one = 1;
            setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            setsockopt(c->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); // bounds connect()
            if (connect(c->fd, (struct sockaddr*)&addr, sizeof addr) != 0) {
                fprintf(stderr, "cpu_slices: connect to port %ld: %s\n", s->port, strerror(errno));
                exit(2);
            }
            fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
            if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) != 0) {
                fail("epoll_ctl", errno);
            }
        }
    }
}

// Runs one slice of server k: returns its replies and (through *cpu) its run time in ns.
static uint64_t run_slice(size_t k, double* cpu) {
    struct server* s = &servers[k];
    const double cpu_start = run_time_ns(s->pid);
    if (cpu_start < 0) {
        fprintf(stderr, "cpu_slices: cannot read the threads of pid %ld\n", s->pid);
        exit(2);
    }
    const int64_t end = measure_now_ns() + (int64_t)(slice_s * 1e9);
    const int64_t give_up = end + (int64_t)(timeout_s * 1e9);
    for (size_t i = 0; i < conns; ++i) {
        start_request(&s->conns[i]);
    }
    uint64_t replies = 0;
    int ending = 0;
    struct epoll_event events[MAX_EVENTS];
    while (s->in_flight > 0) {
        int64_t now = measure_now_ns();
        if (!ending && now >= end) {
            ending = 1;
        }
        if (now >= give_up) {
            fprintf(stderr, "cpu_slices: replies from port %ld did not come in %g s\n", s->port,
                    timeout_s);
            exit(2);
        }
        int64_t wait_ms = ((ending ? give_up : end) - now) / 1000000 + 1;
        int n = epoll_wait(ep, events, MAX_EVENTS, (int)(wait_ms < 100 ? wait_ms : 100));
        if (n < 0 && errno != EINTR) {
            fail("epoll_wait", errno);
        }
        for (int i = 0; i < n; ++i) {
            struct conn* c = events[i].data.ptr;
            if (c->server != k) {
                fprintf(stderr, "cpu_slices: port %ld sent bytes out of turn\n",
                        servers[c->server].port);
                exit(1);
            }
            if ((events[i].events & EPOLLOUT) && c->in_flight) {
                send_rest(c);
            }
            if ((events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP)) && on_readable(c)) {
                ++replies;
                if (!ending) {
                    start_request(c);
                }
            }
        }
    }
    const double cpu_end = run_time_ns(s->pid);
    if (cpu_end < 0) {
        fprintf(stderr, "cpu_slices: cannot read the threads of pid %ld\n", s->pid);
        exit(2);
    }
    *cpu = cpu_end - cpu_start;
    return replies;
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const char* a = argv[i];
        if (strcmp(a, "--json") == 0) {
            json = 1;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(NULL);
        }
        if (i + 1 >= argc) {
            usage("every option but --json wants a value");
        }
        const char* v = argv[++i];
        if (strcmp(a, "--port") == 0 || strcmp(a, "--echo-port") == 0) {
            if (nservers == MAX_SERVERS) {
                usage("at most 8 servers");
            }
            servers[nservers].echo = strcmp(a, "--echo-port") == 0;
            servers[nservers++].port = (long)measure_option("cpu_slices", a, v, 1);
        } else if (strcmp(a, "--server-pid") == 0) {
            if (npids == MAX_SERVERS) {
                usage("at most 8 servers");
            }
            servers[npids++].pid = (long)measure_option("cpu_slices", a, v, 1);
        } else if (strcmp(a, "--host") == 0) {
            host = v;
        } else if (strcmp(a, "--conns") == 0) {
            conns = (size_t)measure_option("cpu_slices", a, v, 1);
        } else if (strcmp(a, "--size") == 0) {
            size = (size_t)measure_option("cpu_slices", a, v, 1);
        } else if (strcmp(a, "--slice-ms") == 0) {
            slice_s = measure_option("cpu_slices", a, v, 0) / 1e3;
        } else if (strcmp(a, "--seconds") == 0) {
            seconds = measure_option("cpu_slices", a, v, 0);
        } else if (strcmp(a, "--warmup") == 0) {
            warmup = measure_option("cpu_slices", a, v, 0);
        } else if (strcmp(a, "--timeout") == 0) {
            timeout_s = measure_option("cpu_slices", a, v, 0);
        } else {
            fprintf(stderr, "cpu_slices: unknown option %s\n", a);
            usage(NULL);
        }
    }
    if (nservers < 2 || npids != nservers) {
        usage("give at least two servers, and --server-pid once per server");
    }
    if (conns < 1 || size < 8 || size > sizeof scratch || slice_s <= 0 || seconds <= 0 ||
        timeout_s <= 0) {
        usage("--conns at least 1, --size 8 to 65536, --slice-ms, --seconds and --timeout "
              "above 0");
    }
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        fail("epoll_create1", errno);
    }
    connect_all();

    size_t order[MAX_SERVERS];
    for (size_t i = 0; i < nservers; ++i) {
        order[i] = i;
    }
    const int64_t t0 = measure_now_ns();
    uint64_t rng = 0x9e3779b97f4a7c15u ^ (uint64_t)t0;
    size_t last = MAX_SERVERS;
    const int64_t measure_from = t0 + (int64_t)(warmup * 1e9);
    const int64_t measure_to = measure_from + (int64_t)(seconds * 1e9);
    size_t turns = 0;
    int measuring = 0;
    while (turns < MAX_TURNS) {
        int64_t now = measure_now_ns();
        if (!measuring && now >= measure_from) {
            measuring = 1;
            for (size_t k = 0; k < nservers; ++k) {
                servers[k].user_start = user_seconds(servers[k].pid);
            }
        }
        if (measuring && now >= measure_to) {
            break;
        }
        measure_next_turn(order, nservers, &rng, &last);
        for (size_t i = 0; i < nservers; ++i) {
            struct server* s = &servers[order[i]];
            double cpu = 0;
            uint64_t replies = run_slice(order[i], &cpu);
            if (measuring) {
                s->messages += replies;
                s->cpu_ns += cpu;
                s->turn_cpu_per_msg[turns] = replies > 0 ? cpu / (double)replies : 0;
            }
        }
        if (measuring) {
            ++turns;
        }
    }
    for (size_t k = 0; k < nservers; ++k) {
        servers[k].user_end = user_seconds(servers[k].pid);
    }

    double* ratios = calloc(turns + 1, sizeof(double));
    if (ratios == NULL) {
        fail("calloc", ENOMEM);
    }
    if (json) {
        printf("{\"conns\":%zu,\"size\":%zu,\"slice_ms\":%g,\"turns\":%zu,\"servers\":[", conns,
               size, slice_s * 1e3, turns);
    }
    for (size_t k = 0; k < nservers; ++k) {
        struct server* s = &servers[k];
        size_t n = 0;
        for (size_t t = 0; t < turns; ++t) {
            if (s->turn_cpu_per_msg[t] > 0 && servers[0].turn_cpu_per_msg[t] > 0) {
                ratios[n++] = s->turn_cpu_per_msg[t] / servers[0].turn_cpu_per_msg[t];
            }
        }
        qsort(ratios, n, sizeof *ratios, measure_cmp_double);
        const double msgs = (double)s->messages;
        const double cpu = msgs > 0 ? s->cpu_ns / 1e3 / msgs : 0;
        const double user = msgs > 0 ? (s->user_end - s->user_start) * 1e6 / msgs : 0;
        const double r50 = measure_quantile(ratios, n, 0.5), r25 = measure_quantile(ratios, n, 0.25),
                     r75 = measure_quantile(ratios, n, 0.75);
        if (json) {
            printf("%s{\"port\":%ld,\"echo\":%s,\"messages\":%llu,\"server_cpu_us_per_msg\":%.4f,"
                   "\"server_user_us_per_msg\":%.4f,\"ratio_median\":%.4f,\"ratio_q1\":%.4f,"
                   "\"ratio_q3\":%.4f",
                   k == 0 ? "" : ",", s->port, s->echo ? "true" : "false",
                   (unsigned long long)s->messages, cpu, user, r50, r25, r75);
            printf(",\"turn_cpu_us_per_msg\":[");
            for (size_t t = 0; t < turns; ++t) {
                printf("%s%.4f", t == 0 ? "" : ",", s->turn_cpu_per_msg[t] / 1e3);
            }
            printf("]}");
        } else {
            printf("port %ld%s: %llu messages, server CPU %.3f us/msg (user %.3f)", s->port,
                   s->echo ? " (ECHO)" : "", (unsigned long long)s->messages, cpu, user);
            if (k > 0) {
                printf("; per-turn ratio to the first: median %.3f (IQR %.3f-%.3f)", r50, r25, r75);
            }
            printf("\n");
        }
    }
    if (json) {
        printf("]}\n");
    }
    free(ratios);
    return 0;
}
