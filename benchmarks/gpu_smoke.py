"""One call of every fusedrnn op (forward and backward, every cell, both directions, a ragged
batch) on one device and one CUDA path, against fusedrnn.reference in float64 on the CPU. The
first step of benchmarks/gpu_check.sh after the build: is CUDA loaded, does every op run on
this path, and does it compute the right numbers?

    python -m benchmarks.gpu_smoke --device cuda --path per_step
    python -m benchmarks.gpu_smoke --device cuda --path persistent
    python -m benchmarks.gpu_smoke --device cpu          # the same checks on the CPU kernels

--path persistent runs every op under FUSEDRNN_CUDA_PATH=auto (forcing persistent raises on
the layers the persistent kernel cannot run: float64, LSTM proj_size, hidden_size > 128) and,
from the kernels the profiler saw, checks that the forward AND the backward ran their persistent
kernels on every layer they can run (and, the batches being ragged, that the schedule kernel
wrote the schedule on the device), and the per-step path on the others; where the profiler sees
no kernel at all, an eligible layer is run again forced to persistent (which raises if that path
is not taken). Last, one bidirectional GRU layer at the sentiment shape through the persistent
forward's and backward's two-direction launches (test-only ops persistent_forward_bidirectional,
persistent_backward_bidirectional): the profiler must see ONE forward and ONE backward kernel
launch where both directions' grids fit the SMs (2 x 32 CTAs), else two each.

Exit status: 0 all ops right; 1 an op failed or was wrong; 2 CUDA cannot run here (says why);
3 the requested CUDA path is not built into this fusedrnn (says so; nothing was run).
"""

import argparse
import json
import os
import sys
import time
import traceback

import torch

import fusedrnn
from fusedrnn import reference

OPS = torch.ops.fusedrnn
GATES = {"lstm": 4, "lstm_proj": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}
# (input_size, hidden_size, proj_size, lengths): a tiny layer, and one of the sentiment model's
# hidden size, large enough for the persistent path's tiling to matter.
SIZES = {"tiny": (3, 5, 2, [4, 3, 1]), "h128": (16, 128, 32, [12, 9, 9, 5, 2, 1])}
# Largest ||ours - reference|| / ||reference|| allowed per output and gradient (float64 and
# float32 from DESIGN.md's tolerances, TF32 off; the half types a loose bound that catches wrong
# indexing, which gives errors near 1, not rounding, which tests/ judges against torch.nn: the
# CPU kernels, rounding as the GPU's per-step path does, reach 7e-2 in bfloat16 on the ReLU RNN
# at H=128, whose gradients grow over the steps).
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 0.2, torch.float16: 0.05}
EXIT_OK, EXIT_WRONG, EXIT_NO_CUDA, EXIT_PATH_ABSENT = 0, 1, 2, 3
MAX_PERSISTENT_HIDDEN = 128  # kMaxHidden, csrc/persistent/persistent_limits.h


def persistent_eligible(cell: str, size: str, dtype: torch.dtype) -> bool:
    """Whether the persistent kernel can run this layer (csrc/persistent/persistent_plan.h):
    not float64, no LSTM projection, hidden_size <= 128."""
    return dtype != torch.float64 and cell != "lstm_proj" and SIZES[size][1] <= MAX_PERSISTENT_HIDDEN


def forward_path_of(kernel_names) -> str:
    """Which CUDA forward path ran, from the names of the kernels one op check launched: the
    persistent kernel (fusedrnn::persistent::forward_kernel) or only per-step kernels; "unknown"
    when no kernel was seen (a profiler without CUDA activity)."""
    names = list(kernel_names)
    if any("persistent" in n and "forward_kernel" in n for n in names):
        return "persistent"
    return "per_step" if names else "unknown"


def backward_path_of(kernel_names) -> str:
    """As forward_path_of, for the backward: the persistent backward kernel
    (fusedrnn::persistent::backward_kernel) or only per-step kernels."""
    names = list(kernel_names)
    if any("persistent" in n and "backward_kernel" in n for n in names):
        return "persistent"
    return "per_step" if names else "unknown"


