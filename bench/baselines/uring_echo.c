// uring_echo: a hand-written liburing echo server, the reference ringchat's echo_server is
// measured against. It uses the kernel features ringchat uses or plans to:
//   - one ring, IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN (falling back to COOP_TASKRUN),
//     registered ring fd;
//   - multishot accept;
//   - multishot recv into a provided buffer ring shared by all connections, so an idle
//     connection holds no receive buffer;
//   - the received buffer is sent back as it is (send, or sendmsg of up to 16 buffers when
//     several are queued; one send in flight per connection, keeping the order) and goes
//     back to the ring when the send has taken it all;
//   - batched submission and completion: io_uring_submit_and_wait + io_uring_for_each_cqe +
//     one io_uring_cq_advance and one buffer-ring advance per batch.
// Connection state is a 64-byte slot in a table indexed by descriptor. Defaults: 1024
// buffers of 16 KiB; a recv that finds none left (-ENOBUFS) is re-armed after the next batch
// has recycled some.
//
// --direct also installs each accepted socket in a registered file table (at the slot of
// its own number) and names it by the slot in sends (IOSQE_FIXED_FILE): what direct
// descriptors would save ringchat, measured without building them into the library
// (docs/benchmarks.md).
//
// --touch N gives each connection N more cache lines of state, next to the previous
// descriptor's (as a heap places objects allocated one after the other), and writes all N on
// each receive and each send completion: a stand-in for the state a library keeps and touches
// per message, to measure what such lines cost in a server that does nothing else
// differently (docs/benchmarks.md, bench/footprint).
//
// Two modes measure what the completion model costs at light load (docs/benchmarks.md):
//   --sync-send sends a connection's queued bytes with a send() system call when it can
//     take them all at once, and through the ring only what it leaves;
//   --poll (raw mode only) receives by readiness instead: a multishot poll per connection,
//     then read() and write() system calls, epoll's pattern with the ring as the poller. A
//     write that the socket cannot take at once waits in poll(), stalling the loop: this
//     mode is for measuring, not for serving many peers.
// --single-recv arms a single-shot recv (still into a provided buffer) instead of the
// multishot one, again after each completion: what a receive costs without multishot.
//
// Raw echo by default. --echo speaks the seed's ECHO framing ("ECHO <len>\n" + <len> bytes,
// payload echoed, many commands per connection); --once with it shuts the write side after
// the first reply, like the seed's server. Prints "listening on ADDR:PORT" first; exits with
// status 0 on SIGINT or SIGTERM.
//
// usage: uring_echo [--host ADDR] [--port N] [--echo [--once]] [--direct] [--buffers N]
//                   [--buffer-size B] [--touch N] [--single-recv] [--sync-send | --poll]

#define _GNU_SOURCE

#include <liburing.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <unistd.h>

enum op { op_accept = 1, op_recv, op_send, op_signal, op_poll };

enum conn_flags {
    sending = 1,     // a send is in flight
    recv_done = 2,   // the multishot recv ended for good (EOF or error)
    starved = 4,     // the recv ended for lack of buffers: re-arm after recycling
    failed = 8,      // drop output, close when nothing is in flight
    reply_done = 16, // --once: the first reply is queued; shut down after sending it
    shut_down = 32,  // --once: write side shut down
};

#define BUFFER_GROUP 1
#define MAX_IOV 16

// Bytes to send: part of one provided buffer.
struct segment {
    struct segment* next;
    uint32_t off;
    uint32_t len;
    uint16_t bid;
};

// What a sendmsg of several segments needs while in flight (a pool, not per connection).
struct send_msg {
    struct send_msg* next_free;
    struct msghdr msg;
    struct iovec iov[MAX_IOV];
};

struct conn {
    struct segment* head; // oldest queued bytes; the send in flight covers the first ones
    struct segment* tail;
    struct send_msg* msg; // sendmsg in flight, if several segments were sent at once
    uint32_t remaining;   // --echo: payload bytes of the current command still to come
    uint16_t flags;
    uint8_t header_len;
    char header[29]; // --echo: a command line split across receives
};

