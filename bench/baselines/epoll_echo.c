// epoll_echo: the plain epoll echo server that ringchat's echo_server --raw is compared with.
//
// Level-triggered epoll, non-blocking sockets, one buffer per connection (16 KiB by
// default). A readable connection gets one recv into its buffer and a send of what arrived;
// if the send is short, the rest waits for EPOLLOUT and the connection reads nothing more
// until it is out (back-pressure). Raw echo: no framing. Prints "listening on ADDR:PORT"
// first; exits with status 0 on SIGINT or SIGTERM.
//
// usage: epoll_echo [--host ADDR] [--port N] [--buffer BYTES]

#define _GNU_SOURCE

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

struct conn {
    int fd;
    int want_out; // registered for EPOLLOUT instead of EPOLLIN
    size_t len;   // bytes in data
    size_t off;   // bytes of data already sent
    char data[];
};

static size_t buffer_size = 16384;
static char listener_tag;
static char signal_tag;

static void die(const char* what) {
    fprintf(stderr, "epoll_echo: %s: %s\n", what, strerror(errno));
    exit(1);
}

static void close_conn(struct conn* c) {
    close(c->fd); // also removes it from the epoll set
    free(c);
}

static void watch(int ep, struct conn* c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev) < 0) {
        die("epoll_ctl");
    }
}

static void on_ready(int ep, struct conn* c) {
    if (c->len == 0) {
        ssize_t n = recv(c->fd, c->data, buffer_size, 0);
        if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            return;
        }
        if (n <= 0) { // EOF or error (EPOLLHUP/EPOLLERR end up here too)
            close_conn(c);
            return;
        }
        c->len = (size_t)n;
        c->off = 0;
    }
    while (c->off < c->len) {
        ssize_t n = send(c->fd, c->data + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN) {
                if (!c->want_out) {
                    c->want_out = 1;
                    watch(ep, c, EPOLLOUT);
                }
                return;
            }
            close_conn(c);
            return;
        }
        c->off += (size_t)n;
    }
    c->len = 0;
    if (c->want_out) {
        c->want_out = 0;
        watch(ep, c, EPOLLIN);
    }
}

static void accept_all(int ep, int lfd) {
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR && errno != ECONNABORTED) {
                fprintf(stderr, "epoll_echo: accept: %s\n", strerror(errno));
            }
            return;
        }
        struct conn* c = malloc(sizeof *c + buffer_size);
        if (c == NULL) {
            close(fd);
            continue;
        }
        c->fd = fd;
        c->want_out = 0;
        c->len = c->off = 0;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev) < 0) {
            die("epoll_ctl");
        }
    }
}

int main(int argc, char** argv) {
    const char* host = "127.0.0.1";
    long port = 0;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
            host = argv[++i];
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            port = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--buffer") == 0 && i + 1 < argc) {
            buffer_size = strtoul(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: epoll_echo [--host ADDR] [--port N] [--buffer BYTES]\n");
            return 64;
        }
    }
    if (port < 0 || port > 65535 || buffer_size == 0) {
        fprintf(stderr, "epoll_echo: bad --port or --buffer\n");
        return 64;
    }

    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    sigprocmask(SIG_BLOCK, &signals, NULL);
    int sfd = signalfd(-1, &signals, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        die("signalfd");
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "epoll_echo: --host must be an IPv4 address\n");
        return 64;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
        bind(lfd, (struct sockaddr*)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        die("listen");
    }
    socklen_t len = sizeof addr;
    getsockname(lfd, (struct sockaddr*)&addr, &len);
    printf("listening on %s:%u\n", host, ntohs(addr.sin_port));
    fflush(stdout);

    int ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        die("epoll_create1");
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &listener_tag};
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    ev.data.ptr = &signal_tag;
    epoll_ctl(ep, EPOLL_CTL_ADD, sfd, &ev);

    struct epoll_event events[256];
    for (int running = 1; running;) {
        int n = epoll_wait(ep, events, 256, -1);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            die("epoll_wait");
        }
        for (int i = 0; i < n; ++i) {
            void* p = events[i].data.ptr;
            if (p == &listener_tag) {
                accept_all(ep, lfd);
            } else if (p == &signal_tag) {
                running = 0;
            } else {
                on_ready(ep, p);
            }
        }
    }
    // Connections still open are closed by the exit.
    close(lfd);
    close(ep);
    return 0;
}
