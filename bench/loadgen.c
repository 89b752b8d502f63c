/*
 * loadgen: the echo benchmark's load generator (Linux, epoll, one thread).
 *
 * Modes
 *   persistent  N connections; each sends an M-byte message, waits for its whole echo, checks
 *               every byte, records the round trip in a histogram, and sends the next one, until
 *               the window of --seconds ends (or --max-requests completed).
 *   short       N slots; each loops: connect, send 64 B (--size), read the echo, check it, close.
 *               Source addresses rotate over 127.0.0.(src-base .. src-base+src-count-1), bound
 *               with IP_BIND_ADDRESS_NO_PORT before connect, so the port space is not the limit.
 *   idle        open N connections and hold them silent; print "READY {json}" once they are up,
 *               then wait until standard input closes (or --seconds passes). With --reconnect a
 *               connection the server closes is opened again (slowloris), at most
 *               --max-reconnects times.
 *
 * TLS (--tls, persistent and short modes): every connection runs a TLS handshake (OpenSSL,
 * certificate not verified: the servers' certificates are throwaway self-signed ones) before
 * its first message, and messages go through SSL_write/SSL_read, checked byte for byte as in
 * plain mode. With --resume each new connection offers the session its slot (or, before the
 * slot has one, any connection) last received (TLS 1.3 tickets, TLS 1.2 session reuse); the
 * report counts the handshakes that resumed. A finished connection sends close_notify.
 *
 * Output: one JSON object on the last line of stdout. CPU figures: the generator's own
 * utime+stime (getrusage) over the window, and, with --server-pid, the server's utime+stime from
 * /proc/PID/stat and the whole host's busy time from /proc/stat over the same window.
 *
 * Every loop is bounded: epoll waits at most 50 ms, the window ends at a deadline, counts are
 * capped, and alarm() ends the process if it ever overruns its time by far.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include <openssl/err.h>
#include <openssl/ssl.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

#define PATTERN_SIZE (1 << 17)
#define MAX_SIZE (1 << 16)
#define MAX_EVENTS 512
#define WAIT_MS 50
#define HIST_SUB_BITS 6
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_BUCKETS (64 * HIST_SUB)
#define MAX_CONNS 200000
#define IDLE_CONNECTS_IN_FLIGHT 64

enum mode { PERSISTENT, SHORT, IDLE };
enum state { FREE, CONNECTING, HANDSHAKE, SENDING, READING, HELD };

struct conn {
    int fd;
    enum state state;
    uint32_t seq;      /* messages completed on this connection */
    size_t off;        /* offset of the current message in the pattern */
    size_t sent, got;  /* bytes of the current message sent / received back */
    uint64_t t0;       /* ns: when the current message (or connection) started */
    SSL *ssl;          /* --tls: the connection's TLS state */
    SSL_SESSION *sess; /* --resume: the session this slot last received */
    uint32_t want;     /* the epoll events the last would-block asked for */
    uint32_t events;   /* the epoll events registered now */
};

static struct {
    enum mode mode;
    const char *host;
    int port;
    int conns;
    size_t size;
    double seconds;
    double connect_timeout;
    int src_base, src_count;
    int server_pid;
    long long max_requests;
    int reconnect;
    long long max_reconnects;
    int tls, resume;
} opt = {PERSISTENT, "127.0.0.1", 0, 50, 64, 1.0, 10.0, 2, 250, 0, 1000000000000LL, 0, 100000,
         0, 0};

static unsigned char pattern[PATTERN_SIZE + MAX_SIZE];
static unsigned char scratch[MAX_SIZE];
static uint64_t hist[HIST_BUCKETS];
static struct conn *table;
static int epfd;
static struct sockaddr_in dest;
static uint32_t src_next;

