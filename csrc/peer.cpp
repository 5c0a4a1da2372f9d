// Peer links: ALL_REDUCE between processes (RPC servers of one meta device, DESIGN §6).
// Each rank runs the whole step graph; at an ALL_REDUCE node one thread sends this rank's
// part to every other rank over its TCP link and receives theirs, then combines them in
// the canonical tree order (tree_sum), so every rank holds the same bits, and the same as
// the in-process group and the generic path. The links were authenticated by the RPC
// servers (lib/rpc/peer.ts) before their sockets were handed over here; what arrives on
// them is still checked: every message's header must be the one this rank expects (its
// sequence number, mode, slice and size), and payloads are read into buffers sized from
// this rank's own tensors, never from the peer's word. Where every rank runs on one host,
// the parts go through a shared mapping instead (see "Shared memory" below).
#include "graph.h"
#include "threadpool.h"
#include <fcntl.h>
#include <sched.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <immintrin.h>

namespace weft {

// A peer that does not send its part within this long is taken for dead. The client ends a
// group much sooner when a server stops answering (its liveness check), by aborting it.
static constexpr int64_t PEER_DEADLINE_MS = 300 * 1000;
static constexpr uint32_t PEER_MAGIC = 0x52415457;  // "WTAR"
// The first bytes on a link, sent natively by the rank that dialed once it has taken the
// socket over. The dialed rank sends nothing before it arrives: the dialer's JS side read
// the PEER reply and would have swallowed anything sent right behind it.
static constexpr char LINK_UP[8] = {'W', 'T', 'L', 'I', 'N', 'K', 'U', 'P'};

// The header before each part: sequence number, mode and wire type, this rank's slice of
// the axis (GATHER) or 0 and the element count, and the payload's bytes.
struct PeerHead { uint32_t magic, seq; int32_t mode, wire; int64_t off, len; uint64_t bytes; };
static_assert(sizeof(PeerHead) == 40, "peer header layout");

void peer_shm_release(char* p, size_t size);  // below, with the rest of the shared memory

Group::~Group() {
  for (int fd : fds) if (fd >= 0) close(fd);
  if (wake[0] >= 0) close(wake[0]);
  if (wake[1] >= 0) close(wake[1]);
  if (shm) peer_shm_release(shm, shm_size);
}

void Group::fail(const std::string& msg) {
  if (!failing.exchange(true)) why = msg;
  barrier.abort();
  if (wake[1] >= 0) { char x = 1; (void)!write(wake[1], &x, 1); }
}

int peer_adopt_socket(int fd, std::string& err) {
  const int d = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (d < 0) { err = std::string("cannot take over the peer socket: ") + strerror(errno); return -1; }
  const int fl = fcntl(d, F_GETFL);
  if (fl < 0 || fcntl(d, F_SETFL, fl | O_NONBLOCK) < 0) { err = std::string("cannot make the peer socket non-blocking: ") + strerror(errno); close(d); return -1; }
  return d;
}

std::shared_ptr<Group> make_peer_group(int size, int self, const std::vector<int>& fds, int wire, bool shared_memory, std::string& err) {
  // the sockets are this function's from the start: closed on any failure
  auto refuse = [&](const char* why) -> std::shared_ptr<Group> { for (int fd : fds) if (fd >= 0) close(fd); err = why; return nullptr; };
  if (size < 2 || size > 64 || self < 0 || self >= size || (int)fds.size() != size) return refuse("bad peer group shape");
  if (wire != WIRE_F32 && wire != WIRE_F16 && wire != WIRE_Q8_0) return refuse("unknown all-reduce wire type");
  for (int r = 0; r < size; ++r) if ((r == self) != (fds[r] < 0)) return refuse("a peer group needs one socket per other rank");
  auto g = std::make_shared<Group>(size);
  g->self = self;
  g->wire = wire;
  g->shm_wanted = shared_memory;
  g->fds = fds;  // owned from here (closed with the group)
  if (pipe2(g->wake, O_CLOEXEC | O_NONBLOCK) != 0) { err = std::string("pipe: ") + strerror(errno); return nullptr; }
  g->rx.resize(size);
  g->dec.resize(size);
  g->confirmed.assign(size, 1);
  for (int r = 0; r < size; ++r) {
    if (r > self) { g->confirmed[r] = 0; continue; }  // it dialed us: its marker comes first
    if (r == self) continue;
    if (send(fds[r], LINK_UP, sizeof LINK_UP, MSG_NOSIGNAL) != (ssize_t)sizeof LINK_UP) {  // a fresh socket takes 8 bytes
      err = std::string("cannot write to the link to rank ") + std::to_string(r) + ": " + strerror(errno);
      return nullptr;
    }
  }
  return g;
}

static size_t wire_bytes(int wire, int64_t n) {
  switch (wire) {
    case WIRE_F16: return (size_t)n * 2;
    case WIRE_Q8_0: return (size_t)((n + QK8_0 - 1) / QK8_0) * sizeof(block_q8_0);
    default: return (size_t)n * 4;
  }
}

// F16 or Q8_0 blocks (the last Q8_0 block padded with zeros).
static void wire_encode(int wire, const float* x, int64_t n, char* out) {
  if (wire == WIRE_F16) {
    uint16_t* h = (uint16_t*)out;
    for (int64_t i = 0; i < n; ++i) h[i] = fp32_to_fp16(x[i]);
    return;
  }
  const int64_t full = n / QK8_0 * QK8_0;
  if (full) quantize_row(T_Q8_0, x, out, full);
  if (full < n) {
    float pad[QK8_0] = {0};
    std::memcpy(pad, x + full, (n - full) * 4);
    quantize_row(T_Q8_0, pad, out + full / QK8_0 * sizeof(block_q8_0), QK8_0);
  }
}
static void wire_decode(int wire, const char* in, int64_t n, float* y) {
  if (wire == WIRE_F16) {
    const uint16_t* h = (const uint16_t*)in;
    for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(h[i]);
    return;
  }
  const int64_t full = n / QK8_0 * QK8_0;
  if (full) dequantize_row(T_Q8_0, in, y, full);
  if (full < n) {
    float pad[QK8_0];
    dequantize_row(T_Q8_0, in + full / QK8_0 * sizeof(block_q8_0), pad, QK8_0);
    std::memcpy(y + full, pad, (n - full) * 4);
  }
}

static int64_t now_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// One transfer with one peer: our header and payload out, theirs in.
struct PeerIo {
  int rank, fd;
  PeerHead out;
  const char* payload;
  size_t sent = 0;         // bytes of header + payload sent
  PeerHead in;
  size_t got = 0;          // bytes of header + payload received
  char* dst = nullptr;     // where its payload goes (set once its header checks out)
  size_t dst_cap = 0;
  bool head_ok = false;
};

// Sends and receives with every peer at once (a peer's part can be larger than the socket
// buffers: both directions must move together or two ranks would block each other).
// `check` validates a received header and returns where its payload goes (or null).
// The peer is computing its share of the same step, typically microseconds to a
// millisecond away: trying the sockets again (yielding the core after a few microseconds)
// beats sleeping in poll(), whose wake-up costs tens of microseconds, more in a VM whose
// idle vCPU halts. 1 ms, or WEFT_SPIN_US if longer; then poll().
static int64_t peer_spin_ns() { return std::max<int64_t>(spin_ns(), 1000000); }
// That spin, as exchange() and exchange_shm() wait: a few microseconds of pause, then the
// core yielded, until the budget is spent. again(): look once more (false: go and sleep).
struct PeerSpin {
  const int64_t t0 = now_ns(), pause_until = t0 + 3000, spin_until = t0 + peer_spin_ns();
  bool again() const {
    const int64_t now = now_ns();
    if (now >= spin_until) return false;
    if (now >= pause_until) sched_yield(); else for (int i = 0; i < 32; ++i) _mm_pause();
    return true;
  }
};

template <typename Check>
static bool exchange(Group& g, std::vector<PeerIo>& io, Check check, std::string& err) {
  const int64_t deadline = now_ms() + PEER_DEADLINE_MS;
  const PeerSpin spin;
  std::vector<pollfd> pfd;
  for (;;) {
    bool pending = false;
    for (PeerIo& p : io) {
      const size_t total_out = sizeof(PeerHead) + p.out.bytes;
      // send what the socket takes
      while (p.sent < total_out) {
        ssize_t k;
        if (p.sent < sizeof(PeerHead)) {
          iovec v[2] = {{(char*)&p.out + p.sent, sizeof(PeerHead) - p.sent}, {(void*)p.payload, p.out.bytes}};
          msghdr m{};
          m.msg_iov = v;
          m.msg_iovlen = p.out.bytes ? 2 : 1;
          k = sendmsg(p.fd, &m, MSG_NOSIGNAL);
        } else {
          const size_t at = p.sent - sizeof(PeerHead);
          k = send(p.fd, p.payload + at, p.out.bytes - at, MSG_NOSIGNAL);
        }
        if (k > 0) { p.sent += (size_t)k; continue; }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        err = "the link to rank " + std::to_string(p.rank) + " failed: " + (k < 0 ? strerror(errno) : "closed");
        return false;
      }
      // receive what has come
      for (;;) {
        const size_t want = p.got < sizeof(PeerHead) ? sizeof(PeerHead) - p.got : sizeof(PeerHead) + p.in.bytes - p.got;
        if (p.head_ok && want == 0) break;
        char* at = p.got < sizeof(PeerHead) ? (char*)&p.in + p.got : p.dst + (p.got - sizeof(PeerHead));
        const ssize_t k = recv(p.fd, at, want, 0);
        if (k > 0) {
          p.got += (size_t)k;
          if (!p.head_ok && p.got == sizeof(PeerHead)) {
            const char* why = nullptr;
            p.dst = check(p, why);
            if (!p.dst) { err = "rank " + std::to_string(p.rank) + " sent " + (why ? why : "an unexpected part"); return false; }
            p.head_ok = true;
          }
          continue;
        }
        if (k < 0 && errno == EINTR) continue;
        if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) break;
        err = "rank " + std::to_string(p.rank) + (k == 0 ? " closed its link (its server stopped?)" : std::string(" link failed: ") + strerror(errno));
        return false;
      }
      if (p.sent < total_out || !p.head_ok || p.got < sizeof(PeerHead) + p.in.bytes) pending = true;
    }
    if (!pending) return true;
    if (g.failing.load()) { err = g.why; return false; }
    if (spin.again()) continue;
    pfd.clear();
    for (PeerIo& p : io) {
      short ev = 0;
      if (p.sent < sizeof(PeerHead) + p.out.bytes) ev |= POLLOUT;
      if (!p.head_ok || p.got < sizeof(PeerHead) + p.in.bytes) ev |= POLLIN;
      if (ev) pfd.push_back({p.fd, ev, 0});
    }
    pfd.push_back({g.wake[0], POLLIN, 0});
    const int64_t left = deadline - now_ms();
    if (left <= 0) { err = "a peer did not send its part within " + std::to_string(PEER_DEADLINE_MS / 1000) + " s"; return false; }
    const int r = poll(pfd.data(), pfd.size(), (int)std::min<int64_t>(left, 1000));
    if (r < 0 && errno != EINTR) { err = std::string("poll: ") + strerror(errno); return false; }
    if (pfd.back().revents) { err = g.why.empty() ? "the group was aborted" : g.why; return false; }
  }
}

