// Shared by every fastload native library: error reporting through a thread-local message
// (C ABI, read from Python with fl_last_error) and a persistent thread pool.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include <unistd.h>

#define FL_EXPORT extern "C" __attribute__((visibility("default")))

namespace fl {

inline char* error_buffer() {
  static thread_local char buf[1024];
  return buf;
}

// Record an error message for the calling thread; returns -1 so callers can `return fail(...)`.
inline int fail(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(error_buffer(), 1024, fmt, ap);
  va_end(ap);
  return -1;
}

// A persistent pool: threads are created once per library and reused by every call, so a
// call costs a wake-up (microseconds), not thread creation. parallel_for splits [0, n) into
// chunks claimed dynamically; the calling thread works too. One parallel_for at a time per
// pool (calls from several Python threads are serialized by the mutex).
class ThreadPool {
 public:
  // One pool per process: after fork() the child has none of the parent's threads, so it
  // gets a fresh pool (the parent's object is leaked in the child on purpose: its threads
  // do not exist there and must not be joined). Never destroyed: exit does not join.
  static ThreadPool& instance() {
    static std::mutex mu;
    static ThreadPool* pool = nullptr;
    static pid_t owner = 0;
    std::lock_guard<std::mutex> lk(mu);
    pid_t me = getpid();
    if (pool == nullptr || owner != me) {
      pool = new ThreadPool();
      owner = me;
    }
    return *pool;
  }

  // fn(begin, end, worker_id) with worker_id in [0, nthreads); returns after all chunks ran.
  void parallel_for(long n, int nthreads, long grain,
                    const std::function<void(long, long, int)>& fn) {
    if (n <= 0) return;
    if (nthreads < 1) nthreads = 1;
    if (grain < 1) grain = 1;
    long chunks = (n + grain - 1) / grain;
    if (nthreads > chunks) nthreads = (int)chunks;
    if (nthreads == 1) {
      fn(0, n, 0);
      return;
    }
    std::lock_guard<std::mutex> call_lock(call_mu_);
    ensure_workers(nthreads - 1);
    std::atomic<long> next{0};
    const std::function<void(int)> body = [&](int wid) {
      for (;;) {
        long c = next.fetch_add(1);
        if (c >= chunks) break;
        long b = c * grain, e = b + grain < n ? b + grain : n;
        fn(b, e, wid);
      }
    };
    {
      std::lock_guard<std::mutex> lk(mu_);
      task_ = &body;
      active_ = nthreads - 1;
      ++generation_;
    }
    cv_.notify_all();
    body(0);
    // All chunks are claimed: withdraw the task so a worker that wakes only now does not
    // start (the caller never waits for a thread that got no work), then wait for the
    // workers that did start, since they use this frame's `body`.
    std::unique_lock<std::mutex> lk(mu_);
    task_ = nullptr;
    done_cv_.wait(lk, [&] { return running_ == 0; });
  }

 private:
  void ensure_workers(int k) {
    while ((int)workers_.size() < k) {
      int wid = (int)workers_.size() + 1;
      workers_.emplace_back([this, wid] { loop(wid); });
    }
  }

  void loop(int wid) {
    unsigned long seen = 0;
    for (;;) {
      const std::function<void(int)>* task;
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (wid > active_ || task_ == nullptr) continue;  // not needed, or already finished
        task = task_;
        ++running_;
      }
      (*task)(wid);
      std::lock_guard<std::mutex> lk(mu_);
      if (--running_ == 0) done_cv_.notify_all();
    }
  }

  std::mutex call_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* task_ = nullptr;
  unsigned long generation_ = 0;
  int active_ = 0, running_ = 0;
};

inline void parallel_for(long n, int nthreads, long grain,
                         const std::function<void(long, long, int)>& fn) {
  ThreadPool::instance().parallel_for(n, nthreads, grain, fn);
}

inline int default_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h ? (int)h : 1;
}

}  // namespace fl

// Every library exports its thread's last error message.
#define FL_DEFINE_LAST_ERROR \
  FL_EXPORT const char* fl_last_error() { return fl::error_buffer(); }
