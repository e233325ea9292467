import os
import re
import tempfile

# Every buffer the kernels allocate starts as NaN (csrc/layer/layer_forward.h: new_buffer),
# so an element that a kernel never writes fails a test. Read once, before the first op runs.
os.environ.setdefault("FUSEDRNN_POISON_OUTPUTS", "1")
# A fresh TorchInductor cache per run: its cache keys do not cover a custom op's schema, so code
# compiled against an earlier build of fusedrnn could otherwise be reused after a schema change.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="fusedrnn-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402

import fusedrnn  # noqa: E402

CUDA = torch.cuda.is_available() and fusedrnn.backends()["cuda"]
requires_cuda = pytest.mark.skipif(
    not CUDA, reason="needs an NVIDIA GPU and the CUDA build of fusedrnn (run benchmarks/gpu_check.sh on one)")

# On a GPU machine a CUDA test that skips is a failure, not a pass: with FUSEDRNN_REQUIRE_CUDA=1
# (benchmarks/gpu_check.sh sets it) the session stops at once when CUDA cannot run, saying why,
# and any CUDA test that skips is reported as failed.
REQUIRE_CUDA = os.environ.get("FUSEDRNN_REQUIRE_CUDA", "") == "1"


def cuda_unavailable_reason():
    """Why fusedrnn cannot run on CUDA here, or None when it can."""
    if not torch.cuda.is_available():
        return (f"torch.cuda.is_available() is False (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda})")
    info = fusedrnn.backends()
    if not info["cuda"]:
        return f"fusedrnn has no CUDA kernels loaded: fusedrnn.backends() = {info}"
    return None


def is_cuda_test(nodeid):
    """Every test in test_cuda.py, and every test run with the device parameter "cuda". (Not any
    test whose name mentions CUDA: some check what happens without it, and skip on a GPU.)"""
    path, _, name = nodeid.partition("::")
    return path.endswith("test_cuda.py") or re.search(r"[\[-]cuda[\]-]", name) is not None


def pytest_sessionstart(session):
    if REQUIRE_CUDA:
        reason = cuda_unavailable_reason()
        if reason is not None:
            pytest.exit(f"FUSEDRNN_REQUIRE_CUDA=1 but CUDA cannot run: {reason}", returncode=3)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_CUDA and report.skipped and not hasattr(report, "wasxfail") and is_cuda_test(item.nodeid):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"FUSEDRNN_REQUIRE_CUDA=1: this CUDA test skipped, which counts as a failure: {reason}"
# Every test runs on the CPU, and on CUDA where there is a GPU (skipped, saying why, elsewhere).
DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]

# DESIGN.md: parity is judged with TF32 off on both sides.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

# torch.nn class, fusedrnn class, extra constructor kwargs
CELLS = {
    "lstm": (torch.nn.LSTM, fusedrnn.LSTM, {}),
    "lstm_proj": (torch.nn.LSTM, fusedrnn.LSTM, {"proj_size": 3}),
    "gru": (torch.nn.GRU, fusedrnn.GRU, {}),
    "rnn_tanh": (torch.nn.RNN, fusedrnn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (torch.nn.RNN, fusedrnn.RNN, {"nonlinearity": "relu"}),
}


def tolerances(dtype):
    """DESIGN.md: float64 max abs error 1e-10; float32 rtol 1e-4, atol 1e-5."""
    if dtype == torch.float64:
        return dict(rtol=0, atol=1e-10)
    return dict(rtol=1e-4, atol=1e-5)


def make_pair(cell, input_size=3, hidden_size=5, dtype=torch.float64, device="cpu", **kwargs):
    """A torch.nn module and its fusedrnn twin holding the same weights."""
    torch_cls, fused_cls, extra = CELLS[cell]
    kwargs = {**extra, **kwargs}
    ref = torch_cls(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    ours = fused_cls(input_size, hidden_size, dtype=dtype, device=device, **kwargs)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def flat_state(state):
    return list(state) if isinstance(state, tuple) else [state]


@pytest.fixture
def threads():
    """Sets torch's thread count for one test and restores it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)
