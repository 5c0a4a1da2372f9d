// Persistent worker pool for one CPU device. The caller's thread is worker 0; workers
// 1..n-1 sleep on a condition variable between graphs and spin on a barrier between
// nodes (a node is a few microseconds at decode, so sleeping there would cost more
// than the work).
#pragma once
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>
#include <immintrin.h>

namespace weft {

class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int ph = phase_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      phase_.fetch_add(1, std::memory_order_release);
    } else {
      while (phase_.load(std::memory_order_acquire) == ph) _mm_pause();
    }
  }
 private:
  int n_;
  std::atomic<int> count_{0};
  std::atomic<int> phase_{0};
};

class ThreadPool {
 public:
  explicit ThreadPool(int n) : n_(n < 1 ? 1 : n), barrier_(n < 1 ? 1 : n) {
    for (int i = 1; i < n_; ++i) workers_.emplace_back([this, i] { loop(i); });
  }
  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      gen_.fetch_add(1);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return n_; }
  // Wakes sleeping workers ahead of a run (called when a compute is queued, before the
  // queue's thread picks it up), so their wake-up latency overlaps the hand-off.
  void prewake() {
    if (n_ == 1) return;
    { std::lock_guard<std::mutex> lk(mu_); ++wake_; }
    cv_.notify_all();
  }
  SpinBarrier& barrier() { return barrier_; }
  // Runs fn(ith, nth) on every worker; returns when all are done.
  void run(const std::function<void(int, int)>& fn) {
    if (n_ == 1) { fn(0, 1); return; }
    job_ = &fn;
    pending_.store(n_ - 1, std::memory_order_release);
    {
      std::lock_guard<std::mutex> lk(mu_);
      gen_.fetch_add(1, std::memory_order_acq_rel);
    }
    cv_.notify_all();
    fn(0, n_);
    while (pending_.load(std::memory_order_acquire) != 0) _mm_pause();
    job_ = nullptr;
  }
 private:
  void loop(int ith) {
    uint64_t seen = 0, woken = 0;
    for (;;) {
      // spin briefly for back-to-back graphs (token generation), then sleep
      int spins = 0;
      while (gen_.load(std::memory_order_acquire) == seen && spins < 20000) { _mm_pause(); ++spins; }
      if (gen_.load(std::memory_order_acquire) == seen) {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return gen_.load() != seen || wake_ != woken; });
        woken = wake_;
        if (gen_.load() == seen && !stop_) continue;  // pre-woken: spin for the job that is on its way
      }
      seen = gen_.load(std::memory_order_acquire);
      if (stop_) return;
      (*job_)(ith, n_);
      pending_.fetch_sub(1, std::memory_order_acq_rel);
    }
  }
  int n_;
  SpinBarrier barrier_;
  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::atomic<uint64_t> gen_{0};
  uint64_t wake_ = 0;  // guarded by mu_
  std::atomic<int> pending_{0};
  const std::function<void(int, int)>* volatile job_ = nullptr;
  std::atomic<bool> stop_{false};
};

}  // namespace weft
