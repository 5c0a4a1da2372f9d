// A client's RPC session served on a native thread (lib/rpc/server.ts, DESIGN §6).
// Generating a token is one COMPUTE per server (its inputs inline, the reads of its output
// named): in JS each cost the server a wake of its event loop, a promise chain and writes,
// about half a millisecond of CPU per token, taken from the compute threads of a box whose
// cores are all computing. Once a session has run its first step, the server hands its
// socket to a lane: a thread of its own that reads the frames, runs the repeated steps
// (COMPUTE of a graph already sent, GET of plain memory, PING) itself, as worker 0 of the
// device's pool, and writes their replies. Everything else, and anything the lane
// does not find exactly as it expects (an unknown buffer, a graph sent along, a range out
// of bounds, a malformed body), goes to the JS side as a frame, where the full checks
// and errors are; a step runs natively only while no forwarded frame is unfinished, so
// requests still run in the order the client sent them. Replies of both sides leave
// through the lane's queue, one frame at a time. What arrives is hostile: every length
// is checked against what is left before it is read.
#include <napi.h>
#include "graph.h"
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <sys/socket.h>
#include <unistd.h>
#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>

namespace weft {

Context* native_context(const Napi::Value& v);
std::shared_ptr<Plan> context_plan(Context* ctx, double uid);

namespace {

// lib/rpc/protocol.ts
constexpr uint32_t MAGIC = 0x31465457;
constexpr size_t HEADER = 20;
constexpr uint8_t KIND_REQUEST = 0, KIND_REPLY = 1;
constexpr uint8_t CMD_GET = 7, CMD_COMPUTE = 11, CMD_PING = 15;
constexpr uint32_t MAX_INPUTS = 4096, MAX_READS = 64;
constexpr uint8_t FLAG_READS = 2;  // COMPUTE's flags (ComputeFlag): GRAPH 1, READS 2

struct Head { uint8_t kind, cmd; uint32_t id; uint64_t len; };

// Events for the JS side: a frame to handle, the connection gone, or a malformed stream.
enum EventType { EV_FRAME = 0, EV_CLOSED = 1, EV_MALFORMED = 2 };
struct Event { int type; Head h; std::vector<char> body; std::string message; };

// Bounds-checked reads of a frame body; any short read makes ok false.
struct In {
  const char* p; const char* e; bool ok = true;
  template <class T> T get() {
    T v{};
    if ((size_t)(e - p) < sizeof(T)) { ok = false; p = e; return v; }
    memcpy(&v, p, sizeof(T));
    p += sizeof(T);
    return v;
  }
  const char* take(uint64_t n) {
    if ((uint64_t)(e - p) < n) { ok = false; p = e; return nullptr; }
    const char* at = p;
    p += n;
    return at;
  }
  bool done() const { return ok && p == e; }
};

std::vector<char> frame(uint8_t kind, uint8_t cmd, uint32_t id, size_t body) {
  std::vector<char> f(HEADER + body);
  const uint16_t zero = 0;
  const uint64_t len = body;
  memcpy(f.data(), &MAGIC, 4);
  f[4] = (char)kind;
  f[5] = (char)cmd;
  memcpy(f.data() + 6, &zero, 2);
  memcpy(f.data() + 8, &id, 4);
  memcpy(f.data() + 12, &len, 8);
  return f;
}

// A reply: status, error code and message (u32-length strings), then `payload` bytes.
std::vector<char> reply(uint8_t cmd, uint32_t id, uint8_t status, const std::string& code, const std::string& msg, size_t payload) {
  const size_t head = 1 + 4 + code.size() + 4 + msg.size();
  std::vector<char> f = frame(KIND_REPLY, cmd, id, head + payload);
  char* p = f.data() + HEADER;
  const uint32_t cl = (uint32_t)code.size(), ml = (uint32_t)msg.size();
  *p++ = (char)status;
  memcpy(p, &cl, 4); p += 4;
  memcpy(p, code.data(), cl); p += cl;
  memcpy(p, &ml, 4); p += 4;
  memcpy(p, msg.data(), ml);
  return f;
}
constexpr size_t OK_HEAD = 9;  // status OK, empty code and message

struct GraphBind { Context* ctx; std::shared_ptr<Plan> plan; uint32_t device; };

struct Lane {
  int fd = -1;
  uint64_t max_frame = 0;
  int wake[2] = {-1, -1};
  Napi::ThreadSafeFunction tsfn;
  std::thread th;
  std::mutex mu;  // the reply queue and the bindings
  std::deque<std::vector<char>> out;
  size_t out_at = 0, out_bytes = 0;
  std::unordered_map<uint64_t, GraphBind> graphs;
  std::unordered_map<uint32_t, int64_t> bufs;  // the client's buffer id → native buffer id
  std::atomic<int> close_mode{0};  // 1: send what is queued, then close; 2: close now
  std::atomic<uint64_t> forwarded{0}, finished{0};
  std::atomic<int64_t> js_bytes{0};
  bool broken = false;  // a malformed stream: nothing more is read
  std::atomic<bool> busy{false};  // a step runs here (the JS side sends the heartbeats and flushes them)
  std::vector<char> in;
  size_t have = 0;

