"""Small calls and the weights they read: no stale weight, ever, and the small-call path's numbers.

Small calls (cells, one-step layer calls, short sequences of a few rows: cpu_engine.h,
use_small_path) read W_ih / W_hh where they are, on every call; the CPU engine keeps no packed
copy of any weight from one call to the next, so there is no cache that an update could leave
stale. The first half of this file pins that down: a generation loop (state carried between
calls) whose weights are changed between calls in every way user code changes weights, including
the ways that do NOT bump a tensor's version counter (writes through `.data`, through numpy,
freed and reallocated storage), must give torch.nn's numbers after every change, on both CPU
paths. Any future cache keyed on data pointers or version counters would fail here.

The second half checks the small-call path itself (FUSEDRNN_CPU_SMALL=1 forces it, =0 forbids
it; read on every call; by default at most 8 rows and 32 tokens) against fusedrnn.reference in float64 over the shapes where it can go
wrong: hidden sizes that are not whole vectors (8 lanes) or unit blocks (8 / 16 units), input
sizes with a vector tail, 1-8 rows, ragged batches, both directions, one and two threads, the
fused one-step input projection and the precomputed one, and the backward's in-place W_hh read
(H a multiple of 16) and its packed copy (any other H).
"""

import pytest
import torch

import fusedrnn
from engine_helpers import GATES, as_float32, lengths_to_batch_sizes, make_args, outputs_and_grads, run_op, run_reference

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

NN = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU, "rnn_tanh": torch.nn.RNN}
FUSED = {"lstm": fusedrnn.LSTM, "gru": fusedrnn.GRU, "rnn_tanh": fusedrnn.RNN}
NN_CELLS = {"lstm": torch.nn.LSTMCell, "gru": torch.nn.GRUCell, "rnn_tanh": torch.nn.RNNCell}
FUSED_CELLS = {"lstm": fusedrnn.LSTMCell, "gru": fusedrnn.GRUCell, "rnn_tanh": fusedrnn.RNNCell}
PATHS = pytest.mark.parametrize("small", ["1", "0"], ids=["small_path", "packed_path"])


# ---- no stale weights -----------------------------------------------------------------------

def _update_optimizer(fused, ref, step):
    """An optimizer step on both (same gradients: the same loss on the same weights)."""
    for m in (fused, ref):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for p in m.parameters():
            p.grad = torch.full_like(p, 0.1 * (step + 1))
        opt.step()


def _update_load_state_dict(fused, ref, step):
    g = torch.Generator().manual_seed(100 + step)
    state = {k: torch.randn(v.shape, generator=g) * 0.3 for k, v in ref.state_dict().items()}
    ref.load_state_dict(state)
    fused.load_state_dict(state)


def _update_data_assignment(fused, ref, step):
    for (name, p), q in zip(fused.named_parameters(), ref.parameters()):
        new = torch.randn_like(p) * 0.3
        p.data = new.clone()
        q.data = new.clone()


def _update_through_data(fused, ref, step):
    # `.data` is a new tensor with its own version counter: the parameter's does not move.
    for p, q in zip(fused.parameters(), ref.parameters()):
        before = p._version
        p.data.mul_(-0.9).add_(0.01)
        q.data.mul_(-0.9).add_(0.01)
        assert p._version == before


def _update_through_numpy(fused, ref, step):
    for p, q in zip(fused.parameters(), ref.parameters()):
        before = p._version
        p.detach().numpy()[...] *= 1.5
        q.detach().numpy()[...] *= 1.5
        assert p._version == before


def _update_in_place_no_grad(fused, ref, step):
    with torch.no_grad():
        for p, q in zip(fused.parameters(), ref.parameters()):
            p.clamp_(-0.05 * (step + 1), 0.05 * (step + 1))  # WGAN-style weight clipping
            q.clamp_(-0.05 * (step + 1), 0.05 * (step + 1))


UPDATES = {"optimizer_step": _update_optimizer, "load_state_dict": _update_load_state_dict,
           "data_assignment": _update_data_assignment, "in_place_through_data": _update_through_data,
           "write_through_numpy": _update_through_numpy, "in_place_clamp": _update_in_place_no_grad}


