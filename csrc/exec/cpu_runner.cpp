// The CPU runner's scheduler (see cpu_runner.h): one fiber per CUDA thread, switched
// cooperatively on one OS thread per group of blocks, so a block of 512 threads costs 512 small stacks and a context
// switch per barrier or shuffle per thread, not 512 OS threads waking on 2 cores. The switch is
// a few instructions of assembly on x86-64 (callee-saved registers, MXCSR and the x87 control
// word, then the stack pointer); elsewhere it falls back to ucontext (slower: it saves the
// signal mask with a system call).
#include "cpu_runner.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <exception>
#include <thread>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <utility>

// FUSEDRNN_EXEC_UCONTEXT=1 forces the portable switch (tests/test_kernel_runner.py builds both).
#if !defined(FUSEDRNN_EXEC_UCONTEXT) && !(defined(__x86_64__) && (defined(__linux__) || defined(__APPLE__)))
#define FUSEDRNN_EXEC_UCONTEXT 1
#endif
#if defined(FUSEDRNN_EXEC_UCONTEXT)
#include <ucontext.h>
#endif

#if !defined(FUSEDRNN_EXEC_UCONTEXT)
// void fusedrnn_exec_switch(void** save_sp, void* load_sp): saves the callee-saved state on the
// current stack, stores the stack pointer in *save_sp, loads load_sp and restores what that
// stack holds (laid out by Fibers::prepare for a fiber's first switch).
#if defined(__APPLE__)
#define FUSEDRNN_EXEC_SYM "_fusedrnn_exec_switch"
#define FUSEDRNN_EXEC_HIDE ".private_extern " FUSEDRNN_EXEC_SYM "\n"
#else
#define FUSEDRNN_EXEC_SYM "fusedrnn_exec_switch"
#define FUSEDRNN_EXEC_HIDE ".hidden " FUSEDRNN_EXEC_SYM "\n.type " FUSEDRNN_EXEC_SYM ", @function\n"
#endif
asm(".text\n"
    ".globl " FUSEDRNN_EXEC_SYM "\n" FUSEDRNN_EXEC_HIDE
    ".p2align 4\n" FUSEDRNN_EXEC_SYM ":\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  subq $8, %rsp\n"
    "  stmxcsr (%rsp)\n"
    "  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n"
    "  fldcw 4(%rsp)\n"
    "  addq $8, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n");
extern "C" void fusedrnn_exec_switch(void** save_sp, void* load_sp);
#endif