// Moves exactly n bytes over a link, outside the collectives (the LINK_UP marker, the
// transport's agreement), waiting up to PEER_DEADLINE_MS or until the group is aborted.
static bool link_io(Group& g, int r, void* buf, size_t n, bool out, std::string& err) {
  const int64_t deadline = now_ms() + PEER_DEADLINE_MS;
  for (size_t done = 0; done < n;) {
    const ssize_t k = out ? send(g.fds[r], (char*)buf + done, n - done, MSG_NOSIGNAL) : recv(g.fds[r], (char*)buf + done, n - done, 0);
    if (k > 0) { done += (size_t)k; continue; }
    if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
      err = "rank " + std::to_string(r) + (k == 0 ? " closed its link" : std::string(" link failed: ") + strerror(errno));
      return false;
    }
    pollfd p[2] = {{g.fds[r], (short)(out ? POLLOUT : POLLIN), 0}, {g.wake[0], POLLIN, 0}};
    const int64_t left = deadline - now_ms();
    if (left <= 0) { err = "rank " + std::to_string(r) + " never started its side of the link"; return false; }
    if (poll(p, 2, (int)std::min<int64_t>(left, 1000)) > 0 && p[1].revents) { err = g.why; return false; }
  }
  return true;
}

// Reads the LINK_UP marker of every link whose dialer has not been heard from yet.
static bool await_link_up(Group& g, std::string& err) {
  for (int r = 0; r < g.size; ++r) {
    if (g.confirmed[r]) continue;
    char buf[sizeof LINK_UP];
    if (!link_io(g, r, buf, sizeof buf, false, err)) return false;
    if (std::memcmp(buf, LINK_UP, sizeof buf) != 0) { err = "rank " + std::to_string(r) + " sent something else than the link's first bytes"; return false; }
    g.confirmed[r] = 1;
  }
  return true;
}