static struct io_uring ring;
static struct conn* conns;
static int max_fds;
static int echo_mode;
static int once;
static int direct; // --direct: sends go through a registered copy of the descriptor
static int sync_send; // --sync-send
static int poll_mode; // --poll
static int single_recv; // --single-recv
static int* fd_numbers; // --direct: fd_numbers[fd] == fd, what a files update reads
#define MAX_TOUCH 32
static unsigned touch_lines;      // --touch: lines of state per connection
static unsigned char* touch_area; // --touch: touch_lines lines per descriptor

static struct io_uring_buf_ring* buf_ring;
static char* buffers;
static unsigned buffer_count = 1024;
static unsigned buffer_size = 16384;
static uint16_t* buffer_refs; // segments (and a parse in progress) using each buffer
static int recycled;          // buffers added to the ring since the last advance

static int* starved_fds;
static int starved_count;

static struct segment* free_segments;
static struct send_msg* free_msgs;

static void die(const char* what, int err) {
    fprintf(stderr, "uring_echo: %s: %s\n", what, strerror(err));
    exit(1);
}

static struct io_uring_sqe* get_sqe(void) {
    struct io_uring_sqe* sqe = io_uring_get_sqe(&ring);
    if (sqe == NULL) {
        io_uring_submit(&ring);
        sqe = io_uring_get_sqe(&ring);
    }
    return sqe;
}

static void set_data(struct io_uring_sqe* sqe, int fd, enum op op) {
    io_uring_sqe_set_data64(sqe, ((uint64_t)fd << 8) | op);
}

static void* grow_pool(size_t item, size_t count) {
    char* block = malloc(item * count);
    if (block == NULL) {
        die("malloc", ENOMEM);
    }
    return block;
}

static struct segment* new_segment(void) {
    if (free_segments == NULL) {
        struct segment* block = grow_pool(sizeof *block, 1024);
        for (int i = 0; i < 1024; ++i) {
            block[i].next = free_segments;
            free_segments = &block[i];
        }
    }
    struct segment* s = free_segments;
    free_segments = s->next;
    return s;
}

static struct send_msg* new_msg(void) {
    if (free_msgs == NULL) {
        struct send_msg* block = grow_pool(sizeof *block, 64);
        for (int i = 0; i < 64; ++i) {
            block[i].next_free = free_msgs;
            free_msgs = &block[i];
        }
    }
    struct send_msg* m = free_msgs;
    free_msgs = m->next_free;
    memset(&m->msg, 0, sizeof m->msg);
    return m;
}

static char* buffer_at(unsigned bid) {
    return buffers + (size_t)bid * buffer_size;
}

static void unref_buffer(unsigned bid) {
    if (--buffer_refs[bid] == 0) {
        io_uring_buf_ring_add(buf_ring, buffer_at(bid), buffer_size, (unsigned short)bid,
                              io_uring_buf_ring_mask(buffer_count), recycled++);
    }
}

static void arm_accept(int lfd) {
    struct io_uring_sqe* sqe = get_sqe();
    io_uring_prep_multishot_accept(sqe, lfd, NULL, NULL,
                                   SOCK_CLOEXEC | (poll_mode ? SOCK_NONBLOCK : 0));
    set_data(sqe, lfd, op_accept);
}

static void arm_recv(int fd) {
    struct io_uring_sqe* sqe = get_sqe();
    if (single_recv) {
        io_uring_prep_recv(sqe, fd, NULL, 0, 0); // length 0: the provided buffer's
    } else {
        io_uring_prep_recv_multishot(sqe, fd, NULL, 0, 0);
    }
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = BUFFER_GROUP;
    set_data(sqe, fd, op_recv);
}

