// N-API surface of the native CPU backend. Typed on the TS side in lib/cpu/native.ts.
#include <napi.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <thread>
#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <functional>
#include <chrono>
#include <immintrin.h>
#include <unordered_map>
#include <unordered_set>
#include "common.h"
#include "graph.h"
#include "kernels.h"
#include "threadpool.h"

namespace weft {

int64_t spin_ns() {
  static const int64_t ns = [] {
    const char* e = getenv("WEFT_SPIN_US");
    const double us = e && *e ? atof(e) : 50.0;
    return (int64_t)(std::max(0.0, std::min(us, 1e6)) * 1000);
  }();
  return ns;
}

// ---------------------------------------------------------------- buffer registry

// A buffer in use by a running graph is pinned; freeing it then only marks it dead (no
// new use can start) and the memory goes when the last run using it ends: a free while
// queued work still uses a buffer is never a use-after-free.
struct BufEntry { char* base; size_t size; bool mapped; size_t map_len; int pins = 0; bool dead = false; };
static std::mutex g_buf_mu;
static std::unordered_map<int64_t, BufEntry> g_bufs;
static int64_t g_next_buf = 1;
static constexpr size_t ALIGN = 64;

static void release_memory(const BufEntry& e) {
  if (e.mapped) { if (e.map_len) munmap(e.base, e.map_len); }
  else free(e.base);
}

bool lookup_buffer(int64_t id, BufferInfo* out) {
  std::lock_guard<std::mutex> lk(g_buf_mu);
  auto it = g_bufs.find(id);
  if (it == g_bufs.end() || it->second.dead) return false;
  out->base = it->second.base;
  out->size = it->second.size;
  out->read_only = it->second.mapped;
  return true;
}

// Pins every buffer of a plan for one run; false (nothing pinned) if one was freed.
static bool pin_buffers(const std::vector<int64_t>& ids) {
  std::lock_guard<std::mutex> lk(g_buf_mu);
  for (int64_t id : ids) {
    auto it = g_bufs.find(id);
    if (it == g_bufs.end() || it->second.dead) return false;
  }
  for (int64_t id : ids) g_bufs[id].pins++;
  return true;
}
static void unpin_buffers(const std::vector<int64_t>& ids) {
  std::vector<BufEntry> gone;
  {
    std::lock_guard<std::mutex> lk(g_buf_mu);
    for (int64_t id : ids) {
      auto it = g_bufs.find(id);
      if (it == g_bufs.end()) continue;
      if (--it->second.pins == 0 && it->second.dead) { gone.push_back(it->second); g_bufs.erase(it); }
    }
  }
  for (auto& e : gone) release_memory(e);
}

// ---------------------------------------------------------------- collective groups

static std::mutex g_group_mu;
static std::unordered_map<int64_t, std::shared_ptr<Group>> g_groups;
static int64_t g_next_group = 1;

std::shared_ptr<Group> lookup_group(int64_t id) {
  std::lock_guard<std::mutex> lk(g_group_mu);
  auto it = g_groups.find(id);
  return it == g_groups.end() ? nullptr : it->second;
}

static Napi::Error weft_error(Napi::Env env, const char* code, const std::string& msg) {
  Napi::Error e = Napi::Error::New(env, msg);
  e.Set("code", Napi::String::New(env, code));
  return e;
}

static BufEntry get_buf(const Napi::Env& env, const Napi::Value& v) {
  int64_t id = v.As<Napi::Number>().Int64Value();
  std::lock_guard<std::mutex> lk(g_buf_mu);
  auto it = g_bufs.find(id);
  if (it == g_bufs.end() || it->second.dead) throw weft_error(env, "DISPOSED", "buffer " + std::to_string(id) + " was freed or never existed");
  return it->second;
}

static void check_range(const Napi::Env& env, const BufEntry& b, double off, double len) {
  if (!(off >= 0 && len >= 0) || off + len > (double)b.size)
    throw weft_error(env, "OUT_OF_RANGE", "access [" + std::to_string((int64_t)off) + ", +" + std::to_string((int64_t)len) +
                                              ") is outside the buffer of " + std::to_string(b.size) + " bytes");
}

// Large buffers are 2 MiB aligned and asked for transparent huge pages: a weight stream
// then walks one page table entry per 2 MiB instead of per 4 KiB, and the hardware
// prefetcher, which stops at page boundaries, runs on.
static void* alloc_aligned(size_t n) {
  constexpr size_t HUGE = 2u << 20;
  void* p = nullptr;
  if (n >= 2 * HUGE) {
    if (posix_memalign(&p, HUGE, n) != 0) return nullptr;
    madvise(p, n / HUGE * HUGE, MADV_HUGEPAGE);  // advice only: failure leaves 4 KiB pages
    return p;
  }
  return posix_memalign(&p, ALIGN, n) == 0 ? p : nullptr;
}

static Napi::Value BufferAlloc(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  double size = info[0].As<Napi::Number>().DoubleValue();
  if (!(size >= 0) || size > 1e15) throw weft_error(env, "BAD_ARGUMENT", "bad buffer size");
  size_t n = ((size_t)size + ALIGN - 1) / ALIGN * ALIGN;
  void* p = nullptr;
  if (n > 0 && (p = alloc_aligned(n)) == nullptr)
    throw weft_error(env, "OUT_OF_MEMORY", "could not allocate " + std::to_string((size_t)size) + " bytes");
  std::lock_guard<std::mutex> lk(g_buf_mu);
  int64_t id = g_next_buf++;
  g_bufs[id] = BufEntry{(char*)p, (size_t)size, false, 0};
  return Napi::Number::New(env, (double)id);
}

static Napi::Value BufferFree(const Napi::CallbackInfo& info) {
  int64_t id = info[0].As<Napi::Number>().Int64Value();
  BufEntry e{};
  {
    std::lock_guard<std::mutex> lk(g_buf_mu);
    auto it = g_bufs.find(id);
    if (it == g_bufs.end() || it->second.dead) return info.Env().Undefined();  // freeing twice is harmless
    if (it->second.pins > 0) { it->second.dead = true; return info.Env().Undefined(); }  // the last run frees it
    e = it->second;
    g_bufs.erase(it);
  }
  release_memory(e);
  return info.Env().Undefined();
}

static Napi::Value MapFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  std::string path = info[0].As<Napi::String>().Utf8Value();
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw weft_error(env, "IO", "cannot open " + path + ": " + strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) { int e = errno; close(fd); throw weft_error(env, "IO", "cannot stat " + path + ": " + strerror(e)); }
  size_t len = (size_t)st.st_size;
  void* p = nullptr;
  if (len > 0) {
    p = mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) { int e = errno; close(fd); throw weft_error(env, "IO", "cannot map " + path + ": " + strerror(e)); }
  }
  close(fd);
  std::lock_guard<std::mutex> lk(g_buf_mu);
  int64_t id = g_next_buf++;
  g_bufs[id] = BufEntry{(char*)p, len, true, len};
  Napi::Object o = Napi::Object::New(env);
  o.Set("id", Napi::Number::New(env, (double)id));
  o.Set("size", Napi::Number::New(env, (double)len));
  return o;
}

