"""Inference without the saved-for-backward buffers (csrc/ops.cpp: lstm_inference, gru_inference).

A call no gradient will be taken of (torch.no_grad, inference_mode, or nothing requiring grad)
runs the inference twin of the forward op, which neither computes nor stores LSTM's gates and
cells or GRU's gates and W_hn h + b_hn (only backward reads them). RNN's forward saves nothing but
its output and keeps its op. Checked here:

- the twins' outputs are bitwise those of the forward ops on every CPU path: the engine on every
  instruction set this CPU has, input projection fused and as one GEMM, the small-call path,
  ragged batches, both directions, the per-step path (engine off, float64, LSTM proj_size), and
  close to fusedrnn.reference in float64 (so both are right, not merely equal);
- the layers choose them exactly when no gradient can be taken (profiled op names), with outputs
  bitwise equal to the same layer with gradients, for bidirectional, multi-layer, packed and
  lengths= input, and close to torch.nn;
- the buffers are really absent: the peak memory of an inference call (torch's CPU allocator,
  profiled) holds the output and states only (fused input projection), or those and the [N, G*H]
  projection (one GEMM), and no [N, H] cells / hn;
- the twins pass torch.library.opcheck, refuse to be differentiated with a clear error, and appear
  in torch.compile(fullgraph) / torch.export graphs traced without gradients, which still match
  eager (ONNX export of such graphs: tests/test_onnx.py exports under torch.no_grad).
"""

import json

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.profiler import ProfilerActivity, profile

import fusedrnn
from conftest import tolerances
from engine_helpers import ISAS, engine_isa, lengths_to_batch_sizes, make_args, run_reference

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

OPS = torch.ops.fusedrnn
N_MAIN = {"lstm": 3, "gru": 2}  # output, h_n (, c_n)


def _forward(cell, args, reverse):
    return getattr(OPS, f"{cell}_forward")(*args, reverse)


def _inference(cell, args, reverse):
    return getattr(OPS, f"{cell}_inference")(*args, reverse)


def _detached(args, dtype=None):
    return [a.detach().to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and dtype else
            a.detach() if isinstance(a, torch.Tensor) else a for a in args]


def _assert_twin_equals_forward(cell, args, reverse):
    with torch.no_grad():
        full = _forward(cell, args, reverse)
        twin = _inference(cell, args, reverse)
    assert len(twin) == N_MAIN[cell]
    for name, a, b in zip(("output", "h_n", "c_n"), full[:N_MAIN[cell]], twin):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert torch.equal(a, b), f"{cell} {name}: inference op differs from the forward op"
    return twin


def _assert_close_to_reference(cell, args64, outs, reverse):
    with torch.no_grad():
        expected = run_reference(cell, _detached(args64), reverse)
    tol = tolerances(outs[0].dtype)
    for e, o in zip(expected, outs):
        torch.testing.assert_close(o.double(), e, **tol)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "1")
    monkeypatch.setenv("FUSEDRNN_CPU_ISA", request.param)
    assert engine_isa() == request.param
    return request.param


# hidden, lengths: partial unit and row blocks (AVX2 6-row / AVX-512 8-row tiles), ragged batches.
SHAPES = [(13, [6] * 7), (37, [9, 8, 8, 6, 3, 3, 3, 2, 1, 1, 1, 1, 1]), (64, [5] * 20)]


