// N-API surface of the native CPU backend. Typed on the TS side in lib/cpu/native.ts.
#include <napi.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <cerrno>
#include <cstdlib>
#include <thread>
#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <chrono>
#include <immintrin.h>
#include <unordered_map>
#include <unordered_set>
#include "common.h"
#include "graph.h"
#include "kernels.h"
#include "threadpool.h"

namespace weft {

// ---------------------------------------------------------------- buffer registry

struct BufEntry { char* base; size_t size; bool mapped; size_t map_len; };
static std::mutex g_buf_mu;
static std::unordered_map<int64_t, BufEntry> g_bufs;
static int64_t g_next_buf = 1;
static constexpr size_t ALIGN = 64;

bool lookup_buffer(int64_t id, BufferInfo* out) {
  std::lock_guard<std::mutex> lk(g_buf_mu);
  auto it = g_bufs.find(id);
  if (it == g_bufs.end()) return false;
  out->base = it->second.base;
  out->size = it->second.size;
  return true;
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
  if (it == g_bufs.end()) throw weft_error(env, "DISPOSED", "buffer " + std::to_string(id) + " was freed or never existed");
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
    if (it == g_bufs.end()) return info.Env().Undefined();  // freeing twice is harmless
    e = it->second;
    g_bufs.erase(it);
  }
  if (e.mapped) { if (e.map_len) munmap(e.base, e.map_len); }
  else free(e.base);
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

// (buffer, offset, length) arguments, checked: the shared head of get, fill and touch
struct BufRange { BufEntry b; double off, len; };
static BufRange buf_range(Napi::Env env, const Napi::CallbackInfo& info) {
  BufRange r{get_buf(env, info[0]), info[1].As<Napi::Number>().DoubleValue(), info[2].As<Napi::Number>().DoubleValue()};
  check_range(env, r.b, r.off, r.len);
  return r;
}

static Napi::Value BufferGet(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const auto [b, off, len] = buf_range(env, info);
  Napi::Uint8Array out = Napi::Uint8Array::New(env, (size_t)len);
  if (len > 0) std::memcpy(out.Data(), b.base + (size_t)off, (size_t)len);
  return out;
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
  static const char* ops[] = {"NONE", "GET_ROWS", "MUL_MAT", "ADD", "MUL", "SCALE", "RMS_NORM", "ROPE", "SOFT_MAX",
                              "CPY", "CONT", "VIEW", "RESHAPE", "PERMUTE", "TRANSPOSE", "SET_ROWS", "UNARY", "GLU",
                              "FLASH_ATTN_EXT", "ALL_REDUCE"};
  Napi::Env env = info.Env();
  Napi::Object o = Napi::Object::New(env);
  OpProfile& p = op_profile();
  for (int op = 0; op < OP_COUNT; ++op)
    for (int ty = 0; ty < 32; ++ty) {
      if (!p.calls[op][ty]) continue;
      std::string k = ops[op];
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
// of 8) weight rows of n elements, srcStride bytes apart, into repacked groups at dst.
static Napi::Value RepackRows(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  const int32_t type = info[0].As<Napi::Number>().Int32Value();
  BufEntry s = get_buf(env, info[1]);
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
  check_range(env, s, so, (rows - 1) * stride + rb);
  check_range(env, d, dof, rows * (double)repacked_row_bytes(type, (int64_t)n));
  repack_rows8(type, s.base + (size_t)so, (int64_t)stride, d.base + (size_t)dof, (int64_t)n, (int64_t)rows);
  return env.Undefined();
}

// ---------------------------------------------------------------- contexts (one per CPU device)

struct Context {
  explicit Context(int n) : pool(std::make_unique<ThreadPool>(n)) {}
  std::unique_ptr<ThreadPool> pool;  // null once destroyed (threads joined, plans freed)
  std::unordered_map<double, std::unique_ptr<Plan>> plans;
  std::unordered_map<double, std::vector<int64_t>> plan_bufs;
  std::vector<char> scratch;
  std::atomic<bool> busy{false};
  // Native events: computes finished on this device (failed ones count too, so that a
  // waiter never hangs). Another device's compute can wait for "completed >= n" on its
  // own worker thread, without a round trip through the JS thread.
  std::atomic<uint64_t> completed{0};
  std::mutex ev_mu;
  std::condition_variable ev_cv;

  void signal() {
    { std::lock_guard<std::mutex> lk(ev_mu); completed.fetch_add(1, std::memory_order_acq_rel); }
    ev_cv.notify_all();
  }
  // false on timeout
  bool wait_for(uint64_t n) {
    for (int spin = 0; spin < 20000; ++spin) {  // well under a millisecond, then sleep
      if (completed.load(std::memory_order_acquire) >= n) return true;
      _mm_pause();
    }
    std::unique_lock<std::mutex> lk(ev_mu);
    return ev_cv.wait_for(lk, std::chrono::seconds(60), [&] { return completed.load() >= n; });
  }
};

struct NativeWait { Context* ctx; uint64_t count; };

static Napi::Value CreateContext(const Napi::CallbackInfo& info) {
  int n = info[0].As<Napi::Number>().Int32Value();
  if (n < 1 || n > 256) throw weft_error(info.Env(), "BAD_ARGUMENT", "thread count must be between 1 and 256");
  auto* ctx = new Context(n);
  return Napi::External<Context>::New(info.Env(), ctx, [](Napi::Env, Context* c) { delete c; });
}

class ComputeWorker : public Napi::AsyncWorker {
 public:
  ComputeWorker(Napi::Env env, Context* ctx, Plan* plan, Napi::Object keep, std::vector<NativeWait> waits, Napi::Array keepWaits)
      : Napi::AsyncWorker(env), ctx_(ctx), plan_(plan), waits_(std::move(waits)), deferred_(Napi::Promise::Deferred::New(env)) {
    keep_ = Napi::Persistent(keep);
    keep_waits_ = Napi::Persistent(keepWaits);
  }
  Napi::Promise Promise() { return deferred_.Promise(); }
  void Execute() override {
    for (const NativeWait& w : waits_) {
      if (!w.ctx->wait_for(w.count)) {
        ctx_->signal();
        SetError("waited 60 s for another device's compute that never finished");
        return;
      }
    }
    try { execute_plan(*plan_, *ctx_->pool, ctx_->scratch); }
    catch (const std::exception& e) { SetError(e.what()); }
    ctx_->signal();
  }
  void OnOK() override { ctx_->busy = false; deferred_.Resolve(Env().Undefined()); }
  void OnError(const Napi::Error& e) override {
    ctx_->busy = false;
    Napi::Error err = weft_error(Env(), "COMPUTE_FAILED", e.Message());
    deferred_.Reject(err.Value());
  }
 private:
  Context* ctx_;
  Plan* plan_;
  std::vector<NativeWait> waits_;
  Napi::Promise::Deferred deferred_;
  Napi::ObjectReference keep_;
  Napi::Reference<Napi::Array> keep_waits_;
};

// compute(ctx, uid, plan?: Float64Array) -> Promise<void>
static Napi::Value Compute(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  Context* ctx = info[0].As<Napi::External<Context>>().Data();
  double uid = info[1].As<Napi::Number>().DoubleValue();
  if (!ctx->pool) throw weft_error(env, "DISPOSED", "this CPU device's context was destroyed");
  if (ctx->busy) throw weft_error(env, "BUSY", "this CPU device is already computing a graph; await it first");
  if (info.Length() > 2 && info[2].IsTypedArray()) {
    Napi::Float64Array rec = info[2].As<Napi::Float64Array>();
    if (rec.ElementLength() % REC != 0) throw weft_error(env, "BAD_PLAN", "plan length is not a whole number of records");
    std::string err;
    auto plan = decode_plan(rec.Data(), (int64_t)(rec.ElementLength() / REC), err);
    if (!plan) throw weft_error(env, "BAD_PLAN", "graph rejected by the CPU backend: " + err);
    std::unordered_set<int64_t> ids;
    for (size_t i = 0; i < rec.ElementLength() / REC; ++i) ids.insert((int64_t)rec[i * REC + R_BUF]);
    ctx->plan_bufs[uid] = std::vector<int64_t>(ids.begin(), ids.end());
    ctx->plans[uid] = std::move(plan);
  }
  auto it = ctx->plans.find(uid);
  if (it == ctx->plans.end()) throw weft_error(env, "BAD_PLAN", "no cached plan for graph uid " + std::to_string((int64_t)uid));
  for (int64_t id : ctx->plan_bufs[uid]) {
    BufferInfo bi;
    if (!lookup_buffer(id, &bi)) {
      ctx->plans.erase(uid);
      throw weft_error(env, "DISPOSED", "a buffer used by graph " + std::to_string((int64_t)uid) + " was freed; rebuild the graph");
    }
  }
  // optional waits: [[otherCtx, count], ...] — run only once those devices completed that many computes
  std::vector<NativeWait> waits;
  Napi::Array keepWaits = Napi::Array::New(env);
  if (info.Length() > 3 && info[3].IsArray()) {
    Napi::Array arr = info[3].As<Napi::Array>();
    for (uint32_t i = 0; i < arr.Length(); ++i) {
      Napi::Value e = arr.Get(i);
      if (!e.IsArray()) throw weft_error(env, "BAD_ARGUMENT", "a wait must be [context, count]");
      Napi::Array pair = e.As<Napi::Array>();
      Napi::Value c = pair.Get((uint32_t)0), n = pair.Get((uint32_t)1);
      if (!c.IsExternal() || !n.IsNumber()) throw weft_error(env, "BAD_ARGUMENT", "a wait must be [context, count]");
      Context* other = c.As<Napi::External<Context>>().Data();
      if (other == ctx) continue;  // a queue never waits for itself
      waits.push_back({other, (uint64_t)n.As<Napi::Number>().DoubleValue()});
      keepWaits.Set(keepWaits.Length(), c);
    }
  }
  ctx->busy = true;
  ctx->pool->prewake();
  auto* w = new ComputeWorker(env, ctx, it->second.get(), info[0].As<Napi::Object>(), std::move(waits), keepWaits);
  w->Queue();
  return w->Promise();
}

// Frees a context's threads, plans and scratch now instead of at garbage collection.
static Napi::Value DestroyContext(const Napi::CallbackInfo& info) {
  Context* ctx = info[0].As<Napi::External<Context>>().Data();
  if (ctx->busy) throw weft_error(info.Env(), "BUSY", "cannot destroy a CPU device context while it computes");
  ctx->plans.clear();
  ctx->plan_bufs.clear();
  std::vector<char>().swap(ctx->scratch);
  ctx->pool.reset();  // joins the worker threads
  return info.Env().Undefined();
}

// Wakes a context's sleeping workers: work for it is about to be queued.
static Napi::Value Wake(const Napi::CallbackInfo& info) {
  Context* ctx = info[0].As<Napi::External<Context>>().Data();
  if (ctx->pool) ctx->pool->prewake();
  return info.Env().Undefined();
}

static Napi::Value ForgetPlan(const Napi::CallbackInfo& info) {
  Context* ctx = info[0].As<Napi::External<Context>>().Data();
  double uid = info[1].As<Napi::Number>().DoubleValue();
  if (!ctx->busy) { ctx->plans.erase(uid); ctx->plan_bufs.erase(uid); }
  return info.Env().Undefined();
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
  exports.Set("quantize", Napi::Function::New(env, Quantize));
  exports.Set("dequantize", Napi::Function::New(env, Dequantize));
  exports.Set("kernelLevel", Napi::Function::New(env, KernelLevel));
  exports.Set("readBandwidth", Napi::Function::New(env, ReadBandwidth));
  return exports;
}

}  // namespace weft

static Napi::Object InitWeft(Napi::Env env, Napi::Object exports) { return weft::Init(env, exports); }
NODE_API_MODULE(weft, InitWeft)
