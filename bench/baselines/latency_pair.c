// latency_pair: one-connection latency of several echo servers, measured side by side.
//
// On a noisy 2-core VM the round-trip time of one connection drifts by 10-20% from one
// second to the next, so two servers measured one after the other differ mostly by when
// they ran. This client keeps one connection to each server (2 to 8 of them, --port given
// once per server) and sends one request at a time, taking the servers in turns: each turn
// visits every server once, in a fresh random order whose first server is never the last
// one of the turn before. Every server sees the same moments of the machine, and a ratio
// taken over the same stretch of time is paired by construction. No server answers twice
// in a row (a server that just answered is still warm in the caches, and one that got such
// repeats more often than the others would look a percent or two faster), and each follows
// every other one about equally often.
//
// A request is --size bytes (at least 8; the first 8 carry a sequence number, the rest a
// fixed pattern), sent with blocking send() on a TCP_NODELAY socket; the reply must be the
// same bytes, read with blocking recv() until complete. With --mode echo the request is
// "ECHO <size>\n" followed by the bytes, for echo_server --keep-alive. Every wait is bounded
// by SO_RCVTIMEO/SO_SNDTIMEO (--timeout, default 5 s).
//
// Round trips count from --warmup seconds after connecting, for --seconds. The window is cut
// into blocks of --block seconds (default 0.5); in each block every server's median round
// trip is taken, and the report gives, per server, the median and quartiles of the block
// ratios to the first server, as well as its p50/p90/p99/mean over the whole window. With
// --server-pid (once per server, in the same order) it also reports each server's CPU time
// (utime+stime from /proc/PID/stat) per round trip over the window.
//
// The servers share a core (bench/targets pins them all to core 1), but only one has a
// request at a time: the next server's request leaves only after the client has woken up
// with the last reply, by when the last server's work after its send is done.
//
// usage: latency_pair --port N --port N [...] [--host ADDR] [--size BYTES] [--seconds S]
//                     [--warmup S] [--block S] [--mode raw|echo] [--timeout S]
//                     [--server-pid PID ...] [--json]
// Exit status: 0 all good, 1 a reply was wrong, 2 other errors, 64 bad usage.

#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "measure.h"

#define MAX_SERVERS 8

struct samples {
    int64_t* ns;
    size_t count, capacity;
};

struct server {
    long port;
    long pid; // 0: not given
    int fd;
    char* request;    // header (echo mode) + payload
    size_t header;    // bytes of "ECHO <size>\n" before the payload
    char* reply;      // receive space, --size bytes
    uint64_t seq;
    struct samples all;   // the window's round trips
    struct samples block; // the current block's
    double* block_p50;    // per block, in ns
    double cpu_start, cpu_end, user_start, user_end;
};

static const char* host = "127.0.0.1";
static size_t size = 64;
static double seconds = 5, warmup = 1, block_s = 0.5, timeout_s = 5;
static int echo_mode = 0, json = 0;
static struct server servers[MAX_SERVERS];
static size_t nservers, npids;

static void usage(const char* why) {
    if (why != NULL) {
        fprintf(stderr, "latency_pair: %s\n", why);
    }
    fprintf(stderr,
            "usage: latency_pair --port N --port N [...] [--host ADDR] [--size BYTES]\n"
            "                    [--seconds S] [--warmup S] [--block S] [--mode raw|echo]\n"
            "                    [--timeout S] [--server-pid PID ...] [--json]\n");
    exit(64);
}

static void push_sample(struct samples* s, int64_t v) {
    if (s->count == s->capacity) {
        size_t cap = s->capacity == 0 ? 4096 : s->capacity * 2;
        int64_t* p = realloc(s->ns, cap * sizeof *p);
        if (p == NULL) {
            fprintf(stderr, "latency_pair: out of memory\n");
            exit(2);
        }
        s->ns = p;
        s->capacity = cap;
    }
    s->ns[s->count++] = v;
}

static int cmp_i64(const void* a, const void* b) {
    int64_t x = *(const int64_t*)a, y = *(const int64_t*)b;
    return (x > y) - (x < y);
}

// The q-quantile of sorted values (nearest rank), or 0 for none.
static double quantile_i64(const int64_t* sorted, size_t n, double q) {
    if (n == 0) {
        return 0;
    }
    size_t rank = (size_t)(q * (double)n);
    return (double)sorted[rank < n ? rank : n - 1];
}

// A server's utime+stime and utime, in seconds; -1 if /proc cannot tell.
static int process_times(const struct server* s, double* total, double* user) {
    double system;
    if (measure_process_cpu(s->pid, user, &system) != 0) {
        return -1;
    }
    *total = *user + system;
    return 0;
}

