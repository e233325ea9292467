"""Helpers shared by the CPU kernel tests (test_cpu_engine, test_weight_cache, test_activations):
the float64 leaves of a layer op, the op and fusedrnn.reference run on them, their outputs and
gradients, and which of the engine's instruction sets this CPU runs (csrc/cpu/cpu_engine.h: isa())."""

import ctypes

import pytest
import torch

from fusedrnn import _ops, reference

OPS = torch.ops.fusedrnn


def cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []


def cpu_has_avx2_fma():
    return "avx2" in cpu_flags() and "fma" in cpu_flags()


def cpu_has_avx512f():
    return "avx512f" in cpu_flags()


# The engine's instruction sets, each skipped (with the reason) where this CPU lacks it.
# FUSEDRNN_CPU_ISA caps the engine's choice (read on every call), so an AVX-512 machine tests both.
ISAS = [pytest.param("avx2", marks=pytest.mark.skipif(not cpu_has_avx2_fma(), reason="this CPU has no AVX2+FMA")),
        pytest.param("avx512", marks=pytest.mark.skipif(not cpu_has_avx512f(), reason="this CPU has no AVX-512F: "
                                                         "the AVX-512 engine is tested on a machine with it"))]


def engine_isa():
    """The instruction set the compiled engine runs a float32 layer on now ("avx512", "avx2", or
    "none": no engine on this CPU or FUSEDRNN_CPU_ENGINE=0), asked from the library itself."""
    lib = ctypes.CDLL(_ops._C.__file__)
    lib.fusedrnn_cpu_engine_isa.restype = ctypes.c_char_p
    return lib.fusedrnn_cpu_engine_isa().decode()


def engine_fuses_input(gates, input_size, hidden_size):
    """Whether the engine computes a float32 layer's input projection inside its forward tiles
    (cpu_engine.h: fuse_input_projection), asked from the library itself."""
    lib = ctypes.CDLL(_ops._C.__file__)
    f = lib.fusedrnn_cpu_fuse_input_projection
    f.restype = ctypes.c_int
    f.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return bool(f(gates, input_size, hidden_size))


GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def lengths_to_batch_sizes(lengths):
    """Per-step batch sizes of sequences sorted by decreasing length."""
    lengths = sorted(lengths, reverse=True)
    return torch.tensor([sum(1 for n in lengths if n > t) for t in range(lengths[0])])


def make_args(cell, hidden, batch_sizes, input_size=5, bias=True, seed=0):
    """float64 leaves of the forward op of `cell` (the order of its schema)."""
    g = torch.Generator().manual_seed(seed)
    n, b = int(batch_sizes.sum()), int(batch_sizes[0])
    gh = GATES[cell] * hidden
    scale = hidden ** -0.5  # keeps the gates in the range where every activation has a slope

    def rand(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).requires_grad_()

    x, h0 = rand(n, input_size), rand(b, hidden)
    w_ih, w_hh = rand(gh, input_size, s=scale), rand(gh, hidden, s=scale)
    b_ih, b_hh = (rand(gh, s=0.5), rand(gh, s=0.5)) if bias else (None, None)
    if cell == "lstm":
        return [x, h0, rand(b, hidden), w_ih, w_hh, b_ih, b_hh, None, batch_sizes]
    return [x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes]


def run_op(cell, args, reverse):
    """Main outputs of the compiled op and the gradients of a random projection of them."""
    if cell == "lstm":
        outs = OPS.lstm_forward(*args, reverse)[:3]
    elif cell == "gru":
        outs = OPS.gru_forward(*args, reverse)[:2]
    else:
        outs = getattr(OPS, cell + "_forward")(*args, reverse)[:2]
    return outs


def run_reference(cell, args, reverse):
    if cell == "lstm":
        return reference.lstm_layer(*args, reverse)
    if cell == "gru":
        return reference.gru_layer(*args, reverse)
    return reference.rnn_layer(cell.split("_")[1], *args, reverse)


def outputs_and_grads(fn, cell, args, reverse):
    outs = fn(cell, args, reverse)
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(sum((o * w).sum() for o, w in zip(outs, weights)), leaves)
    return [o.detach() for o in outs] + list(grads)


def as_float32(args):
    return [a.detach().float().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in args]
