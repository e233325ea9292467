// The forward ops' autograd as C++ autograd Functions, for eager training calls.
//
// Why: in a small training call (one cell step, B <= 8) most of the time was the autograd engine
// calling a Python autograd.Function: its apply, setup_context and save_for_backward on the way
// forward, and on the way back the PyNode (GIL, argument tuples, ctx.saved_tensors, the Python
// backward, the boxed backward-op call). Here both directions stay in C++ (benchmarks/NOTES.md,
// the entry "C++ autograd for the small training calls").
//
// The backward op is told which of input and h0 need a gradient (needs_input_grad): a cell or one-step
// call from a zero or detached state skips dX and the first step's dh_{t-1} = dgates W_hh.
//
// What it does not replace: the Python formulas in fusedrnn/_ops.py (torch.library's autograd
// registration and the functorch twins) stay the only autograd that torch.compile, torch.export,
// TorchScript, make_fx and torch.func see; fusedrnn/_ops.py calls the eager_* ops below only for an
// eager, untraced call outside functorch and forward-mode AD that needs a gradient (_route's
// _EAGER_GRAD). The formulas are the same: the plain backward calls the fused backward op below
// autograd; a backward with grad mode on (create_graph=True) calls eager_differentiable_vjp, whose
// implementation is Python (fusedrnn/_ops.py: _differentiable_vjp, the _FirstOrderGrads path the
// Python formula takes), so double and higher backward are the same code as before.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace fusedrnn {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using at::Tensor;
using std::optional;

Tensor or_undefined(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
optional<Tensor> optional_of(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : std::nullopt; }

// An unused output's gradient: a broadcast zero (the backward ops copy their gradients before
// writing, so a stride-0 zero is read, never written). On the CPU one shared 0-d zero per dtype
// (as fusedrnn/_ops.py's _unused_grad): at::zeros is a dispatched allocation and fill on every
// small backward call, a cell's unused `output` among them.
// Plain backward only (grad mode off): a create_graph backward hands its gradients to Python formulas,
// which get a fresh zero. Never freed (no tensor destroyed at exit).
Tensor shared_cpu_zero(at::ScalarType type) {
  auto make = [](at::ScalarType t) {
    c10::InferenceMode normal_tensor(false);  // usable outside inference mode, whatever the first caller's mode
    return new Tensor(at::zeros({}, at::TensorOptions().dtype(t)));
  };
  static const Tensor* zero_float = make(at::kFloat);
  static const Tensor* zero_double = make(at::kDouble);
  if (type == at::kFloat) return *zero_float;
  if (type == at::kDouble) return *zero_double;
  return Tensor();
}

Tensor grad_or_zero(const Tensor& grad, const Tensor& like) {
  if (grad.defined()) return grad;
  if (!at::GradMode::is_enabled() && like.is_cpu() && like.layout() == at::kStrided) {
    Tensor zero = shared_cpu_zero(like.scalar_type());
    if (zero.defined()) return zero.expand(like.sizes());
  }
  return at::zeros({}, like.options()).expand(like.sizes());
}

c10::OperatorHandle op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
}

// needs_input_grad by forward-argument position: the context numbers only the tensor arguments
// that were given (an absent bias has no edge).
std::vector<bool> needs_grad_by_argument(AutogradContext* ctx, const std::vector<bool>& present) {
  std::vector<bool> needs(present.size(), false);
  size_t edge = 0;
  for (size_t i = 0; i < present.size(); ++i) {
    if (present[i]) needs[i] = ctx->needs_input_grad(edge++);
  }
  return needs;
}

