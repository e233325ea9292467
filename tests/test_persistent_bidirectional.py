"""A bidirectional layer through the two-direction op pair (fusedrnn::bidirectional_forward /
bidirectional_backward, csrc/persistent/persistent_bidirectional.h), which fusedrnn.functional
calls for every bidirectional layer on CUDA: on the CPU these ops run the same wiring with the
persistent kernels' own source on the CPU kernel runner (csrc/exec/cpu_runner.h), planned for a
modeled device (an H100's limits; the SM count set by persistent_runner_sm_count). With
fusedrnn._bidirectional.RUNNER_ON_CPU set, a fusedrnn module on the CPU takes that route, so the
whole module call (forward, autograd, backward) is compared here with torch.nn and with the
per-direction route (the CPU ops, one direction at a time), ragged and full batches. The runner
counts its launches (persistent_runner_launches), so each test also checks WHICH route ran: one
forward and one backward launch for both directions, two of each when the two grids are not
co-resident, none when the plan refuses the layer (hidden size above 128) and the per-step driver
runs it; and a ragged batch's schedule written once per call (by the forward; the backward reads
the saved one).
"""

import contextlib

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn
from fusedrnn import _bidirectional

pytestmark = pytest.mark.skipif(not _bidirectional.AVAILABLE, reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

OPS = torch.ops.fusedrnn
MODULES = {"LSTM": (fusedrnn.LSTM, torch.nn.LSTM, {}), "GRU": (fusedrnn.GRU, torch.nn.GRU, {}),
           "RNN_TANH": (fusedrnn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
           "RNN_RELU": (fusedrnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"})}


@contextlib.contextmanager
def runner_route(sm_count=132):
    """CPU bidirectional layers through the two-direction ops on the runner, a modeled device of
    `sm_count` SMs."""
    previous = OPS.persistent_runner_sm_count(sm_count)
    _bidirectional.RUNNER_ON_CPU = True
    try:
        yield
    finally:
        _bidirectional.RUNNER_ON_CPU = False
        OPS.persistent_runner_sm_count(previous)


def launches():
    return torch.tensor(OPS.persistent_runner_launches())


def make(mode, hidden, dtype, bias=True, layers=1, input_size=5, seed=0):
    ours_cls, nn_cls, kw = MODULES[mode]
    torch.manual_seed(seed)
    nn_mod = nn_cls(input_size, hidden, num_layers=layers, bidirectional=True, bias=bias, **kw).to(dtype)
    ours = ours_cls(input_size, hidden, num_layers=layers, bidirectional=True, bias=bias, **kw).to(dtype)
    ours.load_state_dict(nn_mod.state_dict())
    return ours, nn_mod


def run(mod, mode, x, lengths, h0, c0):
    """Forward and backward of a module: its outputs, then the gradients of input, states and
    every parameter (a fixed random upstream gradient on every output)."""
    x = x.detach().requires_grad_()
    h = h0.detach().requires_grad_()
    c = c0.detach().requires_grad_() if c0 is not None else None
    inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if lengths is not None else x
    out, state = mod(inp, (h, c) if mode == "LSTM" else h)
    out = out.data if lengths is not None else out
    states = list(state) if mode == "LSTM" else [state]
    g = torch.Generator().manual_seed(7)
    outs = [out] + states
    loss = sum((t * torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.device, t.dtype)).sum()
               for t in outs)
    leaves = [x, h] + ([c] if c is not None else []) + list(mod.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach() for t in outs], list(grads)


def inputs(mode, hidden, dtype, lengths, layers=1, batch=4, steps=6, input_size=5):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(steps, batch, input_size, generator=g, dtype=torch.float64).to(dtype)
    h0 = torch.randn(2 * layers, batch, hidden, generator=g, dtype=torch.float64).to(dtype) * 0.5
    c0 = (torch.randn(2 * layers, batch, hidden, generator=g, dtype=torch.float64).to(dtype) * 0.5
          if mode == "LSTM" else None)
    return x, (torch.tensor(lengths) if lengths is not None else None), h0, c0


def assert_all_close(got, want, what, **tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what} [{i}]: {m}", **tol)


CASES = [("full", None), ("ragged", [6, 4, 4, 1])]


@pytest.mark.parametrize("batch", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("mode", list(MODULES))
def test_two_direction_route_matches_nn_and_per_direction_route_float64(mode, batch):
    """One layer in float64: torch.nn to 1e-10, the per-direction CPU ops to 1e-12; the two-direction
    route ran (one forward and one backward kernel launch for both directions, one schedule fill
    for a ragged batch, none in backward)."""
    lengths = batch[1]
    ours, nn_mod = make(mode, 16, torch.float64)
    x, lens, h0, c0 = inputs(mode, 16, torch.float64, lengths)
    before = launches()
    with runner_route():
        got = run(ours, mode, x, lens, h0, c0)
    ran = launches() - before
    assert ran.tolist() == [1, 1, 0 if lengths is None else 1], ran
    want_nn = run(nn_mod, mode, x, lens, h0, c0)
    per_direction = run(ours, mode, x, lens, h0, c0)  # RUNNER_ON_CPU off: the CPU ops, one direction each
    assert (launches() - before - ran).abs().sum() == 0
    for k in (0, 1):
        assert_all_close(got[k], want_nn[k], f"vs torch.nn {'outputs' if k == 0 else 'grads'}", rtol=1e-10, atol=1e-10)
        assert_all_close(got[k], per_direction[k], "vs per-direction", rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", ["LSTM", "GRU"])
def test_two_layers_no_bias_float32_match_nn(mode):
    """Two bidirectional layers (the second over the first's [N, 2H] output), no bias, float32,
    ragged: torch.nn at float32 tolerances; both layers took the two-direction route."""
    ours, nn_mod = make(mode, 24, torch.float32, bias=False, layers=2)
    x, lens, h0, c0 = inputs(mode, 24, torch.float32, [6, 5, 2, 2], layers=2)
    before = launches()
    with runner_route():
        got = run(ours, mode, x, lens, h0, c0)
    assert (launches() - before).tolist() == [2, 2, 2]
    want = run(nn_mod, mode, x, lens, h0, c0)
    assert_all_close(got[0], want[0], "outputs", rtol=1e-4, atol=1e-5)
    assert_all_close(got[1], want[1], "grads", rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_types_two_direction_launch_bitwise_per_direction_launches(dtype):
    """Half types: the two directions in one launch give bitwise what each direction's own launch
    gives (a modeled device of 6 SMs: 2 x 4 CTAs do not fit, so the same call launches them one by
    one), forward and every gradient; and both stay within the dtype's rounding of torch.nn's
    float64 results."""
    mode = "GRU"
    ours, nn_mod = make(mode, 32, dtype)
    x, lens, h0, c0 = inputs(mode, 32, dtype, [6, 5, 5, 3])
    before = launches()
    with runner_route():
        together = run(ours, mode, x, lens, h0, c0)
    mid = launches()
    with runner_route(sm_count=6):
        apart = run(ours, mode, x, lens, h0, c0)
    assert (mid - before).tolist() == [1, 1, 1] and (launches() - mid).tolist() == [2, 2, 1]
    for k in (0, 1):
        for a, b in zip(together[k], apart[k]):
            assert torch.equal(a, b)
    ref_mod = make(mode, 32, torch.float64)[1]
    ref_mod.load_state_dict({k: v.double() for k, v in ours.state_dict().items()})  # the rounded weights
    ref = run(ref_mod, mode, x.double(), lens, h0.double(), None)
    for a, b in zip(together[0], ref[0]):
        err = (a.double() - b).abs().max() / max(1.0, b.abs().max())
        assert err < (2e-2 if dtype == torch.bfloat16 else 3e-3), err


def test_fallbacks_run_each_direction_as_the_one_direction_ops():
    """What the two-direction launch cannot take runs as today, with today's results: a hidden size
    above the persistent kernels' 128 (the per-step driver; no runner launch), and
    FUSEDRNN_CUDA_PATH=per_step; a forced persistent path on such a layer raises as for one
    direction."""
    mode = "LSTM"
    ours, nn_mod = make(mode, 130, torch.float64)
    x, lens, h0, c0 = inputs(mode, 130, torch.float64, [3, 2], batch=2, steps=3)
    before = launches()
    with runner_route():
        got = run(ours, mode, x, lens, h0, c0)
    assert (launches() - before).tolist() == [0, 0, 1]  # only the schedule the backward would read
    want = run(nn_mod, mode, x, lens, h0, c0)
    assert_all_close(got[0], want[0], "outputs", rtol=1e-10, atol=1e-10)
    assert_all_close(got[1], want[1], "grads", rtol=1e-10, atol=1e-10)
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("FUSEDRNN_CUDA_PATH", "persistent")
        with runner_route(), pytest.raises(RuntimeError, match="bidirectional_forward: FUSEDRNN_CUDA_PATH=persistent, "
                                                                "but the persistent kernel cannot run this layer"):
            run(ours, mode, x, lens, h0, c0)
        small, small_nn = make("GRU", 8, torch.float64)
        xs, ls, hs, _ = inputs("GRU", 8, torch.float64, None, batch=2, steps=3)
        mp.setenv("FUSEDRNN_CUDA_PATH", "per_step")
        before = launches()
        with runner_route():
            got = run(small, "GRU", xs, ls, hs, None)
        assert (launches() - before).tolist() == [0, 0, 0]
        want = run(small_nn, "GRU", xs, ls, hs, None)
        assert_all_close(got[1], want[1], "grads", rtol=1e-10, atol=1e-10)
    finally:
        mp.undo()


def test_double_backward_through_the_two_direction_route():
    """create_graph=True: first gradients from the two-direction ops, second-order ones through each
    direction's differentiable backward (as today): equal to the per-direction route's."""
    mode = "GRU"
    ours, _ = make(mode, 6, torch.float64)
    x, lens, h0, _ = inputs(mode, 6, torch.float64, [4, 3, 1], batch=3, steps=4)

    def second_order():
        xx = x.detach().requires_grad_()
        inp = pack_padded_sequence(xx, lens, enforce_sorted=False)
        out, h = ours(inp, h0)
        g = torch.autograd.grad(out.data.sum() + h.sum(), [xx] + list(ours.parameters()), create_graph=True)
        return torch.autograd.grad(sum((t * t).sum() for t in g), [xx] + list(ours.parameters()))

    with runner_route():
        got = second_order()
    want = second_order()
    assert_all_close(got, want, "second order", rtol=1e-10, atol=1e-10)


def test_ops_opcheck():
    """Schema, fake kernels and autograd registration of the two ops (torch.library.opcheck), with
    the arguments a ragged LSTM layer passes."""
    g = torch.Generator().manual_seed(0)
    n, b, i, h = 7, 3, 4, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bs = torch.tensor([3, 2, 2])
    args = ("lstm", r(n, i).requires_grad_(), r(b, h), r(b, h), r(b, h), r(b, h), r(4 * h, i), r(4 * h, h).requires_grad_(),
            r(4 * h), None, r(4 * h, i), r(4 * h, h), None, r(4 * h), bs)
    with runner_route():
        torch.library.opcheck(OPS.bidirectional_forward.default, args,
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
        out = OPS.bidirectional_forward(*[a.detach() if isinstance(a, torch.Tensor) else a for a in args])
        (o, hn, cn, ga, ex, o_r, hn_r, cn_r, ga_r, ex_r, sched) = out
        bargs = ("lstm", r(n, h), r(n, h), r(b, h), r(b, h), r(b, h), r(b, h), args[1].detach(), args[2], args[3],
                 args[4], args[5], args[6], args[7].detach(), args[10], args[11], bs, True, o, ga, ex, o_r, ga_r,
                 ex_r, sched)
        torch.library.opcheck(OPS.bidirectional_backward.default, bargs, test_utils=("test_schema", "test_faketensor"))


def test_compile_bidirectional_module():
    """torch.compile of a module whose bidirectional layer takes the two-direction ops: the fake
    kernels trace it, forward and backward, and the compiled call equals the eager one."""
    mode = "LSTM"
    ours, _ = make(mode, 8, torch.float32)
    x, lens, h0, c0 = inputs(mode, 8, torch.float32, None, batch=2, steps=3)

    def f(x):
        out, (h, c) = ours(x, (h0, c0))
        return out.sum() + h.sum() + c.sum()

    with runner_route():
        xe = x.clone().requires_grad_()
        eager = f(xe)
        eager.backward()
        xc = x.clone().requires_grad_()
        before = launches()
        compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(xc)
        compiled.backward()
        assert (launches() - before)[:2].tolist() == [1, 1]  # the compiled graph ran the op pair
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(xc.grad, xe.grad)


def test_backward_rejects_a_wrong_schedule():
    """The saved schedule is checked for shape and dtype before the backward kernel reads it."""
    g = torch.Generator().manual_seed(0)
    n, b, h = 5, 2, 3
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    bs = torch.tensor([2, 2, 1])
    x, h0, h0r, wi, wh, wir, whr = r(n, 4), r(b, h), r(b, h), r(h, 4), r(h, h), r(h, 4), r(h, h)
    with runner_route():
        out = OPS.bidirectional_forward("rnn_tanh", x, h0, h0r, None, None, wi, wh, None, None, wir, whr, None, None, bs)
        with pytest.raises(RuntimeError, match="saved schedule"):
            OPS.bidirectional_backward("rnn_tanh", r(n, h), r(n, h), r(b, h), r(b, h), None, None, x, h0, h0r, None,
                                       None, wi, wh, wir, whr, bs, True, out[0], out[3], out[4], out[5], out[8],
                                       out[9], torch.zeros(2, 2, dtype=torch.long))


# ---- on a GPU (benchmarks/gpu_check.sh's kernel-vs-emulation step selects these by -k cuda) -----
from conftest import requires_cuda  # noqa: E402


def cuda_persistent_kernels(fn):
    """(forward, backward, schedule) persistent kernel launches the profiler saw while fn ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return (sum(1 for n in names if "persistent" in n and "forward_kernel" in n),
            sum(1 for n in names if "persistent" in n and "backward_kernel" in n),
            sum(1 for n in names if "fill_schedule_kernel" in n))


@requires_cuda
@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
@pytest.mark.parametrize("mode", list(MODULES))
def test_cuda_bidirectional_module_runs_both_directions_in_one_launch(mode, ragged):
    """A bidirectional module on CUDA at B = 32, H = 128 (32 CTAs a direction): ONE persistent forward
    and ONE persistent backward launch for both directions where 2 x 32 CTAs fit the SMs, and one
    schedule kernel for a ragged batch, seen in the profiler; the results equal one direction at a time (the same kernels: 1e-6 for the GEMMs) and
    torch.nn's cuDNN at float32 tolerances."""
    ours, nn_mod = make(mode, 128, torch.float32, input_size=16)
    ours, nn_mod = ours.cuda(), nn_mod.cuda()
    lengths = [9, 7, 7, 3] + [2] * 28 if ragged else None
    x, lens, h0, c0 = inputs(mode, 128, torch.float32, lengths, batch=32, steps=9, input_size=16)
    x, h0 = x.cuda(), h0.cuda()
    c0 = c0.cuda() if c0 is not None else None
    result = {}
    counts = cuda_persistent_kernels(lambda: result.setdefault("two", run(ours, mode, x, lens, h0, c0)))
    one = 2 * 32 <= torch.cuda.get_device_properties(0).multi_processor_count
    # A ragged batch's schedule: written once per training step (the forward's, saved for backward).
    assert counts == ((1, 1) if one else (2, 2)) + (int(ragged),), counts
    _bidirectional.ENABLED = False
    try:
        apart_counts = cuda_persistent_kernels(lambda: result.setdefault("apart", run(ours, mode, x, lens, h0, c0)))
    finally:
        _bidirectional.ENABLED = True
    assert apart_counts == (2, 2, 4 * int(ragged)), apart_counts  # one a direction, forward and backward
    for k in (0, 1):
        assert_all_close(result["two"][k], result["apart"][k], "vs one direction at a time", rtol=1e-6, atol=1e-6)
    want = run(nn_mod, mode, x, lens, h0, c0)
    assert_all_close(result["two"][0], want[0], "vs cuDNN outputs", rtol=1e-4, atol=1e-4)
    assert_all_close(result["two"][1], want[1], "vs cuDNN grads", rtol=1e-3, atol=1e-3)


@requires_cuda
def test_cuda_bidirectional_ragged_training_step_under_graph_capture():
    """A captured ragged training step of a bidirectional GRU through the two-direction ops (the
    schedule written by the forward, read by the backward) replays: new inputs copied into the
    captured ones give the eager results of those inputs."""
    mode = "GRU"
    ours, _ = make(mode, 16, torch.float32, input_size=8)
    ours = ours.cuda()
    lens = torch.tensor([6, 4, 4, 1])
    x = torch.randn(6, 4, 8, device="cuda")
    h0 = torch.zeros(2, 4, 16, device="cuda")

    def step():
        ours.zero_grad(set_to_none=False)
        inp = pack_padded_sequence(x, lens)  # sorted: no index copied to the device under capture
        out, h = ours(inp, h0)
        (out.data.square().sum() + h.sum()).backward()
        return [out.data.detach().clone(), h.detach().clone()] + [p.grad.clone() for p in ours.parameters()]

    step()
    for p in ours.parameters():
        p.grad = torch.zeros_like(p)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    x.copy_(torch.randn(6, 4, 8, device="cuda"))
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    assert_all_close(captured, eager, "replayed vs eager", rtol=1e-5, atol=1e-5)


def test_export_and_onnx_of_a_bidirectional_module():
    """torch.export records the op pair (fake kernels) and the exported program runs it; ONNX export
    (which translates the one-direction ops to ONNX's operators) keeps the one-direction route."""
    pytest.importorskip("onnx")
    import io

    import onnx

    m = fusedrnn.GRU(5, 8, bidirectional=True).eval()
    x = torch.randn(4, 2, 5)
    with runner_route():
        ep = torch.export.export(m, (x,))
        assert any("bidirectional_forward" in str(n.target) for n in ep.graph.nodes)
        torch.testing.assert_close(ep.module()(x)[0], m(x)[0])
        before = launches()
        f = io.BytesIO()
        torch.onnx.export(m, (x,), f, dynamo=False)
        assert (launches() - before).tolist() == [0, 0, 0]
    ops = {n.op_type for n in onnx.load_from_string(f.getvalue()).graph.node}
    assert "GRU" in ops and not any("bidirectional" in o for o in ops), ops