static void connect_server(struct server* s) {
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        usage("--host must be an IPv4 address");
    }
    s->fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s->fd < 0) {
        perror("latency_pair: socket");
        exit(2);
    }
    int one = 1;
    setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct timeval tv = {.tv_sec = (time_t)timeout_s,
                         .tv_usec = (suseconds_t)((timeout_s - (double)(time_t)timeout_s) * 1e6)};
    setsockopt(s->fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(s->fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    if (connect(s->fd, (struct sockaddr*)&addr, sizeof addr) != 0) {
        fprintf(stderr, "latency_pair: connect to %s:%ld: %s\n", host, s->port, strerror(errno));
        exit(2);
    }
    char header[64];
    s->header = echo_mode ? (size_t)snprintf(header, sizeof header, "ECHO %zu\n", size) : 0;
    s->request = malloc(s->header + size);
    s->reply = malloc(size);
    if (s->request == NULL || s->reply == NULL) {
        fprintf(stderr, "latency_pair: out of memory\n");
        exit(2);
    }
    memcpy(s->request, header, s->header);
    for (size_t i = 0; i < size; ++i) {
        s->request[s->header + i] = (char)('a' + i % 26);
    }
}

// One round trip; returns its time in ns. Exits on a wrong reply (1) or a failure (2).
static int64_t round_trip(struct server* s) {
    char* payload = s->request + s->header;
    uint64_t seq = ++s->seq;
    memcpy(payload, &seq, sizeof seq);
    const size_t total = s->header + size;
    int64_t start = measure_now_ns();
    for (size_t sent = 0; sent < total;) {
        ssize_t n = send(s->fd, s->request + sent, total - sent, MSG_NOSIGNAL);
        if (n <= 0) {
            fprintf(stderr, "latency_pair: send to port %ld: %s\n", s->port,
                    n < 0 ? strerror(errno) : "nothing sent");
            exit(2);
        }
        sent += (size_t)n;
    }
    for (size_t got = 0; got < size;) {
        ssize_t n = recv(s->fd, s->reply + got, size - got, 0);
        if (n <= 0) {
            fprintf(stderr, "latency_pair: reply from port %ld: %s\n", s->port,
                    n < 0 ? strerror(errno) : "the server closed the connection");
            exit(2);
        }
        got += (size_t)n;
    }
    int64_t elapsed = measure_now_ns() - start;
    if (memcmp(s->reply, payload, size) != 0) {
        fprintf(stderr, "latency_pair: wrong reply from port %ld to request %llu\n", s->port,
                (unsigned long long)seq);
        exit(1);
    }
    return elapsed;
}

static void close_block(size_t index) {
    for (size_t i = 0; i < nservers; ++i) {
        struct samples* b = &servers[i].block;
        qsort(b->ns, b->count, sizeof *b->ns, cmp_i64);
        servers[i].block_p50[index] = quantile_i64(b->ns, b->count, 0.5);
        b->count = 0;
    }
}

int main(int argc, char** argv) {
    for (int i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--json") == 0) {
            json = 1;
            continue;
        }
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(NULL);
        }
        if (v == NULL) {
            usage("every option but --json wants a value");
        }
        ++i;
        if (strcmp(a, "--port") == 0) {
            if (nservers == MAX_SERVERS) {
                usage("at most 8 servers");
            }
            servers[nservers++].port = (long)measure_option("latency_pair", a, v, 1);
        } else if (strcmp(a, "--server-pid") == 0) {
            if (npids == MAX_SERVERS) {
                usage("at most 8 servers");
            }
            servers[npids++].pid = (long)measure_option("latency_pair", a, v, 1);
        } else if (strcmp(a, "--host") == 0) {
            host = v;
        } else if (strcmp(a, "--size") == 0) {
            size = (size_t)measure_option("latency_pair", a, v, 1);
        } else if (strcmp(a, "--seconds") == 0) {
            seconds = measure_option("latency_pair", a, v, 0);
        } else if (strcmp(a, "--warmup") == 0) {
            warmup = measure_option("latency_pair", a, v, 0);
        } else if (strcmp(a, "--block") == 0) {
            block_s = measure_option("latency_pair", a, v, 0);
        } else if (strcmp(a, "--timeout") == 0) {
            timeout_s = measure_option("latency_pair", a, v, 0);
        } else if (strcmp(a, "--mode") == 0) {
            if (strcmp(v, "raw") != 0 && strcmp(v, "echo") != 0) {
                usage("--mode must be raw or echo");
            }
            echo_mode = strcmp(v, "echo") == 0;
        } else {
            fprintf(stderr, "latency_pair: unknown option %s\n", a);
            usage(NULL);
        }
    }
    if (nservers < 2) {
        usage("give --port at least twice");
    }
    if (npids != 0 && npids != nservers) {
        usage("give --server-pid once per --port, or not at all");
    }
    if (size < 8 || seconds <= 0 || block_s <= 0 || block_s > seconds || timeout_s <= 0) {
        usage("--size must be at least 8; --seconds, --block and --timeout above 0, "
              "--block at most --seconds");
    }
    const size_t blocks = (size_t)(seconds / block_s + 1e-9); // 0.6 / 0.2 is 2.999...
    for (size_t i = 0; i < nservers; ++i) {
        connect_server(&servers[i]);
        servers[i].block_p50 = calloc(blocks, sizeof(double));
        if (servers[i].block_p50 == NULL) {
            fprintf(stderr, "latency_pair: out of memory\n");
            return 2;
        }
    }

    const int64_t t0 = measure_now_ns();
    const int64_t window_start = t0 + (int64_t)(warmup * 1e9);
    const int64_t block_ns = (int64_t)(block_s * 1e9);
    int in_window = 0;
    size_t block = 0;
    size_t order[MAX_SERVERS];
    for (size_t i = 0; i < nservers; ++i) {
        order[i] = i;
    }
    uint64_t rng = 0x9e3779b97f4a7c15u ^ (uint64_t)t0;
    size_t last = MAX_SERVERS;
    for (;;) {
        int64_t now = measure_now_ns();
        if (!in_window && now >= window_start) {
            in_window = 1;
            for (size_t i = 0; i < nservers; ++i) {
                if (servers[i].pid != 0 && process_times(&servers[i], &servers[i].cpu_start,
                                                         &servers[i].user_start) != 0) {
                    fprintf(stderr, "latency_pair: cannot read /proc/%ld/stat\n", servers[i].pid);
                    return 2;
                }
            }
        }
        if (in_window) {
            while (block < blocks && now >= window_start + (int64_t)(block + 1) * block_ns) {
                close_block(block++);
            }
            if (block == blocks) {
                break;
            }
        }
        measure_next_turn(order, nservers, &rng, &last);
        for (size_t k = 0; k < nservers; ++k) {
            struct server* s = &servers[order[k]];
            int64_t rtt = round_trip(s);
            if (in_window) {
                push_sample(&s->all, rtt);
                push_sample(&s->block, rtt);
            }
        }
    }
    for (size_t i = 0; i < nservers; ++i) {
        if (servers[i].pid != 0 &&
            process_times(&servers[i], &servers[i].cpu_end, &servers[i].user_end) != 0) {
            fprintf(stderr, "latency_pair: cannot read /proc/%ld/stat\n", servers[i].pid);
            return 2;
        }
    }

    double* ratios = calloc(blocks, sizeof(double));
    if (ratios == NULL) {
        fprintf(stderr, "latency_pair: out of memory\n");
        return 2;
    }
    if (json) {
        printf("{\"size\":%zu,\"mode\":\"%s\",\"seconds\":%g,\"blocks\":%zu,\"servers\":[", size,
               echo_mode ? "echo" : "raw", (double)blocks * block_s, blocks);
    }
    for (size_t i = 0; i < nservers; ++i) {
        struct server* s = &servers[i];
        qsort(s->all.ns, s->all.count, sizeof *s->all.ns, cmp_i64);
        double sum = 0;
        for (size_t j = 0; j < s->all.count; ++j) {
            sum += (double)s->all.ns[j];
        }
        const double n = (double)s->all.count;
        const double p50 = quantile_i64(s->all.ns, s->all.count, 0.5) / 1e3;
        const double p90 = quantile_i64(s->all.ns, s->all.count, 0.9) / 1e3;
        const double p99 = quantile_i64(s->all.ns, s->all.count, 0.99) / 1e3;
        const double mean = n > 0 ? sum / n / 1e3 : 0;
        for (size_t b = 0; b < blocks; ++b) {
            ratios[b] = servers[0].block_p50[b] > 0 ? s->block_p50[b] / servers[0].block_p50[b] : 0;
        }
        qsort(ratios, blocks, sizeof *ratios, measure_cmp_double);
        const double r50 = measure_quantile(ratios, blocks, 0.5);
        const double r25 = measure_quantile(ratios, blocks, 0.25);
        const double r75 = measure_quantile(ratios, blocks, 0.75);
        double cpu = -1, user = -1;
        if (s->pid != 0 && n > 0) {
            cpu = (s->cpu_end - s->cpu_start) * 1e6 / n;
            user = (s->user_end - s->user_start) * 1e6 / n;
        }
        if (json) {
            printf("%s{\"port\":%ld,\"messages\":%zu,\"p50_us\":%.3f,\"p90_us\":%.3f,"
                   "\"p99_us\":%.3f,\"mean_us\":%.3f,\"p50_ratio_median\":%.4f,"
                   "\"p50_ratio_q1\":%.4f,\"p50_ratio_q3\":%.4f",
                   i == 0 ? "" : ",", s->port, s->all.count, p50, p90, p99, mean, r50, r25, r75);
            if (cpu >= 0) {
                printf(",\"server_cpu_us_per_msg\":%.3f,\"server_user_us_per_msg\":%.3f", cpu,
                       user);
            }
            printf("}");
        } else {
            printf("port %ld: %zu round trips, p50 %.2f us, p90 %.2f, p99 %.2f, mean %.2f", s->port,
                   s->all.count, p50, p90, p99, mean);
            if (i > 0) {
                printf("; p50 / first's by %g s block: median %.3f (IQR %.3f-%.3f)", block_s, r50,
                       r25, r75);
            }
            if (cpu >= 0) {
                printf("; server CPU %.3f us/msg (user %.3f)", cpu, user);
            }
            printf("\n");
        }
    }
    if (json) {
        printf("]}\n");
    }
    free(ratios);
    for (size_t i = 0; i < nservers; ++i) {
        close(servers[i].fd);
    }
    return 0;
}