// --direct: installs the accepted socket in the registered file table at the slot of the
// same number, so sends name it by the slot (IOSQE_FIXED_FILE) and skip the descriptor
// lookup and reference count of each send. The update runs when the kernel consumes the SQE,
// before any SQE after it, so the first send already finds the slot filled. Should the
// update fail (out of kernel memory), its completion carries user_data 0 and is ignored; the
// connection's sends then fail with EBADF and it is dropped like any failed connection.
static void register_fd(int fd) {
    struct io_uring_sqe* sqe = get_sqe();
    fd_numbers[fd] = fd; // read when the kernel consumes the SQE
    io_uring_prep_files_update(sqe, &fd_numbers[fd], 1, fd);
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, 0);
}

static void queue_segment(struct conn* c, unsigned bid, uint32_t off, uint32_t len) {
    struct segment* s = new_segment();
    s->next = NULL;
    s->bid = (uint16_t)bid;
    s->off = off;
    s->len = len;
    ++buffer_refs[bid];
    if (c->tail != NULL) {
        c->tail->next = s;
    } else {
        c->head = s;
    }
    c->tail = s;
}

static void drop_queue(struct conn* c) {
    while (c->head != NULL) {
        struct segment* s = c->head;
        c->head = s->next;
        unref_buffer(s->bid);
        s->next = free_segments;
        free_segments = s;
    }
    c->tail = NULL;
}

static void on_send(int fd, int res);

static void start_send(int fd) {
    struct conn* c = &conns[fd];
    struct segment* s = c->head;
    if (sync_send && s->next == NULL) {
        ssize_t n = send(fd, buffer_at(s->bid) + s->off, s->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n == (ssize_t)s->len) {
            c->flags |= sending;
            on_send(fd, (int)n); // as if the ring had sent it: frees the segment, progresses
            return;
        }
        if (n > 0) { // the ring sends the rest
            s->off += (uint32_t)n;
            s->len -= (uint32_t)n;
        }
    }
    struct io_uring_sqe* sqe = get_sqe();
    if (s->next == NULL) {
        io_uring_prep_send(sqe, fd, buffer_at(s->bid) + s->off, s->len, MSG_NOSIGNAL);
    } else {
        struct send_msg* m = new_msg();
        int n = 0;
        for (; s != NULL && n < MAX_IOV; s = s->next, ++n) {
            m->iov[n].iov_base = buffer_at(s->bid) + s->off;
            m->iov[n].iov_len = s->len;
        }
        m->msg.msg_iov = m->iov;
        m->msg.msg_iovlen = (size_t)n;
        io_uring_prep_sendmsg(sqe, fd, &m->msg, MSG_NOSIGNAL);
        c->msg = m;
    }
    if (direct) {
        sqe->flags |= IOSQE_FIXED_FILE; // slot fd holds the same socket (register_fd)
    }
    set_data(sqe, fd, op_send);
    c->flags |= sending;
}

// Called whenever something finished on the connection: sends what is queued, shuts the
// write side after the --once reply, or closes once nothing is in flight any more.
static void progress(int fd) {
    struct conn* c = &conns[fd];
    if (c->flags & sending) {
        return;
    }
    if (c->head != NULL && !(c->flags & failed)) {
        start_send(fd);
        return;
    }
    if ((c->flags & (reply_done | shut_down | failed)) == reply_done) {
        shutdown(fd, SHUT_WR);
        c->flags |= shut_down;
    }
    if (c->flags & recv_done) {
        drop_queue(c);
        memset(c, 0, sizeof *c);
        struct io_uring_sqe* sqe;
        if (direct) {
            sqe = get_sqe();
            io_uring_prep_close_direct(sqe, (unsigned)fd); // the table's reference
            sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
            io_uring_sqe_set_data64(sqe, 0);
        }
        sqe = get_sqe();
        io_uring_prep_close(sqe, fd);
        sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
        io_uring_sqe_set_data64(sqe, 0);
    }
}

