// Persistent worker pool for one CPU device, and the waiting primitive every native wait
// uses. A wait spins for a short while (a decode node is a few microseconds, and waking a
// sleeping thread costs more than that) and then sleeps on a futex, so that threads that
// wait never hold a core another thread needs: more threads than free cores (another
// program running, -t above the core count, several CPU devices in one process) slow
// down gently instead of spinning each other out.
#pragma once
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <ctime>
#include <functional>
#include <thread>
#include <vector>
#include <immintrin.h>
#include <sched.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace weft {

inline void futex_wait(std::atomic<uint32_t>* a, uint32_t expected, const timespec* timeout = nullptr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAIT_PRIVATE, expected, timeout, nullptr, 0);
}
inline void futex_wake_all(std::atomic<uint32_t>* a) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(a), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
}

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// How long a waiting thread spins before it sleeps (WEFT_SPIN_US, default 50 µs): long
// enough to cover the gap between two decode nodes, short enough that an oversubscribed
// core is handed over within a scheduler tick.
int64_t spin_ns();

// Waits until `word` differs from `seen`: spins for `spin` ns (default spin_ns()), then
// sleeps on the futex. `sleepers` counts threads asleep on `word`, so that a waker can
// skip the syscall when nobody sleeps. Returns false if `deadline_ns` (steady clock,
// 0 = none) passed first.
inline bool wait_change(std::atomic<uint32_t>& word, uint32_t seen, std::atomic<int>& sleepers, int64_t deadline_ns = 0,
                        int64_t spin = -1) {
  // A few microseconds of pause, then sched_yield until the spin time is up: with more
  // threads than cores the thread being waited for is runnable but not running, and a
  // yield hands it this core at once; with a core each, a yield returns at once.
  const int64_t t0 = now_ns(), budget = spin < 0 ? spin_ns() : spin;
  const int64_t pause_until = t0 + std::min<int64_t>(budget, 3000), spin_until = t0 + budget;
  for (int i = 0;; ++i) {
    if (word.load(std::memory_order_acquire) != seen) return true;
    if ((i & 15) == 15) {
      const int64_t now = now_ns();
      if (now >= spin_until) break;
      if (now >= pause_until) { sched_yield(); continue; }
    }
    _mm_pause();
  }
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  bool ok = true;
  while (word.load(std::memory_order_seq_cst) == seen) {
    timespec ts{1, 0};  // wake now and then to check the deadline
    if (deadline_ns) {
      const int64_t left = deadline_ns - now_ns();
      if (left <= 0) { ok = false; break; }
      if (left < 1000000000) ts = {0, (long)left};
    }
    futex_wait(&word, seen, &ts);
  }
  sleepers.fetch_sub(1, std::memory_order_relaxed);
  return ok;
}
// Changes `word` (already stored by the caller) visible to waiters: wakes the sleepers.
inline void wake_waiters(std::atomic<uint32_t>& word, std::atomic<int>& sleepers) {
  if (sleepers.load(std::memory_order_seq_cst) > 0) futex_wake_all(&word);
}

// A reusable barrier for n threads (phase counting: a thread still leaving one phase
// cannot be overtaken, since the next phase needs it to arrive too).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  int size() const { return n_; }
  // false on timeout (deadline_ns, steady clock; 0 = none) or abort(); `spin`: how long
  // to spin (yielding) before sleeping, default spin_ns()
  bool wait(int64_t deadline_ns = 0, int64_t spin = -1) {
    if (n_ == 1) return !aborted_.load(std::memory_order_acquire);
    const uint32_t ph = phase_.load(std::memory_order_acquire);
    // an abort that came first: its phase step may be the one just read, and no other
    // step will come (abort() sets aborted_ before it steps the phase)
    if (aborted_.load(std::memory_order_acquire)) return false;
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_seq_cst);
      wake_waiters(phase_, sleepers_);
      return !aborted_.load(std::memory_order_acquire);
    }
    if (!wait_change(phase_, ph, sleepers_, deadline_ns, spin)) return false;
    return !aborted_.load(std::memory_order_acquire);
  }
  // Releases every waiter now and makes later waits fail at once (a participant died).
  void abort() {
    aborted_.store(true, std::memory_order_release);
    phase_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&phase_);
  }
  bool aborted() const { return aborted_.load(std::memory_order_acquire); }

 private:
  int n_;
  std::atomic<int> count_{0};
  std::atomic<uint32_t> phase_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> aborted_{false};
};

// The calling thread is worker 0; workers 1..n-1 wait for jobs (spin, then sleep) and
// meet the caller at a barrier after each job.
class ThreadPool {
 public:
  explicit ThreadPool(int n) : n_(n < 1 ? 1 : n), barrier_(n < 1 ? 1 : n) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~ThreadPool() {
    stop_.store(true, std::memory_order_release);
    gen_.fetch_add(1, std::memory_order_seq_cst);
    signal_.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&signal_);
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }
  // Workers asleep between graphs start spinning again: a job is on its way, and their
  // wake-up latency then overlaps its hand-off.
  void prewake() {
    if (n_ == 1) return;
    prewoken_.store(true, std::memory_order_relaxed);
    signal_.fetch_add(1, std::memory_order_seq_cst);
    wake_waiters(signal_, sleepers_);
  }
  Barrier& barrier() { return barrier_; }
  // Runs fn(ith, nth) on every worker; returns when all are done.
  void run(const std::function<void(int, int)>& fn) {
    if (n_ == 1) { fn(0, 1); return; }
    job_ = &fn;
    gen_.fetch_add(1, std::memory_order_seq_cst);
    signal_.fetch_add(1, std::memory_order_seq_cst);
    wake_waiters(signal_, sleepers_);
    fn(0, n_);
    barrier_.wait();
    job_ = nullptr;
  }

 private:
  void loop(int ith) {
    uint32_t seen = 0;
    for (;;) {
      // wait for a job; a prewake (signal_ without a new gen_) turns a sleep into a
      // longer spin, since the job is on its way
      for (;;) {
        const uint32_t sig = signal_.load(std::memory_order_seq_cst);
        if (gen_.load(std::memory_order_acquire) != seen) break;
        const bool pre = prewoken_.exchange(false, std::memory_order_relaxed);
        wait_change(signal_, sig, sleepers_, 0, pre ? 2000000 : -1);
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_.load(std::memory_order_acquire)) return;
      (*job_)(ith, n_);
      barrier_.wait();
    }
  }
  int n_;
  Barrier barrier_;
  std::vector<std::thread> workers_;
  std::atomic<uint32_t> gen_{0};     // jobs started
  std::atomic<uint32_t> signal_{0};  // changes on every job and prewake (the futex word)
  std::atomic<bool> prewoken_{false};
  std::atomic<int> sleepers_{0};
  const std::function<void(int, int)>* volatile job_ = nullptr;
  std::atomic<bool> stop_{false};
};

}  // namespace weft