static Napi::Value BufferSet(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  BufEntry b = get_buf(env, info[0]);
  if (b.mapped) throw weft_error(env, "READ_ONLY", "a mapped file buffer is read-only");
  double off = info[1].As<Napi::Number>().DoubleValue();
  Napi::Uint8Array src = info[2].As<Napi::Uint8Array>();
  check_range(env, b, off, (double)src.ByteLength());
  if (src.ByteLength()) std::memcpy(b.base + (size_t)off, src.Data(), src.ByteLength());
  return env.Undefined();
}

// Reads bytes [fileOffset, fileOffset + length) of a file straight into a buffer at `offset`
// (an RPC server placing a cached weight: one copy, from the page cache, in any layout).
static Napi::Value BufferLoadFile(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  BufEntry b = get_buf(env, info[0]);
  if (b.mapped) throw weft_error(env, "READ_ONLY", "a mapped file buffer is read-only");
  const double off = info[1].As<Napi::Number>().DoubleValue();
  const std::string path = info[2].As<Napi::String>().Utf8Value();
  const double foff = info[3].As<Napi::Number>().DoubleValue(), len = info[4].As<Napi::Number>().DoubleValue();
  check_range(env, b, off, len);
  if (!(foff >= 0 && foff <= 9007199254740991.0)) throw weft_error(env, "BAD_ARGUMENT", "bad file offset");
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw weft_error(env, "IO", "cannot open " + path + ": " + std::strerror(errno));
  size_t got = 0;
  const size_t n = (size_t)len;
  while (got < n) {
    const ssize_t r = pread(fd, b.base + (size_t)off + got, n - got, (off_t)((size_t)foff + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) { const int e = errno; close(fd); throw weft_error(env, "IO", "cannot read " + path + (r == 0 ? ": it is shorter than expected" : ": " + std::string(std::strerror(e)))); }
    got += (size_t)r;
  }
  close(fd);
  return env.Undefined();
}

// (buffer, offset, length) arguments, checked: the shared head of get, fill and touch
struct BufRange { BufEntry b; double off, len; };
static BufRange buf_range(Napi::Env env, const Napi::CallbackInfo& info) {
  BufRange r{get_buf(env, info[0]), info[1].As<Napi::Number>().DoubleValue(), info[2].As<Napi::Number>().DoubleValue()};
  check_range(env, r.b, r.off, r.len);
  return r;
}

// (buffer, offset, length[, into]): the bytes into `into` (a Uint8Array of exactly that
// length: a step's output read every token allocates nothing), else into a new array
static Napi::Value BufferGet(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto [b, off, len] = buf_range(env, info);
  if (info.Length() > 3 && !info[3].IsUndefined()) {
    if (!info[3].IsTypedArray() || info[3].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array)
      throw weft_error(env, "BAD_ARGUMENT", "bufferGet: into must be a Uint8Array");
    Napi::Uint8Array into = info[3].As<Napi::Uint8Array>();
    if (into.ByteLength() != (size_t)len) throw weft_error(env, "BAD_ARGUMENT", "bufferGet: into is not as long as the range");
    if (len > 0) std::memcpy(into.Data(), b.base + (size_t)off, (size_t)len);
    return into;
  }
  // memory Node leaves uninitialized (every byte is written here), viewed as a plain Uint8Array
  Napi::Buffer<uint8_t> mem = Napi::Buffer<uint8_t>::New(env, (size_t)len);
  if (len > 0) std::memcpy(mem.Data(), b.base + (size_t)off, (size_t)len);
  return Napi::Uint8Array::New(env, (size_t)len, mem.ArrayBuffer(), mem.ByteOffset());
}

static Napi::Value BufferFill(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto [b, off, len] = buf_range(env, info);
  if (b.mapped) throw weft_error(env, "READ_ONLY", "a mapped file buffer is read-only");
  int value = info[3].As<Napi::Number>().Int32Value();
  if (len > 0) std::memset(b.base + (size_t)off, value, (size_t)len);
  return env.Undefined();
}

// Reads one byte per page of a range so that a mapped model is resident before the first
// token (and load progress can be reported); returns a checksum so the reads stay.
static Napi::Value BufferTouch(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto [b, off, len] = buf_range(env, info);
  unsigned sum = 0;
  const volatile unsigned char* p = (const unsigned char*)b.base + (size_t)off;
  for (size_t i = 0; i < (size_t)len; i += 4096) sum += p[i];
  return Napi::Number::New(env, sum);
}

// {"MUL_MAT/Q8_0": [ms, calls], ...}; with an argument true, also resets.
static Napi::Value ProfileReport(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  OpProfile& p = op_profile();
  for (int op = 0; op < OP_COUNT; ++op)
    for (int ty = 0; ty < 32; ++ty) {
      if (!p.calls[op][ty]) continue;
      std::string k = op_name(op);
      if (op == OP_MUL_MAT) { k += "/"; k += std::to_string(ty); }
      Napi::Array a = Napi::Array::New(env, 2);
      a.Set((uint32_t)0, p.ns[op][ty] / 1e6);
      a.Set((uint32_t)1, (double)p.calls[op][ty]);
      o.Set(k, a);
    }
  if (info.Length() > 0 && info[0].ToBoolean()) p = OpProfile{};
  return o;
}

static Napi::Value BufferCopy(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  BufEntry s = get_buf(env, info[0]);
  double so = info[1].As<Napi::Number>().DoubleValue();
  BufEntry d = get_buf(env, info[2]);
  double dof = info[3].As<Napi::Number>().DoubleValue();
  double len = info[4].As<Napi::Number>().DoubleValue();
  if (d.mapped) throw weft_error(env, "READ_ONLY", "a mapped file buffer is read-only");
  check_range(env, s, so, len);
  check_range(env, d, dof, len);
  if (len > 0) std::memmove(d.base + (size_t)dof, s.base + (size_t)so, (size_t)len);
  return env.Undefined();
}

// repackRows(type, src, srcOffset, srcStride, dst, dstOffset, n, rows): rows (a multiple
// of 8) weight rows of n elements, srcStride bytes apart, into repacked groups at dst. The
// source is a buffer id, or a Uint8Array (srcOffset into it): weights uploaded through a
// repacked buffer's setTensor.
// Live buffers (count, bytes): what tests check to find leaks (an RPC server's clients gone).
static Napi::Value BufferStats(const Napi::CallbackInfo& info) {
  std::lock_guard<std::mutex> lk(g_buf_mu);
  double bytes = 0;
  for (auto& [id, e] : g_bufs) bytes += (double)e.size;
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("count", (double)g_bufs.size());
  o.Set("bytes", bytes);
  return o;
}

static Napi::Value RepackRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t type = info[0].As<Napi::Number>().Int32Value();
  const char* src_base;
  double src_size;
  BufEntry s{};
  if (info[1].IsTypedArray()) {
    Napi::Uint8Array a = info[1].As<Napi::Uint8Array>();
    src_base = (const char*)a.Data();
    src_size = (double)a.ByteLength();
  } else {
    s = get_buf(env, info[1]);
    src_base = s.base;
    src_size = (double)s.size;
  }
  const double so = info[2].As<Napi::Number>().DoubleValue(), stride = info[3].As<Napi::Number>().DoubleValue();
  BufEntry d = get_buf(env, info[4]);
  const double dof = info[5].As<Napi::Number>().DoubleValue();
  const double n = info[6].As<Napi::Number>().DoubleValue(), rows = info[7].As<Napi::Number>().DoubleValue();
  const TypeInfo ti = type_info(type);
  if (!type_is_repackable(type)) throw weft_error(env, "UNSUPPORTED_TYPE", "type " + std::to_string(type) + " cannot be repacked");
  if (!(n > 0 && n <= 1e12 && n == (double)(int64_t)n && (int64_t)n % ti.blck == 0))
    throw weft_error(env, "BAD_ARGUMENT", "row length must be a positive multiple of the block size");
  if (!(rows >= 0 && rows <= 1e12 && rows == (double)(int64_t)rows && (int64_t)rows % 8 == 0))
    throw weft_error(env, "BAD_ARGUMENT", "row count must be a multiple of 8");
  const double rb = (double)row_bytes(type, (int64_t)n);
  if (!(stride >= rb && stride == (double)(int64_t)stride)) throw weft_error(env, "BAD_ARGUMENT", "row stride is shorter than a row");
  if (d.mapped) throw weft_error(env, "READ_ONLY", "a mapped file buffer is read-only");
  if (rows == 0) return env.Undefined();
  if (!(so >= 0) || so + (rows - 1) * stride + rb > src_size) throw weft_error(env, "OUT_OF_RANGE", "the source rows run past their memory");
  check_range(env, d, dof, rows * (double)repacked_row_bytes(type, (int64_t)n));
  repack_rows8(type, src_base + (size_t)so, (int64_t)stride, d.base + (size_t)dof, (int64_t)n, (int64_t)rows);
  return env.Undefined();
}