// ---------------------------------------------------------------- shared memory
// Ranks on one host (RPC servers beside each other: one per NUMA node, per GPU, or a test
// on loopback) need not push every part through the TCP stack, whose send and receive cost
// tens of microseconds each in a VM: twice per layer per token, that is most of what a
// split adds. At the first collective rank 0 creates a mapping (shm_open, a random name,
// 0600, its space reserved so that a full /dev/shm is a refusal, not a SIGBUS later) and
// offers it over the links; each rank that can open it and finds the cookie answers yes;
// rank 0 unlinks the name and tells everyone the outcome: shared memory only if all could
// (ranks on other hosts, other containers or WEFT_PEER_SHM=0 keep the links). The links
// stay open: a peer's death still shows there, and parts too large for a slot use them.
//
// The mapping holds one mailbox per ordered pair of ranks, two slots each (collectives
// alternate): the sender writes its header and payload, then publishes the collective's
// number in `ready`. A slot is written again two collectives later, when its reader has
// necessarily finished: the sender got past the collective in between, which needs the
// reader's part of it, sent only after the reader had copied this one out. What is read
// there is checked as a TCP part is (header against what this rank expects, payload
// bounded by this rank's own sizes).
static constexpr uint32_t SHM_MAGIC = 0x48535457;  // "WTSH"
static constexpr int SHM_MAX_RANKS = 8;
static constexpr size_t SHM_TOTAL = 16u << 20;     // all slots together at most
static constexpr size_t SHM_PART_MAX = 1u << 20;   // one part at most
// Mappings are memory no client's --max-memory counts (and one client may make 64 groups):
// this process maps at most this much; past it, groups keep their links.
static constexpr size_t SHM_PROCESS_MAX = 256u << 20;
static std::atomic<size_t> shm_mapped{0};
static bool shm_reserve(size_t size) {
  if (shm_mapped.fetch_add(size) + size <= SHM_PROCESS_MAX) return true;
  shm_mapped.fetch_sub(size);
  return false;
}
static void shm_release(char* p, size_t size) {
  munmap(p, size);
  shm_mapped.fetch_sub(size);
}
void peer_shm_release(char* p, size_t size) { shm_release(p, size); }
struct ShmMsg { uint32_t magic, kind, ok, part; uint64_t size; char name[40]; unsigned char cookie[16]; };
enum : uint32_t { SHM_OFFER = 1, SHM_ANSWER = 2, SHM_DECISION = 3 };
struct alignas(64) ShmSlot {
  std::atomic<uint64_t> ready;
  char pad[56];
  PeerHead head;
  char pad2[24];
};
static_assert(sizeof(ShmSlot) == 128, "shared slot layout");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared atomics must be lock-free");