static long long completed, errors, verify_errors, connect_errors, unexpected_bytes;
static long long closed_by_server, reconnects;
static long long handshakes, resumed, tls_errors;
static SSL_CTX *tls_ctx;
static SSL_SESSION *last_session; /* --resume: the newest session any connection received */

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static void usage(const char *msg) {
    fprintf(stderr, "loadgen: %s\nusage: loadgen persistent|short|idle --port P [--host H] "
            "[--conns N] [--size M] [--seconds T] [--connect-timeout S] [--src-base B] "
            "[--src-count K] [--server-pid PID] [--max-requests N] [--reconnect] "
            "[--max-reconnects N] [--tls] [--resume]\n", msg);
    exit(2);
}

/* -- latency histogram: 64 sub-buckets per power of two, < 1.6 % relative error ----------- */

static int hist_index(uint64_t v) {
    if (v < HIST_SUB) return (int)v;
    int m = 63 - __builtin_clzll(v);
    int idx = (m - HIST_SUB_BITS + 1) * HIST_SUB + (int)((v >> (m - HIST_SUB_BITS)) & (HIST_SUB - 1));
    return idx < HIST_BUCKETS ? idx : HIST_BUCKETS - 1;
}

static double hist_value(int idx) { /* middle of the bucket, in ns */
    if (idx < HIST_SUB) return idx;
    int m = idx / HIST_SUB + HIST_SUB_BITS - 1;
    uint64_t sub = (uint64_t)(idx % HIST_SUB);
    uint64_t low = (1ull << m) + (sub << (m - HIST_SUB_BITS));
    return (double)low + (double)(1ull << (m - HIST_SUB_BITS)) / 2.0;
}

static double percentile_us(double p) {
    uint64_t total = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) total += hist[i];
    if (total == 0) return 0.0;
    uint64_t rank = (uint64_t)(p * (double)total);
    if (rank >= total) rank = total - 1;
    uint64_t seen = 0;
    for (int i = 0; i < HIST_BUCKETS; i++) {
        seen += hist[i];
        if (seen > rank) return hist_value(i) / 1000.0;
    }
    return 0.0;
}

/* -- CPU accounting ----------------------------------------------------------------------- */

struct cpu_sample {
    double self_user, self_sys;     /* seconds, getrusage */
    double server;                  /* seconds, utime+stime of --server-pid, -1 if unknown */
    double host_busy;               /* seconds summed over all CPUs, -1 if unknown */
};

static double server_cpu(void) {
    if (opt.server_pid <= 0) return -1.0;
    char path[64], buf[2048];
    snprintf(path, sizeof path, "/proc/%d/stat", opt.server_pid);
    FILE *f = fopen(path, "r");
    if (!f) return -1.0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may hold spaces */
    if (!p) return -1.0;
    unsigned long long utime = 0, stime = 0;
    /* after ")": state(3) ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime(14) stime(15) */
    if (sscanf(p + 2, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %llu %llu", &utime, &stime) != 2)
        return -1.0;
    return (double)(utime + stime) / (double)sysconf(_SC_CLK_TCK);
}

static double host_busy(void) {
    FILE *f = fopen("/proc/stat", "r");
    if (!f) return -1.0;
    unsigned long long v[8] = {0};
    int got = fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu",
                     &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &v[6], &v[7]);
    fclose(f);
    if (got < 4) return -1.0;
    unsigned long long busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7]; /* all but idle, iowait */
    return (double)busy / (double)sysconf(_SC_CLK_TCK);
}

static struct cpu_sample sample_cpu(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    struct cpu_sample s;
    s.self_user = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6;
    s.self_sys = (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    s.server = server_cpu();
    s.host_busy = host_busy();
    return s;
}

/* -- sockets -------------------------------------------------------------------------------- */

static void set_events(struct conn *c, uint32_t events, int op) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - table)};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl");
    c->events = events;
}

/* Waits for `events` on a registered connection: one epoll_ctl only when they change. */
static void watch(struct conn *c, uint32_t events) {
    if (c->events != events) set_events(c, events, EPOLL_CTL_MOD);
}