@PATHS
@pytest.mark.parametrize("update", list(UPDATES))
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_generation_loop_sees_every_weight_update(cell, update, small, monkeypatch):
    """One token per call, state carried between calls, weights changed between calls: every
    output equals torch.nn's with the weights as they are at that call."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
    torch.manual_seed(0)
    ref = NN[cell](16, 32, num_layers=2)
    fused = FUSED[cell](16, 32, num_layers=2)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(1, 2, 16)
    state_ref = state_fused = None
    for step in range(4):
        with torch.no_grad():
            out_ref, state_ref = ref(x, state_ref)
            out_fused, state_fused = fused(x, state_fused)
        torch.testing.assert_close(out_fused, out_ref, rtol=1e-4, atol=1e-5)
        UPDATES[update](fused, ref, step)
        x = out_ref[..., :16].detach()


@PATHS
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_cell_with_fresh_weight_tensors_at_a_reused_address(cell, small, monkeypatch):
    """functional_call with new weights on every call: the allocator hands the same address (and
    a fresh version counter, 0) to different values. Each call must use the values it is given."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
    torch.manual_seed(0)
    ref, fused = NN_CELLS[cell](8, 16), FUSED_CELLS[cell](8, 16)
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(3, 8)
    addresses = set()
    for step in range(5):
        params = {k: torch.randn(v.shape) * 0.4 for k, v in ref.state_dict().items()}
        addresses.add(params["weight_hh"].data_ptr())
        with torch.no_grad():
            expected = torch.func.functional_call(ref, params, (x,))
            got = torch.func.functional_call(fused, params, (x,))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        del params