// A slot's payload room (rank 0 chooses, the offer carries it): what the budget gives each
// of n(n-1) mailboxes' two slots, 4 KiB-aligned; WEFT_PEER_SHM_PART lowers it (tests: parts
// too large for a slot then cross the links, in the same run as those that fit).
static size_t shm_part_for(int n) {
  size_t part = std::min(SHM_PART_MAX, (SHM_TOTAL / ((size_t)n * (n - 1) * 2)) & ~(size_t)4095);
  if (const char* e = getenv("WEFT_PEER_SHM_PART")) {
    const long long v = atoll(e);
    if (v >= 4096) part = std::min(part, (size_t)v & ~(size_t)4095);
  }
  return part;
}
static size_t shm_bytes_for(int n, size_t part) { return 64 + (size_t)n * (n - 1) * 2 * (sizeof(ShmSlot) + part); }
static ShmSlot* shm_slot(Group& g, int from, int to, uint64_t mark) {
  const int pair = from * (g.size - 1) + (to < from ? to : to - 1);
  return (ShmSlot*)(g.shm + 64 + ((size_t)pair * 2 + (mark & 1)) * (sizeof(ShmSlot) + g.shm_part));
}

const char* peer_transport(const Group& g) {
  const int s = g.shm_state.load();
  return s == 0 ? "pending" : s > 0 ? "shared memory" : "tcp";
}