def schedule_on_device(kernel_names) -> bool:
    """Whether a ragged batch's schedule was written by the schedule kernel
    (fusedrnn::persistent::fill_schedule_kernel, csrc/cuda/step_schedule.cu), the graph-safe way."""
    return any("fill_schedule_kernel" in n for n in kernel_names)


def cuda_kernels_of(fn):
    """Runs fn() under torch.profiler; returns (fn's result, names of the CUDA kernels it ran)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    names = {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    return result, names


def available_cuda_paths(info: dict) -> list:
    """The CUDA paths this build has. fusedrnn.backends() lists them under 'cuda_paths' once the
    persistent kernels exist; before that the per-step path is the only one."""
    paths = info.get("cuda_paths")
    if paths is None:
        return ["per_step"] if info.get("cuda") else []
    if isinstance(paths, str):
        return [p for p in paths.replace(",", " ").split() if p]
    return list(paths)


def cuda_unavailable_reason(info: dict):
    if not torch.cuda.is_available():
        return f"torch.cuda.is_available() is False (torch {torch.__version__}, CUDA {torch.version.cuda})"
    if not info.get("compiled"):
        return f"the compiled library did not load: {info.get('load_error')}"
    if not info.get("cuda"):
        return f"the compiled library has no CUDA kernels: fusedrnn.backends() = {info}"
    if info.get("built_against_torch") != torch.__version__:
        return f"built against torch {info.get('built_against_torch')}, running torch {torch.__version__}"
    return None


def make_args(cell, size, dtype, device, gen):
    """The forward op and its arguments (fresh random values; batch_sizes on the CPU)."""
    I, H, P, lengths = SIZES[size]
    batch_sizes = torch.tensor([sum(1 for n in lengths if n > t) for t in range(max(lengths))])
    n, b, gh = int(batch_sizes.sum()), len(lengths), GATES[cell] * H
    state = P if cell == "lstm_proj" else H

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device, dtype)

    x, h0 = rand(n, I), rand(b, state)
    w_ih, w_hh = rand(gh, I, scale=H ** -0.5), rand(gh, state, scale=H ** -0.5)
    b_ih, b_hh = rand(gh, scale=0.1), rand(gh, scale=0.1)
    if cell.startswith("lstm"):
        w_hr = rand(P, H, scale=H ** -0.5) if cell == "lstm_proj" else None
        return OPS.lstm_forward, [x, h0, rand(b, H), w_ih, w_hh, b_ih, b_hh, w_hr, batch_sizes]
    op = {"gru": OPS.gru_forward, "rnn_tanh": OPS.rnn_tanh_forward, "rnn_relu": OPS.rnn_relu_forward}[cell]
    return op, [x, h0, w_ih, w_hh, b_ih, b_hh, batch_sizes]


def reference_forward(cell, args, reverse):
    if cell.startswith("lstm"):
        return reference.lstm_layer(*args, reverse)
    if cell == "gru":
        return reference.gru_layer(*args, reverse)
    return reference.rnn_layer(cell.split("_")[1], *args, reverse)


def forward_and_grads(outputs, leaves, weights):
    """The forward outputs and the gradients of sum(output * weight) for every leaf: runs the
    op's backward once (the backward op of the cell)."""
    loss = sum((o.double() * w).sum() for o, w in zip(outputs, weights))
    return list(outputs) + list(torch.autograd.grad(loss, leaves))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||; NaN (an unwritten element) and shape errors never pass."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-30)) if a.numel() else 0.0


def check_one(cell, size, dtype, reverse, device, gen):
    op, args = make_args(cell, size, dtype, device, gen)
    n_main = 3 if cell.startswith("lstm") else 2
    leaves = [a.requires_grad_(True) for a in args if isinstance(a, torch.Tensor) and a.dtype == dtype]
    ref_args = [a.detach().double().cpu().requires_grad_(True) if isinstance(a, torch.Tensor) and a.dtype == dtype
                else a for a in args]
    ref_leaves = [a for a in ref_args if isinstance(a, torch.Tensor) and a.requires_grad]
    outs = op(*args, reverse)[:n_main]
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
    got = forward_and_grads(outs, leaves, [w.to(device) for w in weights])
    want = forward_and_grads(reference_forward(cell, ref_args, reverse)[:n_main], ref_leaves, weights)
    if device == "cuda":
        torch.cuda.synchronize()
    return max(relative_error(a, e) for a, e in zip(got, want))


