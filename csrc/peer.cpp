// Peer links: ALL_REDUCE between processes (RPC servers of one meta device, DESIGN §6).
// Each rank runs the whole step graph; at an ALL_REDUCE node one thread sends this rank's
// part to every other rank over its TCP link and receives theirs, then combines them in
// the canonical tree order (tree_sum), so every rank holds the same bits, and the same as
// the in-process group and the generic path. The links were authenticated by the RPC
// servers (lib/rpc/peer.ts) before their sockets were handed over here; what arrives on
// them is still checked: every message's header must be the one this rank expects (its
// sequence number, mode, slice and size), and payloads are read into buffers sized from
// this rank's own tensors, never from the peer's word.
#include "graph.h"
#include "threadpool.h"
#include <fcntl.h>
#include <sched.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>
#include <algorithm>
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

Group::~Group() {
  for (int fd : fds) if (fd >= 0) close(fd);
  if (wake[0] >= 0) close(wake[0]);
  if (wake[1] >= 0) close(wake[1]);
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

std::shared_ptr<Group> make_peer_group(int size, int self, const std::vector<int>& fds, int wire, std::string& err) {
  // the sockets are this function's from the start: closed on any failure
  auto refuse = [&](const char* why) -> std::shared_ptr<Group> { for (int fd : fds) if (fd >= 0) close(fd); err = why; return nullptr; };
  if (size < 2 || size > 64 || self < 0 || self >= size || (int)fds.size() != size) return refuse("bad peer group shape");
  if (wire != WIRE_F32 && wire != WIRE_F16 && wire != WIRE_Q8_0) return refuse("unknown all-reduce wire type");
  for (int r = 0; r < size; ++r) if ((r == self) != (fds[r] < 0)) return refuse("a peer group needs one socket per other rank");
  auto g = std::make_shared<Group>(size);
  g->self = self;
  g->wire = wire;
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

template <typename Check>
static bool exchange(Group& g, std::vector<PeerIo>& io, Check check, std::string& err) {
  const int64_t deadline = now_ms() + PEER_DEADLINE_MS;
  const int64_t t0 = now_ns(), pause_until = t0 + 3000, spin_until = t0 + peer_spin_ns();
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
    const int64_t now = now_ns();
    if (now < spin_until) {
      if (now >= pause_until) sched_yield(); else for (int i = 0; i < 32; ++i) _mm_pause();
      continue;
    }
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

// Reads the LINK_UP marker of every link whose dialer has not been heard from yet.
static bool await_link_up(Group& g, std::string& err) {
  const int64_t deadline = now_ms() + PEER_DEADLINE_MS;
  for (int r = 0; r < g.size; ++r) {
    if (g.confirmed[r]) continue;
    char buf[sizeof LINK_UP];
    size_t got = 0;
    while (got < sizeof buf) {
      const ssize_t k = recv(g.fds[r], buf + got, sizeof buf - got, 0);
      if (k > 0) { got += (size_t)k; continue; }
      if (k == 0 || (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR)) {
        err = "rank " + std::to_string(r) + (k == 0 ? " closed its link" : std::string(" link failed: ") + strerror(errno));
        return false;
      }
      pollfd p[2] = {{g.fds[r], POLLIN, 0}, {g.wake[0], POLLIN, 0}};
      const int64_t left = deadline - now_ms();
      if (left <= 0) { err = "rank " + std::to_string(r) + " never started its side of the link"; return false; }
      if (poll(p, 2, (int)std::min<int64_t>(left, 1000)) > 0 && p[1].revents) { err = g.why; return false; }
    }
    if (std::memcmp(buf, LINK_UP, sizeof buf) != 0) { err = "rank " + std::to_string(r) + " sent something else than the link's first bytes"; return false; }
    g.confirmed[r] = 1;
  }
  return true;
}

static inline int64_t count(const Tensor& t) { return t.ne[0] * t.ne[1] * t.ne[2] * t.ne[3]; }

bool peer_all_reduce(Group& g, const Tensor& t, const Tensor& a, float* tmp, std::string& err) {
  if (g.failing.load()) { err = g.why; return false; }
  if (!await_link_up(g, err)) { g.fail("all-reduce: " + err); return false; }
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
  if (!exchange(g, io, check, err)) { g.fail("all-reduce: " + err); return false; }

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