// ---------------------------------------------------------------- contexts (one per CPU device)

struct Context;
struct NativeWait { Context* ctx; uint64_t count; };

// One compute: what it runs, what it waits for, and the promise it settles.
struct Job {
  std::shared_ptr<Plan> plan;
  std::vector<NativeWait> waits;
  Napi::Promise::Deferred deferred;
  Napi::ObjectReference keep;   // the context (and the contexts it waits for) stay alive
  std::string error;
  explicit Job(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
};

// A CPU device's native side: a dispatcher thread (worker 0 of its pool) that runs one
// compute at a time, so that devices never share, or run out of, Node's worker threads
// (a collective needs every device of a group running at once). Completion is sent back
// to the JS thread through a thread-safe function.
struct Context {
  explicit Context(Napi::Env env, int n) : threads(n), pool(std::make_unique<ThreadPool>(n)) {
    tsfn = Napi::ThreadSafeFunction::New(env, Napi::Function::New(env, [](const Napi::CallbackInfo&) {}), "weft-cpu", 0, 1);
    tsfn.Unref(env);
    dispatcher = std::thread([this] { loop(); });
  }
  ~Context() { shutdown(); }

  // Joins the threads and frees plans and scratch (idempotent).
  void shutdown() {
    if (!dispatcher.joinable()) return;
    stop.store(true, std::memory_order_release);
    post.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&post);
    dispatcher.join();
    pool.reset();
    std::vector<char>().swap(scratch);
    pool_alive = false;
    plans.clear();
    tsfn.Release();
  }

