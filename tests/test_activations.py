"""The float32 activations of every cell (csrc/cells/cell_common.h, and their vector restatement in
csrc/cpu/engine_common.h, compiled for AVX2 and AVX-512) are accurate to a few ulp RELATIVE over the whole float range.

The old tanh, 2 / (1 + exp(-2x)) - 1, cancelled near 0 (tanh(1e-8) was 0.0, tanh(1e-6) 1.07e-6),
and the old exp clamped its argument at -87, so the negative side of sigmoid was wrong below it.

A layer is built so that every gate's pre-activation is the swept value itself (identity input
weights, zero recurrent weights and initial states, no bias), and the activations the op saves
for backward (LSTM i, f, g, o; GRU r, z, n; the RNN's output) are compared with float64 torch,
on each float32 path: the CPU engine's epilogues on each instruction set this CPU has (8-lane
AVX2, 16-lane AVX-512: FUSEDRNN_CPU_ISA picks), the per-step CPU path (the cells' scalar code in a
SIMD loop), and CUDA where there is a GPU. The CPU paths must all agree bitwise.
Then the modules against torch.nn in float32 at the special values (signed zeros, denormals,
the saturation and overflow points, +-inf, NaN), and the backward at tiny inputs against float64.
"""

import os

import pytest
import torch

import fusedrnn
from conftest import DEVICES
from engine_helpers import cpu_has_avx2_fma, cpu_has_avx512f, engine_isa

pytestmark = pytest.mark.skipif(not fusedrnn.backends()["compiled"], reason="compiled operators not loaded: "
                                + str(fusedrnn.backends()["load_error"]))

OPS = torch.ops.fusedrnn
GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1}
ULP = 2.0 ** -23
# Relative error allowed against float64, and the absolute error allowed where the true value is a
# float32 denormal (steps of 2^-149): the results are the true values correctly rounded or close.
RTOL, DENORMAL_ATOL = 4 * ULP, 2.0 ** -148


HAS_ENGINE = cpu_has_avx2_fma()
requires_engine = pytest.mark.skipif(not HAS_ENGINE, reason="the CPU engine needs AVX2+FMA; this CPU runs the "
                                     "per-step path only (tested here too)")
# The per-step path computes bitwise what the engine computes when its cells are compiled with FMA
# (setup.py adds -mavx2 -mfma on a build machine that has them); a portable build rounds each
# multiply-add twice there.
PORTABLE_BUILD = "FUSEDRNN_CPU_FLAGS" in os.environ and "-mfma" not in os.environ["FUSEDRNN_CPU_FLAGS"].split()

HAS_AVX512 = cpu_has_avx512f()
# The engine's paths on this CPU: each instruction set it has (FUSEDRNN_CPU_ISA caps the choice).
ENGINE_PATHS = (["engine_avx2"] if HAS_ENGINE else []) + (["engine_avx512"] if HAS_AVX512 else [])
requires_avx512 = pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no AVX-512F: its engine path is tested "
                                     "on a machine with it")
PATHS = [pytest.param("engine_avx2", marks=requires_engine), pytest.param("engine_avx512", marks=requires_avx512),
         "per_step", pytest.param("cuda", marks=DEVICES[1].marks)]


def use_path(path, monkeypatch):
    """The device for `path`, with the CPU engine switched on or off and its instruction set
    chosen (both read on every call)."""
    monkeypatch.setenv("FUSEDRNN_CPU_ENGINE", "0" if path == "per_step" else "1")
    if path.startswith("engine_"):
        monkeypatch.setenv("FUSEDRNN_CPU_ISA", path[len("engine_"):])
        assert engine_isa() == path[len("engine_"):]
    return "cuda" if path == "cuda" else "cpu"