namespace fusedrnn {
namespace exec {
namespace {

constexpr size_t kStackBytes = 256 * 1024;  // per fiber; mostly never touched (mmap'd lazily)
constexpr int kWarp = 32;

enum class Wait : uint8_t { kRunnable, kBarrier, kShuffle, kDone };

struct ThreadState {
  Wait wait = Wait::kRunnable;
  const char* file = "";
  int line = 0;
  int lane_mask = 0;
  size_t size = 0;
  uint64_t value = 0;
  uint64_t result = 0;
};

// Stacks with a guard page below each (an overflow faults instead of corrupting a neighbour),
// kept per OS thread and reused across launches.
class Stacks {
 public:
  ~Stacks() {
    if (base_ != nullptr) munmap(base_, bytes_);
  }
  unsigned char* top(int i) const { return base_ + size_t(i + 1) * slot_; }
  void ensure(int n) {
    if (n <= count_) return;
    if (base_ != nullptr) munmap(base_, bytes_);
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    slot_ = kStackBytes + page;
    bytes_ = slot_ * size_t(n);
    void* m = mmap(nullptr, bytes_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw std::runtime_error("fusedrnn kernel runner: cannot map fiber stacks");
    base_ = static_cast<unsigned char*>(m);
    for (int i = 0; i < n; ++i) mprotect(base_ + size_t(i) * slot_, page, PROT_NONE);
    count_ = n;
  }

 private:
  unsigned char* base_ = nullptr;
  size_t bytes_ = 0, slot_ = 0;
  int count_ = 0;
};

thread_local BlockRun* t_current = nullptr;

std::string ranges(const std::vector<int>& ids) {
  std::ostringstream o;
  for (size_t i = 0; i < ids.size();) {
    size_t k = i;
    while (k + 1 < ids.size() && ids[k + 1] == ids[k] + 1) ++k;
    if (i) o << ",";
    o << ids[i];
    if (k > i) o << "-" << ids[k];
    i = k + 1;
  }
  return o.str();
}

}  // namespace

class BlockRun {
 public:
  BlockRun(const LaunchConfig& c, BodyFn fn, void* body) : config_(c), fn_(fn), body_(body) {
    const int n = c.threads;
    if (n < 1 || n > 1024) throw std::invalid_argument("fusedrnn kernel runner: threads per block must be in [1, 1024]");
    if (c.grid < 0 || c.grid > 0x7fffffff) throw std::invalid_argument("fusedrnn kernel runner: grid must be in [0, 2^31 - 1]");
    // One allocation: the shared memory, then its shadow.
    const size_t granules = (c.shared_bytes + kGranuleBytes - 1) / kGranuleBytes;
    smem_.resize(c.shared_bytes + 64);
    shadow_.resize(granules + 1);
    // 16-byte aligned, as CUDA's dynamic shared memory.
    uintptr_t a = reinterpret_cast<uintptr_t>(smem_.data());
    checker_.base = smem_.data() + ((16 - a % 16) % 16);
    checker_.size = c.shared_bytes;
    checker_.shadow = shadow_.data();
    state_.resize(n);
    ctx_.resize(n);
    sp_.resize(n);
#if defined(FUSEDRNN_EXEC_UCONTEXT)
    uctx_.resize(n);
#endif
    for (int t = 0; t < n; ++t) {
      CpuThread& x = ctx_[t];
      x.run_ = this;
      x.checker_ = &checker_;
      x.block_ = &block_;
      x.grid_ = c.grid;
      x.tid_ = t;
      x.threads_ = n;
    }
    stacks().ensure(n);
  }

  // Blocks first, first + stride, ... below `stop` (lowered by any worker that fails, so the
  // launch reports the failing block with the lowest index, whatever the number of workers).
  void run(int64_t first, int64_t stride, std::atomic<int64_t>& stop) {
    BlockRun* outer = t_current;
    t_current = this;
    try {
      for (block_ = first; block_ < config_.grid && block_ < stop.load(); block_ += stride) run_block();
    } catch (...) {
      t_current = outer;
      throw;
    }
    t_current = outer;
  }

  // From a fiber: wait at a barrier / a shuffle, or fail.
  void barrier(int tid, const char* file, int line) {
    ThreadState& s = state_[tid];
    s.wait = Wait::kBarrier;
    s.file = file;
    s.line = line;
    yield(tid);
  }
  uint64_t shuffle(int tid, uint64_t bits, size_t size, int lane_mask, const char* file, int line) {
    ThreadState& s = state_[tid];
    s.wait = Wait::kShuffle;
    s.file = file;
    s.line = line;
    s.value = bits;
    s.size = size;
    s.lane_mask = lane_mask;
    yield(tid);
    return s.result;
  }
  // From a fiber: record why the launch stops, then leave the fiber for good. Callers build the
  // message in a scope that ends before abandon(), so the abandoned stack owns no heap memory.
  void set_error(std::string message) { error_ = std::move(message); }
  [[noreturn]] void abandon() {
    const int tid = running_;
    state_[tid].wait = Wait::kDone;
    yield(tid);
    std::abort();  // never resumed
  }
  std::string where(int tid) const {
    std::ostringstream o;
    o << "block " << block_ << ", thread " << tid << " (warp " << tid / kWarp << ", lane " << tid % kWarp << ")";
    return o.str();
  }
  std::string interval() const {
    if (last_barrier_file_ == nullptr) return "before the first barrier";
    std::ostringstream o;
    o << "after barrier " << epoch_count() << " (" << last_barrier_file_ << ":" << last_barrier_line_ << ")";
    return o.str();
  }
  uint32_t epoch_count() const { return checker_.epoch - 1; }
  int64_t block() const { return block_; }

