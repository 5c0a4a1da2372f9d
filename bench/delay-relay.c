// A TCP relay that delays every byte by a fixed time in each direction: added latency for
// bench/hosts, where this kernel has no netem. One thread, epoll; a timerfd (nanosecond
// resolution) fires when the oldest held chunk is due. Usage:
//   delay-relay DELAY_US LISTEN_IP:PORT=TARGET_IP:PORT [...]
// Prints "ready" once every listener is up. Bench tooling, not part of weft's library.
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define MAX_PIPES 1024
#define HOLD_CAP (64 << 20)  // bytes held per direction before its reading pauses

typedef struct Chunk { struct Chunk* next; int64_t due; size_t len, off; char data[]; } Chunk;
typedef struct Pipe { int from, to; Chunk *head, *tail; size_t held; int eof, shut, reading, blocked, live; struct Pipe* peer; } Pipe;
typedef struct Listener { int fd; struct sockaddr_in target; } Listener;

static int64_t delay_ns;
static int ep, tfd;
static Pipe pipes[MAX_PIPES];
static Listener listeners[64];
static int nlisteners;

static int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }

static int parse_addr(const char* s, struct sockaddr_in* a) {
  char host[64]; const char* colon = strrchr(s, ':');
  if (!colon || colon - s >= (long)sizeof host) return -1;
  memcpy(host, s, colon - s); host[colon - s] = 0;
  memset(a, 0, sizeof *a); a->sin_family = AF_INET; a->sin_port = htons((uint16_t)atoi(colon + 1));
  return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

static void nonblock(int fd) { fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK); int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }

// epoll data: index into pipes (reading side, +1) or listener (negative)
static void watch(int fd, uint32_t ev, uint64_t tag, int op) { struct epoll_event e = {.events = ev, .data.u64 = tag}; epoll_ctl(ep, op, fd, &e); }

// The registration of a pipe's reading socket, which is also its peer's writing socket:
// readable while the pipe reads, writable while the peer waits to write.
static void update(Pipe* p) {
  watch(p->from, (p->reading && !p->eof ? EPOLLIN : 0) | (p->peer->blocked ? EPOLLOUT : 0), (uint64_t)(p - pipes) + 1, EPOLL_CTL_MOD);
}

static void arm(void) {
  int64_t next = INT64_MAX;
  for (int i = 0; i < MAX_PIPES; i++) if (pipes[i].live && !pipes[i].blocked && pipes[i].head && pipes[i].head->due < next) next = pipes[i].head->due;
  struct itimerspec its = {0};
  if (next != INT64_MAX) { its.it_value.tv_sec = next / 1000000000LL; its.it_value.tv_nsec = next % 1000000000LL; if (!its.it_value.tv_sec && !its.it_value.tv_nsec) its.it_value.tv_nsec = 1; }
  timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL);
}

static void close_pair(Pipe* p) {
  Pipe* q = p->peer;
  close(p->from); close(p->to);
  for (Pipe* x = p; x; x = (x == p ? q : NULL)) {
    for (Chunk* c = x->head; c;) { Chunk* n = c->next; free(c); c = n; }
    memset(x, 0, sizeof *x);
  }
}

// writes what is due; returns -1 if the connection broke
static int flush(Pipe* p, int64_t now) {
  while (p->head && p->head->due <= now) {
    Chunk* c = p->head;
    ssize_t k = send(p->to, c->data + c->off, c->len - c->off, MSG_NOSIGNAL);
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) { p->blocked = 1; update(p->peer); return 0; }
    if (k <= 0) return -1;
    c->off += (size_t)k;
    if (c->off < c->len) return 0;
    p->held -= c->len;
    p->head = c->next;
    if (!p->head) p->tail = NULL;
    free(c);
  }
  if (!p->head && p->eof && !p->shut) { shutdown(p->to, SHUT_WR); p->shut = 1; }
  if (!p->reading && !p->eof && p->held < HOLD_CAP / 2) { p->reading = 1; update(p); }
  return 0;
}