static void drop(struct conn *c) {
    if (c->ssl) {
        /* close_notify once, without waiting for the peer's: what a well-behaved client
           sends, and it keeps OpenSSL from marking the session unresumable */
        if (SSL_is_init_finished(c->ssl)) (void)SSL_shutdown(c->ssl);
        SSL_free(c->ssl);
        c->ssl = NULL;
        ERR_clear_error();
    }
    if (c->fd >= 0) close(c->fd); /* closing removes it from the epoll set */
    c->fd = -1;
    c->state = FREE;
}

/* Starts a non-blocking connect; returns 0, or -1 (counted) when the socket could not start. */
static int start_connect(struct conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        connect_errors++;
        return -1;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (opt.src_count > 0) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
        uint32_t host = (uint32_t)(opt.src_base + (int)(src_next++ % (uint32_t)opt.src_count));
        src.sin_addr.s_addr = htonl((127u << 24) | (host & 0xffffffu));
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0) {
            close(fd);
            connect_errors++;
            return -1;
        }
    }
    c->fd = fd;
    c->t0 = now_ns();
    c->sent = c->got = 0;
    if (connect(fd, (struct sockaddr *)&dest, sizeof dest) < 0 && errno != EINPROGRESS) {
        close(fd);
        c->fd = -1;
        connect_errors++;
        return -1;
    }
    c->state = CONNECTING;
    set_events(c, EPOLLOUT, EPOLL_CTL_ADD);
    return 0;
}

static int connect_finished(struct conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0 || err != 0) {
        connect_errors++;
        drop(c);
        return -1;
    }
    return 0;
}

/* -- TLS ------------------------------------------------------------------------------------ */

/* OpenSSL hands every session a server sends (TLS 1.3: its tickets) here; the slot keeps the
   newest, and so does the whole generator (for slots that have none yet). */
static int new_session(SSL *ssl, SSL_SESSION *sess) {
    struct conn *c = SSL_get_app_data(ssl);
    if (c) {
        if (c->sess) SSL_SESSION_free(c->sess);
        SSL_SESSION_up_ref(sess);
        c->sess = sess;
    }
    if (last_session) SSL_SESSION_free(last_session);
    last_session = sess; /* the reference OpenSSL passed us (we return 1) */
    return 1;
}

static void tls_init(void) {
    tls_ctx = SSL_CTX_new(TLS_client_method());
    if (!tls_ctx) {
        fprintf(stderr, "loadgen: SSL_CTX_new failed\n");
        exit(2);
    }
    SSL_CTX_set_min_proto_version(tls_ctx, TLS1_2_VERSION);
    SSL_CTX_set_verify(tls_ctx, SSL_VERIFY_NONE, NULL); /* throwaway self-signed certificates */
    SSL_CTX_set_mode(tls_ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    if (opt.resume) {
        SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
        SSL_CTX_sess_set_new_cb(tls_ctx, new_session);
    } else {
        SSL_CTX_set_session_cache_mode(tls_ctx, SSL_SESS_CACHE_OFF);
    }
}

/* The events to wait for after an SSL call returned `ret`: EPOLLIN/EPOLLOUT, or 0 when the
   connection failed (counted in tls_errors). */
static uint32_t tls_want(struct conn *c, int ret) {
    switch (SSL_get_error(c->ssl, ret)) {
    case SSL_ERROR_WANT_READ: return EPOLLIN;
    case SSL_ERROR_WANT_WRITE: return EPOLLOUT;
    default:
        tls_errors++;
        ERR_clear_error();
        return 0;
    }
}

/* Starts (or goes on with) the handshake: 1 done, 0 waiting (events set), -1 failed (dropped). */
static int handshake(struct conn *c) {
    if (!c->ssl) {
        c->ssl = SSL_new(tls_ctx);
        if (!c->ssl || SSL_set_fd(c->ssl, c->fd) != 1) {
            tls_errors++;
            drop(c);
            return -1;
        }
        SSL_set_app_data(c->ssl, c);
        SSL_set_connect_state(c->ssl);
        SSL_SESSION *offer = c->sess ? c->sess : last_session;
        if (opt.resume && offer) SSL_set_session(c->ssl, offer);
        c->state = HANDSHAKE;
    }
    int ret = SSL_do_handshake(c->ssl);
    if (ret == 1) {
        handshakes++;
        if (SSL_session_reused(c->ssl)) resumed++;
        return 1;
    }
    uint32_t want = tls_want(c, ret);
    if (!want) {
        drop(c);
        return -1;
    }
    watch(c, want);
    return 0;
}

/* send()/recv() or their TLS twins: bytes moved (> 0), 0 to wait for c->want, -1 failed. */
static ssize_t io_send(struct conn *c, const void *buf, size_t len) {
    if (c->ssl) {
        int n = SSL_write(c->ssl, buf, (int)len);
        if (n > 0) return n;
        c->want = tls_want(c, n);
        return c->want ? 0 : -1;
    }
    for (;;) {
        ssize_t n = send(c->fd, buf, len, MSG_NOSIGNAL);
        if (n > 0) return n;
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            c->want = EPOLLOUT;
            return 0;
        }
        return -1;
    }
}

