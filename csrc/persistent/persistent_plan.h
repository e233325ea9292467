// The host-side choice between the persistent and the per-step CUDA forward,
// framework-free so the CPU tests can run it with made-up device limits. It
// never accepts a configuration the device cannot run: the kernel's register
// count, thread limit and shared memory are checked against the device's.
#pragma once

#include <cstdint>
#include <cstring>

#include "persistent_limits.h"

namespace fusedrnn {
namespace persistent {

enum class PathRequest { kAuto, kPerStep, kPersistent, kInvalid };

// FUSEDRNN_CUDA_PATH=per_step|persistent|auto (unset or empty: auto).
inline PathRequest parse_path_request(const char* v) {
  if (v == nullptr || v[0] == '\0' || std::strcmp(v, "auto") == 0) return PathRequest::kAuto;
  if (std::strcmp(v, "per_step") == 0) return PathRequest::kPerStep;
  if (std::strcmp(v, "persistent") == 0) return PathRequest::kPersistent;
  return PathRequest::kInvalid;
}

// What the device and the compiled kernel offer (cudaGetDeviceProperties,
// cudaFuncGetAttributes), filled by the caller.
struct DeviceLimits {
  int64_t sm_count = 0;
  int64_t shared_optin_bytes = 0;     // sharedMemPerBlockOptin
  int64_t registers_per_block = 0;    // regsPerBlock
  int64_t kernel_registers = 0;       // cudaFuncAttributes::numRegs
  int64_t kernel_max_threads = 0;     // cudaFuncAttributes::maxThreadsPerBlock
  int64_t kernel_static_shared = 0;   // cudaFuncAttributes::sharedSizeBytes
};

// The layer as the plan sees it.
struct LayerShape {
  int64_t hidden = 0;
  int64_t batch = 0;
  bool float64 = false;
  bool projection = false;
};

struct Plan {
  bool ok = false;
  int64_t rows_per_cta = 0;
  int64_t grid = 0;
  int64_t shared_bytes = 0;
  const char* why_not = "";  // when !ok: the reason, for the error under FUSEDRNN_CUDA_PATH=persistent
};

// `shared_bytes_for_rows(rows)`: the kernel's dynamic shared memory for a rows-per-CTA.
template <typename SharedBytes>
Plan plan_forward(const LayerShape& l, const DeviceLimits& d, SharedBytes shared_bytes_for_rows) {
  Plan p;
  if (l.float64) { p.why_not = "float64 runs on the per-step path only"; return p; }
  if (l.projection) { p.why_not = "LSTM proj_size runs on the per-step path only"; return p; }
  if (l.hidden < 1 || l.hidden > kMaxHidden) {
    p.why_not = "hidden_size above the persistent kernel's limit of 128 (kMaxHidden)";
    return p;
  }
  if (l.batch < 1) { p.why_not = "empty batch"; return p; }
  if (d.kernel_max_threads < kThreads || d.kernel_registers * kThreads > d.registers_per_block ||
      d.kernel_registers > kMaxRegisters) {
    p.why_not = "the kernel's registers do not fit 512 threads in one block on this device";
    return p;
  }
  // Spread the rows over every SM first (latency: one row per CTA is fastest),
  // then put several rows in a CTA so one wave covers the batch.
  const int64_t sms = d.sm_count > 0 ? d.sm_count : 1;
  int64_t rows = (l.batch + sms - 1) / sms;
  rows = rows < 1 ? 1 : (rows > kMaxRowsPerCta ? kMaxRowsPerCta : rows);
  const int64_t limit = d.shared_optin_bytes - d.kernel_static_shared;
  while (rows > 1 && int64_t(shared_bytes_for_rows(rows)) > limit) --rows;
  const int64_t bytes = int64_t(shared_bytes_for_rows(rows));
  if (bytes > limit) {
    p.why_not = "the kernel's shared memory exceeds this device's per-block limit";
    return p;
  }
  p.ok = true;
  p.rows_per_cta = rows;
  p.grid = (l.batch + rows - 1) / rows;
  p.shared_bytes = bytes;
  return p;
}

// Both directions of a bidirectional layer in ONE launch (persistent_directions.h) only when all
// their CTAs are co-resident: the kernels run one CTA per SM (512 threads at up to 128 registers
// fill an SM's 65536), so twice one direction's grid must fit the SMs; otherwise the launch would
// run in two waves, no better than two launches, and the caller launches the directions one by one.
inline bool both_directions_in_one_launch(const Plan& one_direction, const DeviceLimits& d) {
  return one_direction.ok && 2 * one_direction.grid <= d.sm_count;
}

}  // namespace persistent
}  // namespace fusedrnn