@PATHS
def test_training_steps_use_the_updated_weights(small, monkeypatch):
    """A few Adam steps on a one-step LSTM: losses and weights follow torch.nn's."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
    torch.manual_seed(0)
    ref, fused = torch.nn.LSTMCell(8, 16), fusedrnn.LSTMCell(8, 16)
    fused.load_state_dict(ref.state_dict())
    opts = [torch.optim.Adam(m.parameters(), lr=0.05) for m in (ref, fused)]
    x = torch.randn(4, 8)
    for _ in range(5):
        losses = []
        for m, opt in zip((ref, fused), opts):
            opt.zero_grad()
            h, c = m(x)
            loss = (h ** 2).sum() + c.sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-5)
    for p, q in zip(fused.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


# ---- the small-call path against the float64 reference --------------------------------------



# (hidden, input_size, lengths): one step (the fused input projection) and several (the
# precomputed one); hidden sizes off the vector (8) and unit-block (8 / 16) widths and on them
# (the backward reads W_hh in place at multiples of 16); input sizes with a vector tail; 1-8 rows.
SMALL_SHAPES = [
    (1, 1, [1]),
    (5, 3, [1, 1]),
    (8, 8, [1] * 8),
    (13, 11, [2, 2, 1]),
    (16, 17, [1] * 7),
    (17, 9, [3, 3, 2, 2, 1, 1]),
    (32, 32, [4, 4, 4, 4]),
    (37, 40, [5, 4, 4, 1]),
    (64, 20, [1]),
    (130, 7, [3, 2]),
]


# Both paths: these shapes take the small path by default, so the packed path's partial row and
# unit blocks at these sizes are checked here with FUSEDRNN_CPU_SMALL=0 (tests/test_cpu_engine.py
# does not set it).
@PATHS
@pytest.mark.parametrize("nthreads", [1, 2])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("hidden,input_size,lengths", SMALL_SHAPES)
@pytest.mark.parametrize("cell", list(GATES))
def test_small_path_matches_float64_reference(cell, hidden, input_size, lengths, reverse, nthreads, small, threads,
                                              monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
    threads(nthreads)
    args = make_args(cell, hidden, lengths_to_batch_sizes(lengths), input_size)
    expected = outputs_and_grads(run_reference, cell, args, reverse)
    got = outputs_and_grads(run_op, cell, as_float32(args), reverse)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("cell", list(GATES))
def test_small_path_one_step_without_bias_and_full_batch(cell, bias, monkeypatch):
    """A cell call: one step, 8 rows, with and without biases (the fused projection adds them)."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "1")
    args = make_args(cell, 24, torch.tensor([8]), 12, bias=bias)
    expected = outputs_and_grads(run_reference, cell, args, False)
    got = outputs_and_grads(run_op, cell, as_float32(args), False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("cell", list(GATES))
def test_small_path_reads_strided_weights_right(cell, monkeypatch):
    """Weights that are views with a row stride (columns of a wider tensor): read in place, the
    small path must follow the real layout, not assume rows of I or H floats."""
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "1")
    args = make_args(cell, 16, torch.tensor([2]), 8)
    w_at = 3 if cell == "lstm" else 2
    strided = list(as_float32(args))
    for k in (w_at, w_at + 1):
        wide = torch.randn(strided[k].shape[0], strided[k].shape[1] + 5)
        wide[:, :strided[k].shape[1]] = strided[k].detach()
        strided[k] = wide[:, :strided[k].shape[1]]
        assert not strided[k].is_contiguous()
    expected = run_reference(cell, args, False)
    with torch.no_grad():
        got = run_op(cell, strided, False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g.double(), e.detach(), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_modules_agree_on_both_paths_and_with_nn(cell, monkeypatch):
    """Every case of the streaming benchmark, once: cells, one-step layers, T=20 at B=1, two
    layers, with and without gradients, small path against the packed path and torch.nn."""
    torch.manual_seed(0)
    for hidden, batch, steps, layers in [(64, 1, 1, 1), (128, 8, 1, 1), (64, 1, 20, 1), (64, 1, 1, 2)]:
        ref = NN[cell](hidden, hidden, num_layers=layers)
        fused = FUSED[cell](hidden, hidden, num_layers=layers)
        fused.load_state_dict(ref.state_dict())
        x = torch.randn(steps, batch, hidden, requires_grad=True)
        out_ref, _ = ref(x)
        g_ref = torch.autograd.grad(out_ref.sum(), [x] + list(ref.parameters()))
        for small in ("1", "0"):
            monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
            with torch.no_grad():
                torch.testing.assert_close(fused(x)[0], out_ref, rtol=1e-4, atol=1e-5)
            out, _ = fused(x)
            torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
            for a, b in zip(torch.autograd.grad(out.sum(), [x] + list(fused.parameters())), g_ref):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_no_grad_fast_path_keeps_autograd_semantics():
    """The no-grad shortcut (fusedrnn/_ops.py) is taken only when no gradient can flow: with grad
    mode on and a weight requiring grad the output has a grad_fn; under no_grad it has none and
    the same values; a leaf input requiring grad alone still gets its gradient."""
    torch.manual_seed(0)
    m = fusedrnn.GRUCell(8, 16)
    x = torch.randn(2, 8)
    with torch.no_grad():
        h_no_grad = m(x)
    assert h_no_grad.grad_fn is None and not h_no_grad.requires_grad
    h = m(x)
    assert h.grad_fn is not None
    torch.testing.assert_close(h.detach(), h_no_grad, rtol=0, atol=0)
    m.requires_grad_(False)
    xg = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(m(xg).sum(), [xg])
    ref = torch.nn.GRUCell(8, 16)
    ref.load_state_dict(m.state_dict())
    xr = x.clone().requires_grad_()
    (gr,) = torch.autograd.grad(ref(xr).sum(), [xr])
    torch.testing.assert_close(gx, gr, rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(m(x), h_no_grad, rtol=0, atol=0)


def _library_autograd_calls(fn):
    """Python calls into torch.library's autograd machinery (torch/_library/autograd.py, utils.py)
    while fn runs."""
    import sys
    calls = []

    def profiler(frame, event, arg):
        if event == "call" and "_library" in frame.f_code.co_filename.replace("\\", "/").split("/")[-2:-1]:
            calls.append(f"{frame.f_code.co_filename}:{frame.f_code.co_name}")

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_small_calls_skip_torch_library_python_autograd(cell):
    """The fixed cost of a call (entry 15 of benchmarks/NOTES.md): an eager no-grad cell call, an
    eager training step (forward and backward) and a one-token layer call never enter
    torch.library's Python autograd kernel (a round trip of 10-20 us per op, as much as a whole
    cell); the same formulas run (test_higher_order.py covers the derivatives)."""
    torch.manual_seed(0)
    m = FUSED_CELLS[cell](8, 16)
    layer = FUSED[cell](8, 16, num_layers=2)
    x = torch.randn(2, 8)
    m(x)  # first calls may import lazily
    with torch.no_grad():
        assert _library_autograd_calls(lambda: m(x)) == []
        assert _library_autograd_calls(lambda: layer(x.unsqueeze(0))) == []

    def step():
        out = m(x)
        (out[0] if isinstance(out, tuple) else out).sum().backward()

    assert _library_autograd_calls(step) == []
    assert _library_autograd_calls(lambda: layer(x.unsqueeze(0))[0].sum().backward()) == []


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_jit_trace_records_the_op_not_a_python_function(cell):
    """torch.jit.trace (and the TorchScript ONNX exporter, which traces) must see the registered op:
    the eager training shortcut is an autograd.Function, which a trace records as a PythonOp that
    neither torch.jit.save nor the ONNX symbolics can handle."""
    module = FUSED[cell](3, 4)  # parameters require grad: the training path
    traced = torch.jit.trace(module, (torch.randn(5, 2, 3),), check_trace=False)
    kinds = {node.kind() for node in traced.inlined_graph.nodes()}
    assert f"fusedrnn::{cell}_forward" in kinds
    assert "prim::PythonOp" not in kinds