static ssize_t io_recv(struct conn *c, void *buf, size_t len) {
    if (c->ssl) {
        int n = SSL_read(c->ssl, buf, (int)len);
        if (n > 0) return n;
        c->want = tls_want(c, n);
        return c->want ? 0 : -1;
    }
    ssize_t n = recv(c->fd, buf, len, 0);
    if (n > 0) return n;
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
        c->want = EPOLLIN;
        return 0;
    }
    return -1; /* EOF or reset */
}

static size_t message_offset(size_t index, uint32_t seq) {
    return ((size_t)index * 7919u + (size_t)seq * 131u) % (PATTERN_SIZE - 1);
}

/* Sends what is left of the current message; -1 when the connection failed. */
static int send_rest(struct conn *c) {
    while (c->sent < opt.size) {
        ssize_t n = io_send(c, pattern + c->off + c->sent, opt.size - c->sent);
        if (n > 0) {
            c->sent += (size_t)n;
        } else if (n == 0) {
            c->state = SENDING;
            watch(c, c->want);
            return 0;
        } else {
            errors++;
            drop(c);
            return -1;
        }
    }
    c->state = READING;
    watch(c, EPOLLIN);
    return 0;
}

static void begin_message(struct conn *c) {
    c->off = message_offset((size_t)(c - table), c->seq);
    c->sent = c->got = 0;
    c->t0 = now_ns();
    send_rest(c);
}

/* Reads once; returns 1 when the whole echo arrived and matched, 0 for more to come, -1 failed. */
static int read_echo(struct conn *c) {
    /* a TLS record already decrypted and buffered would raise no epoll event: read it all */
    int reads = 0;
    do {
        ssize_t n = io_recv(c, scratch, opt.size - c->got);
        if (n > 0) {
            if (memcmp(scratch, pattern + c->off + c->got, (size_t)n) != 0) {
                verify_errors++;
                drop(c);
                return -1;
            }
            c->got += (size_t)n;
            if (c->got == opt.size) return 1;
        } else if (n == 0) {
            watch(c, c->want); /* EPOLLOUT only when TLS must write to read */
            return 0;
        } else {
            errors++; /* EOF, reset or a TLS error before the whole echo: a failed request */
            drop(c);
            return -1;
        }
        reads++;
    } while (c->ssl && SSL_pending(c->ssl) > 0 && reads < 64);
    return 0;
}

static void record(uint64_t t0) {
    uint64_t t = now_ns();
    hist[hist_index(t > t0 ? t - t0 : 0)]++;
    completed++;
}

/* -- modes ---------------------------------------------------------------------------------- */