  void loop() {
    uint32_t seen = 0;
    for (;;) {
      // back-to-back computes (token generation) arrive within the spin; idle, it sleeps;
      // woken ahead of a job (prewake: work was queued in JS), it spins longer
      const bool pre = prewoken.exchange(false, std::memory_order_acq_rel);
      wait_change(post, seen, post_sleepers, 0, pre ? 2000000 : -1);
      seen = post.load(std::memory_order_acquire);
      if (stop.load(std::memory_order_acquire)) break;
      Job* j = job.exchange(nullptr, std::memory_order_acq_rel);
      if (!j) continue;
      run(*j);
      tsfn.NonBlockingCall(j, [](Napi::Env env, Napi::Function, Job* j) { finish(env, j); });
    }
  }
  // A compute is on its way: the dispatcher and the workers spin instead of sleeping,
  // so that their wake-up latency overlaps the hand-off (and devices of one meta device
  // start their steps together instead of one waiting at the first all-reduce).
  void prewake() {
    pool->prewake();
    prewoken.store(true, std::memory_order_release);
    post.fetch_add(1, std::memory_order_seq_cst);
    wake_waiters(post, post_sleepers);
  }

  void run(Job& j) {
    for (const NativeWait& w : j.waits)
      if (!w.ctx->wait_for(w.count)) { j.error = "waited 60 s for another device's compute that never finished"; break; }
    if (j.error.empty()) {
      try { execute_plan(*j.plan, *pool, scratch); }
      catch (const std::exception& e) { j.error = e.what(); }
    }
    unpin_buffers(j.plan->buffers);
    signal();
  }

  static void finish(Napi::Env env, Job* j);

  // Native events: computes finished on this device (failed ones count too, so that a
  // waiter never hangs). Another device's compute can wait for "completed >= n" on its
  // own dispatcher thread, without a round trip through the JS thread.
  void signal() {
    completed.fetch_add(1, std::memory_order_acq_rel);
    done_word.fetch_add(1, std::memory_order_seq_cst);
    wake_waiters(done_word, done_sleepers);
  }
  bool wait_for(uint64_t n) {  // false on timeout
    const int64_t deadline = now_ns() + 60LL * 1000000000LL;
    for (;;) {
      const uint32_t w = done_word.load(std::memory_order_seq_cst);
      if (completed.load(std::memory_order_acquire) >= n) return true;
      if (!wait_change(done_word, w, done_sleepers, deadline)) return completed.load() >= n;
    }
  }

