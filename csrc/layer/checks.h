// Argument checks shared by every operator on every device. Each failure says
// which operator, which argument, what was expected and what it got; nothing
// reaches a kernel before these pass, so a bad call never reads out of bounds.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace fusedrnn {

#define FUSEDRNN_CHECK(cond, op, ...) TORCH_CHECK(cond, "fusedrnn.", op, ": ", __VA_ARGS__)

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
  const auto dt = t.scalar_type();
  FUSEDRNN_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
                 name, " must be float32, float64, float16 or bfloat16, got ", dt);
}

// Same dtype and device as the reference tensor (the input).
inline void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref) {
  FUSEDRNN_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of input (",
                 ref.scalar_type(), "), got ", t.scalar_type());
  FUSEDRNN_CHECK(t.device() == ref.device(), op, name, " must be on the device of input (", ref.device(),
                 "), got ", t.device());
}

inline void check_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef expected,
                        const char* meaning) {
  FUSEDRNN_CHECK(t.sizes() == expected, op, name, " must have shape ", expected, " ", meaning, ", got ",
                 t.sizes());
}

inline void check_optional(const char* op, const char* name, const std::optional<at::Tensor>& t,
                           const at::Tensor& ref, at::IntArrayRef expected, const char* meaning) {
  if (!t.has_value() || !t->defined()) return;
  check_like(op, name, *t, ref);
  check_shape(op, name, *t, expected, meaning);
}

// The time-step schedule of a packed sequence: at time index t the first
// batch[t] rows of the (length-sorted) batch are active, stored at rows
// offset[t] .. offset[t] + batch[t] of the packed [tokens, features] tensors.
// A full-length batch is the special case batch[t] == B for every t.
struct StepSchedule {
  std::vector<int64_t> batch;
  std::vector<int64_t> offset;
  bool uniform = true;  // every step has all B rows
  int64_t steps() const { return static_cast<int64_t>(batch.size()); }
};

inline StepSchedule make_schedule(const char* op, const at::Tensor& batch_sizes, int64_t tokens, int64_t batch) {
  FUSEDRNN_CHECK(batch_sizes.device().is_cpu(), op, "batch_sizes must be a CPU tensor, got device ",
                 batch_sizes.device());
  FUSEDRNN_CHECK(batch_sizes.scalar_type() == at::kLong, op, "batch_sizes must be int64, got ",
                 batch_sizes.scalar_type());
  FUSEDRNN_CHECK(batch_sizes.dim() == 1, op, "batch_sizes must be 1-D [steps], got shape ", batch_sizes.sizes());
  const auto sizes = batch_sizes.contiguous();
  const int64_t* bs = sizes.const_data_ptr<int64_t>();
  StepSchedule s;
  const int64_t steps = sizes.numel();
  s.batch.resize(steps);
  s.offset.resize(steps);
  int64_t total = 0;
  for (int64_t t = 0; t < steps; ++t) {
    const int64_t prev = t == 0 ? batch : bs[t - 1];
    FUSEDRNN_CHECK(bs[t] >= (batch > 0 ? 1 : 0) && bs[t] <= prev, op,
                   "batch_sizes must be non-increasing, positive and at most the batch size ", batch,
                   " (sequences sorted by decreasing length), got ", bs[t], " at step ", t);
    s.batch[t] = bs[t];
    s.offset[t] = total;
    s.uniform = s.uniform && bs[t] == batch;
    total += bs[t];
  }
  FUSEDRNN_CHECK(steps == 0 || bs[0] == batch, op, "batch_sizes[0] must equal the batch size of h0 (", batch,
                 "), got ", steps ? bs[0] : 0);
  FUSEDRNN_CHECK(total == tokens, op, "batch_sizes must sum to the number of rows of input (", tokens,
                 "), got ", total);
  return s;
}

}  // namespace fusedrnn