// Rank 0's side: a new mapping (null where this host cannot give one).
static char* shm_create(size_t size, char (&name)[40], unsigned char (&cookie)[16]) {
  unsigned char rnd[16];
  if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd || getrandom(cookie, sizeof cookie, 0) != (ssize_t)sizeof cookie) return nullptr;
  int at = snprintf(name, sizeof name, "/weft-");
  for (unsigned char b : rnd) at += snprintf(name + at, sizeof name - at, "%02x", b);
  if (!shm_reserve(size)) return nullptr;
  const int fd = shm_open(name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0) { shm_mapped.fetch_sub(size); return nullptr; }
  char* p = nullptr;
  if (posix_fallocate(fd, 0, (off_t)size) == 0) {
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m != MAP_FAILED) p = (char*)m;
  }
  close(fd);
  if (!p) { shm_unlink(name); shm_mapped.fetch_sub(size); return nullptr; }
  std::memcpy(p, cookie, sizeof cookie);
  return p;
}

// Another rank's side: rank 0's mapping, if this process can open it and it is the one
// offered (a name of the form rank 0 makes, this user's, the size expected, the cookie).
static char* shm_attach(const ShmMsg& offer, size_t size) {
  if (offer.size != size || size > SHM_TOTAL + 4096 * 64 || offer.name[sizeof offer.name - 1] != 0) return nullptr;
  const size_t len = strlen(offer.name);
  if (len != 6 + 32 || std::memcmp(offer.name, "/weft-", 6) != 0) return nullptr;
  for (size_t i = 6; i < len; ++i) if (!isxdigit((unsigned char)offer.name[i])) return nullptr;
  if (!shm_reserve(size)) return nullptr;
  const int fd = shm_open(offer.name, O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0);
  if (fd < 0) { shm_mapped.fetch_sub(size); return nullptr; }
  struct stat st;
  char* p = nullptr;
  if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == geteuid() && (size_t)st.st_size == size) {
    void* m = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m != MAP_FAILED) p = (char*)m;
  }
  close(fd);
  if (p && std::memcmp(p, offer.cookie, sizeof offer.cookie) != 0) { munmap(p, size); p = nullptr; }
  if (!p) shm_mapped.fetch_sub(size);
  return p;
}

// Agrees with every rank whether parts go through shared memory (g.shm_state). False only
// when a link failed or a rank broke the exchange.
static bool agree_shm(Group& g, std::string& err) {
  const int n = g.size;
  const bool can = g.shm_wanted && n <= SHM_MAX_RANKS;
  size_t part = g.self == 0 ? shm_part_for(n) : 0, size = 0;
  auto bad = [&](int r, const ShmMsg& m, uint32_t kind) {
    if (m.magic == SHM_MAGIC && m.kind == kind && m.ok <= 1) return false;
    err = "rank " + std::to_string(r) + " broke the setup of the group's transport";
    return true;
  };
  char* map = nullptr;
  bool all = false;
  if (g.self == 0) {
    ShmMsg offer{SHM_MAGIC, SHM_OFFER, 0, (uint32_t)part, 0, {}, {}};
    size = shm_bytes_for(n, part);
    if (can) map = shm_create(size, offer.name, offer.cookie);
    if (map) { offer.ok = 1; offer.size = size; }
    for (int r = 1; r < n; ++r) if (!link_io(g, r, &offer, sizeof offer, true, err)) { if (map) shm_unlink(offer.name); goto fail; }
    all = map != nullptr;
    for (int r = 1; r < n; ++r) {
      ShmMsg a{};
      if (!link_io(g, r, &a, sizeof a, false, err) || bad(r, a, SHM_ANSWER)) { if (map) shm_unlink(offer.name); goto fail; }
      all = all && a.ok == 1;
    }
    if (map) shm_unlink(offer.name);  // every rank that will use it has it mapped
    ShmMsg d{SHM_MAGIC, SHM_DECISION, all ? 1u : 0u, 0, 0, {}, {}};
    for (int r = 1; r < n; ++r) if (!link_io(g, r, &d, sizeof d, true, err)) goto fail;
  } else {
    ShmMsg offer{};
    if (!link_io(g, 0, &offer, sizeof offer, false, err) || bad(0, offer, SHM_OFFER)) goto fail;
    part = offer.part;
    size = shm_bytes_for(n, part);
    if (can && offer.ok && part >= 4096 && part <= SHM_PART_MAX && part % 4096 == 0) map = shm_attach(offer, size);
    ShmMsg a{SHM_MAGIC, SHM_ANSWER, map ? 1u : 0u, 0, 0, {}, {}};
    ShmMsg d{};
    if (!link_io(g, 0, &a, sizeof a, true, err) || !link_io(g, 0, &d, sizeof d, false, err) || bad(0, d, SHM_DECISION)) goto fail;
    all = d.ok == 1 && map;
    if (d.ok == 1 && !map) { err = "rank 0 decided on shared memory this rank could not open"; goto fail; }
  }
  if (all) { g.shm = map; g.shm_size = size; g.shm_part = part; g.shm_state.store(1); }
  else { if (map) shm_release(map, size); g.shm_state.store(-1); }
  return true;
fail:
  if (map) shm_release(map, size);
  return false;
}