  static void fiber_main() {
    BlockRun* r = t_current;
    const int tid = r->running_;
    r->fn_(r->body_, r->ctx_[tid]);
    r->state_[tid].wait = Wait::kDone;
    r->yield(tid);
    std::abort();  // a finished fiber is never resumed
  }

 private:
  static Stacks& stacks() {
    static thread_local Stacks s;
    return s;
  }

  void prepare(int tid) {
#if defined(FUSEDRNN_EXEC_UCONTEXT)
    ucontext_t& u = uctx_[tid];
    getcontext(&u);
    u.uc_stack.ss_sp = stacks().top(tid) - kStackBytes;
    u.uc_stack.ss_size = kStackBytes;
    u.uc_link = nullptr;
    makecontext(&u, reinterpret_cast<void (*)()>(&BlockRun::fiber_main), 0);
#else
    // The frame fusedrnn_exec_switch pops: [mxcsr, x87 cw] r15 r14 r13 r12 rbx rbp, then the
    // return address (fiber_main) and a null slot, so that fiber_main starts with the stack
    // aligned as after a call.
    uint64_t* sp = reinterpret_cast<uint64_t*>(stacks().top(tid));
    *--sp = 0;
    *--sp = reinterpret_cast<uint64_t>(&BlockRun::fiber_main);
    for (int i = 0; i < 6; ++i) *--sp = 0;
    uint32_t mxcsr;
    uint16_t fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    --sp;
    std::memcpy(reinterpret_cast<unsigned char*>(sp), &mxcsr, 4);
    std::memcpy(reinterpret_cast<unsigned char*>(sp) + 4, &fpucw, 2);
    sp_[tid] = sp;
#endif
  }

  void resume(int tid) {
    running_ = tid;
    checker_.tid = tid;
    state_[tid].wait = Wait::kRunnable;
#if defined(FUSEDRNN_EXEC_UCONTEXT)
    swapcontext(&sched_uctx_, &uctx_[tid]);
#else
    fusedrnn_exec_switch(&sched_sp_, sp_[tid]);
#endif
  }
  void yield(int tid) {
#if defined(FUSEDRNN_EXEC_UCONTEXT)
    swapcontext(&uctx_[tid], &sched_uctx_);
#else
    fusedrnn_exec_switch(&sp_[tid], sched_sp_);
#endif
  }

  [[noreturn]] void fail(const std::string& message) { throw KernelCheckError(message); }