@pytest.mark.parametrize("small", ["0", "1"], ids=["packed", "small_path"])
@pytest.mark.parametrize("fuse_input", ["1", "0"], ids=["fused_input", "gemm_input"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("hidden,lengths", SHAPES)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_engine_inference_is_bitwise_the_forward(cell, hidden, lengths, reverse, fuse_input, small, isa,
                                                 monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", fuse_input)
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", small)
    args64 = make_args(cell, hidden, lengths_to_batch_sizes(lengths))
    outs = _assert_twin_equals_forward(cell, _detached(args64, torch.float32), reverse)
    _assert_close_to_reference(cell, args64, outs, reverse)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_engine_inference_small_calls(cell, isa, monkeypatch):
    """The small-call path as it is chosen (FUSEDRNN_CPU_SMALL unset): one step of one and of 8
    rows (input projection read in place), 4 steps of 2 rows (one GEMM), without bias."""
    monkeypatch.delenv("FUSEDRNN_CPU_SMALL", raising=False)
    for lengths in ([1], [1] * 8, [4, 4]):
        args64 = make_args(cell, 20, lengths_to_batch_sizes(lengths), bias=False, seed=len(lengths))
        outs = _assert_twin_equals_forward(cell, _detached(args64, torch.float32), False)
        _assert_close_to_reference(cell, args64, outs, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32_engine_off", "float64"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_per_step_path_inference_is_bitwise_the_forward(cell, reverse, dtype, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0")
    args64 = make_args(cell, 19, lengths_to_batch_sizes([7, 7, 5, 3, 3, 1]))
    outs = _assert_twin_equals_forward(cell, _detached(args64, dtype), reverse)
    _assert_close_to_reference(cell, args64, outs, reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_lstm_projection_inference_is_bitwise_the_forward(reverse):
    """proj_size runs the drivers' per-step loop also in float32 beside the engine."""
    args64 = make_args("lstm", 12, lengths_to_batch_sizes([6, 5, 5, 2]))
    g = torch.Generator().manual_seed(3)
    b = args64[1].shape[0]
    args64[7] = torch.randn(5, 12, generator=g, dtype=torch.float64) * 0.3  # w_hr: proj_size 5
    args64[1] = torch.randn(b, 5, generator=g, dtype=torch.float64)          # h0: [B, proj_size]
    args64[4] = torch.randn(48, 5, generator=g, dtype=torch.float64) * 0.4  # w_hh: [4H, proj_size]
    for dtype in (torch.float32, torch.float64):
        outs = _assert_twin_equals_forward("lstm", _detached(args64, dtype), reverse)
        _assert_close_to_reference("lstm", args64, outs, reverse)


# ---- the layers choose the twins exactly when no gradient can be taken -----------------------

LAYERS = {"lstm": (fusedrnn.LSTM, torch.nn.LSTM), "gru": (fusedrnn.GRU, torch.nn.GRU),
          "rnn": (fusedrnn.RNN, torch.nn.RNN)}


def _op_names(fn):
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    return {e.name for e in prof.events() if e.name.startswith("fusedrnn::")}, result


def _layers(cell, **kwargs):
    torch.manual_seed(0)
    ours_cls, nn_cls = LAYERS[cell]
    ref = nn_cls(7, 24, **kwargs)
    ours = ours_cls(7, 24, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ours, ref


def _run(m, x, lengths, how):
    def call():
        inp = x if how == "padded" else pack_padded_sequence(x, lengths, enforce_sorted=False)
        if how == "lengths":
            out, state = m(x, lengths=lengths)
        else:
            out, state = m(inp)
        out = out.data if how == "packed" else out
        return [out] + (list(state) if isinstance(state, tuple) else [state])
    return call


@pytest.mark.parametrize("how", ["padded", "packed", "lengths"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("cell", list(LAYERS))
def test_layers_without_gradients_run_the_inference_ops(cell, bidirectional, how):
    ours, ref = _layers(cell, num_layers=2, bidirectional=bidirectional)
    x = torch.randn(9, 5, 7)
    lengths = torch.tensor([9, 4, 7, 1, 6])
    name = {"lstm": "lstm", "gru": "gru", "rnn": "rnn_tanh"}[cell]
    trained_op = f"fusedrnn::{name}_forward"
    twin = f"fusedrnn::{name}_inference" if cell != "rnn" else trained_op  # RNN saves nothing: one op

    with_grad_ops, with_grad = _op_names(_run(ours, x, lengths, how))
    assert trained_op in with_grad_ops and f"fusedrnn::{name}_inference" not in with_grad_ops
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            ops, without = _op_names(_run(ours, x, lengths, how))
        assert twin in ops and (cell == "rnn" or trained_op not in ops), ops
        for a, b in zip(with_grad, without):
            assert torch.equal(a.detach(), b), "a call without gradients gives other bits"
    # Nothing requiring grad, grad mode on: no gradient can be taken either.
    for p in ours.parameters():
        p.requires_grad_(False)
    ops, frozen = _op_names(_run(ours, x, lengths, how))
    assert twin in ops and (cell == "rnn" or trained_op not in ops), ops
    for a, b in zip(with_grad, frozen):
        assert torch.equal(a.detach(), b)
    # ... and the numbers are torch.nn's.
    if how != "lengths":
        with torch.no_grad():
            expected = _run(ref, x, lengths, how)()
        for e, o in zip(expected, frozen):
            torch.testing.assert_close(o, e, **tolerances(torch.float32))
    # An input requiring grad with frozen weights: a gradient may be taken, the full forward runs.
    x_grad = x.clone().requires_grad_()
    ops, _ = _op_names(_run(ours, x_grad, lengths, how))
    assert trained_op in ops


def test_a_frozen_layer_still_passes_gradients_to_its_input():
    ours, ref = _layers("lstm")
    for p in list(ours.parameters()) + list(ref.parameters()):
        p.requires_grad_(False)
    x = torch.randn(6, 3, 7, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    ours(x)[0].sum().backward()
    ref(x_ref)[0].sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tolerances(torch.float32))


# ---- the saved buffers are really absent --------------------------------------------------------

def _peak_bytes(fn, tmp_path):
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    if not mem:
        return 0
    start = mem[0]["args"]["Total Allocated"] - mem[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in mem) - start


@pytest.mark.parametrize("path", ["engine_fused", "engine_gemm", "per_step"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_allocates_no_saved_buffers(cell, path, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0" if path == "per_step" else "1")
    monkeypatch.setenv("FUSEDRNN_CPU_FUSE_INPUT", "0" if path == "engine_gemm" else "1")
    monkeypatch.setenv("FUSEDRNN_CPU_SMALL", "0")
    T, B, I, H = 50, 16, 24, 64
    gates = {"lstm": 4, "gru": 3}[cell]
    args = _detached(make_args(cell, H, torch.tensor([B] * T), input_size=I), torch.float32)
    N = T * B
    row_bytes = N * 4  # one float per token
    out_bytes, state_bytes = row_bytes * H, B * H * 4 * (2 if cell == "lstm" else 1)
    with torch.no_grad():
        _inference(cell, args, False)  # warm-up
        full_peak = _peak_bytes(lambda: _forward(cell, args, False), tmp_path)
        peak = _peak_bytes(lambda: _inference(cell, args, False), tmp_path)
    projection = row_bytes * gates * H if path != "engine_fused" else 0  # the input GEMM's [N, G*H]
    # per-step [B, *] buffers; the per-step path's W_hh^T copy and the GEMM's packing of W_ih
    slack = 16 * B * H * 4 + gates * H * (H + I) * 4
    assert peak <= out_bytes + state_bytes + projection + slack, (peak, out_bytes, projection)
    # The forward op holds the gates and the [N, H] cells / hn on top.
    saved = row_bytes * (gates + 1) * H
    assert full_peak - peak >= saved - projection - slack, (full_peak, peak, saved)


# ---- the op contract ---------------------------------------------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_ops_pass_opcheck(cell):
    args = _detached(make_args(cell, 6, lengths_to_batch_sizes([4, 3, 1])), torch.float32)
    torch.library.opcheck(getattr(OPS, f"{cell}_inference").default, (*args, False))
    torch.library.opcheck(getattr(OPS, f"{cell}_inference").default, (*args, True))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_differentiating_an_inference_op_is_a_clear_error(cell):
    args = make_args(cell, 6, lengths_to_batch_sizes([4, 3, 1]))
    out = _inference(cell, args, False)[0]
    with pytest.raises(RuntimeError, match=rf"fusedrnn\.{cell}_inference: .*saves nothing for backward.*"
                                           rf"fusedrnn\.{cell}_forward"):
        out.sum().backward()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_inference_ops_check_their_arguments_like_the_forward_ops(cell):
    args = _detached(make_args(cell, 6, lengths_to_batch_sizes([4, 3, 1])), torch.float32)
    bad = list(args)
    bad[-1] = torch.tensor([3, 2, 2, 2])  # batch_sizes summing to 9 rows for an input of 8
    with pytest.raises(RuntimeError, match=rf"fusedrnn\.{cell}_inference: batch_sizes must sum"):
        _inference(cell, bad, False)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_compile_and_export_without_gradients_use_the_inference_op(cell):
    ours, _ = _layers(cell, bidirectional=True)
    ours.eval()
    x = torch.randn(8, 3, 7)
    with torch.no_grad():
        eager = ours(x)
        torch._dynamo.reset()
        compiled = torch.compile(ours, fullgraph=True)(x)
        program = torch.export.export(ours, (x,))
        exported = program.module()(x)
    graph = str(program.graph)
    assert f"fusedrnn.{cell}_inference" in graph and f"fusedrnn.{cell}_forward" not in graph, graph
    for got in (compiled, exported):
        assert torch.equal(got[0], eager[0])
        for a, b in zip(got[1] if cell == "lstm" else (got[1],), eager[1] if cell == "lstm" else (eager[1],)):
            assert torch.equal(a, b)
    # With gradients: the forward op, as before.
    program = torch.export.export(ours, (x,))
    assert f"fusedrnn.{cell}_forward" in str(program.graph)


class _ScriptedUser(torch.nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        a, (h1, c1) = self.rnn(x)
        packed, (h2, c2) = self.rnn(torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False))
        return [a, h1, c1, packed.data, h2, c2]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_without_gradients_equals_eager():
    """TorchScript decides at run time (fusedrnn/_ops.py: _grad_possible): the inference ops under
    torch.no_grad, bitwise the eager result; the forward ops with gradients, whose backward works."""
    ours, _ = _layers("lstm", num_layers=2, bidirectional=True)
    model = _ScriptedUser(ours)
    scripted = torch.jit.script(model)
    x, lengths = torch.randn(6, 4, 7), torch.tensor([6, 2, 5, 3])
    with torch.no_grad():
        ops, got = _op_names(lambda: scripted(x, lengths))
        eager = model(x, lengths)
    assert "fusedrnn::lstm_inference" in ops and "fusedrnn::lstm_forward" not in ops, ops
    assert all(torch.equal(a, b) for a, b in zip(got, eager))
    ops, got = _op_names(lambda: scripted(x, lengths))
    assert "fusedrnn::lstm_forward" in ops and "fusedrnn::lstm_inference" not in ops, ops
    assert all(torch.equal(a.detach(), b) for a, b in zip(got, eager))
    sum(o.sum() for o in got).backward()
    assert ours.weight_hh_l1_reverse.grad is not None and ours.weight_hh_l1_reverse.grad.abs().sum() > 0
