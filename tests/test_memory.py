"""Peak memory of a training step (issue 8 item 5): no higher than torch.nn's, for every cell.

Memory is counted, not timed: the torch profiler records every allocation and free through
PyTorch's CPU allocator with its running total, which is the same from run to run for the same
shapes, so these tests cannot flake. Two properties:

- a whole training step (forward + backward of one layer) peaks no higher than torch.nn's on the
  same shape, on the per-step path and on the CPU engine (FUSEDRNN_CPU_ENGINE=1);
- the backward op itself allocates no more than its design says (csrc/layer/layer_backward.h):
  the gate gradients [N, G*H], the input gradient [N, I], a copy of a non-contiguous grad_output
  [N, H] (RNN: which then holds the gate gradients), the weight gradients and a few [B, *]
  buffers. In particular no [N, 3H] copy of GRU's hidden-side gate gradients and no [N, H]
  gather of the previous states.
"""

import json
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.profiler import ProfilerActivity, profile

import fusedrnn

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

CELLS = {"gru": (torch.nn.GRU, fusedrnn.GRU, 3), "lstm": (torch.nn.LSTM, fusedrnn.LSTM, 4),
         "rnn": (torch.nn.RNN, fusedrnn.RNN, 1)}
T, B, I, H = 60, 16, 48, 64


def _memory_trace(fn, tmp_path):
    """(memory events, op events) of the profiler's CPU trace while fn runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    path = tmp_path / "trace.json"
    prof.export_chrome_trace(str(path))
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    ops = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    return mem, ops


def _peak(mem, lo=None, hi=None):
    """Most bytes allocated at once in [lo, hi] above the running total just before lo."""
    inside = [e for e in mem if (lo is None or e["ts"] >= lo) and (hi is None or e["ts"] <= hi)]
    if not inside:
        return 0
    start = inside[0]["args"]["Total Allocated"] - inside[0]["args"]["Bytes"]
    return max(e["args"]["Total Allocated"] for e in inside) - start


def _modules(cell):
    torch.manual_seed(0)
    nn_cls, fused_cls, _ = CELLS[cell]
    ref = nn_cls(I, H)
    ours = fused_cls(I, H)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(m, x, lengths):
    def run():
        inp = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
        out, _ = m(inp)
        (out.data if lengths is not None else out).sum().backward()
    return run


def _step_peak(m, x, lengths, tmp_path):
    run = _step(m, x, lengths)
    run()  # warm-up: lazily created state is not part of a step
    m.zero_grad(set_to_none=True)
    x.grad = None
    mem, _ = _memory_trace(run, tmp_path)
    return _peak(mem)


@pytest.mark.parametrize("engine", ["0", "1"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_training_step_peak_not_above_torch_nn(cell, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", engine)
    ref, ours = _modules(cell)
    x = torch.randn(T, B, I, requires_grad=True)
    nn_peak = _step_peak(ref, x, None, tmp_path)
    fused_peak = _step_peak(ours, x, None, tmp_path)
    assert fused_peak <= nn_peak, f"{cell}: fusedrnn peaks at {fused_peak} bytes, torch.nn at {nn_peak}"


@pytest.mark.parametrize("engine", ["0", "1"])
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_backward_allocates_what_the_design_says(cell, ragged, engine, tmp_path, monkeypatch):
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", engine)
    _, ours = _modules(cell)
    G = CELLS[cell][2]
    x = torch.randn(T, B, I, requires_grad=True)
    lengths = None
    if ragged:  # every length from 1 to T, one of full length, some repeated
        lengths = torch.cat([torch.tensor([T]), torch.randint(1, T + 1, (B - 1,), generator=torch.Generator()
                                                               .manual_seed(1))])
    N = T * B if lengths is None else int(lengths.sum())
    mem, ops = _memory_trace(_step(ours, x, lengths), tmp_path)
    name = {"gru": "fusedrnn::gru_backward", "lstm": "fusedrnn::lstm_backward",
            "rnn": "fusedrnn::rnn_tanh_backward"}[cell]
    (op,) = [e for e in ops if e["name"] == name]
    peak = _peak(mem, op["ts"], op["ts"] + op["dur"])
    f = 4  # float32
    params = G * H * (I + H) + 2 * G * H  # the weight and bias gradients
    allowed = (N * G * H          # the gate gradients
               + N * I            # the input gradient
               + N * H            # grad_output made contiguous (the gradient of a sum is expanded)
               + params
               + 4 * B * G * H    # per-step buffers: dh, dc, GRU's hidden-side gate gradients, previous states
               ) * f
    if cell == "rnn":
        allowed -= N * G * H * f  # its gate gradients take the place of the grad_output copy
    assert peak <= allowed, (f"{cell}: the backward op allocated {peak} bytes at its peak, the design allows "
                             f"{allowed} (one [N, H] float32 buffer is {N * H * f} bytes)")
    # and the layer's memory is not a matter of luck of the allocator: a second run peaks the same
    mem2, ops2 = _memory_trace(_step(ours, x, lengths), tmp_path)
    (op2,) = [e for e in ops2 if e["name"] == name]
    assert _peak(mem2, op2["ts"], op2["ts"] + op2["dur"]) == peak


@pytest.mark.parametrize("engine", ["0", "1"])
@pytest.mark.parametrize("grad", ["expanded", "contiguous"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_reused_buffers_give_torch_nn_gradients(cell, grad, engine, monkeypatch):
    """The buffers backward reuses: RNN's gate gradients in the grad_output copy (only when that
    copy is made, i.e. for an expanded grad_output), dX in the gate gradients' buffer when
    input_size == G * H, GRU's n-gate columns rescaled in place, the previous states read in
    place; over a ragged batch in both directions."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", engine)
    nn_cls, fused_cls, G = CELLS[cell]
    hidden = 8
    size = G * hidden  # input_size == G * H: dX may take the gate gradients' buffer
    dtype = torch.float32 if engine == "1" else torch.float64
    torch.manual_seed(0)
    ref = nn_cls(size, hidden, bidirectional=True).to(dtype)
    ours = fused_cls(size, hidden, bidirectional=True).to(dtype)
    ours.load_state_dict(ref.state_dict())
    lengths = torch.tensor([9, 9, 7, 4, 4, 1, 3])
    x = torch.randn(9, len(lengths), size, dtype=dtype)
    weight = torch.randn(9, len(lengths), 2 * hidden, dtype=dtype)
    results = []
    for m in (ref, ours):
        xi = x.clone().requires_grad_(True)
        out, _ = m(pack_padded_sequence(xi, lengths, enforce_sorted=False))
        loss = out.data.sum() if grad == "expanded" else (out.data * weight.view(-1, 2 * hidden)[:len(out.data)]).sum()
        loss.backward()
        results.append([xi.grad] + [p.grad for p in m.parameters()])
    tol = dict(rtol=0, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **tol)