  ~Lane() {
    if (th.joinable()) { close_mode.store(2); poke(); th.join(); }
    if (wake[0] >= 0) close(wake[0]);
    if (wake[1] >= 0) close(wake[1]);
  }
  void poke() { if (wake[1] >= 0) { char x = 1; (void)!write(wake[1], &x, 1); } }

  void queue(std::vector<char>&& f) {
    std::lock_guard<std::mutex> lk(mu);
    out_bytes += f.size();
    out.push_back(std::move(f));
  }
  // Sends what the socket takes now; false if the connection failed. Either thread may
  // call it (the JS one sends heartbeats while a step runs here): under the lock, which
  // also guards the descriptor's closing (a closed number may be reused at once).
  bool flush(std::string& why) {
    std::lock_guard<std::mutex> lk(mu);
    if (fd < 0) return false;
    while (!out.empty()) {
      std::vector<char>& f = out.front();
      const ssize_t k = send(fd, f.data() + out_at, f.size() - out_at, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (k < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
        if (errno == EINTR) continue;
        why = strerror(errno);
        return false;
      }
      out_at += (size_t)k;
      if (out_at == f.size()) { out_bytes -= f.size(); out.pop_front(); out_at = 0; }
    }
    return true;
  }
  bool out_empty() { std::lock_guard<std::mutex> lk(mu); return out.empty(); }
  size_t queued() { std::lock_guard<std::mutex> lk(mu); return out_bytes; }

  bool emit(Event* ev) {
    if (tsfn.NonBlockingCall(ev, deliver) != napi_ok) { delete ev; return false; }
    return true;
  }
  static void deliver(Napi::Env env, Napi::Function fn, Event* ev);

  // Takes one whole frame off `in`: 1 taken, 0 not whole yet, -1 malformed (reported).
  int take() {
    if (have < HEADER) return 0;
    uint32_t magic; Head h; uint64_t len;
    memcpy(&magic, in.data(), 4);
    h.kind = (uint8_t)in[4];
    h.cmd = (uint8_t)in[5];
    memcpy(&h.id, in.data() + 8, 4);
    memcpy(&len, in.data() + 12, 8);
    h.len = len;
    if (magic != MAGIC || len > max_frame) {
      broken = true;
      emit(new Event{EV_MALFORMED, h, {}, magic != MAGIC ? "not a weft RPC frame (bad magic)" :
        "frame of " + std::to_string(len) + " bytes is larger than the " + std::to_string(max_frame) + " allowed"});
      return -1;
    }
    if (have < HEADER + len) return 0;  // (the buffer grows as the bytes come, not on a header's word)
    const char* body = in.data() + HEADER;
    const bool idle = finished.load(std::memory_order_acquire) == forwarded.load(std::memory_order_acquire);
    if (!(h.kind == KIND_REQUEST && idle && serve(h, body))) {
      js_bytes.fetch_add((int64_t)len);
      forwarded.fetch_add(1);
      if (!emit(new Event{EV_FRAME, h, std::vector<char>(body, body + len), {}})) broken = true;
    }
    const size_t used = HEADER + len;
    memmove(in.data(), in.data() + used, have - used);
    have -= used;
    if (in.size() > (8u << 20) && have < (64u << 10)) { in.resize(64 << 10); in.shrink_to_fit(); }  // after a big frame
    return 1;
  }

  // A span of a client's buffer: a step's input (data: its bytes) or a read.
  struct Span { uint32_t id; uint64_t off, len; const char* data; int64_t nid; char* at; };
  // The spans' buffers by the client's ids, pinned, every range checked (inputs not into
  // read-only memory); false (nothing pinned) if one is not as expected.
  bool pin_spans(std::vector<Span>& spans, size_t n_inputs, std::vector<int64_t>& pins) {
    {
      std::lock_guard<std::mutex> lk(mu);
      for (auto& x : spans) {
        auto b = bufs.find(x.id);
        if (b == bufs.end()) return false;
        x.nid = b->second;
      }
    }
    for (auto& x : spans) pins.push_back(x.nid);
    if (!pin_buffer_ids(pins)) { pins.clear(); return false; }
    for (size_t i = 0; i < spans.size(); ++i) {
      Span& x = spans[i];
      BufferInfo b;
      if (!lookup_buffer(x.nid, &b) || (i < n_inputs && b.read_only) || x.off > b.size || x.len > b.size - x.off) {
        unpin_buffer_ids(pins);
        pins.clear();
        return false;
      }
      x.at = b.base + x.off;
    }
    return true;
  }
  // An OK reply whose payload is the reads' bytes, in order.
  void reply_reads(const Head& h, const Span* reads, size_t n, uint64_t total) {
    std::vector<char> f = reply(h.cmd, h.id, 0, "", "", total);
    char* at = f.data() + HEADER + OK_HEAD;
    for (size_t i = 0; i < n; ++i) { memcpy(at, reads[i].at, reads[i].len); at += reads[i].len; }
    queue(std::move(f));
  }

  // A repeated step's request, run here; false (nothing done that matters) to hand it to JS.
  bool serve(const Head& h, const char* body) {
    In r{body, body + h.len};
    if (h.cmd == CMD_PING) {
      if (h.len) return false;
      queue(reply(h.cmd, h.id, 0, "", "", 0));
      return true;
    }
    if (h.cmd == CMD_GET) {
      std::vector<Span> one(1);
      one[0].id = r.get<uint32_t>();
      one[0].off = r.get<uint64_t>();
      one[0].len = r.get<uint64_t>();
      std::vector<int64_t> pins;
      if (!r.done() || one[0].len > max_frame - 64 || !pin_spans(one, 0, pins)) return false;
      reply_reads(h, one.data(), 1, one[0].len);
      unpin_buffer_ids(pins);
      return true;
    }
    if (h.cmd != CMD_COMPUTE) return false;
    const uint32_t device = r.get<uint32_t>();
    const uint64_t gid = r.get<uint64_t>();
    const uint8_t flags = r.get<uint8_t>();
    const uint32_t n = r.get<uint32_t>();
    if (!r.ok || (flags & ~FLAG_READS) || n > MAX_INPUTS) return false;  // a graph sent along: JS decodes it
    // the inputs (written before the step), then the reads (the reply's payload after it)
    std::vector<Span> spans(n);
    for (auto& x : spans) {
      x.id = r.get<uint32_t>();
      x.off = r.get<uint64_t>();
      x.len = r.get<uint64_t>();
      x.data = r.take(x.len);
    }
    uint64_t total = 0;
    if (flags & FLAG_READS) {
      const uint32_t k = r.get<uint32_t>();
      if (!r.ok || k > MAX_READS) return false;
      for (uint32_t i = 0; i < k; ++i) {
        Span x{};
        x.id = r.get<uint32_t>();
        x.off = r.get<uint64_t>();
        x.len = r.get<uint64_t>();
        if (x.len > max_frame) return false;
        total += x.len;
        spans.push_back(x);
      }
      if (total > max_frame - 64) return false;
    }
    if (!r.done()) return false;
    GraphBind g;
    {
      std::lock_guard<std::mutex> lk(mu);
      auto it = graphs.find(gid);
      if (it == graphs.end() || it->second.device != device) return false;
      g = it->second;
    }
    // every span checked before anything is written; the buffers stay pinned through the step
    std::vector<int64_t> pins;
    if (!pin_spans(spans, n, pins)) return false;
    for (uint32_t i = 0; i < n; ++i) memcpy(spans[i].at, spans[i].data, spans[i].len);
    std::string err;
    busy.store(true);
    const NativeRun ran = run_plan_native(g.ctx, g.plan, err);
    busy.store(false);
    if (ran == NativeRun::OK) reply_reads(h, spans.data() + n, spans.size() - n, total);
    unpin_buffer_ids(pins);
    if (ran == NativeRun::REFUSED) return false;  // a buffer was freed: JS says so (the inputs it writes again are the same)
    if (ran == NativeRun::FAILED) {
      { std::lock_guard<std::mutex> lk(mu); graphs.erase(gid); }  // the client sends it again
      queue(reply(h.cmd, h.id, 1, "COMPUTE_FAILED", err.substr(0, 4000), 0));
    }
    return true;
  }

  // After a reply the next request is usually a client's turnaround away: trying the
  // socket for a while (yielding the core) beats a sleep in poll(), whose wake-up costs
  // tens of microseconds, more in a VM whose idle vCPU halts (one server, small-q8_0 tg:
  // 146 -> 160 t/s; two servers and their client sharing two cores: no change either
  // way). 300 us, or WEFT_LANE_SPIN_US (0: none). true: bytes came; why set: gone.
  bool spin_for_next(std::string& why) {
    static const int64_t spin = [] {
      const char* e = getenv("WEFT_LANE_SPIN_US");
      return (int64_t)(std::max(0.0, std::min(e && *e ? atof(e) : 300.0, 10000.0)) * 1000);
    }();
    if (spin <= 0 || have == in.size()) return false;
    const int64_t until = now_ns() + spin;
    while (close_mode.load(std::memory_order_relaxed) == 0 && now_ns() < until) {
      const ssize_t k = recv(fd, in.data() + have, in.size() - have, MSG_DONTWAIT);
      if (k > 0) { have += (size_t)k; return true; }
      if (k == 0) { why = "closed"; return false; }
      if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) { why = strerror(errno); return false; }
      sched_yield();
    }
    return false;
  }