// exchange() through the mapping. Every part fits a slot (the caller checked).
template <typename Check>
static bool exchange_shm(Group& g, std::vector<PeerIo>& io, Check check, std::string& err) {
  const uint64_t mark = ++g.shm_count;
  for (PeerIo& p : io) {
    if (p.out.bytes > g.shm_part) { err = "a part larger than a shared slot"; return false; }
    ShmSlot* s = shm_slot(g, g.self, p.rank, mark);
    s->head = p.out;
    if (p.out.bytes) std::memcpy((char*)(s + 1), p.payload, p.out.bytes);
    s->ready.store(mark, std::memory_order_release);
  }
  const int64_t deadline = now_ms() + PEER_DEADLINE_MS;
  const PeerSpin spin;
  std::vector<pollfd> pfd;
  for (;;) {
    bool pending = false;
    for (PeerIo& p : io) {
      if (p.head_ok) continue;
      ShmSlot* s = shm_slot(g, p.rank, g.self, mark);
      if (s->ready.load(std::memory_order_acquire) != mark) { pending = true; continue; }
      std::memcpy(&p.in, &s->head, sizeof p.in);  // copied once: the peer may still write there
      const char* why = nullptr;
      p.dst = check(p, why);
      if (p.dst && p.in.bytes > g.shm_part) { p.dst = nullptr; why = "a part larger than a shared slot"; }
      if (!p.dst) { err = "rank " + std::to_string(p.rank) + " sent " + (why ? why : "an unexpected part"); return false; }
      if (p.in.bytes) std::memcpy(p.dst, (const char*)(s + 1), p.in.bytes);
      p.head_ok = true;
    }
    if (!pending) return true;
    if (g.failing.load()) { err = g.why; return false; }
    if (spin.again()) continue;
    // a long wait: the links are watched (nothing comes there now but a peer's end), and
    // the slots looked at every millisecond
    pfd.clear();
    for (PeerIo& p : io) if (!p.head_ok) pfd.push_back({p.fd, POLLIN, 0});
    pfd.push_back({g.wake[0], POLLIN, 0});
    if (now_ms() > deadline) { err = "a peer did not send its part within " + std::to_string(PEER_DEADLINE_MS / 1000) + " s"; return false; }
    const int r = poll(pfd.data(), pfd.size(), 1);
    if (r < 0 && errno != EINTR) { err = std::string("poll: ") + strerror(errno); return false; }
    if (pfd.back().revents) { err = g.why.empty() ? "the group was aborted" : g.why; return false; }
    for (size_t i = 0; i + 1 < pfd.size(); ++i) {
      if (!pfd[i].revents) continue;
      char c;
      const ssize_t k = recv(pfd[i].fd, &c, 1, MSG_PEEK);
      if (k < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) continue;
      int rank = 0;
      for (PeerIo& p : io) if (p.fd == pfd[i].fd) rank = p.rank;
      err = "rank " + std::to_string(rank) + (k == 0 ? " closed its link (its server stopped?)" : k < 0 ? std::string(" link failed: ") + strerror(errno) : " sent bytes on its link while parts go through shared memory");
      return false;
    }
  }
}

