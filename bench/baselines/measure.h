// Helpers the C measurement clients share (epoll_client, latency_pair, cpu_slices): the
// clock, a process's CPU time from /proc, quantiles, the random order of a turn, and the
// checking of numeric options. The
// reference servers (epoll_echo, uring_echo) stay free of it, one file each.

#ifndef RINGCHAT_BENCH_MEASURE_H
#define RINGCHAT_BENCH_MEASURE_H

#include <fcntl.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

// CLOCK_MONOTONIC in nanoseconds.
static inline int64_t measure_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

// utime and stime of a process (all its threads) from /proc/PID/stat, in seconds. Counted
// in clock ticks (10 ms). Returns 0, or -1 if the file cannot be read or parsed.
static inline int measure_process_cpu(long pid, double* user_s, double* system_s) {
    char path[64], text[2048];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return -1;
    }
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    if (n <= 0) {
        return -1;
    }
    text[n] = '\0';
    // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    // Fields after it: 3 state ... 14 utime, 15 stime.
    const char* p = strrchr(text, ')');
    unsigned long long utime, stime;
    if (p == NULL || sscanf(p + 2, "%*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %*s %llu %llu",
                            &utime, &stime) != 2) {
        return -1;
    }
    const double hz = (double)sysconf(_SC_CLK_TCK);
    *user_s = (double)utime / hz;
    *system_s = (double)stime / hz;
    return 0;
}

static inline int measure_cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

// The q-quantile of n sorted values, interpolating between neighbours; 0 for none.
static inline double measure_quantile(const double* sorted, size_t n, double q) {
    if (n == 0) {
        return 0;
    }
    double at = q * (double)(n - 1);
    size_t lo = (size_t)at;
    size_t hi = lo + 1 < n ? lo + 1 : lo;
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (at - (double)lo);
}

// Shuffles order[0..n) (n >= 2) into the next turn's order: a fresh random permutation
// (Fisher-Yates on xorshift64 state *rng, which must not be 0) whose first entry is not
// *last, the last entry of the turn before; then sets *last. No server goes twice in a row,
// and each follows every other one about equally often.
static inline void measure_next_turn(size_t* order, size_t n, uint64_t* rng, size_t* last) {
    do {
        for (size_t k = n - 1; k > 0; --k) {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            size_t j = (size_t)(*rng % (k + 1));
            size_t t = order[k];
            order[k] = order[j];
            order[j] = t;
        }
    } while (order[0] == *last);
    *last = order[n - 1];
}

// The value of option `flag`: a number >= 0 (integral if `integral`), or the program exits
// with 64, bad usage, saying so; `tool` names the program in the message.
static inline double measure_option(const char* tool, const char* flag, const char* text,
                                    int integral) {
    char* end;
    const double v = integral ? (double)strtol(text, &end, 10) : strtod(text, &end);
    if (end == text || *end != '\0' || !(v >= 0)) {
        fprintf(stderr, "%s: %s wants %s, got %s\n", tool, flag,
                integral ? "a whole number >= 0" : "a number >= 0", text);
        exit(64);
    }
    return v;
}

#endif