/* Connects every connection (at most `in_flight` at a time) before `deadline`; returns how many. */
static int connect_all(int in_flight, uint64_t deadline, uint32_t held_events) {
    int next = 0, pending = 0, up = 0;
    struct epoll_event evs[MAX_EVENTS];
    while ((up + pending < opt.conns || pending > 0) && now_ns() < deadline) {
        while (next < opt.conns && pending < in_flight) {
            struct conn *c = &table[next++];
            if (start_connect(c) == 0) pending++;
        }
        if (pending == 0 && next >= opt.conns) break;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, WAIT_MS);
        for (int i = 0; i < n; i++) {
            struct conn *c = &table[evs[i].data.u32];
            int ready;
            if (c->state == CONNECTING) {
                if (connect_finished(c) < 0) {
                    pending--;
                    continue;
                }
                ready = opt.tls ? handshake(c) : 1;
            } else if (c->state == HANDSHAKE) {
                ready = handshake(c);
            } else {
                continue;
            }
            if (ready == 0) continue;
            pending--;
            if (ready == 1) {
                c->state = HELD;
                watch(c, held_events);
                up++;
            }
        }
    }
    return up;
}

static struct cpu_sample window_start, window_end;
static uint64_t t_start, t_end;

static void run_persistent(void) {
    uint64_t connect_deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
    int up = connect_all(opt.conns, connect_deadline, 0);
    for (int i = 0; i < opt.conns; i++) {
        if (table[i].state != HELD && table[i].fd >= 0) { /* still connecting at the deadline */
            connect_errors++;
            drop(&table[i]);
        }
    }
    window_start = sample_cpu();
    t_start = now_ns();
    uint64_t deadline = t_start + (uint64_t)(opt.seconds * 1e9);
    for (int i = 0; i < opt.conns; i++)
        if (table[i].state == HELD) begin_message(&table[i]);
    struct epoll_event evs[MAX_EVENTS];
    int alive = up;
    while (alive > 0 && completed < opt.max_requests) {
        if (now_ns() >= deadline) break;
        int n = epoll_wait(epfd, evs, MAX_EVENTS, WAIT_MS);
        for (int i = 0; i < n; i++) {
            struct conn *c = &table[evs[i].data.u32];
            if (c->state == SENDING) {
                if (send_rest(c) < 0) alive--;
            } else if (c->state == READING) {
                int r = read_echo(c);
                if (r < 0) {
                    alive--;
                } else if (r == 1) {
                    record(c->t0);
                    c->seq++;
                    begin_message(c);
                    if (c->state == FREE) alive--;
                }
            }
        }
    }
    t_end = now_ns();
    window_end = sample_cpu();
    for (int i = 0; i < opt.conns; i++) drop(&table[i]);
}

static void run_short(void) {
    window_start = sample_cpu();
    t_start = now_ns();
    uint64_t deadline = t_start + (uint64_t)(opt.seconds * 1e9);
    for (int i = 0; i < opt.conns; i++) start_connect(&table[i]);
    struct epoll_event evs[MAX_EVENTS];
    long long restarts_left = opt.max_requests * 4 + 1000; /* failures can't loop for ever */
    while (now_ns() < deadline && completed < opt.max_requests && restarts_left > 0) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, WAIT_MS);
        for (int i = 0; i < n; i++) {
            struct conn *c = &table[evs[i].data.u32];
            int ready = 0;
            if (c->state == CONNECTING) {
                if (connect_finished(c) == 0) ready = opt.tls ? handshake(c) : 1;
            } else if (c->state == HANDSHAKE) {
                ready = handshake(c);
            } else if (c->state == SENDING) {
                send_rest(c);
            } else if (c->state == READING) {
                int r = read_echo(c);
                if (r == 1) {
                    record(c->t0);
                    drop(c);
                }
            }
            if (ready == 1) {
                c->seq++;
                c->off = message_offset((size_t)(c - table), c->seq);
                send_rest(c);
            }
        }
        /* every slot that finished or failed starts its next connection */
        for (int i = 0; i < opt.conns && now_ns() < deadline && restarts_left > 0; i++) {
            if (table[i].state == FREE) {
                restarts_left--;
                start_connect(&table[i]);
            }
        }
    }
    t_end = now_ns();
    window_end = sample_cpu();
    for (int i = 0; i < opt.conns; i++) drop(&table[i]);
}