static void fail(int fd) {
    struct conn* c = &conns[fd];
    c->flags |= failed;
    drop_queue(c);
    if (!(c->flags & (recv_done | starved))) {
        shutdown(fd, SHUT_RDWR); // ends the multishot recv; its last completion closes
    }
}

// --echo: finds the commands in the received bytes; payload bytes are queued for sending
// straight from the provided buffer.
static void parse_echo(int fd, unsigned bid, uint32_t len) {
    struct conn* c = &conns[fd];
    const char* p = buffer_at(bid);
    uint32_t off = 0;
    while (off < len && !(c->flags & (reply_done | failed))) {
        if (c->remaining == 0) {
            const char* nl = memchr(p + off, '\n', len - off);
            uint32_t take = nl != NULL ? (uint32_t)(nl - (p + off)) + 1 : len - off;
            if (c->header_len + take > sizeof c->header - 1) {
                fail(fd); // not a command this server understands
                return;
            }
            memcpy(c->header + c->header_len, p + off, take);
            c->header_len = (uint8_t)(c->header_len + take);
            off += take;
            if (nl == NULL) {
                continue;
            }
            c->header[c->header_len] = '\0';
            char* end = NULL;
            unsigned long long n = 0;
            if (strncmp(c->header, "ECHO ", 5) == 0 && c->header[5] >= '0' && c->header[5] <= '9') {
                n = strtoull(c->header + 5, &end, 10);
            }
            if (end == NULL || (*end == '\r' ? end[1] != '\n' : *end != '\n') || n > UINT32_MAX) {
                fail(fd);
                return;
            }
            c->header_len = 0;
            c->remaining = (uint32_t)n;
        } else {
            uint32_t take = c->remaining < len - off ? c->remaining : len - off;
            queue_segment(c, bid, off, take);
            c->remaining -= take;
            off += take;
        }
        if (c->remaining == 0 && c->header_len == 0 && once) {
            c->flags |= reply_done;
        }
    }
}

// --touch: writes each line of the connection's part of touch_area.
static void touch(int fd) {
    if (touch_lines == 0) {
        return;
    }
    unsigned char* area = touch_area + (size_t)fd * touch_lines * 64;
    for (unsigned i = 0; i < touch_lines; ++i) {
        ++*(volatile unsigned char*)(area + i * 64);
    }
}

static void on_recv(int fd, int res, unsigned cqe_flags) {
    struct conn* c = &conns[fd];
    touch(fd);
    if (res > 0) {
        unsigned bid = cqe_flags >> IORING_CQE_BUFFER_SHIFT;
        ++buffer_refs[bid]; // held while parsing; segments take their own references
        if (c->flags & (failed | reply_done)) {
            // Discard: the connection is going away, or --once has replied already.
        } else if (echo_mode) {
            parse_echo(fd, bid, (uint32_t)res);
        } else {
            queue_segment(c, bid, 0, (uint32_t)res);
        }
        unref_buffer(bid);
        if (!(cqe_flags & IORING_CQE_F_MORE)) {
            // The recv ended although the connection is fine (always with --single-recv;
            // a multishot one when e.g. the CQ overflowed): start another, unless the
            // connection is being torn down.
            if (c->flags & failed) {
                c->flags |= recv_done;
            } else {
                arm_recv(fd);
            }
        }
    } else if (res == -ENOBUFS) {
        c->flags |= starved;
        starved_fds[starved_count++] = fd;
        return;
    } else {
        c->flags |= recv_done; // EOF, or an error
        if (res < 0) {
            c->flags |= failed;
            drop_queue(c);
        }
    }
    progress(fd);
}

static void on_send(int fd, int res) {
    struct conn* c = &conns[fd];
    touch(fd);
    c->flags &= (uint16_t)~sending;
    if (c->msg != NULL) {
        c->msg->next_free = free_msgs;
        free_msgs = c->msg;
        c->msg = NULL;
    }
    if (res < 0) {
        fail(fd);
    } else {
        uint32_t sent = (uint32_t)res;
        while (sent > 0 && c->head != NULL) {
            struct segment* s = c->head;
            if (sent < s->len) {
                s->off += sent;
                s->len -= sent;
                break;
            }
            sent -= s->len;
            c->head = s->next;
            unref_buffer(s->bid);
            s->next = free_segments;
            free_segments = s;
        }
        if (c->head == NULL) {
            c->tail = NULL;
        }
    }
    progress(fd);
}

