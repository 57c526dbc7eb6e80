// Shared by every fastload native library: error reporting through a thread-local message
// (C ABI, read from Python with fl_last_error), a persistent thread pool that serves
// concurrent callers, and the guard that keeps C++ exceptions from crossing the C ABI.
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <cxxabi.h>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <stdexcept>
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

// The message of the exception being handled (call only inside a catch block). Never
// allocates: it runs after bad_alloc.
inline void describe_current_exception(char* buf, size_t cap) {
  try {
    throw;
  } catch (const std::bad_alloc&) {
    snprintf(buf, cap, "out of memory (std::bad_alloc)");
  } catch (const std::length_error& e) {
    snprintf(buf, cap, "out of memory (length error: %s)", e.what());
  } catch (const std::exception& e) {
    snprintf(buf, cap, "C++ exception: %s", e.what());
  } catch (...) {
    snprintf(buf, cap, "unknown C++ exception");
  }
}

// Body of every exported entry point: `return fl::guard("fl_x", [&] { ... return 0; });`.
// A C++ exception becomes an error code and a message (it must not unwind into ctypes'
// C frames: that is std::terminate). A forced unwind (thread cancellation) is not an error
// and must keep unwinding.
template <typename F>
inline int guard(const char* what, F&& f) {
  try {
    return f();
  } catch (abi::__forced_unwind&) {
    throw;
  } catch (...) {
    char m[512];
    describe_current_exception(m, sizeof m);
    return fail("%s: %s", what, m);
  }
}

// A persistent pool: threads are created once per library and reused by every call, so a
// call costs a wake-up (microseconds), not thread creation. parallel_for splits [0, n) into
// chunks claimed dynamically; the calling thread works too. Several callers (e.g. a
// training and a validation loader in one process) run at the same time: each call is a
// job in a list, idle workers help the oldest job that still has chunks and a free helper
// slot, and a caller never waits for anything but the helpers that joined its own job.
class ThreadPool {
 public:
  // One pool per process: after fork() the child has none of the parent's threads, so it
  // gets a fresh pool (the parent's object is leaked in the child on purpose: its threads
  // do not exist there and must not be joined). Never destroyed, and its statics have
  // trivial destructors: exit() neither joins nor waits for a worker (workers that are
  // running at exit simply stop with the process).
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

  // fn(begin, end, worker_id) with worker_id in [0, nthreads) unique within the call;
  // returns 0 after all chunks ran, or -1 (message in fl::error_buffer()) if fn threw in any
  // thread: the first exception is kept, the chunks not yet started are skipped.
  int parallel_for(long n, int nthreads, long grain, const std::function<void(long, long, int)>& fn) {
    if (n <= 0) return 0;
    if (nthreads < 1) nthreads = 1;
    if (grain < 1) grain = 1;
    const long chunks = (n + grain - 1) / grain;
    if (nthreads > chunks) nthreads = (int)chunks;
    Job job;
    job.fn = &fn;
    job.n = n;
    job.grain = grain;
    job.chunks = chunks;
    job.max_helpers = nthreads - 1;
    if (job.max_helpers > 0) {
      std::lock_guard<std::mutex> lk(mu_);
      ensure_workers_locked(job.max_helpers);
      job.next_ = jobs_;
      jobs_ = &job;
      cv_.notify_all();
    }
    work(job, 0);
    if (job.max_helpers > 0) {
      // All chunks are claimed: unlink the job so that no worker joins it now (a caller
      // never waits for a thread that got no work), then wait for the helpers that did
      // join, since they use this frame's `job`.
      std::unique_lock<std::mutex> lk(mu_);
      for (Job** p = &jobs_; *p; p = &(*p)->next_)
        if (*p == &job) {
          *p = job.next_;
          break;
        }
      done_cv_.wait(lk, [&] { return job.helpers_running == 0; });
    }
    if (job.failed.load()) return fail("%s", job.msg);
    return 0;
  }

  // Test hook: how many jobs (callers) are in the list right now.
  int active_jobs() {
    std::lock_guard<std::mutex> lk(mu_);
    int k = 0;
    for (Job* j = jobs_; j; j = j->next_) ++k;
    return k;
  }

 private:
  struct Job {
    const std::function<void(long, long, int)>* fn = nullptr;
    long n = 0, grain = 1, chunks = 0;
    std::atomic<long> next{0};
    int max_helpers = 0, helpers_joined = 0, helpers_running = 0;  // guarded by the pool's mu_
    std::atomic<bool> failed{false};
    std::atomic<bool> msg_set{false};
    char msg[512] = {0};
    Job* next_ = nullptr;
  };