static void run_idle(void) {
    uint64_t connect_deadline = now_ns() + (uint64_t)(opt.connect_timeout * 1e9);
    uint32_t held = EPOLLIN | EPOLLRDHUP;
    uint64_t c0 = now_ns();
    int up = connect_all(IDLE_CONNECTS_IN_FLIGHT, connect_deadline, held);
    double connect_s = (double)(now_ns() - c0) / 1e9;
    printf("READY {\"connected\": %d, \"connect_errors\": %lld, \"connect_seconds\": %.3f}\n",
           up, connect_errors, connect_s);
    fflush(stdout);

    window_start = sample_cpu();
    t_start = now_ns();
    uint64_t deadline = t_start + (uint64_t)(opt.seconds * 1e9);
    struct epoll_event stdin_ev = {.events = EPOLLIN, .data.u32 = UINT32_MAX};
    /* stdin that cannot be watched (a regular file) leaves only the deadline to end the hold */
    (void)epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &stdin_ev);
    struct epoll_event evs[MAX_EVENTS];
    int done = 0;
    while (!done && now_ns() < deadline) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, WAIT_MS);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.u32 == UINT32_MAX) {
                char buf[256];
                ssize_t r = read(0, buf, sizeof buf);
                if (r <= 0) done = 1; /* standard input closed: the harness is finished */
                continue;
            }
            struct conn *c = &table[evs[i].data.u32];
            if (c->state == HELD) {
                ssize_t r = recv(c->fd, scratch, sizeof scratch, 0);
                if (r > 0) {
                    unexpected_bytes += r;
                    continue;
                }
                if (r < 0 && (errno == EAGAIN || errno == EINTR)) continue;
                closed_by_server++;
                drop(c);
                if (opt.reconnect && reconnects < opt.max_reconnects) {
                    reconnects++;
                    start_connect(c);
                }
            } else if (c->state == CONNECTING) {
                if (connect_finished(c) == 0) {
                    c->state = HELD;
                    set_events(c, held, EPOLL_CTL_MOD);
                }
            }
        }
    }
    t_end = now_ns();
    window_end = sample_cpu();
    for (int i = 0; i < opt.conns; i++) drop(&table[i]);
}

/* -- main ----------------------------------------------------------------------------------- */

static void raise_nofile(int want) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    rlim_t need = (rlim_t)want + 64;
    if (rl.rlim_cur >= need) return;
    rl.rlim_cur = need < rl.rlim_max ? need : rl.rlim_max;
    setrlimit(RLIMIT_NOFILE, &rl);
}

