// The CPU runner of a kernel body (see cuda_block.h for the context every body is written
// against). `run_kernel` runs EVERY thread of every block, unchanged, as a fiber of its own: a
// thread runs until it reaches a barrier or a warp shuffle, then the next one runs. So the body
// that CI runs is the kernel's own source, with the GPU's semantics where they matter:
//   barrier    released when every thread of the block waits at it (the same call site); a
//              thread that returns, or waits at another barrier, while others wait, is an error
//              (on the GPU: a hang or undefined behaviour).
//   shuffle    lane-exact: when all 32 lanes of a warp are at the shuffle, each gets the value its
//              partner lane passed in. A lane that is not there (diverged, at a barrier, returned,
//              or missing in a partial warp) is an error: the GPU's full-mask shuffle is undefined.
//   shared     the block's dynamic shared memory, poisoned (all-ones bytes: NaN in every floating
//              type) at the start of each block, reached only through checked pointers:
//              an access outside it, a read of bytes no thread wrote, and a race (a 2-byte granule
//              written by one thread and read or written by another between the same two
//              barriers) are errors.
// A failed check stops the launch and `run_kernel` throws KernelCheckError naming the block, the
// threads, the shared-memory byte offset and the barriers around it. Global memory is plain host
// memory, unchecked. Blocks are independent by CUDA's rules, so they run on several OS threads
// (FUSEDRNN_RUNNER_THREADS, default the hardware's); a block's threads always share one.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace fusedrnn {
namespace exec {

class KernelCheckError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LaunchConfig {
  int64_t grid = 1;          // blocks (at most 2^31 - 1, CUDA's limit)
  int threads = 1;           // threads per block
  size_t shared_bytes = 0;   // dynamic shared memory per block
};

// The shadow of one 2-byte granule of shared memory (the smallest element a kernel stores is a
// half): who wrote and who read it in which barrier interval (epoch). Epoch 0 = never written.
struct Granule {
  uint32_t write_epoch;
  uint32_t read_epoch;
  int16_t writer;
  int16_t reader;  // kManyReaders when several threads read it in read_epoch
};
constexpr int16_t kManyReaders = -2;
constexpr size_t kGranuleBytes = 2;

// The block's shared memory and its shadow; `tid` is the thread running now.
class SharedChecker {
 public:
  unsigned char* base = nullptr;
  size_t size = 0;
  Granule* shadow = nullptr;
  uint32_t epoch = 1;
  int tid = 0;

  void on_read(uintptr_t addr, size_t n) {
    const size_t off = check_bounds(addr, n, "read");
    for (size_t g = off / kGranuleBytes, e = (off + n - 1) / kGranuleBytes; g <= e; ++g) {
      Granule& s = shadow[g];
      if (s.write_epoch == 0) fail_access("read of bytes no thread has written (poisoned)", off, n, -1);
      if (s.write_epoch == epoch && s.writer != tid) fail_access("race: read of a value another thread wrote since the last barrier", off, n, s.writer);
      if (s.read_epoch != epoch) {
        s.read_epoch = epoch;
        s.reader = static_cast<int16_t>(tid);
      } else if (s.reader != tid) {
        s.reader = kManyReaders;
      }
    }
  }
  void on_write(uintptr_t addr, size_t n) {
    const size_t off = check_bounds(addr, n, "write");
    for (size_t g = off / kGranuleBytes, e = (off + n - 1) / kGranuleBytes; g <= e; ++g) {
      Granule& s = shadow[g];
      if (s.write_epoch == epoch && s.writer != tid) fail_access("race: write of a value another thread wrote since the last barrier", off, n, s.writer);
      if (s.read_epoch == epoch && s.reader != tid) fail_access("race: write of a value another thread read since the last barrier", off, n, s.reader);
      s.write_epoch = epoch;
      s.writer = static_cast<int16_t>(tid);
    }
  }

  // Out of line (cpu_runner.cpp): stop the running thread and the launch with this message.
  [[noreturn]] void fail_access(const char* what, size_t offset, size_t bytes, int other);