// Backward with grad mode on (create_graph=True): the differentiable first-order gradients, by the
// Python formula (eager_differentiable_vjp, implemented in fusedrnn/_ops.py). `primals` are the forward's
// tensor arguments (undefined where absent), `saved` the forward's extra outputs. Returns one
// gradient per primal (undefined where none is needed).
variable_list differentiable_vjp(const char* kind, bool reverse, const variable_list& grads,
                                 const variable_list& primals, const std::vector<bool>& needs,
                                 const Tensor& batch_sizes, const variable_list& saved) {
  static const auto op =
      op_handle("fusedrnn::eager_differentiable_vjp")
          .typed<std::vector<Tensor>(c10::string_view, bool, at::TensorList, const c10::List<optional<Tensor>>&,
                                     c10::ArrayRef<bool>, const Tensor&, at::TensorList)>();
  c10::List<optional<Tensor>> primal_list;
  for (const auto& p : primals) primal_list.push_back(p.defined() ? optional<Tensor>(p) : std::nullopt);
  bool needs_array[16];  // ArrayRef<bool> needs contiguous bools (std::vector<bool> is packed)
  TORCH_CHECK(needs.size() <= 16, "fusedrnn: too many primals");
  for (size_t i = 0; i < needs.size(); ++i) needs_array[i] = needs[i];
  std::vector<Tensor> result = op.call(kind, reverse, grads, primal_list, c10::ArrayRef<bool>(needs_array, needs.size()),
                                       batch_sizes, saved);
  // The Python side returns the gradients of the primals that are present and need one, in order.
  variable_list full(primals.size());
  size_t next = 0;
  for (size_t i = 0; i < primals.size(); ++i) {
    if (primals[i].defined() && needs[i]) {
      TORCH_CHECK(next < result.size(), "fusedrnn: eager_differentiable_vjp returned too few gradients");
      full[i] = result[next++];
    }
  }
  return full;
}

// The output is what backward reads (h_t of every step), and it is also what the caller gets back,
// who may change it in place before backward: torch.nn's layers allow that (their graph saved its own
// copies) and return the gradients of the changed values. So the node saves the output's data under a
// version counter of its own (variable_data: the caller's in-place change is not a version error here),
// and keeps an empty tensor that shares the caller's version counter (not its storage: a detached alias
// would keep the whole output alive past saved-tensor hooks, so checkpointing and save_on_cpu would save
// nothing for it) to see whether it moved. Only then does backward run the forward again for the output's
// original values (the same op on the same saved inputs: the same numbers, bitwise); a saved input changed
// in place still raises when it is unpacked, as torch.nn's does. Cost on the usual call: two tensor
// headers and one empty allocation, no copy.
Tensor saved_output(AutogradContext* ctx, const Tensor& out) {
  Tensor watch = at::empty({0}, out.options());
  watch.unsafeGetTensorImpl()->set_version_counter(out.unsafeGetTensorImpl()->version_counter());
  ctx->saved_data["output"] = watch;
  ctx->saved_data["output_version"] = static_cast<int64_t>(out._version());
  return out.variable_data();
}

bool output_changed_in_place(AutogradContext* ctx) {
  return ctx->saved_data["output"].toTensor()._version() != ctx->saved_data["output_version"].toInt();
}

