"""The persistent CUDA forward and backward kernels' own source, run on the CPU.

`fusedrnn::persistent_emulate_forward` runs the kernel body (Forward<Cell, T>::run in
csrc/persistent/persistent_forward.h, the same source the `__global__` wrapper in
csrc/cuda/persistent_kernel.cuh runs) through the CPU kernel runner (csrc/exec/cpu_runner.h):
every thread of every CTA as a fiber, real barriers, lane-exact warp shuffles, shared memory
poisoned and checked for races, out-of-bounds and uninitialised reads (any of which raises). So
these tests check, without a GPU, how the kernel splits weights, units and rows over threads and
CTAs, the partial tiles (H not a multiple of the k-slices, rows past the batch), the reduction,
ragged stops and the reverse direction, against fusedrnn.reference and against the per-step path's
saved tensors (which the existing backward ops read). `fusedrnn::persistent_plan` is the host-side
path choice, run with made-up device limits. `fusedrnn::persistent_emulate_backward` is the
backward op with the persistent backward kernel's body (Backward<Cell, T>::run in
csrc/persistent/persistent_backward.h) on the same runner in place of the per-step loop, checked
against fusedrnn.reference's autograd gradients and the per-step backward.
tests/test_kernel_runner.py shows the runner's checks catch a planted bug of each kind.
"""

import pytest
import torch

import fusedrnn
from fusedrnn import reference

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

OPS = torch.ops.fusedrnn
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# Values from csrc/persistent/persistent_limits.h.
MAX_HIDDEN, THREADS, MAX_ROWS_PER_CTA = 128, 512, 16
# An H100 SXM as cudaGetDeviceProperties reports it, and a kernel that fits.
H100 = dict(sm_count=132, shared_optin=232448, registers_per_block=65536, kernel_registers=128,
            kernel_max_threads=512)


def lengths_to_batch_sizes(lengths):
    """Per-step batch sizes of sequences sorted by decreasing length."""
    lengths = sorted(lengths, reverse=True)
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(lengths[0])], dtype=torch.long)