  const int threads;
  std::unique_ptr<ThreadPool> pool;  // the dispatcher thread is its worker 0
  bool pool_alive = true;            // false once shut down (JS thread's view)
  std::thread dispatcher;
  std::atomic<Job*> job{nullptr};
  std::atomic<bool> prewoken{false};
  std::atomic<uint32_t> post{0};
  std::atomic<int> post_sleepers{0};
  std::atomic<bool> stop{false};
  Napi::ThreadSafeFunction tsfn;
  int pending = 0;  // JS thread: computes in flight (the event loop stays alive meanwhile)
  bool busy = false;
  std::unordered_map<double, std::shared_ptr<Plan>> plans;  // JS thread
  std::vector<char> scratch;  // the dispatcher's
  std::atomic<uint64_t> completed{0};
  std::atomic<uint32_t> done_word{0};
  std::atomic<int> done_sleepers{0};
};

static Context* context_of(const Napi::Value& v) { return v.As<Napi::External<Context>>().Data(); }

void Context::finish(Napi::Env env, Job* j) {
  Context* ctx = context_of(j->keep.Value().Get((uint32_t)0));
  ctx->busy = false;
  if (--ctx->pending == 0) ctx->tsfn.Unref(env);
  if (j->error.empty()) j->deferred.Resolve(env.Undefined());
  else j->deferred.Reject(weft_error(env, "COMPUTE_FAILED", j->error).Value());
  delete j;
}

static Napi::Value CreateContext(const Napi::CallbackInfo& info) {
  int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 1 || n > 256) throw weft_error(info.Env(), "BAD_ARGUMENT", "thread count must be between 1 and 256");
  auto* ctx = new Context(info.Env(), n);
  return Napi::External<Context>::New(info.Env(), ctx, [](Napi::Env, Context* c) { delete c; });
}

// compute(ctx, uid, plan?: Float64Array, waits?) -> Promise<void>
static Napi::Value Compute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Context* ctx = context_of(info[0]);
  double uid = info[1].As<Napi::Number>().DoubleValue();
  if (!ctx->pool_alive) throw weft_error(env, "DISPOSED", "this CPU device's context was destroyed");
  if (ctx->busy) throw weft_error(env, "BUSY", "this CPU device is already computing a graph; await it first");
  if (info.Length() > 2 && info[2].IsTypedArray()) {
    Napi::Float64Array rec = info[2].As<Napi::Float64Array>();
    if (rec.ElementLength() % REC != 0) throw weft_error(env, "BAD_PLAN", "plan length is not a whole number of records");
    std::string err;
    auto plan = decode_plan(rec.Data(), (int64_t)(rec.ElementLength() / REC), err);
    if (!plan) throw weft_error(env, "BAD_PLAN", "graph rejected by the CPU backend: " + err);
    ctx->plans[uid] = std::move(plan);
  }
  auto it = ctx->plans.find(uid);
  if (it == ctx->plans.end()) throw weft_error(env, "BAD_PLAN", "no cached plan for graph uid " + std::to_string((int64_t)uid));
  std::shared_ptr<Plan> plan = it->second;
  // optional waits: [[otherCtx, count], ...] — run only once those devices completed that many computes
  std::vector<NativeWait> waits;
  Napi::Array keep = Napi::Array::New(env);
  keep.Set((uint32_t)0, info[0]);
  if (info.Length() > 3 && info[3].IsArray()) {
    Napi::Array arr = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      Napi::Value e = arr.Get(i);
      if (!e.IsArray()) throw weft_error(env, "BAD_ARGUMENT", "a wait must be [context, count]");
      Napi::Array pair = e.As<Napi::Array>();
      Napi::Value c = pair.Get((uint32_t)0), n = pair.Get((uint32_t)1);
      if (!c.IsExternal() || !n.IsNumber()) throw weft_error(env, "BAD_ARGUMENT", "a wait must be [context, count]");
      Context* other = context_of(c);
      if (other == ctx) continue;  // a queue never waits for itself
      waits.push_back({other, (uint64_t)n.As<Napi::Number>().DoubleValue()});
      keep.Set(keep.Length(), c);
    }
  }
  if (!pin_buffers(plan->buffers)) {
    ctx->plans.erase(uid);
    throw weft_error(env, "DISPOSED", "a buffer used by graph " + std::to_string((int64_t)uid) + " was freed; rebuild the graph");
  }
  Job* j = new Job(env);
  j->plan = std::move(plan);
  j->waits = std::move(waits);
  j->keep = Napi::Persistent(keep.As<Napi::Object>());  // [this context, the contexts it waits for]
  Napi::Promise p = j->deferred.Promise();
  ctx->busy = true;
  if (ctx->pending++ == 0) ctx->tsfn.Ref(env);
  ctx->pool->prewake();
  ctx->job.store(j, std::memory_order_release);
  ctx->post.fetch_add(1, std::memory_order_seq_cst);
  wake_waiters(ctx->post, ctx->post_sleepers);
  return p;
}

// ---------------------------------------------------------------- native runs (lane.cpp)

void register_lane(Napi::Env env, Napi::Object exports);

Context* native_context(const Napi::Value& v) { return v.IsExternal() ? context_of(v) : nullptr; }