struct LSTMFunction : public torch::autograd::Function<LSTMFunction> {
  static std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> run(const Tensor& input, const Tensor& h0, const Tensor& c0,
                                                                const Tensor& w_ih, const Tensor& w_hh,
                                                                const optional<Tensor>& b_ih,
                                                                const optional<Tensor>& b_hh,
                                                                const optional<Tensor>& w_hr,
                                                                const Tensor& batch_sizes, bool reverse) {
    static const auto op =
        op_handle("fusedrnn::lstm_forward")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                const optional<Tensor>&, const optional<Tensor>&, const Tensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0, const Tensor& c0,
                               const Tensor& w_ih, const Tensor& w_hh, const optional<Tensor>& b_ih,
                               const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
                               const Tensor& batch_sizes, bool reverse) {
    auto [out, h_n, c_n, gates, cells] = run(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
    ctx->mark_non_differentiable({gates, cells});
    ctx->set_materialize_grads(false);  // no zero-filled gradients for unused outputs
    // The biases only for double backward: saving them copies nothing.
    ctx->save_for_backward({input, h0, c0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), or_undefined(w_hr),
                            batch_sizes, saved_output(ctx, out), gates, cells});
    ctx->saved_data["reverse"] = reverse;
    return {out, h_n, c_n, gates, cells};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle("fusedrnn::lstm_backward")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, const Tensor&, const optional<Tensor>&, const Tensor&, bool, bool, const Tensor&,
                const Tensor&, const Tensor&, bool)>();
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &h0 = s[1], &c0 = s[2], &w_ih = s[3], &w_hh = s[4], &b_ih = s[5], &b_hh = s[6],
                 &w_hr = s[7], &batch_sizes = s[8], &gates = s[10], &cells = s[11];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor out = !output_changed_in_place(ctx)
                           ? s[9]
                           : std::get<0>(run(input, h0, c0, w_ih, w_hh, optional_of(b_ih), optional_of(b_hh),
                                             optional_of(w_hr), batch_sizes, reverse));
    auto needs = needs_grad_by_argument(
        ctx, {true, true, true, true, true, b_ih.defined(), b_hh.defined(), w_hr.defined(), true});
    variable_list result(10);  // one per forward argument
    // At one step, w_hr reaches only out and h_n (c_n = f c_0 + i g does not depend on it): with neither
    // of their gradients, torch.nn's graph gives w_hr no gradient (None), and optimizers skip it.
    const bool w_hr_reached = grads[0].defined() || grads[1].defined() || batch_sizes.size(0) != 1;
    variable_list g = {grad_or_zero(grads[0], out), grad_or_zero(grads[1], h0), grad_or_zero(grads[2], c0)};
    if (at::GradMode::is_enabled()) {
      needs.resize(8);
      auto first = differentiable_vjp("lstm", reverse, g, {input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr}, needs,
                                      batch_sizes, {out, gates, cells});
      std::copy(first.begin(), first.end(), result.begin());
      if (!w_hr_reached) result[7] = Tensor();
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gh0, gc0, gwih, gwhh, gbih, gbhh, gwhr] =
        op.call(g[0], g[1], g[2], input, h0, c0, w_ih, w_hh, w_hr.defined() ? optional<Tensor>(w_hr) : std::nullopt,
                batch_sizes, reverse, needs[0], out, gates, cells, needs[1]);
    result[0] = needs[0] ? gi : Tensor();
    result[1] = needs[1] ? gh0 : Tensor();
    result[2] = gc0;
    result[3] = gwih;
    result[4] = gwhh;
    if (b_ih.defined()) result[5] = gbih;
    if (b_hh.defined()) result[6] = gbhh;
    if (w_hr.defined() && w_hr_reached) result[7] = gwhr;
    return result;
  }
};