// --poll: one multishot poll for input per connection.
static void arm_poll(int fd) {
    struct io_uring_sqe* sqe = get_sqe();
    io_uring_prep_poll_multishot(sqe, fd, POLLIN);
    set_data(sqe, fd, op_poll);
}

// --poll: ends the connection. The poll holds a reference to the socket, so it is removed
// first, and the close is hard-linked behind the removal: the descriptor's number cannot be
// accepted again while a removal aimed at its user_data is pending. Completions still queued
// for the connection find it failed and are ignored (the accept clears the flag).
static void close_polled(int fd, int poll_armed) {
    conns[fd].flags |= failed;
    struct io_uring_sqe* sqe;
    if (poll_armed) {
        sqe = get_sqe();
        io_uring_prep_poll_remove(sqe, ((uint64_t)fd << 8) | op_poll);
        sqe->flags |= IOSQE_IO_HARDLINK | IOSQE_CQE_SKIP_SUCCESS;
        io_uring_sqe_set_data64(sqe, 0);
    }
    sqe = get_sqe();
    io_uring_prep_close(sqe, fd);
    sqe->flags |= IOSQE_CQE_SKIP_SUCCESS;
    io_uring_sqe_set_data64(sqe, 0);
}

// --poll: writes all of it, waiting in poll() while the socket's buffer is full.
static int write_all(int fd, const char* p, size_t len) {
    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);
        if (n > 0) {
            p += n;
            len -= (size_t)n;
        } else if (n < 0 && errno == EAGAIN) {
            struct pollfd pfd = {.fd = fd, .events = POLLOUT};
            poll(&pfd, 1, -1);
        } else if (n < 0 && errno != EINTR) {
            return -1;
        }
    }
    return 0;
}

// --poll: the socket is readable. Reads until a read comes back short (the socket is
// drained) and echoes each piece.
static void on_poll(int fd, int res, unsigned cqe_flags) {
    static char piece[16384];
    const int armed = (cqe_flags & IORING_CQE_F_MORE) != 0;
    if (conns[fd].flags & failed) {
        return; // closing
    }
    if (res < 0) {
        close_polled(fd, armed);
        return;
    }
    for (;;) {
        ssize_t n = read(fd, piece, sizeof piece);
        if (n > 0) {
            if (write_all(fd, piece, (size_t)n) < 0) {
                close_polled(fd, armed);
                return;
            }
            if ((size_t)n < sizeof piece) {
                break;
            }
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            break;
        } else {
            close_polled(fd, armed); // EOF or an error
            return;
        }
    }
    if (!armed) {
        arm_poll(fd); // the kernel ended the multishot poll: start another
    }
}