int main(int argc, char **argv) {
    if (argc < 2) usage("missing mode");
    if (strcmp(argv[1], "persistent") == 0) opt.mode = PERSISTENT;
    else if (strcmp(argv[1], "short") == 0) opt.mode = SHORT;
    else if (strcmp(argv[1], "idle") == 0) opt.mode = IDLE;
    else usage("unknown mode");
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--reconnect") == 0) { opt.reconnect = 1; continue; }
        if (strcmp(a, "--tls") == 0) { opt.tls = 1; continue; }
        if (strcmp(a, "--resume") == 0) { opt.resume = 1; continue; }
        if (!v) usage("option without a value");
        i++;
        if (strcmp(a, "--host") == 0) opt.host = v;
        else if (strcmp(a, "--port") == 0) opt.port = atoi(v);
        else if (strcmp(a, "--conns") == 0) opt.conns = atoi(v);
        else if (strcmp(a, "--size") == 0) opt.size = (size_t)atol(v);
        else if (strcmp(a, "--seconds") == 0) opt.seconds = atof(v);
        else if (strcmp(a, "--connect-timeout") == 0) opt.connect_timeout = atof(v);
        else if (strcmp(a, "--src-base") == 0) opt.src_base = atoi(v);
        else if (strcmp(a, "--src-count") == 0) opt.src_count = atoi(v);
        else if (strcmp(a, "--server-pid") == 0) opt.server_pid = atoi(v);
        else if (strcmp(a, "--max-requests") == 0) opt.max_requests = atoll(v);
        else if (strcmp(a, "--max-reconnects") == 0) opt.max_reconnects = atoll(v);
        else usage("unknown option");
    }
    if (opt.port <= 0 || opt.port > 65535) usage("--port must be 1-65535");
    if (opt.conns < 1 || opt.conns > MAX_CONNS) usage("--conns must be 1-200000");
    if (opt.size < 1 || opt.size > MAX_SIZE) usage("--size must be 1-65536");
    if (!(opt.seconds > 0 && opt.seconds <= 3600)) usage("--seconds must be in (0, 3600]");
    if (!(opt.connect_timeout > 0 && opt.connect_timeout <= 600)) usage("bad --connect-timeout");
    if (opt.src_count < 0 || opt.src_base < 1 || opt.src_base + opt.src_count > 255)
        usage("source addresses must stay within 127.0.0.1-254");
    if (opt.max_requests < 1 || opt.max_reconnects < 0) usage("bad count");
    if ((opt.tls || opt.resume) && opt.mode == IDLE) usage("idle mode speaks no TLS");
    if (opt.resume && !opt.tls) usage("--resume needs --tls");
    /* the loopback network only: nothing here may reach another machine */
    dest.sin_family = AF_INET;
    dest.sin_port = htons((uint16_t)opt.port);
    if (inet_pton(AF_INET, opt.host, &dest.sin_addr) != 1 || (ntohl(dest.sin_addr.s_addr) >> 24) != 127)
        usage("--host must be an IPv4 loopback address (127.0.0.0/8)");

    /* the safety net: whatever happens, the process ends a little after its planned time */
    alarm((unsigned)(opt.connect_timeout + opt.seconds) + 30u);
    signal(SIGPIPE, SIG_IGN);
    raise_nofile(opt.conns);

    uint64_t seed = 0x9e3779b97f4a7c15ull;
    for (size_t i = 0; i < sizeof pattern; i++) {
        seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
        pattern[i] = (unsigned char)(seed >> 24);
    }
    table = calloc((size_t)opt.conns, sizeof *table);
    if (!table) die("calloc");
    for (int i = 0; i < opt.conns; i++) table[i].fd = -1;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0) die("epoll_create1");
    if (opt.tls) tls_init();

    if (opt.mode == PERSISTENT) run_persistent();
    else if (opt.mode == SHORT) run_short();
    else run_idle();

    double elapsed = (double)(t_end - t_start) / 1e9;
    double self_cpu = (window_end.self_user - window_start.self_user) +
                      (window_end.self_sys - window_start.self_sys);
    double server = window_start.server >= 0 && window_end.server >= 0
                        ? window_end.server - window_start.server : -1.0;
    double host = window_start.host_busy >= 0 && window_end.host_busy >= 0
                      ? window_end.host_busy - window_start.host_busy : -1.0;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"size\": %zu, \"seconds\": %.6f, "
           "\"completed\": %lld, \"errors\": %lld, \"verify_errors\": %lld, "
           "\"connect_errors\": %lld, \"p50_us\": %.1f, \"p99_us\": %.1f, \"max_bucket_us\": %.1f, "
           "\"loadgen_cpu_s\": %.4f, \"server_cpu_s\": %.4f, \"host_busy_s\": %.4f, "
           "\"closed_by_server\": %lld, \"reconnects\": %lld, \"unexpected_bytes\": %lld, "
           "\"tls\": %d, \"handshakes\": %lld, \"resumed\": %lld, \"tls_errors\": %lld}\n",
           argv[1], opt.conns, opt.size, elapsed, completed, errors, verify_errors, connect_errors,
           percentile_us(0.50), percentile_us(0.99), percentile_us(1.0), self_cpu, server, host,
           closed_by_server, reconnects, unexpected_bytes, opt.tls, handshakes, resumed,
           tls_errors);
    fflush(stdout);
    close(epfd);
    for (int i = 0; i < opt.conns; i++)
        if (table[i].sess) SSL_SESSION_free(table[i].sess);
    if (last_session) SSL_SESSION_free(last_session);
    if (tls_ctx) SSL_CTX_free(tls_ctx);
    free(table);
    return 0;
}