struct GRUFunction : public torch::autograd::Function<GRUFunction> {
  static std::tuple<Tensor, Tensor, Tensor, Tensor> run(const Tensor& input, const Tensor& h0, const Tensor& w_ih,
                                                        const Tensor& w_hh, const optional<Tensor>& b_ih,
                                                        const optional<Tensor>& b_hh, const Tensor& batch_sizes,
                                                        bool reverse) {
    static const auto op = op_handle("fusedrnn::gru_forward")
                               .typed<std::tuple<Tensor, Tensor, Tensor, Tensor>(
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&, const optional<Tensor>&,
                                   const optional<Tensor>&, const Tensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse);
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const Tensor& batch_sizes, bool reverse) {
    auto [out, h_n, gates, hn] = run(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse);
    ctx->mark_non_differentiable({gates, hn});
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(
        {input, h0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), batch_sizes, saved_output(ctx, out), gates, hn});
    ctx->saved_data["reverse"] = reverse;
    return {out, h_n, gates, hn};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op =
        op_handle("fusedrnn::gru_backward")
            .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                const Tensor&, bool, bool, const Tensor&, const Tensor&, const Tensor&, bool)>();
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &h0 = s[1], &w_ih = s[2], &w_hh = s[3], &b_ih = s[4], &b_hh = s[5],
                 &batch_sizes = s[6], &gates = s[8], &hn = s[9];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor out = !output_changed_in_place(ctx)
                           ? s[7]
                           : std::get<0>(run(input, h0, w_ih, w_hh, optional_of(b_ih), optional_of(b_hh), batch_sizes,
                                             reverse));
    auto needs = needs_grad_by_argument(ctx, {true, true, true, true, b_ih.defined(), b_hh.defined(), true});
    variable_list result(8);
    variable_list g = {grad_or_zero(grads[0], out), grad_or_zero(grads[1], h0)};
    if (at::GradMode::is_enabled()) {
      needs.resize(6);
      auto first = differentiable_vjp("gru", reverse, g, {input, h0, w_ih, w_hh, b_ih, b_hh}, needs, batch_sizes,
                                      {out, gates, hn});
      std::copy(first.begin(), first.end(), result.begin());
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gh0, gwih, gwhh, gbih, gbhh] =
        op.call(g[0], g[1], input, h0, w_ih, w_hh, batch_sizes, reverse, needs[0], out, gates, hn, needs[1]);
    result[0] = needs[0] ? gi : Tensor();
    result[1] = needs[1] ? gh0 : Tensor();
    result[2] = gwih;
    result[3] = gwhh;
    if (b_ih.defined()) result[4] = gbih;
    if (b_hh.defined()) result[5] = gbhh;
    return result;
  }
};

// Elman RNN, tanh or relu (Relu selects the ops).
template <bool Relu>
struct RNNFunction : public torch::autograd::Function<RNNFunction<Relu>> {
  static constexpr const char* kind = Relu ? "rnn_relu" : "rnn_tanh";