  void run_block() {
    const int n = config_.threads;
    std::memset(checker_.base, 0xff, config_.shared_bytes);
    std::memset(static_cast<void*>(shadow_.data()), 0, shadow_.size() * sizeof(Granule));
    checker_.epoch = 1;
    last_barrier_file_ = nullptr;
    last_barrier_line_ = 0;
    for (int t = 0; t < n; ++t) {
      state_[t] = ThreadState{};
      prepare(t);
    }
    std::vector<char> runnable(n, 1);
    for (;;) {
      for (int t = 0; t < n; ++t) {
        if (!runnable[t]) continue;
        runnable[t] = 0;
        resume(t);
        if (!error_.empty()) fail(error_);
      }
      // Every thread now waits or is done. Shuffles first: a warp whose lanes all wait at one.
      bool progressed = false;
      for (int w = 0; w * kWarp < n; ++w) {
        const int lo = w * kWarp, hi = std::min(n, lo + kWarp);
        bool all = true;
        for (int t = lo; t < hi && all; ++t) all = state_[t].wait == Wait::kShuffle;
        if (!all) continue;
        if (hi - lo < kWarp) fail(shuffle_message(w, "the warp has only " + std::to_string(hi - lo) + " lanes"));
        check_same_site(lo, hi, Wait::kShuffle);
        for (int t = lo; t < hi; ++t) {
          const ThreadState& s = state_[t];
          if (s.lane_mask < 0 || s.lane_mask >= kWarp) {
            fail("shuffle with lane mask " + std::to_string(s.lane_mask) + " outside the warp at " + s.file + ":" +
                 std::to_string(s.line) + ", " + where(t));
          }
          const ThreadState& src = state_[lo + ((t - lo) ^ s.lane_mask)];
          if (src.size != s.size) fail(shuffle_message(w, "lanes pass values of different sizes"));
          state_[t].result = src.value;
        }
        for (int t = lo; t < hi; ++t) runnable[t] = 1;
        progressed = true;
      }
      if (progressed) continue;
      std::vector<int> at_barrier, at_shuffle, done;
      for (int t = 0; t < n; ++t) {
        if (state_[t].wait == Wait::kBarrier) at_barrier.push_back(t);
        else if (state_[t].wait == Wait::kShuffle) at_shuffle.push_back(t);
        else done.push_back(t);
      }
      if (int(done.size()) == n) return;
      if (!at_shuffle.empty()) {
        const int w = at_shuffle.front() / kWarp;
        std::vector<int> missing;
        for (int t = w * kWarp; t < std::min(n, (w + 1) * kWarp); ++t) {
          if (state_[t].wait != Wait::kShuffle) missing.push_back(t);
        }
        fail(shuffle_message(w, "lanes " + ranges(missing) + " are not active (" + describe(missing) + ")"));
      }
      // Only barriers and finished threads are left.
      if (!done.empty()) {
        const ThreadState& s = state_[at_barrier.front()];
        fail("barrier at " + std::string(s.file) + ":" + std::to_string(s.line) + " in block " +
             std::to_string(block_) + " is not reached by every thread: threads " + ranges(at_barrier) +
             " wait there, threads " + ranges(done) + " returned");
      }
      check_same_site(0, n, Wait::kBarrier);
      last_barrier_file_ = state_[0].file;
      last_barrier_line_ = state_[0].line;
      ++checker_.epoch;
      std::fill(runnable.begin(), runnable.end(), 1);
    }
  }

  // "16-31 returned; 40-47 at the barrier f:l": the threads grouped by where they are.
  std::string describe(const std::vector<int>& ids) const {
    std::vector<std::pair<std::string, std::vector<int>>> groups;
    for (int t : ids) {
      const ThreadState& s = state_[t];
      std::string at = s.wait == Wait::kDone ? std::string("returned")
                                             : std::string(s.wait == Wait::kBarrier ? "at the barrier " : "at the shuffle ") +
                                                   s.file + ":" + std::to_string(s.line);
      auto g = std::find_if(groups.begin(), groups.end(), [&](const auto& x) { return x.first == at; });
      if (g == groups.end()) groups.emplace_back(at, std::vector<int>{t});
      else g->second.push_back(t);
    }
    std::string o;
    for (const auto& g : groups) o += (o.empty() ? "" : "; ") + ranges(g.second) + " " + g.first;
    return o;
  }

  std::string shuffle_message(int w, const std::string& why) const {
    std::ostringstream o;
    o << "warp shuffle over inactive lanes in block " << block_ << ", warp " << w;
    for (int t = w * kWarp; t < std::min(config_.threads, (w + 1) * kWarp); ++t) {
      if (state_[t].wait == Wait::kShuffle) {
        o << " at " << state_[t].file << ":" << state_[t].line;
        break;
      }
    }
    o << ": " << why << " (a full-mask shuffle needs all 32 lanes)";
    return o.str();
  }

  void check_same_site(int lo, int hi, Wait kind) {
    const ThreadState& a = state_[lo];
    for (int t = lo + 1; t < hi; ++t) {
      const ThreadState& b = state_[t];
      if (b.line != a.line || std::strcmp(b.file, a.file) != 0) {
        fail(std::string(kind == Wait::kBarrier ? "threads wait at different barriers" : "lanes wait at different shuffles") +
             " in block " + std::to_string(block_) + ": thread " + std::to_string(lo) + " at " + a.file + ":" +
             std::to_string(a.line) + ", thread " + std::to_string(t) + " at " + b.file + ":" + std::to_string(b.line));
      }
    }
  }