def f32(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def dense_sweep(stride=97, limit=100.0):
    """Every `stride`-th float32 bit pattern in [-limit, limit] (both signs, zeros and denormals
    included), and 1e-30..1e-1 on a fine logarithmic grid of both signs."""
    top = int(torch.tensor(limit).view(torch.int32))
    pos = torch.arange(0, top + 1, stride, dtype=torch.int32)
    neg = pos | torch.tensor(-2 ** 31, dtype=torch.int32)
    near0 = torch.logspace(-30, -1, 20001, dtype=torch.float64).float()
    return torch.cat([pos.view(torch.float32), neg.view(torch.float32), near0, -near0])


def special_values():
    tiny = [0.0, 2.0 ** -149, 2.0 ** -140, 1e-40, 2.0 ** -126, 1e-30, 1e-20, 1e-8, 1e-7, 1e-6, 1e-4]
    # 0.625: tanh's switch from polynomial to exp; 9.01..9.5: tanh rounds to 1, its cap; 87.3: exp(-x)
    # becomes a denormal; 88.72: exp(x) overflows (torch's sigmoid turns 0 below -88.72); 103.3..104:
    # the last denormal of exp(-x) and the clamp.
    edges = [0.5, 0.62499994, 0.625, 0.62500006, 1.0, 9.0, 9.01, 9.5, 9.6, 20.0, 43.7, 87.3, 87.4, 88.0, 88.72,
             88.73, 90.0, 100.0, 103.2, 103.3, 103.98, 104.0, 104.5, 200.0, 3.4028234663852886e38,
             float("inf")]
    values = [v for x in tiny + edges for v in (x, -x)] + [float("nan")]
    return torch.tensor(values, dtype=torch.float32)


def run_activations(cell, x, device, H):
    """The swept values through one step of a layer with input x ([N, H]): every gate's
    pre-activation is x. Returns (activations by name, each [N, H]) from the op's outputs."""
    G = GATES[cell]
    n = x.shape[0]
    x = x.to(device)
    w_ih = torch.eye(H, dtype=torch.float32, device=device).repeat(G, 1)
    w_hh = torch.zeros(G * H, H, dtype=torch.float32, device=device)
    h0 = torch.zeros(n, H, dtype=torch.float32, device=device)
    batch = torch.tensor([n])
    if cell == "lstm":
        out, _, c_n, gates, _ = OPS.lstm_forward(x, h0, h0.clone(), w_ih, w_hh, None, None, None, batch, False)
        i, f, g, o = gates.view(n, 4, H).unbind(1)
        return {"i": i, "f": f, "g": g, "o": o, "c": c_n, "h": out}
    if cell == "gru":
        out, _, gates, _ = OPS.gru_forward(x, h0, w_ih, w_hh, None, None, batch, False)
        r, z, nn_ = gates.view(n, 3, H).unbind(1)
        return {"r": r, "z": z, "n": nn_, "h": out}
    out, _ = OPS.rnn_tanh_forward(x, h0, w_ih, w_hh, None, None, batch, False)
    return {"h": out}


def expected(cell, x, acts):
    """float64 values of each activation of run_activations, from the float32 inputs (and, for
    the states, from the float32 gates the cell combined)."""
    x = x.double()
    sig, tanh = torch.sigmoid(x), torch.tanh(x)
    if cell == "lstm":
        i, g, o = (acts[k].double() for k in "igo")
        c = (acts["i"] * acts["g"]).double()  # c = f * 0 + i * g, one float32 rounding
        return {"i": sig, "f": sig, "g": tanh, "o": sig, "c": c, "h": o * torch.tanh(acts["c"].double())}
    if cell == "gru":
        return {"r": sig, "z": sig, "n": tanh, "h": (1 - acts["z"].double()) * acts["n"].double()}
    return {"h": tanh}


def check_close(name, got, want, x, rtol=RTOL):
    got, want, x = got.double().cpu().flatten(), want.flatten(), x.flatten()
    err = (got - want).abs()
    ok = (err <= rtol * want.abs() + DENORMAL_ATOL) | (got.isnan() & want.isnan()) | (got == want)
    if not bool(ok.all()):
        bad = (~ok).nonzero().flatten()
        worst = bad[(err[bad] / want[bad].abs().clamp_min(2.0 ** -149)).nan_to_num(float("inf")).argsort(
            descending=True)[:5]]
        detail = ", ".join(f"x={x[k].item():.9g}: got {got[k].item():.9g}, float64 {want[k].item():.9g}"
                           for k in worst)
        raise AssertionError(f"{name}: {bad.numel()} of {got.numel()} values beyond {rtol / ULP:g} ulp "
                             f"relative (or {DENORMAL_ATOL:g} absolute); worst: {detail}")


def sweep_layouts():
    """(inputs [N, H], H): the finite dense sweep with 16 values per row, so that every lane of
    the engine's vectors holds one (16 units: AVX2's LSTM block of 8 twice and GRU/RNN block of 16;
    AVX-512's LSTM block of 16 and the first vector of its GRU/RNN block of 32), and
    the special values (inf and NaN included) one per row, where the identity weights' zeros never
    multiply them (0 * inf is NaN)."""
    dense = dense_sweep()
    dense = torch.cat([dense, torch.zeros((-dense.numel()) % 16)])
    specials = special_values()
    return [(dense.view(-1, 16), 16), (specials.view(-1, 1), 1)]


CHUNK_ROWS = 1 << 16


@pytest.mark.parametrize("cell", list(GATES))
def test_activations_are_accurate_on_every_path(cell, monkeypatch):
    """Each float32 path within 4 ulp of float64 over the sweep, and the CPU paths bitwise
    equal to each other."""
    paths = ["per_step"] + ENGINE_PATHS
    for x_all, H in sweep_layouts():
        for start in range(0, x_all.shape[0], CHUNK_ROWS):
            x = x_all[start:start + CHUNK_ROWS]
            results = {}
            for path in paths:
                results[path] = acts = run_activations(cell, x, use_path(path, monkeypatch), H)
                want = expected(cell, x, acts)
                for name, value in acts.items():
                    check_close(f"{cell} {name} ({path}, H={H})", value, want[name], x)
            for engine in ENGINE_PATHS if not PORTABLE_BUILD else []:
                for name in results[engine]:
                    a, b = results[engine][name], results["per_step"][name]
                    same = (a.view(torch.int32) == b.view(torch.int32)) | (a.isnan() & b.isnan())
                    assert bool(same.all()), (f"{cell} {name}: {engine} and per-step path differ at x = "
                                              f"{x[~same][:5].tolist()}: {a[~same][:5].tolist()} vs "
                                              f"{b[~same][:5].tolist()}")
    if ENGINE_PATHS and not PORTABLE_BUILD:
        # The state updates (LSTM c = f c_{t-1} + i g, GRU h = (1 - z) n + z h_{t-1}) from random
        # states: the cells' explicit fma_ where the epilogues fuse, so the bits agree here too.
        g = torch.Generator().manual_seed(0)
        n, H, G = 4096, 16, GATES[cell]
        x, h0, c0 = (torch.randn(n, H, generator=g) * 4 for _ in range(3))
        args = [torch.eye(H).repeat(G, 1), torch.zeros(G * H, H), None, None]
        outs = {}
        for path in ENGINE_PATHS + ["per_step"]:
            use_path(path, monkeypatch)
            if cell == "lstm":
                outs[path] = OPS.lstm_forward(x, h0, c0, *args, None, torch.tensor([n]), False)
            elif cell == "gru":
                outs[path] = OPS.gru_forward(x, h0, *args, torch.tensor([n]), False)
            else:
                outs[path] = OPS.rnn_tanh_forward(x, h0, *args, torch.tensor([n]), False)
        for engine in ENGINE_PATHS:
            for a, b in zip(outs[engine], outs["per_step"]):
                assert torch.equal(a, b), f"{cell}: {engine} and per-step path differ from random states"


@pytest.mark.parametrize("cell", list(GATES))
@pytest.mark.parametrize("device", [DEVICES[1]])  # CUDA only: the CPU paths are the test above
def test_cuda_activations_are_accurate(cell, device):
    """The device branch of cell_common.h (CUDA's tanhf and expf) over the same sweep."""
    for x_all, H in sweep_layouts():
        for start in range(0, x_all.shape[0], 16 * CHUNK_ROWS):
            x = x_all[start:start + 16 * CHUNK_ROWS]
            acts = {k: v.cpu() for k, v in run_activations(cell, x, "cuda", H).items()}
            want = expected(cell, x, acts)
            for name, value in acts.items():
                check_close(f"{cell} {name} (cuda, H={H})", value, want[name], x)


MODULES = {"lstm": (torch.nn.LSTM, fusedrnn.LSTM, {}), "gru": (torch.nn.GRU, fusedrnn.GRU, {}),
           "rnn_tanh": (torch.nn.RNN, fusedrnn.RNN, {"nonlinearity": "tanh"})}


def module_pair(cell, device, dtype=torch.float32):
    """nn and fusedrnn, input_size = hidden_size = 1, W_ih = 1, W_hh = 0, biases 0: with zero
    initial states, every gate's pre-activation is the input."""
    nn_cls, ours_cls, extra = MODULES[cell]
    ref = nn_cls(1, 1, dtype=dtype, device=device, **extra)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.fill_(1.0 if name.startswith("weight_ih") else 0.0)
    ours = ours_cls(1, 1, dtype=dtype, device=device, **extra)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", list(GATES))
def test_special_values_as_torch_nn(cell, path, monkeypatch):
    """Signed zeros, denormals, the edges of every formula, +-inf, NaN: the outputs and final
    states of torch.nn in float32 (NaN where nn has NaN), to nn's accuracy; and within a few ulp
    of float64. Where nn returns 0 for a sigmoid (torch.sigmoid below -88.72, where its exp(-x)
    overflows; nn.LSTM's cell already below about -86.5) fusedrnn returns the true value, normal or
    denormal: the difference is below 2^-124 (cell_common.h, sigmoid_simd)."""
    device = use_path(path, monkeypatch)
    ref, ours = module_pair(cell, device)
    x = special_values().view(1, -1, 1).to(device)  # one step, one value per sequence
    with torch.no_grad():
        want, got = ref(x), ours(x)
    want64 = module_pair(cell, "cpu", torch.float64)[0](x.double().cpu())
    for name, a, e, e64 in zip(["output", "h_n", "c_n"], [got[0], *fusedrnn_states(got[1])],
                               [want[0], *fusedrnn_states(want[1])], [want64[0], *fusedrnn_states(want64[1])]):
        a, e = a.cpu(), e.cpu()
        assert torch.equal(a.isnan(), e.isnan()), f"{cell} {name}: NaN where torch.nn has none, or the reverse"
        # Both within ~8 ulp of the truth after a whole cell (several roundings on the way).
        torch.testing.assert_close(a, e, rtol=16 * ULP, atol=2.0 ** -124, equal_nan=True,
                                   msg=lambda m: f"{cell} {name} against torch.nn: {m}")
        if cell != "gru":  # its 1 - z cancels where z -> 1, in float32 nn too: the sweep checks z itself
            check_close(f"{cell} {name} ({path}) against float64", a, e64.detach(), x.cpu(), rtol=8 * ULP)


def fusedrnn_states(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("cell", list(GATES))
def test_gradients_at_tiny_inputs_match_float64(cell, path, monkeypatch):
    """Backward at inputs of 1e-30..1e-1 against float64 torch.nn. With the loss sum(h^2) / 2 the
    gradient is proportional to h, so a tanh that loses relative accuracy near 0 shows in dx (and
    LSTM's backward recomputes tanh(c) for the o gate and dc)."""
    device = use_path(path, monkeypatch)
    mags = torch.logspace(-30, -1, 300, dtype=torch.float64)
    signs = torch.where(torch.arange(300) % 2 == 0, 1.0, -1.0).double()
    x64 = (mags * signs).float().double().view(3, -1, 1)  # 3 steps: h_{t-1} W_hh = 0 keeps them apart
    ref64, _ = module_pair(cell, "cpu", torch.float64)
    _, ours = module_pair(cell, device)
    grads = []
    for module, x in [(ref64, x64.clone()), (ours, x64.float().to(device))]:
        x.requires_grad_()
        out = module(x)[0]
        (out.double() ** 2).sum().div(2).backward()
        grads.append((x.grad.double().cpu(), [p.grad.double().cpu() for p in module.parameters()]))
    (want_x, want_p), (got_x, got_p) = grads
    check_close(f"{cell} grad of input ({path})", got_x, want_x, x64.float(), rtol=8 * ULP)
    names = [n for n, _ in ref64.named_parameters()]
    for name, a, e in zip(names, got_p, want_p):
        # sums over 300 terms of both signs: the float32 tolerance of the parity tests
        torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-30, msg=lambda m: f"{cell} grad of {name}: {m}")
