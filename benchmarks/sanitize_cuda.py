"""A small forward + backward of every cell, the workload that benchmarks/gpu_check.sh runs under
compute-sanitizer (memcheck, racecheck, initcheck): two layers, bidirectional, a ragged packed
batch and a full one, float32 and bfloat16, projection included, the LSTM cell too, at a tiny
hidden size and at 128 (where the persistent kernels tile). Run as a module, so that it imports
the fusedrnn of this checkout however it was built:

    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_cuda --path per_step
    compute-sanitizer --tool memcheck python -m benchmarks.sanitize_cuda --probe   # can it run here?
    python -m benchmarks.sanitize_cuda --device cpu     # the same workload on the CPU

--path persistent forces the persistent kernel on every layer it can run and leaves the others
(the LSTM with proj_size) on auto, which runs them per step: forcing it there would raise.
--probe launches one tiny kernel of torch's and none of ours, so that gpu_check.sh can tell a
sanitizer that refuses the device (reported as not available) from a finding in our kernels.

FUSEDRNN_POISON_OUTPUTS is left unset on purpose: buffers start uninitialised, so initcheck sees
a kernel that reads an element nothing wrote.
"""

import argparse
import os
import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fusedrnn

CELLS = [(fusedrnn.LSTM, {}), (fusedrnn.LSTM, {"proj_size": 5}), (fusedrnn.GRU, {}),
         (fusedrnn.RNN, {"nonlinearity": "tanh"}), (fusedrnn.RNN, {"nonlinearity": "relu"})]
HIDDEN_SIZES = (24, 128)


PROBE_OK = "sanitizer probe: a tiny kernel ran"


def layer_path(path, extra: dict, hidden: int, dtype: torch.dtype):
    """FUSEDRNN_CUDA_PATH for one module: `path`, except persistent on a layer the persistent
    kernel cannot run (projection, hidden_size > 128, float64), which runs under auto."""
    if path == "persistent" and (extra.get("proj_size") or hidden > 128 or dtype == torch.float64):
        return "auto"
    return path


def run(device: str, path=None) -> list:
    """Runs the workload; returns the FUSEDRNN_CUDA_PATH of each forward + backward pass."""
    torch.manual_seed(0)
    passes = []
    for dtype in (torch.float32, torch.bfloat16):
        for hidden in HIDDEN_SIZES:
            for cls, extra in CELLS:
                if path:
                    os.environ["FUSEDRNN_CUDA_PATH"] = layer_path(path, extra, hidden, dtype)
                m = cls(12, hidden, num_layers=2, bidirectional=True, device=device, dtype=dtype, **extra)
                x = torch.randn(9, 5, 12, device=device, dtype=dtype, requires_grad=True)
                for packed in (False, True):
                    inp = pack_padded_sequence(x, torch.tensor([9, 2, 7, 1, 5]), enforce_sorted=False) if packed else x
                    out, state = m(inp)
                    data = out.data if packed else out
                    h = state[0] if isinstance(state, tuple) else state
                    (data.float().square().sum() + h.float().sum()).backward()
                    passes.append(os.environ.get("FUSEDRNN_CUDA_PATH", "auto"))
            if path:
                os.environ["FUSEDRNN_CUDA_PATH"] = layer_path(path, {}, hidden, dtype)
            cell = fusedrnn.LSTMCell(12, hidden, device=device, dtype=dtype)
            x = torch.randn(5, 12, device=device, dtype=dtype, requires_grad=True)
            cell(x)[0].float().sum().backward()
            passes.append(os.environ.get("FUSEDRNN_CUDA_PATH", "auto"))
    if device == "cuda":
        torch.cuda.synchronize()
    return passes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--path", default=None, choices=["per_step", "persistent", "auto"],
                        help="CUDA path to force (sets FUSEDRNN_CUDA_PATH before the first op)")
    parser.add_argument("--probe", action="store_true",
                        help="launch one tiny torch kernel and exit (does the sanitizer accept this device?)")
    args = parser.parse_args(argv)
    if args.probe:
        x = torch.ones(8, device=args.device).add_(1)
        if args.device == "cuda":
            torch.cuda.synchronize()
        ok = float(x.sum()) == 16.0
        print(PROBE_OK if ok else f"sanitizer probe: wrong result {x.tolist()}")
        return 0 if ok else 1
    info = fusedrnn.backends()
    if args.device == "cuda" and not (torch.cuda.is_available() and info["cuda"]):
        print(f"CUDA cannot run: torch.cuda.is_available() = {torch.cuda.is_available()}, "
              f"fusedrnn.backends() = {info}")
        return 2
    passes = run(args.device, args.path)
    counts = {p: passes.count(p) for p in sorted(set(passes))}
    print(f"sanitize workload done: {len(passes)} forward + backward passes on {args.device} "
          f"(FUSEDRNN_CUDA_PATH: {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