  static std::tuple<Tensor, Tensor> run(const Tensor& input, const Tensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                        const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                                        const Tensor& batch_sizes, bool reverse) {
    static const auto op = op_handle(Relu ? "fusedrnn::rnn_relu_forward" : "fusedrnn::rnn_tanh_forward")
                               .typed<std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const Tensor&,
                                                                 const Tensor&, const optional<Tensor>&,
                                                                 const optional<Tensor>&, const Tensor&, bool)>();
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return op.call(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse);
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& h0, const Tensor& w_ih,
                               const Tensor& w_hh, const optional<Tensor>& b_ih, const optional<Tensor>& b_hh,
                               const Tensor& batch_sizes, bool reverse) {
    auto [out, h_n] = run(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse);
    ctx->set_materialize_grads(false);
    ctx->save_for_backward(
        {input, h0, w_ih, w_hh, or_undefined(b_ih), or_undefined(b_hh), batch_sizes, saved_output(ctx, out)});
    ctx->saved_data["reverse"] = reverse;
    return {out, h_n};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle(Relu ? "fusedrnn::rnn_relu_backward" : "fusedrnn::rnn_tanh_backward")
                               .typed<std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
                                   const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                                   const Tensor&, const Tensor&, bool, bool, const Tensor&, bool)>();
    auto s = ctx->get_saved_variables();
    const Tensor &input = s[0], &h0 = s[1], &w_ih = s[2], &w_hh = s[3], &b_ih = s[4], &b_hh = s[5],
                 &batch_sizes = s[6];
    const bool reverse = ctx->saved_data["reverse"].toBool();
    const Tensor out = !output_changed_in_place(ctx)
                           ? s[7]
                           : std::get<0>(run(input, h0, w_ih, w_hh, optional_of(b_ih), optional_of(b_hh), batch_sizes,
                                             reverse));
    auto needs = needs_grad_by_argument(ctx, {true, true, true, true, b_ih.defined(), b_hh.defined(), true});
    variable_list result(8);
    variable_list g = {grad_or_zero(grads[0], out), grad_or_zero(grads[1], h0)};
    if (at::GradMode::is_enabled()) {
      needs.resize(6);
      auto first =
          differentiable_vjp(kind, reverse, g, {input, h0, w_ih, w_hh, b_ih, b_hh}, needs, batch_sizes, {out});
      std::copy(first.begin(), first.end(), result.begin());
      return result;
    }
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [gi, gh0, gwih, gwhh, gbih, gbhh] =
        op.call(g[0], g[1], input, h0, w_ih, w_hh, batch_sizes, reverse, needs[0], out, needs[1]);
    result[0] = needs[0] ? gi : Tensor();
    result[1] = needs[1] ? gh0 : Tensor();
    result[2] = gwih;
    result[3] = gwhh;
    if (b_ih.defined()) result[4] = gbih;
    if (b_hh.defined()) result[5] = gbhh;
    return result;
  }
};

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> eager_lstm_forward(
    const Tensor& input, const Tensor& h0, const Tensor& c0, const Tensor& w_ih, const Tensor& w_hh,
    const optional<Tensor>& b_ih, const optional<Tensor>& b_hh, const optional<Tensor>& w_hr,
    const Tensor& batch_sizes, bool reverse) {
  auto r = LSTMFunction::apply(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes, reverse);
  return {r[0], r[1], r[2], r[3], r[4]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> eager_gru_forward(const Tensor& input, const Tensor& h0,
                                                             const Tensor& w_ih, const Tensor& w_hh,
                                                             const optional<Tensor>& b_ih,
                                                             const optional<Tensor>& b_hh,
                                                             const Tensor& batch_sizes, bool reverse) {
  auto r = GRUFunction::apply(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse);
  return {r[0], r[1], r[2], r[3]};
}

template <bool Relu>
std::tuple<Tensor, Tensor> eager_rnn_forward(const Tensor& input, const Tensor& h0, const Tensor& w_ih,
                                             const Tensor& w_hh, const optional<Tensor>& b_ih,
                                             const optional<Tensor>& b_hh, const Tensor& batch_sizes, bool reverse) {
  auto r = RNNFunction<Relu>::apply(input, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes, reverse);
  return {r[0], r[1]};
}

}  // namespace
}  // namespace fusedrnn

// Eager-only entry points (fusedrnn/_ops.py, _route == _EAGER_GRAD): the forward ops with the autograd
// Functions above. CompositeImplicitAutograd: they run above autograd and record their own node.
TORCH_LIBRARY_FRAGMENT(fusedrnn, m) {
  m.def(
      "eager_lstm_forward(Tensor input, Tensor h0, Tensor c0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, "
      "Tensor? b_hh, Tensor? w_hr, Tensor batch_sizes, bool reverse) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)",
      &fusedrnn::eager_lstm_forward);
  m.def(
      "eager_gru_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n, Tensor gates, Tensor hn)",
      &fusedrnn::eager_gru_forward);
  m.def(
      "eager_rnn_tanh_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n)",
      &fusedrnn::eager_rnn_forward<false>);
  m.def(
      "eager_rnn_relu_forward(Tensor input, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor? b_ih, Tensor? b_hh, "
      "Tensor batch_sizes, bool reverse) -> (Tensor output, Tensor h_n)",
      &fusedrnn::eager_rnn_forward<true>);
  // The differentiable first-order gradients for a backward with grad mode on; implemented in Python
  // (fusedrnn/_ops.py). kind: lstm, gru, rnn_tanh, rnn_relu. Returns the gradients of the primals that are
  // present and have needs_grad set, in order.
  m.def(
      "eager_differentiable_vjp(str kind, bool reverse, Tensor[] grads, Tensor?[] primals, bool[] needs_grad, "
      "Tensor batch_sizes, Tensor[] saved) -> Tensor[]");
}