def run_config(cell, size, dtype, reverse, device, path, gen):
    """One op check on `path`: (worst relative error, the forward path taken or None when not
    checked, why that path is wrong or None). per_step and auto force FUSEDRNN_CUDA_PATH as
    named; persistent runs under auto and checks the path from the kernels that ran."""
    if path != "persistent":
        os.environ["FUSEDRNN_CUDA_PATH"] = path
        return check_one(cell, size, dtype, reverse, device, gen), None, None
    os.environ["FUSEDRNN_CUDA_PATH"] = "auto"
    eligible = persistent_eligible(cell, size, dtype)
    want = "persistent" if eligible else "per_step"
    if device != "cuda":  # the CPU kernels have one path; nothing to check
        return check_one(cell, size, dtype, reverse, device, gen), None, None
    err, kernels = cuda_kernels_of(lambda: check_one(cell, size, dtype, reverse, device, gen))
    forward, backward = forward_path_of(kernels), backward_path_of(kernels)
    taken = forward if forward == backward else f"forward {forward}, backward {backward}"
    if taken == "unknown" and eligible:
        # No CUDA activity in the profiler: forcing the persistent path raises unless it runs.
        os.environ["FUSEDRNN_CUDA_PATH"] = "persistent"
        try:
            err = max(err, check_one(cell, size, dtype, reverse, device, gen))
        finally:
            os.environ["FUSEDRNN_CUDA_PATH"] = "auto"
        taken = "persistent (forced; the profiler saw no kernels)"
    elif taken == "unknown":
        taken = "per_step (the profiler saw no kernels; not checked)"
    elif taken != want:
        return err, taken, f"auto should run {want} here ({'eligible' if eligible else 'not eligible'} " \
                           f"for the persistent kernel), it ran {taken}"
    elif taken == "persistent" and not schedule_on_device(kernels):  # every size's batch is ragged (SIZES)
        return err, taken, "the ragged batch's schedule was not written by the schedule kernel on the device"
    return err, taken, None


def two_direction_launches(gen, device="cuda", sm_count=None) -> tuple:
    """A bidirectional GRU layer at the sentiment shape (B = 32, H = 128: 32 CTAs a direction)
    through the persistent forward's and backward's two-direction launches (the test-only ops
    persistent_forward_bidirectional / persistent_backward_bidirectional): ((forward, backward)
    kernel launches the profiler saw, those expected: 1 each where both grids fit the SMs
    co-resident, else 2)."""
    batch_sizes = torch.tensor([32] * 20)
    n, b, H, I = 32 * 20, 32, 128, 16

    def rand(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * H ** -0.5).to(device, torch.float32)

    x = rand(n, I)
    h0, w_hh = [rand(b, H), rand(b, H)], [rand(3 * H, H), rand(3 * H, H)]
    args = (h0, [], [rand(3 * H, I), rand(3 * H, I)], w_hh, [rand(3 * H), rand(3 * H)], [rand(3 * H), rand(3 * H)])
    fwd, kernels = cuda_kernel_counts_of(lambda: OPS.persistent_forward_bidirectional("gru", x, *args, batch_sizes, 1))
    # The backward recurrence of both directions from what that forward saved (output, gates, hn).
    bwd_args = ([rand(n, H), rand(n, H)], [rand(b, H), rand(b, H)], [], h0, [], w_hh, batch_sizes,
                [fwd[0], fwd[5]], [fwd[3], fwd[8]], [fwd[4], fwd[9]], 1)
    _, bwd_kernels = cuda_kernel_counts_of(lambda: OPS.persistent_backward_bidirectional("gru", *bwd_args))
    seen = (sum(c for name, c in kernels.items() if "persistent" in name and "forward_kernel" in name),
            sum(c for name, c in bwd_kernels.items() if "persistent" in name and "backward_kernel" in name))
    if sm_count is None:
        sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    want = 1 if 2 * b <= sm_count else 2
    return seen, (want, want)