  LaunchConfig config_;
  BodyFn fn_;
  void* body_;
  int64_t block_ = 0;
  int running_ = 0;
  std::string error_;
  const char* last_barrier_file_ = nullptr;
  int last_barrier_line_ = 0;
  std::vector<unsigned char> smem_;
  std::vector<Granule> shadow_;
  SharedChecker checker_;
  std::vector<ThreadState> state_;
  std::vector<CpuThread> ctx_;
  std::vector<void*> sp_;
  void* sched_sp_ = nullptr;
#if defined(FUSEDRNN_EXEC_UCONTEXT)
  std::vector<ucontext_t> uctx_;
  ucontext_t sched_uctx_;
#endif
};

void CpuThread::sync(const char* file, int line) const { run_->barrier(tid_, file, line); }

uint64_t CpuThread::shuffle_xor_bits(uint64_t bits, size_t size, int lane_mask, const char* file, int line) const {
  return run_->shuffle(tid_, bits, size, lane_mask, file, line);
}

void SharedChecker::fail_access(const char* what, size_t offset, size_t bytes, int other) {
  BlockRun* r = t_current;
  {
    std::ostringstream o;
    o << "shared memory " << what << ": " << r->where(tid) << ", " << bytes << " bytes at offset " << offset << " of "
      << size;
    if (other >= 0) o << ", other thread " << other;
    else if (other == kManyReaders) o << ", read by several other threads";
    o << ", " << r->interval();
    r->set_error(o.str());
  }
  r->abandon();
}

void SharedChecker::fail_bounds(uintptr_t addr, size_t n, const char* what) {
  BlockRun* r = t_current;
  {
    std::ostringstream o;
    o << "shared memory " << what << " out of bounds: " << r->where(tid) << ", " << n << " bytes at offset "
      << (static_cast<long long>(addr) - static_cast<long long>(reinterpret_cast<uintptr_t>(base))) << " of a "
      << size << "-byte block, " << r->interval();
    r->set_error(o.str());
  }
  r->abandon();
}

// Blocks are independent (CUDA runs them in any order, at once), so they are spread over OS
// threads, each with its own fibers, shared memory and shadow: FUSEDRNN_RUNNER_THREADS, default
// the hardware's threads, at most one per block.
int runner_threads(int64_t grid) {
  int64_t n = std::thread::hardware_concurrency();
  if (const char* env = std::getenv("FUSEDRNN_RUNNER_THREADS")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v >= 1) n = v;
  }
  return int(std::max<int64_t>(1, std::min<int64_t>({n, grid, 64})));
}

void run_kernel_erased(const LaunchConfig& config, BodyFn fn, void* body) {
  if (config.grid == 0) return;
  std::atomic<int64_t> stop{INT64_MAX};
  const int workers = runner_threads(config.grid);
  if (workers == 1) {
    BlockRun run(config, fn, body);
    run.run(0, 1, stop);
    return;
  }
  std::vector<std::exception_ptr> errors(workers);
  std::vector<int64_t> error_block(workers, INT64_MAX);
  std::vector<std::thread> pool;
  for (int w = 0; w < workers; ++w) {
    pool.emplace_back([&, w] {
      int64_t at = w;  // the block that failed (setting up counts as the worker's first block)
      try {
        BlockRun run(config, fn, body);
        try {
          run.run(w, workers, stop);
        } catch (...) {
          at = run.block();
          throw;
        }
      } catch (...) {
        errors[w] = std::current_exception();
        error_block[w] = at;
        int64_t cur = stop.load();
        while (at < cur && !stop.compare_exchange_weak(cur, at)) {
        }
      }
    });
  }
  for (auto& t : pool) t.join();
  const int first = int(std::min_element(error_block.begin(), error_block.end()) - error_block.begin());
  if (errors[first]) std::rethrow_exception(errors[first]);
}

}  // namespace exec
}  // namespace fusedrnn