 private:
  size_t check_bounds(uintptr_t addr, size_t n, const char* what) {
    const uintptr_t b = reinterpret_cast<uintptr_t>(base);
    if (addr < b || addr - b > size || size - (addr - b) < n) fail_bounds(addr, n, what);
    return addr - b;
  }
  [[noreturn]] void fail_bounds(uintptr_t addr, size_t n, const char* what);
};

// A reference to one element of shared memory: reading converts, assigning writes, both checked.
template <typename U>
class SharedRef {
 public:
  SharedRef(SharedChecker* c, uintptr_t a) : c_(c), a_(a) {}
  operator U() const {
    c_->on_read(a_, sizeof(U));
    U v;
    std::memcpy(static_cast<void*>(&v), reinterpret_cast<const void*>(a_), sizeof(U));
    return v;
  }
  const SharedRef& operator=(const U& v) const {
    c_->on_write(a_, sizeof(U));
    std::memcpy(reinterpret_cast<void*>(a_), static_cast<const void*>(&v), sizeof(U));
    return *this;
  }
  // Element to element: a read, then a write (never a rebinding of the reference).
  const SharedRef& operator=(const SharedRef& o) const { return *this = static_cast<U>(o); }
  const SharedRef& operator+=(const U& v) const { return *this = static_cast<U>(static_cast<U>(*this) + v); }
  const SharedRef& operator-=(const U& v) const { return *this = static_cast<U>(static_cast<U>(*this) - v); }
  const SharedRef& operator*=(const U& v) const { return *this = static_cast<U>(static_cast<U>(*this) * v); }

 private:
  SharedChecker* c_;
  uintptr_t a_;
};

// A pointer into shared memory on the CPU runner. Arithmetic is free; every access is checked
// (an address held outside the block's memory is fine until it is dereferenced, as on the GPU).
template <typename U>
class SharedPtr {
 public:
  SharedPtr() = default;
  SharedPtr(SharedChecker* c, uintptr_t a) : c_(c), a_(a) {}
  SharedPtr operator+(int64_t n) const { return SharedPtr(c_, a_ + uintptr_t(n) * sizeof(U)); }
  SharedPtr operator-(int64_t n) const { return SharedPtr(c_, a_ - uintptr_t(n) * sizeof(U)); }
  SharedRef<U> operator[](int64_t i) const { return SharedRef<U>(c_, a_ + uintptr_t(i) * sizeof(U)); }
  SharedRef<U> operator*() const { return SharedRef<U>(c_, a_); }

 private:
  SharedChecker* c_ = nullptr;
  uintptr_t a_ = 0;
};

class BlockRun;  // the scheduler of one launch (cpu_runner.cpp)

// What a body sees on the CPU: the same members as CudaBlock, plus the call site of each barrier
// and shuffle (default arguments), for the error messages.
class CpuThread {
 public:
  template <typename U>
  using ptr = SharedPtr<U>;

  unsigned thread() const { return unsigned(tid_); }
  unsigned block() const { return unsigned(*block_); }
  unsigned block_dim() const { return unsigned(threads_); }
  unsigned grid_dim() const { return unsigned(grid_); }
  void sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) const;
  template <typename V>
  V shfl_xor(V v, int lane_mask, const char* file = __builtin_FILE(), int line = __builtin_LINE()) const {
    static_assert(std::is_trivially_copyable<V>::value && sizeof(V) <= 8, "shuffles move one register");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(V));
    bits = shuffle_xor_bits(bits, sizeof(V), lane_mask, file, line);
    std::memcpy(&v, &bits, sizeof(V));
    return v;
  }
  template <typename U>
  SharedPtr<U> shared(size_t byte_offset) const {
    return SharedPtr<U>(checker_, reinterpret_cast<uintptr_t>(checker_->base) + byte_offset);
  }

 private:
  friend class BlockRun;
  uint64_t shuffle_xor_bits(uint64_t bits, size_t size, int lane_mask, const char* file, int line) const;
  BlockRun* run_ = nullptr;
  SharedChecker* checker_ = nullptr;
  const int64_t* block_ = nullptr;
  int64_t grid_ = 0;
  int tid_ = 0;
  int threads_ = 0;
};

using BodyFn = void (*)(void* body, CpuThread& ctx);
void run_kernel_erased(const LaunchConfig& config, BodyFn fn, void* body);

// Runs `body(ctx)` (ctx: CpuThread&) for every thread of `config.grid` blocks of
// `config.threads` threads; throws KernelCheckError when a check fails.
template <typename Body>
void run_kernel(const LaunchConfig& config, Body&& body) {
  using B = std::remove_reference_t<Body>;
  run_kernel_erased(config, [](void* b, CpuThread& ctx) { (*static_cast<B*>(b))(ctx); },
                    const_cast<void*>(static_cast<const void*>(&body)));
}

}  // namespace exec
}  // namespace fusedrnn