static void setup_ring(void) {
    struct io_uring_params p;
    unsigned tries[] = {IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN,
                        IORING_SETUP_COOP_TASKRUN, 0};
    const char* names[] = {"SINGLE_ISSUER|DEFER_TASKRUN", "COOP_TASKRUN", "no flags"};
    int ret = -EINVAL;
    for (int i = 0; i < 3; ++i) {
        memset(&p, 0, sizeof p);
        p.flags = tries[i] | IORING_SETUP_CQSIZE;
        p.cq_entries = 16384;
        ret = io_uring_queue_init_params(1024, &ring, &p);
        if (ret == 0) {
            fprintf(stderr, "uring_echo: io_uring set up with %s\n", names[i]);
            break;
        }
    }
    if (ret < 0) {
        die("io_uring_queue_init_params", -ret);
    }
    io_uring_register_ring_fd(&ring); // an optimisation only: ignore failure
    if (direct) {
        ret = io_uring_register_files_sparse(&ring, (unsigned)max_fds);
        if (ret < 0) {
            die("io_uring_register_files_sparse", -ret);
        }
    }

    // liburing 2.3 has io_uring_register_buf_ring but not io_uring_setup_buf_ring: map the
    // ring ourselves.
    size_t ring_bytes = buffer_count * sizeof(struct io_uring_buf);
    buf_ring = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE, MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (buf_ring == MAP_FAILED) {
        die("mmap", errno);
    }
    struct io_uring_buf_reg reg = {.ring_addr = (uint64_t)(uintptr_t)buf_ring,
                                   .ring_entries = buffer_count,
                                   .bgid = BUFFER_GROUP};
    ret = io_uring_register_buf_ring(&ring, &reg, 0);
    if (ret < 0) {
        die("io_uring_register_buf_ring (provided buffer rings need Linux 5.19)", -ret);
    }
    io_uring_buf_ring_init(buf_ring);
    buffers = mmap(NULL, (size_t)buffer_count * buffer_size, PROT_READ | PROT_WRITE,
                   MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    buffer_refs = calloc(buffer_count, sizeof *buffer_refs);
    if (buffers == MAP_FAILED || buffer_refs == NULL) {
        die("mmap", ENOMEM);
    }
    for (unsigned i = 0; i < buffer_count; ++i) {
        io_uring_buf_ring_add(buf_ring, buffer_at(i), buffer_size, (unsigned short)i,
                              io_uring_buf_ring_mask(buffer_count), (int)i);
    }
    io_uring_buf_ring_advance(buf_ring, (int)buffer_count);
}

int main(int argc, char** argv) {
    const char* host = "127.0.0.1";
    long port = 0;
    for (int i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--host") == 0 && i + 1 < argc) {
            host = argv[++i];
        } else if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            port = strtol(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--echo") == 0) {
            echo_mode = 1;
        } else if (strcmp(argv[i], "--direct") == 0) {
            direct = 1;
        } else if (strcmp(argv[i], "--once") == 0) {
            once = 1;
        } else if (strcmp(argv[i], "--buffers") == 0 && i + 1 < argc) {
            buffer_count = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--buffer-size") == 0 && i + 1 < argc) {
            buffer_size = (unsigned)strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--sync-send") == 0) {
            sync_send = 1;
        } else if (strcmp(argv[i], "--poll") == 0) {
            poll_mode = 1;
        } else if (strcmp(argv[i], "--single-recv") == 0) {
            single_recv = 1;
        } else if (strcmp(argv[i], "--touch") == 0 && i + 1 < argc) {
            touch_lines = (unsigned)strtoul(argv[++i], NULL, 10);
        } else {
            fprintf(stderr, "usage: uring_echo [--host ADDR] [--port N] [--echo [--once]] "
                            "[--direct] [--buffers N] [--buffer-size B] [--touch N] "
                            "[--single-recv] [--sync-send | --poll]\n");
            return 64;
        }
    }
    if (port < 0 || port > 65535 || buffer_count == 0 || buffer_count > 32768 ||
        (buffer_count & (buffer_count - 1)) != 0 || buffer_size == 0 || (once && !echo_mode) ||
        touch_lines > MAX_TOUCH ||
        (poll_mode && (echo_mode || direct || sync_send || single_recv))) {
        fprintf(stderr, "uring_echo: bad arguments (--buffers: a power of two up to 32768; "
                        "--once needs --echo; --touch: at most 32 lines; --poll: raw mode, "
                        "without --direct, --sync-send or --single-recv)\n");
        return 64;
    }

    sigset_t signals;
    sigemptyset(&signals);
    sigaddset(&signals, SIGINT);
    sigaddset(&signals, SIGTERM);
    sigprocmask(SIG_BLOCK, &signals, NULL);
    int sfd = signalfd(-1, &signals, SFD_CLOEXEC);
    if (sfd < 0) {
        die("signalfd", errno);
    }

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "uring_echo: --host must be an IPv4 address\n");
        return 64;
    }
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    // TCP_NODELAY on the listener is inherited by accepted sockets.
    if (lfd < 0 || setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one) < 0 ||
        setsockopt(lfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0 ||
        bind(lfd, (struct sockaddr*)&addr, sizeof addr) < 0 || listen(lfd, 1024) < 0) {
        die("listen", errno);
    }
    socklen_t len = sizeof addr;
    getsockname(lfd, (struct sockaddr*)&addr, &len);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    max_fds = rl.rlim_cur > 1u << 20 ? 1 << 20 : (int)rl.rlim_cur;
    // Untouched pages of these tables cost no memory: a connection costs its slot.
    conns = calloc((size_t)max_fds, sizeof *conns);
    starved_fds = calloc((size_t)max_fds, sizeof *starved_fds);
    fd_numbers = calloc((size_t)max_fds, sizeof *fd_numbers);
    if (touch_lines > 0) {
        touch_area = aligned_alloc(64, (size_t)max_fds * touch_lines * 64);
    }
    if (conns == NULL || starved_fds == NULL || fd_numbers == NULL ||
        (touch_lines > 0 && touch_area == NULL)) {
        die("calloc", ENOMEM);
    }
    setup_ring();

    printf("listening on %s:%u\n", host, ntohs(addr.sin_port));
    fflush(stdout);

    struct signalfd_siginfo siginfo;
    struct io_uring_sqe* sqe = get_sqe();
    io_uring_prep_read(sqe, sfd, &siginfo, sizeof siginfo, 0);
    set_data(sqe, sfd, op_signal);
    arm_accept(lfd);

    for (int running = 1; running;) {
        int ret = io_uring_submit_and_wait(&ring, 1);
        if (ret < 0 && ret != -EINTR && ret != -EAGAIN && ret != -EBUSY) {
            die("io_uring_submit_and_wait", -ret);
        }
        struct io_uring_cqe* cqe;
        unsigned head;
        unsigned seen = 0;
        io_uring_for_each_cqe(&ring, head, cqe) {
            ++seen;
            uint64_t data = io_uring_cqe_get_data64(cqe);
            int fd = (int)(data >> 8);
            switch ((enum op)(data & 0xff)) {
            case op_accept:
                if (cqe->res >= 0) {
                    if (cqe->res < max_fds) {
                        memset(&conns[cqe->res], 0, sizeof *conns);
                        if (direct) {
                            register_fd(cqe->res);
                        }
                        if (poll_mode) {
                            arm_poll(cqe->res);
                        } else {
                            arm_recv(cqe->res);
                        }
                    } else {
                        close(cqe->res);
                    }
                }
                if (!(cqe->flags & IORING_CQE_F_MORE)) {
                    arm_accept(fd);
                }
                break;
            case op_recv:
                on_recv(fd, cqe->res, cqe->flags);
                break;
            case op_send:
                on_send(fd, cqe->res);
                break;
            case op_poll:
                on_poll(fd, cqe->res, cqe->flags);
                break;
            case op_signal:
                running = 0;
                break;
            default: // user_data 0: a close that failed; nothing to do
                break;
            }
        }
        io_uring_cq_advance(&ring, seen);
        if (recycled > 0) {
            io_uring_buf_ring_advance(buf_ring, recycled);
            recycled = 0;
        }
        // Connections whose recv ran out of buffers wait until some came back.
        int waiting = starved_count;
        starved_count = 0;
        for (int i = 0; i < waiting; ++i) {
            int fd = starved_fds[i];
            conns[fd].flags &= (uint16_t)~starved;
            if (conns[fd].flags & failed) {
                conns[fd].flags |= recv_done; // no recv left to end: close now
                progress(fd);
            } else {
                arm_recv(fd);
            }
        }
    }
    // Connections still open are closed by the exit.
    io_uring_queue_exit(&ring);
    close(lfd);
    return 0;
}
