/*
 * c_epoll: the smallest sensible epoll echo server, the practical limit of this machine.
 *
 * One thread, level-triggered epoll, one shared 64 KiB read buffer; bytes the kernel would not
 * take at once are kept per connection and the connection stops reading until they are sent.
 * Listens on 127.0.0.1 (port from argv, 0 = any), prints {"port": N, "data_first_port": 0} on
 * stdout once listening, and runs until SIGTERM or --max-seconds (alarm) ends it.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF_SIZE 65536
#define MAX_EVENTS 512
#define BACKLOG 1024

struct pending {
    char *data;
    size_t len, off;
};

static struct pending *pend; /* indexed by descriptor */
static size_t pend_cap;
static int epfd;
static char buf[BUF_SIZE];

static void close_conn(int fd) {
    if ((size_t)fd < pend_cap) {
        free(pend[fd].data);
        pend[fd].data = NULL;
        pend[fd].len = pend[fd].off = 0;
    }
    close(fd);
}

static void watch(int fd, unsigned events, int op) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    epoll_ctl(epfd, op, fd, &ev);
}

static void flush_pending(int fd) {
    struct pending *p = &pend[fd];
    while (p->off < p->len) {
        ssize_t n = send(fd, p->data + p->off, p->len - p->off, MSG_NOSIGNAL);
        if (n > 0) {
            p->off += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EINTR)) {
            return;
        } else {
            close_conn(fd);
            return;
        }
    }
    free(p->data);
    p->data = NULL;
    p->len = p->off = 0;
    watch(fd, EPOLLIN, EPOLL_CTL_MOD);
}

static void on_readable(int fd) {
    ssize_t n = recv(fd, buf, sizeof buf, 0);
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
        close_conn(fd);
        return;
    }
    if (n < 0) return;
    ssize_t sent = send(fd, buf, (size_t)n, MSG_NOSIGNAL);
    if (sent < 0 && errno != EAGAIN && errno != EINTR) {
        close_conn(fd);
        return;
    }
    if (sent < 0) sent = 0;
    if (sent < n) { /* keep the rest, stop reading until it is out */
        size_t rest = (size_t)(n - sent);
        pend[fd].data = malloc(rest);
        if (!pend[fd].data) {
            close_conn(fd);
            return;
        }
        memcpy(pend[fd].data, buf + sent, rest);
        pend[fd].len = rest;
        pend[fd].off = 0;
        watch(fd, EPOLLOUT, EPOLL_CTL_MOD);
    }
}

int main(int argc, char **argv) {
    int port = 0;
    unsigned max_seconds = 3600;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (strcmp(argv[i], "--port") == 0) port = atoi(argv[i + 1]);
        else if (strcmp(argv[i], "--max-seconds") == 0) max_seconds = (unsigned)atoi(argv[i + 1]);
    }
    alarm(max_seconds); /* ends the process by itself if nobody stops it */
    signal(SIGPIPE, SIG_IGN);

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    pend_cap = rl.rlim_cur == RLIM_INFINITY ? 1u << 20 : (size_t)rl.rlim_cur;
    pend = calloc(pend_cap, sizeof *pend);
    if (!pend) return 2;

    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((unsigned short)port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(lfd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(lfd, BACKLOG) < 0) {
        perror("c_epoll: listen");
        return 2;
    }
    socklen_t alen = sizeof addr;
    getsockname(lfd, (struct sockaddr *)&addr, &alen);
    printf("{\"port\": %d, \"data_first_port\": 0}\n", ntohs(addr.sin_port));
    fflush(stdout);

    epfd = epoll_create1(EPOLL_CLOEXEC);
    watch(lfd, EPOLLIN, EPOLL_CTL_ADD);
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        int n = epoll_wait(epfd, evs, MAX_EVENTS, 1000);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == lfd) {
                for (int k = 0; k < 64; k++) { /* a bounded batch per wake-up */
                    int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
                    if (c < 0) break;
                    if ((size_t)c >= pend_cap) {
                        close(c);
                        continue;
                    }
                    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    watch(c, EPOLLIN, EPOLL_CTL_ADD);
                }
            } else if (evs[i].events & EPOLLOUT) {
                flush_pending(fd);
            } else {
                on_readable(fd);
            }
        }
    }
}