def cuda_kernel_counts_of(fn):
    """As cuda_kernels_of, with how many times each kernel ran."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        result = fn()
        torch.cuda.synchronize()
    counts = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            counts[e.name] = counts.get(e.name, 0) + 1
    return result, counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--path", default=None, choices=["per_step", "persistent", "auto"],
                        help="CUDA path to force (sets FUSEDRNN_CUDA_PATH); default: whatever is set")
    parser.add_argument("--dtypes", default="float64,float32,bfloat16")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    info = fusedrnn.backends()
    print(f"fusedrnn.backends(): {info}")
    path = args.path or os.environ.get("FUSEDRNN_CUDA_PATH") or "auto"
    if args.device == "cuda":
        reason = cuda_unavailable_reason(info)
        if reason is not None:
            print(f"CUDA cannot run: {reason}")
            return EXIT_NO_CUDA
        print(f"GPU: {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}")
        paths = available_cuda_paths(info)
        if path != "auto" and path not in paths:
            print(f"CUDA path {path!r} is not built into this fusedrnn (it has {paths}; fusedrnn.backends() "
                  f"{'lists cuda_paths' if 'cuda_paths' in info else 'has no cuda_paths key'}): nothing run")
            return EXIT_PATH_ABSENT
        # FUSEDRNN_CUDA_PATH is read by fusedrnn when an op runs: run_config sets it per check.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    gen = torch.Generator().manual_seed(0)
    rows, failures = [], 0
    t0 = time.perf_counter()
    for size in SIZES:
        for cell in GATES:
            for dtype in dtypes:
                for reverse in (False, True):
                    name = f"{cell:9s} {size:5s} {str(dtype)[6:]:9s} {'reverse' if reverse else 'forward'}"
                    taken = None
                    try:
                        err, taken, path_error = run_config(cell, size, dtype, reverse, args.device, path, gen)
                        ok = err <= TOLERANCE[dtype] and path_error is None
                        detail = f"worst relative error {err:.2e} (tolerance {TOLERANCE[dtype]:.0e})"
                        if taken is not None:
                            detail += f", ran {taken}"
                        if path_error is not None:
                            detail += f"; WRONG PATH: {path_error}"
                    except Exception as e:  # noqa: BLE001 - report every op, then fail
                        ok, err = False, float("nan")
                        detail = f"raised {type(e).__name__}: {e}".splitlines()[0]
                        traceback.print_exc()
                    failures += not ok
                    rows.append({"cell": cell, "size": size, "dtype": str(dtype)[6:], "reverse": reverse,
                                 "max_rel_error": err, "ok": ok, "detail": detail, "path_taken": taken})
                    print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if args.device == "cuda" and path == "persistent":
        try:  # both directions of a bidirectional layer in one persistent launch, where they fit
            seen, want = two_direction_launches(gen)
            ok = seen == want
            detail = f"(forward, backward) kernel launches {seen}, expected {want}"
        except Exception as e:  # noqa: BLE001
            ok, detail = False, f"raised {type(e).__name__}: {e}".splitlines()[0]
            traceback.print_exc()
        failures += not ok
        rows.append({"cell": "gru", "size": "h128", "dtype": "float32", "reverse": "both", "max_rel_error": None,
                     "ok": ok, "detail": "two directions in one launch: " + detail, "path_taken": "persistent"})
        print(f"{'ok  ' if ok else 'FAIL'} gru       h128  float32   both directions in one launch: {detail}",
              flush=True)
    seconds = time.perf_counter() - t0
    print(f"{len(rows) - failures}/{len(rows)} op checks passed on {args.device} (path {path}) in {seconds:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "path": path, "backends": info, "rows": rows, "seconds": seconds}, f,
                      indent=2, default=str)
    return EXIT_WRONG if failures else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