  // Claims and runs chunks of `job` until none is left; an exception stops the job.
  static void work(Job& job, int wid) {
    for (;;) {
      const long c = job.next.fetch_add(1);
      if (c >= job.chunks) return;
      const long b = c * job.grain, e = b + job.grain < job.n ? b + job.grain : job.n;
      try {
        (*job.fn)(b, e, wid);
      } catch (abi::__forced_unwind&) {
        throw;
      } catch (...) {
        bool expected = false;
        if (job.msg_set.compare_exchange_strong(expected, true))
          describe_current_exception(job.msg, sizeof job.msg);
        job.failed.store(true);
        job.next.store(job.chunks);  // skip the chunks nobody started
        return;
      }
    }
  }

  void ensure_workers_locked(int k) {
    while ((int)workers_.size() < k) {
      workers_.emplace_back([this] { loop(); });
      workers_.back().detach();  // never joined: the process may exit at any moment
    }
  }

  // A job that still has unclaimed chunks and a free helper slot (oldest first).
  Job* pick_locked() {
    Job* found = nullptr;
    for (Job* j = jobs_; j; j = j->next_)
      if (j->helpers_joined < j->max_helpers && j->next.load() < j->chunks) found = j;
    return found;
  }

  void loop() {
    for (;;) {
      Job* job = nullptr;
      int wid;
      {
        std::unique_lock<std::mutex> lk(mu_);
        // Keep the job the predicate found: a second pick_locked() could see null, since
        // the caller claims chunks (job->next) without the lock. The job stays linked (and
        // alive) while we hold mu_, and the caller waits for helpers_running to drop.
        cv_.wait(lk, [&] { return (job = pick_locked()) != nullptr; });
        wid = ++job->helpers_joined;
        ++job->helpers_running;
      }
      work(*job, wid);
      std::lock_guard<std::mutex> lk(mu_);
      if (--job->helpers_running == 0) done_cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  std::vector<std::thread> workers_;
  Job* jobs_ = nullptr;  // newest first
};

[[nodiscard]] inline int parallel_for(long n, int nthreads, long grain,
                                      const std::function<void(long, long, int)>& fn) {
  return ThreadPool::instance().parallel_for(n, nthreads, grain, fn);
}

inline int default_threads() {
  unsigned h = std::thread::hardware_concurrency();
  return h ? (int)h : 1;
}

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace fl

// Every library exports its thread's last error message, and two pool test hooks:
// fl_pool_test_throw runs a parallel_for whose worker `throw_at` throws (kind 0:
// std::bad_alloc, 1: std::runtime_error, 2: an int), which must come back as an error code;
// fl_pool_test_sleep runs n tasks of `ms` milliseconds on nthreads threads and records, from
// inside, the steady-clock time (seconds) at which the call's first task began and its
// last task ended (times[0], times[1]) and the most jobs seen in the pool at once (times[2]).
#define FL_DEFINE_LAST_ERROR                                                                      \
  FL_EXPORT const char* fl_last_error() { return fl::error_buffer(); }                           \
  FL_EXPORT int fl_pool_test_throw(int kind, long n, int nthreads, long throw_at) {               \
    return fl::guard("fl_pool_test_throw", [&] {                                                  \
      return fl::parallel_for(n, nthreads, 1, [&](long b, long e, int) {                          \
        for (long i = b; i < e; ++i)                                                              \
          if (i == throw_at) {                                                                    \
            if (kind == 0) throw std::bad_alloc();                                                \
            if (kind == 1) throw std::runtime_error("test exception");                           \
            throw 7;                                                                              \
          }                                                                                       \
      });                                                                                         \
    });                                                                                           \
  }                                                                                               \
  FL_EXPORT int fl_pool_test_sleep(long n, int nthreads, int ms, double* times, int64_t cap) {    \
    return fl::guard("fl_pool_test_sleep", [&] {                                                  \
      if (times == nullptr || cap < 3) return fl::fail("fl_pool_test_sleep: need 3 doubles");     \
      std::mutex mu;                                                                              \
      double t0 = 1e300, t1 = 0;                                                                  \
      int most = 0;                                                                               \
      int rc = fl::parallel_for(n, nthreads, 1, [&](long b, long e, int) {                        \
        for (long i = b; i < e; ++i) {                                                            \
          const double s = fl::now_seconds();                                                     \
          const int k = fl::ThreadPool::instance().active_jobs();                                 \
          std::this_thread::sleep_for(std::chrono::milliseconds(ms));                             \
          const double f = fl::now_seconds();                                                     \
          std::lock_guard<std::mutex> lk(mu);                                                     \
          t0 = s < t0 ? s : t0;                                                                   \
          t1 = f > t1 ? f : t1;                                                                   \
          most = k > most ? k : most;                                                             \
        }                                                                                         \
      });                                                                                         \
      times[0] = t0;                                                                              \
      times[1] = t1;                                                                              \
      times[2] = most;                                                                            \
      return rc;                                                                                  \
    });                                                                                           \
  }