std::shared_ptr<Plan> context_plan(Context* ctx, double uid) {
  auto it = ctx->plans.find(uid);
  return it == ctx->plans.end() ? nullptr : it->second;
}

NativeRun run_plan_native(Context* ctx, const std::shared_ptr<Plan>& plan, std::string& err) {
  if (!pin_buffers(plan->buffers)) return NativeRun::REFUSED;
  // on the session's own thread, as worker 0 of the device's pool: the dispatcher is idle
  // (the session's JS queue is), and a hand-off to it and back would cost two wake-ups
  try { execute_plan(*plan, *ctx->pool, ctx->scratch); }
  catch (const std::exception& e) { err = e.what(); }
  unpin_buffers(plan->buffers);
  return err.empty() ? NativeRun::OK : NativeRun::FAILED;
}

bool pin_buffer_ids(const std::vector<int64_t>& ids) { return pin_buffers(ids); }
void unpin_buffer_ids(const std::vector<int64_t>& ids) { unpin_buffers(ids); }

// Frees a context's threads, plans and scratch now instead of at garbage collection.
static Napi::Value DestroyContext(const Napi::CallbackInfo& info) {
  Context* ctx = context_of(info[0]);
  if (ctx->busy) throw weft_error(info.Env(), "BUSY", "cannot destroy a CPU device context while it computes");
  ctx->shutdown();
  return info.Env().Undefined();
}

// Wakes a context's sleeping workers: work for it is about to be queued.
static Napi::Value Wake(const Napi::CallbackInfo& info) {
  Context* ctx = context_of(info[0]);
  if (ctx->pool_alive) ctx->prewake();
  return info.Env().Undefined();
}

static Napi::Value ForgetPlan(const Napi::CallbackInfo& info) {
  Context* ctx = context_of(info[0]);
  ctx->plans.erase(info[1].As<Napi::Number>().DoubleValue());  // a running job keeps its own reference
  return info.Env().Undefined();
}

// createGroup(n) -> id: a communicator for n CPU devices of this process (ALL_REDUCE)
static Napi::Value CreateGroup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 1 || n > 64) throw weft_error(env, "BAD_ARGUMENT", "a collective group has 1 to 64 devices");
  std::lock_guard<std::mutex> lk(g_group_mu);
  const int64_t id = g_next_group++;
  g_groups[id] = std::make_shared<Group>(n);
  return Napi::Number::New(env, (double)id);
}
// destroyGroup(id, why?): aborts anything waiting in it (with `why`) and forgets it;
// plans that use it keep it alive until they are dropped, and fail if they run
static Napi::Value DestroyGroup(const Napi::CallbackInfo& info) {
  const int64_t id = info[0].As<Napi::Number>().Int64Value();
  std::shared_ptr<Group> g;
  {
    std::lock_guard<std::mutex> lk(g_group_mu);
    auto it = g_groups.find(id);
    if (it == g_groups.end()) return info.Env().Undefined();
    g = it->second;
    g_groups.erase(it);
  }
  g->fail(info.Length() > 1 && info[1].IsString() ? info[1].As<Napi::String>().Utf8Value() : "the collective group was destroyed");
  return info.Env().Undefined();
}

// adoptPeerSocket(fd) -> fd: a duplicate of a connected socket (the JS side then closes
// its own); the duplicate belongs to native code from here (a peer group, or closePeerSocket)
static Napi::Value AdoptPeerSocket(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int fd = info[0].As<Napi::Number>().Int32Value();
  if (fd < 0) throw weft_error(env, "UNSUPPORTED_OP", "this platform does not expose socket descriptors: peer links need Linux or macOS");
  std::string err;
  const int d = peer_adopt_socket(fd, err);
  if (d < 0) throw weft_error(env, "IO", err);
  return Napi::Number::New(env, d);
}
static Napi::Value ClosePeerSocket(const Napi::CallbackInfo& info) {
  const int fd = info[0].As<Napi::Number>().Int32Value();
  if (fd >= 0) close(fd);
  return info.Env().Undefined();
}
// createPeerGroup(size, self, fds, wire, sharedMemory) -> id: a group whose other ranks are
// processes behind the adopted sockets fds[r] (fds[self] = -1); it owns the sockets from
// here. sharedMemory: its parts may go through a mapping where every rank is on this host.
static Napi::Value CreatePeerGroup(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int size = info[0].As<Napi::Number>().Int32Value(), self = info[1].As<Napi::Number>().Int32Value();
  Napi::Array a = info[2].As<Napi::Array>();
  std::vector<int> fds;
  for (uint32_t i = 0; i < a.Length(); ++i) fds.push_back(a.Get(i).As<Napi::Number>().Int32Value());
  std::string err;
  const bool shared = info.Length() > 4 && info[4].ToBoolean().Value();
  auto g = make_peer_group(size, self, fds, info[3].As<Napi::Number>().Int32Value(), shared, err);
  if (!g) throw weft_error(env, "BAD_ARGUMENT", err);
  std::lock_guard<std::mutex> lk(g_group_mu);
  const int64_t id = g_next_group++;
  g_groups[id] = std::move(g);
  return Napi::Number::New(env, (double)id);
}