static void on_readable(Pipe* p) {
  char buf[1 << 16];
  for (;;) {
    ssize_t k = recv(p->from, buf, sizeof buf, 0);
    if (k > 0) {
      Chunk* c = malloc(sizeof(Chunk) + (size_t)k);
      c->next = NULL; c->due = now_ns() + delay_ns; c->len = (size_t)k; c->off = 0;
      memcpy(c->data, buf, (size_t)k);
      if (p->tail) p->tail->next = c; else p->head = c;
      p->tail = c;
      p->held += (size_t)k;
      if (p->held >= HOLD_CAP) { p->reading = 0; update(p); break; }
      continue;
    }
    if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
    p->eof = 1;  // EOF or error: pass the end on once everything held has gone
    update(p);
    break;
  }
  if (delay_ns == 0 && flush(p, now_ns()) < 0) { close_pair(p); return; }
  if (p->eof && p->peer->eof && !p->head && !p->peer->head) { close_pair(p); return; }
  arm();
}

int main(int argc, char** argv) {
  if (argc < 3) { fprintf(stderr, "usage: delay-relay DELAY_US LISTEN_IP:PORT=TARGET_IP:PORT ...\n"); return 2; }
  delay_ns = (int64_t)(atof(argv[1]) * 1000);
  prctl(PR_SET_TIMERSLACK, 1UL);  // the default 50 µs of slack would add to every delay
  ep = epoll_create1(0);
  tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK);
  watch(tfd, EPOLLIN, 0, EPOLL_CTL_ADD);
  for (int i = 2; i < argc && nlisteners < 64; i++) {
    char* eq = strchr(argv[i], '=');
    struct sockaddr_in la;
    if (!eq) { fprintf(stderr, "bad pair %s\n", argv[i]); return 2; }
    *eq = 0;
    if (parse_addr(argv[i], &la) || parse_addr(eq + 1, &listeners[nlisteners].target)) { fprintf(stderr, "bad address in %s\n", argv[i]); return 2; }
    int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr*)&la, sizeof la) || listen(fd, 64)) { perror("listen"); return 1; }
    listeners[nlisteners].fd = fd;
    watch(fd, EPOLLIN, (uint64_t)1 << 40 | (uint64_t)nlisteners, EPOLL_CTL_ADD);
    nlisteners++;
  }
  printf("ready\n");
  fflush(stdout);
  struct epoll_event evs[64];
  for (;;) {
    int n = epoll_wait(ep, evs, 64, -1);
    for (int i = 0; i < n; i++) {
      uint64_t tag = evs[i].data.u64;
      if (tag == 0) {  // the timer: write what is due
        uint64_t x; (void)!read(tfd, &x, sizeof x);
        int64_t now = now_ns();
        for (int j = 0; j < MAX_PIPES; j++) if (pipes[j].live && !pipes[j].blocked && flush(&pipes[j], now) < 0) close_pair(&pipes[j]);
        arm();
      } else if (tag >> 40) {  // a listener: accept, connect to its target, make the two pipes
        Listener* l = &listeners[tag & 0xffff];
        int c = accept(l->fd, NULL, NULL);
        if (c < 0) continue;
        int t = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(t, (struct sockaddr*)&l->target, sizeof l->target)) { close(c); close(t); continue; }
        int a = -1, b = -1;
        for (int j = 0; j < MAX_PIPES && b < 0; j++) if (!pipes[j].live) { if (a < 0) a = j; else b = j; }
        if (b < 0) { close(c); close(t); continue; }
        nonblock(c); nonblock(t);
        pipes[a] = (Pipe){.from = c, .to = t, .reading = 1, .live = 1, .peer = &pipes[b]};
        pipes[b] = (Pipe){.from = t, .to = c, .reading = 1, .live = 1, .peer = &pipes[a]};
        watch(c, EPOLLIN, (uint64_t)a + 1, EPOLL_CTL_ADD);
        watch(t, EPOLLIN, (uint64_t)b + 1, EPOLL_CTL_ADD);
      } else {
        Pipe* p = &pipes[tag - 1];
        if (p->live && (evs[i].events & EPOLLOUT) && p->peer->blocked) {
          // the socket p reads from is the one its peer writes to: room again
          p->peer->blocked = 0;
          update(p);
          if (flush(p->peer, now_ns()) < 0) { close_pair(p); continue; }
          arm();
        }
        if (p->live && (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(p);
      }
    }
  }
}