static inline int64_t count(const Tensor& t) { return t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]; }

bool peer_all_reduce(Group& g, const Tensor& t, const Tensor& a, float* tmp, std::string& err) {
  if (g.failing.load()) { err = g.why; return false; }
  if (!await_link_up(g, err) || (g.shm_state.load() == 0 && !agree_shm(g, err))) { g.fail("all-reduce: " + err); return false; }
  const int n = g.size, self = g.self;
  const int mode = (int)t.params[2];
  const bool gather = mode == COLL_GATHER;
  // a reduce-scatter that knows every rank's slice sends each peer only the slice it keeps
  const bool sliced = mode == COLL_REDUCE_SCATTER && t.nparams == 8 + n;
  // GATHER moves results, always as F32; partial sums travel as the group's wire type
  const int wire = gather ? WIRE_F32 : g.wire;
  const int64_t E = count(a);
  const int64_t inner = (int64_t)t.params[3], axis = (int64_t)t.params[4];
  const int64_t off = (int64_t)t.params[5], len = (int64_t)t.params[6];
  // outer blocks of the axis (GATHER: of the whole result; REDUCE_SCATTER: of the whole partial)
  const int64_t outer = axis ? (gather ? count(t) : E) / (inner * axis) : 0;
  auto bound = [&](int r) { return (int64_t)t.params[7 + r]; };
  // what goes to each peer, and how many elements come back from each
  g.txs.resize(n);
  std::vector<const char*> out_data(n, nullptr);
  std::vector<size_t> out_bytes(n, 0);
  int64_t in_count = gather ? 0 : sliced ? outer * len * inner : E;  // per peer (GATHER: from its header)
  auto encode = [&](int r, const float* x, int64_t cnt) {
    if (wire == WIRE_F32) { out_data[r] = (const char*)x; out_bytes[r] = (size_t)cnt * 4; return; }
    g.txs[r].resize(wire_bytes(wire, cnt));
    wire_encode(wire, x, cnt, g.txs[r].data());
    out_data[r] = g.txs[r].data();
    out_bytes[r] = g.txs[r].size();
  };
  // this rank's own part, as every rank will add it (rounded through the wire type too)
  const char* own = a.data;
  int64_t own_count = E;
  if (sliced) {
    // peer q gets rows [b_q, b_q+1) of every outer block of this rank's partial, packed
    g.packs.resize(n);
    for (int q = 0; q < n; ++q) {
      const int64_t lo = bound(q), w = bound(q + 1) - lo;
      g.packs[q].resize((size_t)(outer * w * inner));
      for (int64_t o = 0; o < outer; ++o)
        std::memcpy(g.packs[q].data() + o * w * inner, a.data + (o * axis + lo) * inner * 4, (size_t)(w * inner * 4));
      encode(q, g.packs[q].data(), outer * w * inner);  // q == self: its own slice, rounded like the others
    }
    own = (const char*)g.packs[self].data();
    own_count = outer * len * inner;
  } else if (!gather) {
    // the whole partial, encoded once for every peer
    encode(self, (const float*)a.data, E);
    for (int q = 0; q < n; ++q) { out_data[q] = out_data[self]; out_bytes[q] = out_bytes[self]; }
  } else {
    for (int q = 0; q < n; ++q) { out_data[q] = a.data; out_bytes[q] = (size_t)E * 4; }
  }
  if (!gather && wire != WIRE_F32) {
    g.dec[self].resize((size_t)own_count);
    wire_decode(wire, g.txs[self].data(), own_count, g.dec[self].data());
    own = (const char*)g.dec[self].data();
  }
  const size_t in_bytes = gather ? 0 : wire_bytes(wire, in_count);
  const uint32_t seq = g.seq++;
  std::vector<PeerIo> io;
  for (int r = 0; r < n; ++r) {
    if (r == self) continue;
    PeerIo p;
    p.rank = r;
    p.fd = g.fds[r];
    // the header names the slice it carries: the sender's (GATHER), the receiver's (sliced
    // REDUCE_SCATTER), or the whole partial
    const int64_t h_off = gather ? off : sliced ? bound(r) : 0, h_len = gather ? len : sliced ? bound(r + 1) - bound(r) : E;
    p.out = {PEER_MAGIC, seq, mode, wire, h_off, h_len, (uint64_t)out_bytes[r]};
    p.payload = out_data[r];
    // the most a peer's part may be: the whole tensor (GATHER), or exactly what this rank expects
    p.dst_cap = gather ? (size_t)count(t) * 4 : in_bytes;
    if (g.rx[r].size() < p.dst_cap) g.rx[r].resize(p.dst_cap);
    io.push_back(p);
  }
  auto check = [&](PeerIo& p, const char*& why) -> char* {
    const PeerHead& h = p.in;
    if (h.magic != PEER_MAGIC) { why = "a malformed header"; return nullptr; }
    if (h.seq != seq) { why = "the part of another collective (the ranks run different steps)"; return nullptr; }
    if (h.mode != mode || h.wire != wire) { why = "a part of another kind (mode or wire type)"; return nullptr; }
    if (gather) {
      if (h.off < 0 || h.len < 0 || h.off > axis || h.len > axis - h.off) { why = "a slice outside the axis"; return nullptr; }
      if (h.bytes != (uint64_t)(h.len * inner * outer * 4) || h.bytes > p.dst_cap) { why = "a slice of the wrong size"; return nullptr; }
    } else if (h.off != (sliced ? off : 0) || h.len != (sliced ? len : E) || h.bytes != in_bytes) {
      why = "a partial of another size or slice";
      return nullptr;
    }
    return g.rx[p.rank].data();
  };
  // through shared memory when the largest part any rank may send here fits a slot (the
  // same bound on every rank: they all choose alike)
  const size_t most = gather ? (size_t)count(t) * 4 : wire_bytes(wire, E);
  const bool shared = g.shm_state.load() > 0 && most <= g.shm_part;
  if (!(shared ? exchange_shm(g, io, check, err) : exchange(g, io, check, err))) { g.fail("all-reduce: " + err); return false; }

  if (gather) {
    // every slice into place; together they must cover the axis exactly once
    std::vector<std::pair<int64_t, int64_t>> cover{{off, len}};
    auto place = [&](const char* src, int64_t o_off, int64_t o_len) {
      for (int64_t o = 0; o < outer; ++o)
        std::memcpy(t.data + (o * axis + o_off) * inner * 4, src + o * o_len * inner * 4, o_len * inner * 4);
    };
    place(a.data, off, len);
    for (PeerIo& p : io) { place(g.rx[p.rank].data(), p.in.off, p.in.len); cover.push_back({p.in.off, p.in.len}); }
    std::sort(cover.begin(), cover.end());
    int64_t at = 0;
    for (auto& c : cover) { if (c.first != at) break; at += c.second; }
    if (at != axis) { err = "the ranks' slices do not cover the axis"; g.fail("all-gather: " + err); return false; }
    return true;
  }
  const char* srcs[64];
  for (int r = 0; r < n; ++r) {
    if (r == self) { srcs[r] = own; continue; }
    if (wire == WIRE_F32) srcs[r] = g.rx[r].data();
    else {
      g.dec[r].resize((size_t)in_count);
      wire_decode(wire, g.rx[r].data(), in_count, g.dec[r].data());
      srcs[r] = (const char*)g.dec[r].data();
    }
  }
  constexpr int64_t CH = 64;
  if (mode == COLL_SUM || sliced) {
    // every source holds exactly the elements of the result, in its order
    const int64_t N = count(t);
    for (int64_t e = 0; e < N; e += CH) {
      const int64_t m = std::min(CH, N - e);
      tree_sum(srcs, 0, n, e, m, tmp, tmp + CH);
      std::memcpy(t.data + e * 4, tmp, m * 4);
    }
    return true;
  }
  // REDUCE_SCATTER from whole partials: this rank's slice of the sum
  const int64_t row = len * inner;
  for (int64_t e = 0; e < outer * row;) {
    const int64_t o = e / row, i = e % row, m = std::min({CH, outer * row - e, row - i});
    tree_sum(srcs, 0, n, (o * axis + off) * inner + i, m, tmp, tmp + CH);
    std::memcpy(t.data + e * 4, tmp, m * 4);
    e += m;
  }
  return true;
}

}  // namespace weft