def make_args(cell, hidden, batch_sizes, dtype=torch.float64, input_size=3, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    n, b, gh = int(batch_sizes.sum()), int(batch_sizes[0]), GATES[cell] * hidden
    # Weights scaled like torch.nn's init, so states stay in the activations' useful range.
    k = hidden ** -0.5
    args = dict(input=rand(n, input_size), h0=rand(b, hidden), c0=rand(b, hidden) if cell == "lstm" else None,
                w_ih=rand(gh, input_size, scale=k), w_hh=rand(gh, hidden, scale=k),
                b_ih=rand(gh, scale=k) if bias else None, b_hh=rand(gh, scale=k) if bias else None)
    return args


def emulate(cell, a, batch_sizes, reverse, rows_per_cta):
    return OPS.persistent_emulate_forward(cell, a["input"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                          a["b_hh"], batch_sizes, reverse, rows_per_cta)


def per_step(cell, a, batch_sizes, reverse):
    """The per-step path's forward op: (output, h_n, c_n or None, gates, extra)."""
    if cell == "lstm":
        out, h, c, gates, cells = OPS.lstm_forward(a["input"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                                   a["b_hh"], None, batch_sizes, reverse)
        return out, h, c, gates, cells
    if cell == "gru":
        out, h, gates, hn = OPS.gru_forward(a["input"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"],
                                            batch_sizes, reverse)
        return out, h, None, gates, hn
    op = getattr(OPS, f"{cell}_forward")
    out, h = op(a["input"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], batch_sizes, reverse)
    return out, h, None, None, None


def reference_forward(cell, a, batch_sizes, reverse):
    """fusedrnn.reference (plain PyTorch): (output, h_n, c_n or None)."""
    if cell == "lstm":
        return reference.lstm_layer(a["input"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], None,
                                    batch_sizes, reverse)
    if cell == "gru":
        out, h = reference.gru_layer(a["input"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"], a["b_hh"], batch_sizes,
                                     reverse)
    else:
        out, h = reference.rnn_layer(cell.split("_")[1], a["input"], a["h0"], a["w_ih"], a["w_hh"], a["b_ih"],
                                     a["b_hh"], batch_sizes, reverse)
    return out, h, None


def tol(dtype):
    return dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


# (hidden, lengths, rows_per_cta): the sentiment hidden size; H not a multiple of the 4 k-slices;
# H = 1; T = 1 with a batch of 1; ragged batches split over several CTAs with a partial last CTA
# (5 rows, 2 per CTA) and rows that stop at different steps inside one CTA.
SHAPES = [
    (128, [3, 3], 1),
    (37, [4, 3, 3, 1, 1], 2),
    (1, [2, 1], 1),
    (5, [1], 1),
    (9, [5, 4, 2, 2, 1], 3),
    (64, [3, 2, 2], 16),
]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("hidden,lengths,rows", SHAPES, ids=[f"H{h}-L{'_'.join(map(str, l))}-R{r}"
                                                              for h, l, r in SHAPES])
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_kernel_matches_reference_and_per_step_path(cell, hidden, lengths, rows, reverse, dtype):
    batch_sizes = lengths_to_batch_sizes(lengths)
    a = make_args(cell, hidden, batch_sizes, dtype)
    out, h_n, c_n, gates, extra = emulate(cell, a, batch_sizes, reverse, rows)
    ref = reference_forward(cell, a, batch_sizes, reverse)
    torch.testing.assert_close(out, ref[0], **tol(dtype))
    torch.testing.assert_close(h_n, ref[1], **tol(dtype))
    if cell == "lstm":
        torch.testing.assert_close(c_n, ref[2], **tol(dtype))
    else:
        assert c_n.numel() == 0
    # Saved tensors: the same layout and values as the per-step path's, which backward reads.
    # Not at H = 1: the per-step CPU path is wrong there for LSTM and GRU (MKL rejects its GEMM's
    # leading dimension: "Parameter 8 was incorrect on entry to DGEMM"), a bug outside this kernel.
    want = per_step(cell, a, batch_sizes, reverse)
    if cell in ("lstm", "gru") and hidden > 1:
        torch.testing.assert_close(gates, want[3], **tol(dtype))
        torch.testing.assert_close(extra, want[4], **tol(dtype))


@pytest.mark.parametrize("hidden,lengths,rows", [(37, [4, 3, 3, 1, 1], 2), (128, [3, 3], 1)],
                         ids=["H37-ragged-R2", "H128-full-R1"])
@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_both_directions_in_one_launch_match_each_direction_alone(cell, hidden, lengths, rows):
    """Both directions of a bidirectional layer (other weights and states, the same input) in ONE
    launch of the forward kernel: blocks [0, ctas) run the forward direction, the next ctas the
    reverse one. Each direction's outputs and saved tensors must be bitwise those of its own
    launch, and match fusedrnn.reference."""
    batch_sizes = lengths_to_batch_sizes(lengths)
    fwd = make_args(cell, hidden, batch_sizes, seed=0)
    rev = make_args(cell, hidden, batch_sizes, seed=1)
    rev["input"] = fwd["input"]
    both = OPS.persistent_forward_bidirectional(
        cell, fwd["input"], [fwd["h0"], rev["h0"]], [fwd["c0"], rev["c0"]] if cell == "lstm" else [],
        [fwd["w_ih"], rev["w_ih"]], [fwd["w_hh"], rev["w_hh"]], [fwd["b_ih"], rev["b_ih"]],
        [fwd["b_hh"], rev["b_hh"]], batch_sizes, rows)
    assert len(both) == 10
    for d, (a, reverse) in enumerate(((fwd, False), (rev, True))):
        alone = emulate(cell, a, batch_sizes, reverse, rows)
        for i, (x, y) in enumerate(zip(both[5 * d:5 * d + 5], alone)):
            assert torch.equal(x, y), (d, i)
        ref = reference_forward(cell, a, batch_sizes, reverse)
        torch.testing.assert_close(both[5 * d], ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(both[5 * d + 1], ref[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("batch,one_launch", [(32, True), (66, True), (67, False), (132, False), (1000, False)])
def test_plan_runs_both_directions_in_one_launch_only_when_every_cta_is_co_resident(batch, one_launch):
    """One CTA per SM (512 threads at up to 128 registers): a bidirectional layer's two grids go
    into one launch only when twice one direction's grid fits the SMs (132 on an H100)."""
    for cell in GATES:
        ok, rows, grid, shared, both = OPS.persistent_plan_directions(cell, 128, batch, torch.float32, **H100)
        assert ok == 1 and both == int(one_launch), (cell, batch, rows, grid, both)
        assert 2 * grid <= H100["sm_count"] if both else 2 * grid > H100["sm_count"]
    ok, *_, both = OPS.persistent_plan_directions("gru", 256, 32, torch.float32, **H100)  # no persistent plan
    assert ok == 0 and both == 0


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", list(GATES))
def test_backward_op_accepts_the_persistent_forward_saved_tensors(cell, reverse):
    """The per-step backward (the CPU's, and CUDA's where the persistent backward cannot run): fed
    the persistent forward's outputs, it must give the same gradients as the per-step forward's
    (float64)."""
    batch_sizes = lengths_to_batch_sizes([4, 3, 1])
    a = make_args(cell, 6, batch_sizes)
    n, b, hidden = a["input"].shape[0], a["h0"].shape[0], 6
    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(n, hidden, generator=g, dtype=torch.float64)
    grad_h = torch.randn(b, hidden, generator=g, dtype=torch.float64)
    emu = emulate(cell, a, batch_sizes, reverse, 2)
    ps = per_step(cell, a, batch_sizes, reverse)

    def backward(fwd):
        out, _, _, gates, extra = fwd
        if cell == "lstm":
            grad_c = torch.ones(b, hidden, dtype=torch.float64) * 0.5
            return OPS.lstm_backward(grad_out, grad_h, grad_c, a["input"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                     None, batch_sizes, reverse, True, out, gates, extra)
        if cell == "gru":
            return OPS.gru_backward(grad_out, grad_h, a["input"], a["h0"], a["w_ih"], a["w_hh"], batch_sizes,
                                    reverse, True, out, gates, extra)
        return getattr(OPS, f"{cell}_backward")(grad_out, grad_h, a["input"], a["h0"], a["w_ih"], a["w_hh"],
                                                 batch_sizes, reverse, True, out)

    for got, want in zip(backward(emu), backward(ps)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_kernel_without_bias(cell):
    batch_sizes = lengths_to_batch_sizes([3, 2])
    a = make_args(cell, 10, batch_sizes, bias=False)
    out, h_n, *_ = emulate(cell, a, batch_sizes, False, 1)
    ref = reference_forward(cell, a, batch_sizes, False)
    torch.testing.assert_close(out, ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(h_n, ref[1], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_half_kernel_keeps_sums_and_state_in_float32(cell, dtype, monkeypatch):
    """Weights and outputs in half, sums, h between steps and the LSTM cell state in float32: the
    error against float64 is at most that of the per-step path, which rounds every step's
    recurrent product and state to half (DESIGN.md: at most 2x torch.nn's). That path is the
    CPU op with FUSEDRNN_CPU_HALF=per_step: by default the CPU runs half layers in float32
    (cpu/widened_layer.h), rounding only what it returns."""
    monkeypatch.setenv("FUSEDRNN_CPU_HALF", "per_step")
    batch_sizes = lengths_to_batch_sizes([12, 10, 7])
    a64 = make_args(cell, 48, batch_sizes, torch.float64)
    a = {k: None if v is None else v.to(dtype) for k, v in a64.items()}
    # The oracle sees the same (rounded) inputs in float64.
    a_ref = {k: None if v is None else v.double() for k, v in a.items()}
    ref_out, ref_h, _ = reference_forward(cell, a_ref, batch_sizes, False)
    out, h_n, *_ = emulate(cell, a, batch_sizes, False, 2)
    ps_out, ps_h, *_ = per_step(cell, a, batch_sizes, False)
    err = (out.double() - ref_out).abs().max().item()
    err_per_step = (ps_out.double() - ref_out).abs().max().item()
    assert err <= err_per_step * 1.0 + 1e-3, (err, err_per_step)
    assert (h_n.double() - ref_h).abs().max().item() <= (ps_h.double() - ref_h).abs().max().item() + 1e-3


# ---------------------------------------------------------------------------------------------
# The persistent BACKWARD kernel (Backward<Cell, T>::run in csrc/persistent/persistent_backward.h)
# on the CPU runner, inside the real backward op (the weight/input GEMMs after it are the driver's).
# ---------------------------------------------------------------------------------------------

def upstream_grads(cell, a, batch_sizes, dtype, seed=1):
    """Random dL/doutput, dL/dh_n and (LSTM) dL/dc_n."""
    g = torch.Generator().manual_seed(seed)
    n, b = a["input"].shape[0], a["h0"].shape[0]
    hidden = a["h0"].shape[1]
    rand = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return rand(n, hidden), rand(b, hidden), rand(b, hidden) if cell == "lstm" else None


def emulate_backward(cell, a, fwd, grads, batch_sizes, reverse, rows_per_cta):
    """The backward op with the persistent backward kernel on the runner, fed forward outputs `fwd`
    (either path's): (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)."""
    out, _, _, gates, extra = fwd
    go, gh, gc = grads
    return OPS.persistent_emulate_backward(cell, go, gh, gc, a["input"], a["h0"], a["c0"], a["w_ih"], a["w_hh"],
                                           batch_sizes, reverse, True, out, gates, extra, rows_per_cta)


def per_step_backward(cell, a, fwd, grads, batch_sizes, reverse):
    """The per-step backward op, the same 7 results as emulate_backward."""
    out, _, _, gates, extra = fwd
    go, gh, gc = grads
    if cell == "lstm":
        r = OPS.lstm_backward(go, gh, gc, a["input"], a["h0"], a["c0"], a["w_ih"], a["w_hh"], None, batch_sizes,
                              reverse, True, out, gates, extra)
        return r[:7]
    if cell == "gru":
        r = OPS.gru_backward(go, gh, a["input"], a["h0"], a["w_ih"], a["w_hh"], batch_sizes, reverse, True, out,
                             gates, extra)
    else:
        r = getattr(OPS, f"{cell}_backward")(go, gh, a["input"], a["h0"], a["w_ih"], a["w_hh"], batch_sizes, reverse,
                                             True, out)
    return (r[0], r[1], None) + tuple(r[2:])


def reference_grads(cell, a, grads, batch_sizes, reverse):
    """Gradients of sum(out * go) + sum(h_n * gh) (+ sum(c_n * gc)) through fusedrnn.reference in
    float64, in emulate_backward's order (None where a tensor is absent)."""
    leaves = {k: None if v is None else v.detach().double().requires_grad_() for k, v in a.items()}
    out, h_n, c_n = reference_forward(cell, leaves, batch_sizes, reverse)
    go, gh, gc = (None if t is None else t.double() for t in grads)
    loss = (out * go).sum() + (h_n * gh).sum() + ((c_n * gc).sum() if cell == "lstm" else 0)
    names = ["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"]
    wanted = [leaves[k] for k in names if leaves[k] is not None]
    got = dict(zip([k for k in names if leaves[k] is not None], torch.autograd.grad(loss, wanted)))
    return tuple(got.get(k) for k in names)


@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_backward_of_both_directions_in_one_launch_matches_each_alone(cell):
    """Both directions' backward recurrence (other weights, states and upstream gradients; the
    second reversed) in ONE launch of the backward kernel on the runner: each direction's dL/dh0,
    dL/dc0 and gate gradients (through their column sum, the bias gradient, and dX = dgates W_ih)
    bitwise those of its own backward op, and dL/dh0 within 1e-12 of fusedrnn.reference."""
    batch_sizes = lengths_to_batch_sizes([6, 5, 5, 3, 2])  # 21 tokens: the ATen route for the bias sums
    dirs = []
    for d in range(2):
        a = make_args(cell, 37, batch_sizes, seed=d)
        if d == 1:
            a["input"] = dirs[0][0]["input"]
        fwd = emulate(cell, a, batch_sizes, d == 1, 2)
        dirs.append((a, fwd, upstream_grads(cell, a, batch_sizes, torch.float64, seed=10 + d)))
    lists = lambda f: [f(*x) for x in dirs]  # noqa: E731
    lstm, gated = cell == "lstm", cell in ("lstm", "gru")
    both = OPS.persistent_backward_bidirectional(
        cell, lists(lambda a, f, g: g[0]), lists(lambda a, f, g: g[1]), lists(lambda a, f, g: g[2]) if lstm else [],
        lists(lambda a, f, g: a["h0"]), lists(lambda a, f, g: a["c0"]) if lstm else [],
        lists(lambda a, f, g: a["w_hh"]), batch_sizes, lists(lambda a, f, g: f[0]),
        lists(lambda a, f, g: f[3]) if gated else [], lists(lambda a, f, g: f[4]) if gated else [], 2)
    assert len(both) == 6
    for d, (a, fwd, grads) in enumerate(dirs):
        dgates, dh0, dc0 = both[3 * d:3 * d + 3]
        alone = emulate_backward(cell, a, fwd, grads, batch_sizes, d == 1, 2)
        assert torch.equal(dh0, alone[1]), d
        if lstm:
            assert torch.equal(dc0, alone[2]), d
        assert torch.equal(dgates.sum(0), alone[5]), d
        torch.testing.assert_close(dgates @ a["w_ih"], alone[0], rtol=0, atol=1e-12)
        ref = reference_grads(cell, a, grads, batch_sizes, d == 1)
        torch.testing.assert_close(dh0, ref[1], rtol=0, atol=1e-12)


def grad_tol(dtype):
    return dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("hidden,lengths,rows", SHAPES, ids=[f"H{h}-L{'_'.join(map(str, l))}-R{r}"
                                                              for h, l, r in SHAPES])
@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_emulated_backward_kernel_matches_reference_gradients(cell, hidden, lengths, rows, reverse, dtype):
    """Every gradient (input, h0, c0, weights, biases) against fusedrnn.reference's autograd, from
    the persistent forward's saved tensors; ragged batches stop inside a CTA, partial tiles, reverse."""
    batch_sizes = lengths_to_batch_sizes(lengths)
    a = make_args(cell, hidden, batch_sizes, dtype)
    grads = upstream_grads(cell, a, batch_sizes, dtype)
    fwd = emulate(cell, a, batch_sizes, reverse, rows)
    got = emulate_backward(cell, a, fwd, grads, batch_sizes, reverse, rows)
    want = reference_grads(cell, a, grads, batch_sizes, reverse)
    for name, x, y in zip(["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"], got, want):
        if y is None:
            assert name == "c0" and x.numel() == 0
            continue
        torch.testing.assert_close(x.double(), y, **grad_tol(dtype), msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_backward_kernel_accepts_either_forward_paths_saved_tensors(cell, reverse):
    """Fed the per-step forward's or the persistent forward's outputs, the persistent backward gives
    the per-step backward's gradients (float64); several rows per CTA with a partial last CTA."""
    batch_sizes = lengths_to_batch_sizes([5, 4, 4, 2, 1])
    a = make_args(cell, 7, batch_sizes)
    grads = upstream_grads(cell, a, batch_sizes, torch.float64, seed=3)
    for fwd in (per_step(cell, a, batch_sizes, reverse), emulate(cell, a, batch_sizes, reverse, 2)):
        got = emulate_backward(cell, a, fwd, grads, batch_sizes, reverse, 2)
        want = per_step_backward(cell, a, fwd, grads, batch_sizes, reverse)
        for x, y in zip(got, want):
            if y is None:
                assert x.numel() == 0
            else:
                torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_backward_kernel_without_bias(cell):
    batch_sizes = lengths_to_batch_sizes([3, 2])
    a = make_args(cell, 10, batch_sizes, bias=False)
    grads = upstream_grads(cell, a, batch_sizes, torch.float64)
    got = emulate_backward(cell, a, emulate(cell, a, batch_sizes, False, 1), grads, batch_sizes, False, 1)
    want = reference_grads(cell, a, grads, batch_sizes, False)
    for x, y in zip(got[:5], want[:5]):
        if y is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", list(GATES))
def test_emulated_half_backward_kernel_error_at_most_the_per_step_paths(cell, dtype):
    """Half inputs, dh and dc carried in float32 between steps: every gradient's error against
    float64 at most the per-step backward's (which rounds dh, dc to half each step) plus one
    rounding of the dtype at the gradient's largest magnitude: both paths round every gate
    gradient and the result to half, so one ulp there is the resolution of the comparison."""
    batch_sizes = lengths_to_batch_sizes([12, 10, 7])
    a = {k: None if v is None else v.to(dtype) for k, v in make_args(cell, 48, batch_sizes).items()}
    grads = upstream_grads(cell, a, batch_sizes, dtype)
    want = reference_grads(cell, a, grads, batch_sizes, False)
    fwd = per_step(cell, a, batch_sizes, False)
    got = emulate_backward(cell, a, fwd, grads, batch_sizes, False, 2)
    ps = per_step_backward(cell, a, fwd, grads, batch_sizes, False)
    for name, x, y, z in zip(["input", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh"], got, ps, want):
        if z is None:
            continue
        err, err_ps = (x.double() - z).abs().max().item(), (y.double() - z).abs().max().item()
        assert err <= err_ps + torch.finfo(dtype).eps * max(1.0, z.abs().max().item()), (name, err, err_ps)


def test_emulated_backward_kernel_rejects_what_the_kernel_cannot_run():
    batch_sizes = lengths_to_batch_sizes([2])
    a = make_args("gru", MAX_HIDDEN + 1, batch_sizes)
    grads = upstream_grads("gru", a, batch_sizes, torch.float64)
    fwd = per_step("gru", a, batch_sizes, False)
    with pytest.raises(RuntimeError, match="hidden_size must be at most 128"):
        emulate_backward("gru", a, fwd, grads, batch_sizes, False, 1)
    a = make_args("gru", 4, batch_sizes)
    fwd = per_step("gru", a, batch_sizes, False)
    grads = upstream_grads("gru", a, batch_sizes, torch.float64)
    with pytest.raises(RuntimeError, match=r"rows_per_cta must be in \[1, 16\]"):
        emulate_backward("gru", a, fwd, grads, batch_sizes, False, MAX_ROWS_PER_CTA + 1)


def test_emulated_kernel_rejects_what_the_kernel_cannot_run():
    batch_sizes = lengths_to_batch_sizes([2])
    a = make_args("gru", MAX_HIDDEN + 1, batch_sizes)
    with pytest.raises(RuntimeError, match="hidden_size must be at most 128"):
        emulate("gru", a, batch_sizes, False, 1)
    a = make_args("gru", 4, batch_sizes)
    with pytest.raises(RuntimeError, match=r"rows_per_cta must be in \[1, 16\]"):
        emulate("gru", a, batch_sizes, False, MAX_ROWS_PER_CTA + 1)
    with pytest.raises(RuntimeError, match="cell must be lstm, gru, rnn_tanh or rnn_relu"):
        emulate("lstmx", a, batch_sizes, False, 1)


def plan(cell="gru", hidden=128, batch=32, dtype=torch.float32, projection=False, **device):
    limits = dict(H100, **device)
    ok, rows, grid, shared = OPS.persistent_plan(cell, hidden, batch, dtype, projection, limits["sm_count"],
                                                 limits["shared_optin"], limits["registers_per_block"],
                                                 limits["kernel_registers"], limits["kernel_max_threads"])
    return dict(ok=bool(ok), rows=rows, grid=grid, shared=shared)


def test_plan_sentiment_shape_runs_one_sequence_per_cta():
    for cell in GATES:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            p = plan(cell, 128, 32, dtype)
            assert p["ok"] and p["rows"] == 1 and p["grid"] == 32, (cell, dtype, p)
            assert p["shared"] <= H100["shared_optin"]


def test_plan_shared_memory_per_cell_and_dtype():
    """The weight bytes in shared memory follow the register/shared split (limits header):
    RNN stages through one 32 x 512 slot; GRU keeps 1 gate, LSTM 2 gates in shared memory. The
    state, in the accumulation type: h (two buffers) and c per row, and b_hh (G x 128)."""
    state = lambda gates, acc: acc * (3 * 1 * 128 + gates * 128)  # noqa: E731
    slot = 32 * THREADS
    assert plan("rnn_tanh", dtype=torch.float32)["shared"] == 4 * slot + state(1, 4)
    assert plan("gru", dtype=torch.float32)["shared"] == 4 * slot + state(3, 4)
    assert plan("lstm", dtype=torch.float32)["shared"] == 2 * 4 * slot + state(4, 4)
    assert plan("lstm", dtype=torch.bfloat16)["shared"] == 2 * 2 * slot + state(4, 4)


def test_plan_spreads_rows_over_the_sms_then_packs_them():
    assert plan(batch=1)["rows"] == 1 and plan(batch=1)["grid"] == 1
    assert plan(batch=132)["rows"] == 1
    p = plan(batch=133)
    assert p["rows"] == 2 and p["grid"] == 67
    p = plan(batch=100000)  # more than 16 rows per SM: several waves of 16-row CTAs
    assert p["rows"] == MAX_ROWS_PER_CTA and p["grid"] == (100000 + 15) // 16


def test_plan_shrinks_rows_to_fit_shared_memory_and_refuses_what_does_not_fit():
    full = plan("lstm", batch=132 * 16)
    assert full["ok"] and full["rows"] == 16
    one_row = plan("lstm", batch=1)["shared"]
    p = plan("lstm", batch=132 * 16, shared_optin=one_row + 3 * 4 * 128 * 2)  # room for 3 rows
    assert p["ok"] and p["rows"] == 3 and p["shared"] <= one_row + 3 * 4 * 128 * 2
    assert not plan("lstm", shared_optin=one_row - 1)["ok"]


@pytest.mark.parametrize("change", [
    dict(dtype=torch.float64), dict(projection=True), dict(hidden=MAX_HIDDEN + 1), dict(hidden=0),
    dict(batch=0), dict(kernel_registers=129), dict(registers_per_block=32768), dict(kernel_max_threads=256),
])
def test_plan_refuses_what_the_kernel_or_device_cannot_run(change):
    assert not plan(**change)["ok"]
    assert plan()["ok"]


def test_backends_lists_the_compiled_cuda_paths():
    info = fusedrnn.backends()
    assert "cuda_paths" in info
    if info["cuda"]:
        assert info["cuda_paths"] == ["per_step", "persistent"]
    else:
        assert info["cuda_paths"] == []


# ---------------------------------------------------------------------------------------------
# On a GPU (skipped, saying why, elsewhere; benchmarks/gpu_check.sh runs them): the real kernel
# against the per-step path and the CPU emulation, and the FUSEDRNN_CUDA_PATH switch.
# ---------------------------------------------------------------------------------------------

CUDA = torch.cuda.is_available() and fusedrnn.backends()["cuda"]
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs an NVIDIA GPU and the CUDA build of fusedrnn "
                                   "(benchmarks/gpu_check.sh runs these on one)")


def on_cuda(a):
    return {k: None if v is None else v.cuda() for k, v in a.items()}


# (hidden, lengths): the sentiment shape; a ragged batch larger than the SM count (several rows
# per CTA, a partial last CTA) with H not a multiple of the k-slices.
CUDA_SHAPES = [(128, [20] * 32), (37, [(i * 7) % 23 + 1 for i in range(300)])]


@requires_cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("hidden,lengths", CUDA_SHAPES, ids=["sentiment", "ragged300"])
@pytest.mark.parametrize("cell", list(GATES))
def test_cuda_persistent_kernel_matches_per_step_path_and_emulation(cell, hidden, lengths, reverse, monkeypatch):
    batch_sizes = lengths_to_batch_sizes(lengths)
    a = make_args(cell, hidden, batch_sizes, torch.float32, input_size=16)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")
    got = per_step(cell, on_cuda(a), batch_sizes, reverse)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "per_step")
    want = per_step(cell, on_cuda(a), batch_sizes, reverse)
    for x, y in zip(got, want):
        if x is not None:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    # The same rows-per-CTA split as the GPU's plan would not matter for the values; 1 row per CTA.
    emu = emulate(cell, a, batch_sizes, reverse, 1)
    torch.testing.assert_close(got[0].cpu(), emu[0], rtol=1e-4, atol=1e-5)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", list(GATES))
def test_cuda_persistent_half_error_at_most_the_per_step_paths(cell, dtype, monkeypatch):
    batch_sizes = lengths_to_batch_sizes([50] * 8)
    a = {k: None if v is None else v.to(dtype) for k, v in make_args(cell, 128, batch_sizes, input_size=16).items()}
    ref_out = reference_forward(cell, {k: None if v is None else v.double() for k, v in a.items()}, batch_sizes,
                                False)[0]
    errs = {}
    for path in ("persistent", "per_step"):
        monkeypatch.setenv("FUSEDRNN_CUDA_PATH", path)
        out = per_step(cell, on_cuda(a), batch_sizes, False)[0]
        errs[path] = (out.double().cpu() - ref_out).abs().max().item()
    assert errs["persistent"] <= errs["per_step"] + 1e-3, errs


@requires_cuda
def test_cuda_path_switch_errors(monkeypatch):
    batch_sizes = lengths_to_batch_sizes([3, 2])
    a = on_cuda(make_args("gru", 8, batch_sizes))  # float64: per-step only
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")
    with pytest.raises(RuntimeError, match="FUSEDRNN_CUDA_PATH=persistent, but the persistent kernel cannot run "
                                           "this layer: float64"):
        per_step("gru", a, batch_sizes, False)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "fastest")
    with pytest.raises(RuntimeError, match="FUSEDRNN_CUDA_PATH must be per_step, persistent or auto, got 'fastest'"):
        per_step("gru", a, batch_sizes, False)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "auto")  # falls back to per-step for float64
    out = per_step("gru", a, batch_sizes, False)[0]
    torch.testing.assert_close(out.cpu(), reference_forward("gru", {k: None if v is None else v.cpu()
                                                                     for k, v in a.items()}, batch_sizes, False)[0],
                               rtol=0, atol=1e-12)


@pytest.mark.skipif(not fusedrnn.backends()["cuda"], reason="the CUDA operators are not compiled in this build")
def test_every_op_has_a_cuda_kernel():
    """register_cuda.cpp registers the forward ops itself (to choose the path) and the backward
    ops from the layer drivers: none may be left out. Needs only the CUDA build, not a GPU."""
    for cell in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
        for direction in ("forward", "backward"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedrnn::{cell}_{direction}", "CUDA")


def assert_grads_close(got, want, rel, what):
    """Each gradient within rel of the largest magnitude of the wanted one (weight gradients are
    sums over every token: an absolute tolerance that does not scale with them means nothing)."""
    for i, (x, y) in enumerate(zip(got, want)):
        if y is None or y.numel() == 0:
            continue
        x, y = x.double().cpu(), y.double().cpu()
        scale = max(1.0, y.abs().max().item())
        torch.testing.assert_close(x, y, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}, result {i}: {m}")


@requires_cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("hidden,lengths", CUDA_SHAPES, ids=["sentiment", "ragged300"])
@pytest.mark.parametrize("cell", list(GATES))
def test_cuda_persistent_backward_matches_per_step_path_and_emulation(cell, hidden, lengths, reverse, monkeypatch):
    """The real persistent backward kernel (FUSEDRNN_CUDA_PATH=persistent) against the per-step
    backward on the GPU and against the same kernel source on the CPU runner, from one forward."""
    batch_sizes = lengths_to_batch_sizes(lengths)
    a = make_args(cell, hidden, batch_sizes, torch.float32, input_size=16)
    grads = upstream_grads(cell, a, batch_sizes, torch.float32)
    ca, cgrads = on_cuda(a), tuple(None if t is None else t.cuda() for t in grads)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "per_step")
    fwd = per_step(cell, ca, batch_sizes, reverse)
    want = per_step_backward(cell, ca, fwd, cgrads, batch_sizes, reverse)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")
    got = per_step_backward(cell, ca, fwd, cgrads, batch_sizes, reverse)
    assert_grads_close(got, want, 1e-3, "persistent vs per-step backward on the GPU")
    cpu_fwd = tuple(None if t is None else t.cpu() for t in fwd)
    emu = emulate_backward(cell, a, cpu_fwd, grads, batch_sizes, reverse, 1)
    assert_grads_close(got, emu, 1e-4, "GPU kernel vs the CPU runner")


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("cell", list(GATES))
def test_cuda_persistent_backward_half_error_at_most_the_per_step_paths(cell, dtype, monkeypatch):
    batch_sizes = lengths_to_batch_sizes([50] * 8)
    a = {k: None if v is None else v.to(dtype) for k, v in make_args(cell, 128, batch_sizes, input_size=16).items()}
    grads = upstream_grads(cell, a, batch_sizes, dtype)
    ref = reference_grads(cell, a, grads, batch_sizes, False)
    ca, cgrads = on_cuda(a), tuple(None if t is None else t.cuda() for t in grads)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "per_step")
    fwd = per_step(cell, ca, batch_sizes, False)
    errs = {}
    for path in ("persistent", "per_step"):
        monkeypatch.setenv("FUSEDRNN_CUDA_PATH", path)
        got = per_step_backward(cell, ca, fwd, cgrads, batch_sizes, False)
        errs[path] = [None if z is None else (x.double().cpu() - z).abs().max().item() / max(1.0, z.abs().max().item())
                      for x, z in zip(got, ref)]
    for i, (e, e_ps) in enumerate(zip(errs["persistent"], errs["per_step"])):
        if e is not None:
            assert e <= e_ps + 1e-3, (i, errs)


@requires_cuda
def test_cuda_backward_path_switch_errors(monkeypatch):
    """A forced persistent backward on a layer its kernel cannot run (float64) says why."""
    batch_sizes = lengths_to_batch_sizes([3, 2])
    a = on_cuda(make_args("gru", 8, batch_sizes))
    grads = tuple(None if t is None else t.cuda() for t in upstream_grads("gru", a, batch_sizes, torch.float64))
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "per_step")
    fwd = per_step("gru", a, batch_sizes, False)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")
    with pytest.raises(RuntimeError, match="gru_backward: FUSEDRNN_CUDA_PATH=persistent, but the persistent kernel "
                                           "cannot run this layer: float64"):
        per_step_backward("gru", a, fwd, grads, batch_sizes, False)


@pytest.mark.parametrize("lengths", [[5, 3, 3, 1], [7] * 4 + [2] * 3, list(range(124, 0, -1)),
                                     list(range(125, 0, -1)), list(range(300, 0, -1))],
                         ids=["4-runs", "2-runs", "124-runs", "125-runs", "300-runs"])
def test_ragged_schedule_written_on_the_device_matches_batch_sizes(lengths):
    """The persistent path's ragged schedule is written by a kernel from its own parameters (graph
    capture safe), 124 runs of equal batch sizes per launch: its body on the runner, one chunk and
    several, against batch_sizes and their running sum."""
    bs = lengths_to_batch_sizes(lengths)
    got = OPS.persistent_schedule(bs, len(lengths))
    assert torch.equal(got, torch.stack([bs, torch.cumsum(bs, 0) - bs])), got


@requires_cuda
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_cuda_ragged_batch_under_graph_capture_runs_persistent(cell, monkeypatch):
    """A ragged batch's schedule is written on the device from the launch's parameters, so a
    captured training step on the (forced) persistent path replays: new inputs copied into the
    captured ones give the eager results of those inputs."""
    batch_sizes = lengths_to_batch_sizes([6, 4, 4, 1])
    a = on_cuda(make_args(cell, 16, batch_sizes, torch.float32, input_size=8))
    grads = tuple(None if t is None else t.cuda() for t in upstream_grads(cell, a, batch_sizes, torch.float32))
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")

    def step():
        fwd = per_step(cell, a, batch_sizes, False)
        return fwd, per_step_backward(cell, a, fwd, grads, batch_sizes, False)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up outside the capture, as torch.cuda.graphs asks
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    fresh = on_cuda(make_args(cell, 16, batch_sizes, torch.float32, input_size=8, seed=5))
    for k, v in fresh.items():
        if v is not None:
            a[k].copy_(v)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    # The same kernels on the same inputs; 1e-5 only for cuBLAS, which may pick another algorithm
    # for the weight-gradient GEMMs under capture. A stale schedule would be off by O(1).
    assert_grads_close(captured[0], eager[0], 1e-5, "forward, replayed vs eager")
    assert_grads_close(captured[1], eager[1], 1e-5, "backward, replayed vs eager")


@requires_cuda
@pytest.mark.parametrize("cell", list(GATES))
def test_cuda_both_directions_in_one_persistent_launch(cell, monkeypatch):
    """A bidirectional layer's two directions through the real persistent forward: ONE launch of
    the forward kernel when both grids fit the SMs co-resident (B = 32 rows, one per CTA: 64 CTAs),
    seen in the profiler, with each direction's results bitwise those of its own one-direction op."""
    from torch.profiler import ProfilerActivity, profile

    batch_sizes = lengths_to_batch_sizes([9, 7, 7, 3] + [2] * 28)
    fwd = on_cuda(make_args(cell, 128, batch_sizes, torch.float32, input_size=16, seed=0))
    rev = on_cuda(make_args(cell, 128, batch_sizes, torch.float32, input_size=16, seed=1))
    rev["input"] = fwd["input"]
    pair = lambda k: [fwd[k], rev[k]]  # noqa: E731
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        both = OPS.persistent_forward_bidirectional(cell, fwd["input"], pair("h0"), pair("c0") if cell == "lstm" else [],
                                                    pair("w_ih"), pair("w_hh"), pair("b_ih"), pair("b_hh"),
                                                    batch_sizes, 1)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "persistent" in e.name and "forward_kernel" in e.name)
    one_launch = 2 * 32 <= torch.cuda.get_device_properties(0).multi_processor_count
    assert launches == (1 if one_launch else 2), (launches, one_launch)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")
    for d, (a, reverse) in enumerate(((fwd, False), (rev, True))):
        alone = per_step(cell, a, batch_sizes, reverse)  # the forward op, forced persistent
        for i, (x, y) in enumerate(zip(both[5 * d:5 * d + 5], alone)):
            if y is not None:
                assert torch.equal(x, y), (d, i)


@requires_cuda
@pytest.mark.parametrize("cell", list(GATES))
def test_cuda_both_directions_backward_in_one_persistent_launch(cell, monkeypatch):
    """The backward recurrence of a bidirectional layer's two directions through the real
    persistent backward: ONE launch of the backward kernel when both grids fit the SMs (B = 32),
    seen in the profiler; each direction's dL/dh0 (and dL/dc0) bitwise its own backward op's."""
    from torch.profiler import ProfilerActivity, profile

    batch_sizes = lengths_to_batch_sizes([9, 7, 7, 3] + [2] * 28)
    monkeypatch.setenv("FUSEDRNN_CUDA_PATH", "persistent")
    dirs = []
    for d in range(2):
        a = on_cuda(make_args(cell, 128, batch_sizes, torch.float32, input_size=16, seed=d))
        if d == 1:
            a["input"] = dirs[0][0]["input"]
        fwd = per_step(cell, a, batch_sizes, d == 1)  # the forward op, forced persistent
        grads = tuple(None if t is None else t.cuda()
                      for t in upstream_grads(cell, a, batch_sizes, torch.float32, seed=10 + d))
        dirs.append((a, fwd, grads))
    lists = lambda f: [f(*x) for x in dirs]  # noqa: E731
    lstm, gated = cell == "lstm", cell in ("lstm", "gru")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        both = OPS.persistent_backward_bidirectional(
            cell, lists(lambda a, f, g: g[0]), lists(lambda a, f, g: g[1]),
            lists(lambda a, f, g: g[2]) if lstm else [], lists(lambda a, f, g: a["h0"]),
            lists(lambda a, f, g: a["c0"]) if lstm else [], lists(lambda a, f, g: a["w_hh"]), batch_sizes,
            lists(lambda a, f, g: f[0]), lists(lambda a, f, g: f[3]) if gated else [],
            lists(lambda a, f, g: f[4]) if gated else [], 1)
        torch.cuda.synchronize()
    launches = sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "persistent" in e.name and "backward_kernel" in e.name)
    one_launch = 2 * 32 <= torch.cuda.get_device_properties(0).multi_processor_count
    assert launches == (1 if one_launch else 2), (launches, one_launch)
    for d, (a, fwd, grads) in enumerate(dirs):
        alone = per_step_backward(cell, a, fwd, grads, batch_sizes, d == 1)  # the backward op, forced persistent
        assert torch.equal(both[3 * d + 1], alone[1]), d
        if lstm:
            assert torch.equal(both[3 * d + 2], alone[2]), d