  void loop() {
    std::string why;
    in.resize(64 << 10);
    for (;;) {
      const int mode = close_mode.load(std::memory_order_acquire);
      if (mode == 2) break;
      if (!flush(why)) break;
      if (mode == 1 && out_empty()) break;
      const bool reading = mode == 0 && !broken && queued() <= max_frame && js_bytes.load() <= (int64_t)(2 * max_frame);
      if (reading) {
        int t;
        while ((t = take()) == 1) {
          if (!flush(why)) goto gone;
          if (queued() > max_frame || js_bytes.load() > (int64_t)(2 * max_frame)) break;
        }
        if (t == 1) continue;  // stopped for back-pressure: look again after a poll
        if (spin_for_next(why)) continue;
        if (!why.empty()) break;
      }
      pollfd p[2] = {{fd, (short)((reading ? POLLIN : 0) | (out_empty() ? 0 : POLLOUT)), 0}, {wake[0], POLLIN, 0}};
      if (poll(p, 2, 1000) < 0 && errno != EINTR) { why = strerror(errno); break; }
      if (p[1].revents) { char buf[64]; while (read(wake[0], buf, sizeof buf) > 0) {} }
      if (p[0].revents & (POLLERR | POLLNVAL)) { why = "the connection failed"; break; }
      if (reading && (p[0].revents & (POLLIN | POLLHUP))) {
        if (have == in.size()) in.resize(std::min<size_t>(in.size() * 2, HEADER + max_frame));
        const ssize_t k = recv(fd, in.data() + have, in.size() - have, 0);
        if (k == 0) { why = "closed"; break; }
        if (k < 0) {
          if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) continue;
          why = strerror(errno);
          break;
        }
        have += (size_t)k;
      }
    }
  gone:
    {
      std::lock_guard<std::mutex> lk(mu);
      close(fd);
      fd = -1;
    }
    emit(new Event{EV_CLOSED, {}, {}, why});
    tsfn.Release();
  }
};

void Lane::deliver(Napi::Env env, Napi::Function fn, Event* ev) {
  std::unique_ptr<Event> e(ev);
  if (!env) return;
  Napi::Value arg;
  if (e->type == EV_FRAME && e->body.size() < (64u << 10)) {
    arg = Napi::Buffer<char>::Copy(env, e->body.data(), e->body.size());  // (an empty external buffer would be detached)
  } else if (e->type == EV_FRAME) {
    auto* body = new std::vector<char>(std::move(e->body));
    arg = Napi::Buffer<char>::New(env, body->data(), body->size(), [](Napi::Env, char*, std::vector<char>* v) { delete v; }, body);
  } else arg = Napi::String::New(env, e->message);
  fn.Call({Napi::Number::New(env, e->type), Napi::Number::New(env, e->h.kind), Napi::Number::New(env, e->h.cmd),
           Napi::Number::New(env, e->h.id), arg});
}

Lane* lane_of(const Napi::Value& v) { return v.As<Napi::External<Lane>>().Data(); }

// laneOpen(fd, maxFrame, onEvent(type, kind, cmd, id, body | message)) -> lane: takes a
// duplicate of the socket (Node's handle is closed by the caller) and starts its thread.
Napi::Value LaneOpen(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = info[0].As<Napi::Number>().Int32Value();
  const double max_frame = info[1].As<Napi::Number>().DoubleValue();
  if (fd < 0) throw Napi::Error::New(env, "this platform does not expose socket descriptors");
  if (!(max_frame >= 4096 && max_frame <= 9007199254740991.0)) throw Napi::Error::New(env, "bad frame limit");
  std::string err;
  auto lane = std::make_unique<Lane>();
  lane->fd = peer_adopt_socket(fd, err);
  if (lane->fd < 0) throw Napi::Error::New(env, err);
  if (pipe2(lane->wake, O_CLOEXEC | O_NONBLOCK) != 0) { close(lane->fd); throw Napi::Error::New(env, std::string("pipe: ") + strerror(errno)); }
  lane->max_frame = (uint64_t)max_frame;
  lane->tsfn = Napi::ThreadSafeFunction::New(env, info[2].As<Napi::Function>(), "weft-lane", 0, 1);
  Lane* l = lane.get();
  l->th = std::thread([l] { l->loop(); });
  return Napi::External<Lane>::New(env, lane.release(), [](Napi::Env, Lane* l) { delete l; });
}

// laneSend(lane, parts): one frame, queued whole (frames of both sides never interleave)
Napi::Value LaneSend(const Napi::CallbackInfo& info) {
  Lane* l = lane_of(info[0]);
  Napi::Array parts = info[1].As<Napi::Array>();
  size_t n = 0;
  for (uint32_t i = 0; i < parts.Length(); ++i) n += parts.Get(i).As<Napi::Uint8Array>().ByteLength();
  std::vector<char> f(n);
  size_t at = 0;
  for (uint32_t i = 0; i < parts.Length(); ++i) {
    Napi::Uint8Array a = parts.Get(i).As<Napi::Uint8Array>();
    memcpy(f.data() + at, a.Data(), a.ByteLength());
    at += a.ByteLength();
  }
  if (l->close_mode.load() != 0) return info.Env().Undefined();
  l->queue(std::move(f));
  // sent from here where the socket takes it (a heartbeat while the lane's thread runs a
  // step); what it does not take, the lane's thread sends
  std::string why;
  l->flush(why);
  if (!l->out_empty()) l->poke();
  return info.Env().Undefined();
}

// laneDone(lane, bytes): a forwarded frame of that many body bytes is finished (replied to)
Napi::Value LaneDone(const Napi::CallbackInfo& info) {
  Lane* l = lane_of(info[0]);
  l->js_bytes.fetch_sub((int64_t)info[1].As<Napi::Number>().DoubleValue());
  l->finished.fetch_add(1, std::memory_order_release);
  l->poke();
  return info.Env().Undefined();
}

// laneBindGraph(lane, gid, context, planUid, device) -> bool: the graph's steps may run here
Napi::Value LaneBindGraph(const Napi::CallbackInfo& info) {
  Lane* l = lane_of(info[0]);
  Context* ctx = native_context(info[2]);
  std::shared_ptr<Plan> plan = ctx ? context_plan(ctx, info[3].As<Napi::Number>().DoubleValue()) : nullptr;
  if (!plan) return Napi::Boolean::New(info.Env(), false);
  std::lock_guard<std::mutex> lk(l->mu);
  l->graphs[(uint64_t)info[1].As<Napi::Number>().DoubleValue()] = {ctx, plan, info[4].As<Napi::Number>().Uint32Value()};
  return Napi::Boolean::New(info.Env(), true);
}
Napi::Value LaneUnbindGraph(const Napi::CallbackInfo& info) {
  Lane* l = lane_of(info[0]);
  std::lock_guard<std::mutex> lk(l->mu);
  l->graphs.erase((uint64_t)info[1].As<Napi::Number>().DoubleValue());
  return info.Env().Undefined();
}
// laneBindBuffer(lane, id, nativeId | -1): a plain buffer steps may write inputs to and GET reads
Napi::Value LaneBindBuffer(const Napi::CallbackInfo& info) {
  Lane* l = lane_of(info[0]);
  const uint32_t id = info[1].As<Napi::Number>().Uint32Value();
  const int64_t nid = info[2].As<Napi::Number>().Int64Value();
  std::lock_guard<std::mutex> lk(l->mu);
  if (nid < 0) l->bufs.erase(id); else l->bufs[id] = nid;
  return info.Env().Undefined();
}
// laneBusy(lane) -> whether a step runs on the lane now (the client is owed heartbeats)
Napi::Value LaneBusy(const Napi::CallbackInfo& info) { return Napi::Boolean::New(info.Env(), lane_of(info[0])->busy.load()); }

// laneClose(lane, graceful): graceful sends what is queued first; the closed event follows
Napi::Value LaneClose(const Napi::CallbackInfo& info) {
  Lane* l = lane_of(info[0]);
  int want = info[1].ToBoolean() ? 1 : 2, cur = 0;
  while (cur < want && !l->close_mode.compare_exchange_weak(cur, want)) {}
  l->poke();
  return info.Env().Undefined();
}

}  // namespace

void register_lane(Napi::Env env, Napi::Object exports) {
  exports.Set("laneOpen", Napi::Function::New(env, LaneOpen));
  exports.Set("laneSend", Napi::Function::New(env, LaneSend));
  exports.Set("laneDone", Napi::Function::New(env, LaneDone));
  exports.Set("laneBindGraph", Napi::Function::New(env, LaneBindGraph));
  exports.Set("laneUnbindGraph", Napi::Function::New(env, LaneUnbindGraph));
  exports.Set("laneBindBuffer", Napi::Function::New(env, LaneBindBuffer));
  exports.Set("laneBusy", Napi::Function::New(env, LaneBusy));
  exports.Set("laneClose", Napi::Function::New(env, LaneClose));
}

}  // namespace weft