// peerGroupTransport(id) -> "pending" | "tcp" | "shared memory" (null: no such group)
static Napi::Value PeerGroupTransport(const Napi::CallbackInfo& info) {
  auto g = lookup_group((int64_t)info[0].As<Napi::Number>().Int64Value());
  if (!g || !g->networked()) return info.Env().Null();
  return Napi::String::New(info.Env(), peer_transport(*g));
}

// ---------------------------------------------------------------- quantization

static void check_quant_args(const Napi::Env& env, int32_t type, int64_t n_per_row) {
  TypeInfo ti = type_info(type);
  if (!ti.known || !type_is_quantizable(type)) throw weft_error(env, "UNSUPPORTED_TYPE", "type " + std::to_string(type) + " cannot be quantized to");
  if (n_per_row <= 0 || n_per_row % ti.blck != 0)
    throw weft_error(env, "BAD_ARGUMENT", "row length " + std::to_string(n_per_row) + " is not a multiple of the block size " + std::to_string(ti.blck));
}

// quantize(type, Float32Array, nPerRow) -> Uint8Array
static Napi::Value Quantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t type = info[0].As<Napi::Number>().Int32Value();
  Napi::Float32Array src = info[1].As<Napi::Float32Array>();
  int64_t npr = info[2].As<Napi::Number>().Int64Value();
  check_quant_args(env, type, npr);
  int64_t n = (int64_t)src.ElementLength();
  if (n % npr != 0) throw weft_error(env, "BAD_ARGUMENT", "element count is not a whole number of rows");
  int64_t rows = n / npr, rb = row_bytes(type, npr);
  Napi::Uint8Array out = Napi::Uint8Array::New(env, (size_t)(rows * rb));
  // rows are independent (each quantized exactly as alone), so threads split them
  int nth = info.Length() > 3 && info[3].IsNumber() ? info[3].As<Napi::Number>().Int32Value() : (int)std::thread::hardware_concurrency();
  nth = (int)std::max<int64_t>(1, std::min<int64_t>({(int64_t)std::max(nth, 1), 64, rows / 16 + 1}));
  const float* x = src.Data();
  uint8_t* y = out.Data();
  auto work = [&](int t) {
    for (int64_t r = rows * t / nth; r < rows * (t + 1) / nth; ++r) quantize_row(type, x + r * npr, y + r * rb, npr);
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < nth; ++t) pool.emplace_back(work, t);
  work(0);
  for (auto& th : pool) th.join();
  return out;
}

// dequantize(type, Uint8Array, nElements) -> Float32Array
static Napi::Value Dequantize(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  int32_t type = info[0].As<Napi::Number>().Int32Value();
  Napi::Uint8Array src = info[1].As<Napi::Uint8Array>();
  int64_t n = info[2].As<Napi::Number>().Int64Value();
  TypeInfo ti = type_info(type);
  if (!ti.known || ti.blck == 0 || n < 0 || n % ti.blck != 0) throw weft_error(env, "UNSUPPORTED_TYPE", "cannot dequantize type " + std::to_string(type));
  if ((double)row_bytes(type, n) > (double)src.ByteLength()) throw weft_error(env, "OUT_OF_RANGE", "source too short");
  Napi::Float32Array out = Napi::Float32Array::New(env, (size_t)n);
  dequantize_row(type, src.Data(), out.Data(), n);
  return out;
}

// ---------------------------------------------------------------- CPU facts and probes

static Napi::Value KernelLevel(const Napi::CallbackInfo& info) {
  if (info.Length() > 0 && info[0].IsNumber()) set_kernel_level(info[0].As<Napi::Number>().Int32Value());
  Napi::Object o = Napi::Object::New(info.Env());
  o.Set("current", kernels().level);
  o.Set("detected", detected_level());
  o.Set("bf16", kernels().bf16);
  return o;
}

// readBandwidth(bytes, threads, reps) -> best GB/s of a streaming sum
__attribute__((target("avx2"))) static double sum_stream(const char* p, size_t n) {
  __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
  for (size_t i = 0; i + 128 <= n; i += 128) {
    a0 = _mm256_add_epi64(a0, _mm256_load_si256((const __m256i*)(p + i)));
    a1 = _mm256_add_epi64(a1, _mm256_load_si256((const __m256i*)(p + i + 32)));
    a2 = _mm256_add_epi64(a2, _mm256_load_si256((const __m256i*)(p + i + 64)));
    a3 = _mm256_add_epi64(a3, _mm256_load_si256((const __m256i*)(p + i + 96)));
  }
  __m256i s = _mm256_add_epi64(_mm256_add_epi64(a0, a1), _mm256_add_epi64(a2, a3));
  int64_t out[4];
  _mm256_storeu_si256((__m256i*)out, s);
  return (double)(out[0] + out[1] + out[2] + out[3]);
}
static double sum_stream_scalar(const char* p, size_t n) {
  const int64_t* q = (const int64_t*)p;
  int64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  for (size_t i = 0; i + 4 <= n / 8; i += 4) { s0 += q[i]; s1 += q[i + 1]; s2 += q[i + 2]; s3 += q[i + 3]; }
  return (double)(s0 + s1 + s2 + s3);
}

static Napi::Value ReadBandwidth(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  size_t bytes = (size_t)info[0].As<Napi::Number>().Int64Value();
  int threads = info[1].As<Napi::Number>().Int32Value();
  int reps = info[2].As<Napi::Number>().Int32Value();
  bytes = bytes / 4096 * 4096;
  char* p = nullptr;
  if (bytes == 0 || (p = (char*)alloc_aligned(bytes)) == nullptr) throw weft_error(env, "OUT_OF_MEMORY", "probe allocation failed");
  for (size_t i = 0; i < bytes; i += 8) *(int64_t*)(p + i) = (int64_t)i;
  ThreadPool pool(threads);
  double best = 0, sink = 0;
  const bool avx2 = detected_level() >= LEVEL_AVX2;
  for (int r = 0; r < reps; ++r) {
    auto t0 = std::chrono::steady_clock::now();
    pool.run([&](int ith, int nth) {
      size_t per = bytes / nth / 128 * 128;
      size_t lo = per * ith, n = ith == nth - 1 ? bytes - lo : per;
      double s = avx2 ? sum_stream(p + lo, n) : sum_stream_scalar(p + lo, n);
      if (s == 1.2345) sink += 1;  // keep the loads alive
    });
    double sec = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, bytes / sec / 1e9);
  }
  free(p);
  return Napi::Number::New(env, best + sink * 0);
}

static Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("bufferAlloc", Napi::Function::New(env, BufferAlloc));
  exports.Set("bufferFree", Napi::Function::New(env, BufferFree));
  exports.Set("bufferStats", Napi::Function::New(env, BufferStats));
  exports.Set("bufferLoadFile", Napi::Function::New(env, BufferLoadFile));
  exports.Set("bufferSet", Napi::Function::New(env, BufferSet));
  exports.Set("bufferGet", Napi::Function::New(env, BufferGet));
  exports.Set("bufferFill", Napi::Function::New(env, BufferFill));
  exports.Set("profileReport", Napi::Function::New(env, ProfileReport));
  { const char* e = getenv("WEFT_PROFILE"); g_profile = e && *e && *e != '0'; }
  exports.Set("bufferTouch", Napi::Function::New(env, BufferTouch));
  exports.Set("bufferCopy", Napi::Function::New(env, BufferCopy));
  exports.Set("repackRows", Napi::Function::New(env, RepackRows));
  exports.Set("mapFile", Napi::Function::New(env, MapFile));
  exports.Set("createContext", Napi::Function::New(env, CreateContext));
  exports.Set("compute", Napi::Function::New(env, Compute));
  exports.Set("destroyContext", Napi::Function::New(env, DestroyContext));
  exports.Set("wake", Napi::Function::New(env, Wake));
  exports.Set("forgetPlan", Napi::Function::New(env, ForgetPlan));
  exports.Set("createGroup", Napi::Function::New(env, CreateGroup));
  exports.Set("destroyGroup", Napi::Function::New(env, DestroyGroup));
  exports.Set("adoptPeerSocket", Napi::Function::New(env, AdoptPeerSocket));
  exports.Set("closePeerSocket", Napi::Function::New(env, ClosePeerSocket));
  exports.Set("createPeerGroup", Napi::Function::New(env, CreatePeerGroup));
  exports.Set("peerGroupTransport", Napi::Function::New(env, PeerGroupTransport));
  register_lane(env, exports);
  {
    // the op table and plan layout, checked against lib/core/ops.ts and lib/cpu/plan.ts at load
    Napi::Array names = Napi::Array::New(env, OP_COUNT);
    for (int op = 0; op < OP_COUNT; ++op) names.Set((uint32_t)op, op_name(op));
    exports.Set("opNames", names);
    Napi::Object layout = Napi::Object::New(env);
    const std::pair<const char*, int> fields[] = {{"REC", REC}, {"R_OP", R_OP}, {"R_TYPE", R_TYPE}, {"R_NE", R_NE}, {"R_NB", R_NB},
        {"R_BUF", R_BUF}, {"R_OFFS", R_OFFS}, {"R_SRC", R_SRC}, {"R_FLAGS", R_FLAGS}, {"R_NPARAMS", R_NPARAMS},
        {"R_PARAMS", R_PARAMS}, {"MAX_PARAMS", MAX_PARAMS}, {"MAX_SRC", MAX_SRC}, {"F_REPACKED", F_REPACKED}};
    for (auto& [k, v] : fields) layout.Set(k, v);
    exports.Set("planLayout", layout);
  }
  exports.Set("quantize", Napi::Function::New(env, Quantize));
  exports.Set("dequantize", Napi::Function::New(env, Dequantize));
  exports.Set("kernelLevel", Napi::Function::New(env, KernelLevel));
  exports.Set("readBandwidth", Napi::Function::New(env, ReadBandwidth));
  return exports;
}

}  // namespace weft

static Napi::Object InitWeft(Napi::Env env, Napi::Object exports) { return weft::Init(env, exports); }
NODE_API_MODULE(weft, InitWeft)
