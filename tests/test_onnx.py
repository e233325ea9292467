"""ONNX export (fusedrnn/onnx.py): models holding fusedrnn layers and cells export, with both
torch.onnx exporters, to the standard ONNX LSTM / GRU / RNN operators, and run in onnxruntime with
the numbers of torch.nn (same weights, float32 tolerance), at batch and sequence sizes other than
the ones they were exported at."""

import io
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fusedrnn
from conftest import tolerances

onnx = pytest.importorskip("onnx", reason="ONNX export tests need `pip install onnx onnxscript onnxruntime`")
pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs `pip install onnxscript`")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests run the models in `pip install onnxruntime`")

pytestmark = [
    pytest.mark.skipif(not fusedrnn.backends()["compiled"],
                       reason="exports the compiled ops; the reference fallback exports as plain torch ops"),
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),  # nn.LSTM's, harmless
]

EXPORTERS = ["dynamo", "torchscript"]
I, H = 3, 4
EXPORT_BT = (2, 3)  # batch, steps at export ...
RUN_BT = (3, 5)     # ... and at run time: the axes must be dynamic
TOL = tolerances(torch.float32)

# cell -> (fusedrnn class, torch.nn class, constructor kwargs, ONNX operator, its attributes)
LAYERS = {
    "lstm": (fusedrnn.LSTM, nn.LSTM, {}, "LSTM", {}),
    "lstm_proj": (fusedrnn.LSTM, nn.LSTM, {"proj_size": 2}, "LSTM", {}),  # decomposed: ONNX has no projection
    "gru": (fusedrnn.GRU, nn.GRU, {}, "GRU", {"linear_before_reset": 1}),
    "rnn_tanh": (fusedrnn.RNN, nn.RNN, {"nonlinearity": "tanh"}, "RNN", {"activations": [b"Tanh"]}),
    "rnn_relu": (fusedrnn.RNN, nn.RNN, {"nonlinearity": "relu"}, "RNN", {"activations": [b"Relu"]}),
}


def _twin(module: nn.Module, torch_cls, **kwargs) -> nn.Module:
    """The torch.nn module with `module`'s weights."""
    ref = torch_cls(module.input_size, module.hidden_size, **kwargs)
    ref.load_state_dict(module.state_dict())
    return ref.eval()


def _export(model: nn.Module, args: tuple, exporter: str, dynamic: dict, opset_version=None) -> "onnx.ModelProto":
    """Exports `model`; `dynamic` maps each input name to {axis: axis name}."""
    names = list(dynamic)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the exporters' deprecation notes
        if exporter == "dynamo":
            dims = {}
            shapes = {n: {a: dims.setdefault(d, torch.export.Dim(d)) for a, d in axes.items()}
                      for n, axes in dynamic.items()}
            program = torch.onnx.export(model, args, dynamo=True, input_names=names, dynamic_shapes=shapes,
                                        opset_version=opset_version, verbose=False)
            return program.model_proto
        buffer = io.BytesIO()
        torch.onnx.export(model, args, buffer, dynamo=False, input_names=names, dynamic_axes=dynamic,
                          opset_version=opset_version)
        return onnx.load_from_string(buffer.getvalue())


def _run(proto, inputs: dict) -> list:
    onnx.checker.check_model(proto, full_check=True)  # valid ONNX, types and shapes inferred
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(out) for out in session.run(None, {k: v.numpy() for k, v in inputs.items()})]


def _recurrent_nodes(proto) -> list:
    for node in proto.graph.node:  # nothing of ours left: only standard operators
        assert node.domain in ("", "ai.onnx"), f"non-standard node {node.op_type} in domain {node.domain!r}"
    return [node for node in proto.graph.node if node.op_type in ("LSTM", "GRU", "RNN")]


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _flat(outputs) -> list:
    flat = []
    for out in outputs:
        flat.extend(_flat(out) if isinstance(out, (tuple, list)) else [out])
    return flat


class Layers(nn.Module):
    """Two layers of one kind: `deep` (2 layers, bidirectional, batch_first, no initial state) and
    `plain` (1 layer, bias=False, time-major, initial state given)."""

    def __init__(self, cls, kwargs):
        super().__init__()
        self.deep = cls(I, H, num_layers=2, bidirectional=True, batch_first=True, **kwargs)
        self.plain = cls(I, H, bias=False, **kwargs)

    def forward(self, x_bf, x_tm, h0, c0=None):
        deep = self.deep(x_bf)
        plain = self.plain(x_tm, (h0, c0) if c0 is not None else h0)
        return deep, plain


@pytest.mark.parametrize("cell", LAYERS)
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_layers_export_to_the_standard_operator(cell, exporter):
    cls, torch_cls, kwargs, onnx_op, onnx_attributes = LAYERS[cell]
    torch.manual_seed(0)
    model = Layers(cls, kwargs).eval()
    is_lstm = onnx_op == "LSTM"

    def inputs(batch, steps):
        args = {"x_bf": torch.randn(batch, steps, I), "x_tm": torch.randn(steps, batch, I),
                "h0": torch.randn(1, batch, kwargs.get("proj_size", H))}
        if is_lstm:
            args["c0"] = torch.randn(1, batch, H)
        return args

    dynamic = {"x_bf": {0: "batch", 1: "steps"}, "x_tm": {0: "steps", 1: "batch"}, "h0": {1: "batch"}}
    if is_lstm:
        dynamic["c0"] = {1: "batch"}
    proto = _export(model, tuple(inputs(*EXPORT_BT).values()), exporter, dynamic)

    nodes = _recurrent_nodes(proto)
    assert [n.op_type for n in nodes] == [onnx_op] * 5  # 2 layers x 2 directions + 1
    assert sorted(_attributes(n)["direction"] for n in nodes) == [b"forward"] * 3 + [b"reverse"] * 2
    for node in nodes:
        attributes = _attributes(node)
        assert attributes["hidden_size"] == H
        for name, value in onnx_attributes.items():
            assert attributes[name] == value

    run_inputs = inputs(*RUN_BT)
    deep_ref = _twin(model.deep, torch_cls, num_layers=2, bidirectional=True, batch_first=True, **kwargs)
    plain_ref = _twin(model.plain, torch_cls, bias=False, **kwargs)
    with torch.no_grad():
        h0, c0 = run_inputs["h0"], run_inputs.get("c0")
        expected = _flat([deep_ref(run_inputs["x_bf"]), plain_ref(run_inputs["x_tm"], (h0, c0) if is_lstm else h0)])
    actual = _run(proto, run_inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


@pytest.mark.parametrize("cell", ["lstm", "lstm_proj", "gru"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_export_without_gradients_goes_through_the_inference_ops(cell, exporter):
    """Traced under torch.no_grad, the graph holds the inference ops (csrc/ops.cpp: lstm_inference,
    gru_inference), which export to the same standard operators with torch.nn's numbers."""
    cls, torch_cls, kwargs, onnx_op, _ = LAYERS[cell]
    torch.manual_seed(0)
    model = cls(I, H, num_layers=2, bidirectional=True, **kwargs).eval()
    x = torch.randn(EXPORT_BT[1], EXPORT_BT[0], I)
    with torch.no_grad():
        if exporter == "dynamo":
            graph = str(torch.export.export(model, (x,)).graph)
            assert "inference" in graph and "_forward" not in graph, graph
        proto = _export(model, (x,), exporter, {"input": {0: "steps", 1: "batch"}})
    assert [n.op_type for n in _recurrent_nodes(proto)] == [onnx_op] * 4
    run_x = torch.randn(RUN_BT[1], RUN_BT[0], I)
    ref = _twin(model, torch_cls, num_layers=2, bidirectional=True, **kwargs)
    with torch.no_grad():
        expected = _flat([ref(run_x)])
    actual = _run(proto, {"input": run_x})
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


class Cells(nn.Module):
    """Every cell kind, with and without a state and a bias, plus a layer on unbatched input."""

    def __init__(self):
        super().__init__()
        self.lstm = fusedrnn.LSTMCell(I, H)
        self.gru = fusedrnn.GRUCell(I, H, bias=False)
        self.rnn_relu = fusedrnn.RNNCell(I, H, nonlinearity="relu")
        self.rnn_tanh = fusedrnn.RNNCell(I, H)
        self.unbatched = fusedrnn.GRU(I, H, bidirectional=True)

    def forward(self, x, h, c, sequence):
        hc = self.lstm(x, (h, c))
        hc = self.lstm(x, hc)  # a second step, fed by the first
        return hc, self.gru(x), self.gru(x, h), self.rnn_relu(x, h), self.rnn_tanh(x), self.unbatched(sequence)


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_cells_and_unbatched_input_export(exporter):
    torch.manual_seed(1)
    model = Cells().eval()

    def inputs(batch, steps):
        return {"x": torch.randn(batch, I), "h": torch.randn(batch, H), "c": torch.randn(batch, H),
                "sequence": torch.randn(steps, I)}

    dynamic = {"x": {0: "batch"}, "h": {0: "batch"}, "c": {0: "batch"}, "sequence": {0: "steps"}}
    proto = _export(model, tuple(inputs(*EXPORT_BT).values()), exporter, dynamic)
    assert sorted(n.op_type for n in _recurrent_nodes(proto)) == ["GRU"] * 4 + ["LSTM"] * 2 + ["RNN"] * 2

    lstm, gru = _twin(model.lstm, nn.LSTMCell), _twin(model.gru, nn.GRUCell, bias=False)
    rnn_relu, rnn_tanh = _twin(model.rnn_relu, nn.RNNCell, nonlinearity="relu"), _twin(model.rnn_tanh, nn.RNNCell)
    unbatched = _twin(model.unbatched, nn.GRU, bidirectional=True)
    run_inputs = inputs(*RUN_BT)
    x, h, c, sequence = run_inputs.values()
    with torch.no_grad():
        expected = _flat([lstm(x, lstm(x, (h, c))), gru(x), gru(x, h), rnn_relu(x, h), rnn_tanh(x),
                          unbatched(sequence)])
    actual = _run(proto, run_inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


P = 2  # proj_size


class RaggedLSTM(nn.Module):
    """fusedrnn.functional on packed data with a fixed ragged `batch_sizes`, with and without a
    projection: exercises the sequence lengths that the translation derives from batch_sizes, and
    where a reversed sequence starts (torch.export cannot capture a PackedSequence)."""

    def __init__(self, batch_sizes):
        super().__init__()
        self.plain = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True)
        self.proj = fusedrnn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=P)
        self.register_buffer("batch_sizes", batch_sizes)

    def forward(self, data, h0, c0, h0_proj):
        return [fusedrnn.functional.rnn_packed("LSTM", data, self.batch_sizes, h, c0, rnn._layer_weights(),
                                               2, True, 0.0, False)
                for rnn, h in ((self.plain, h0), (self.proj, h0_proj))]


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_ragged_batch_sizes_match_a_packed_sequence(exporter):
    torch.manual_seed(2)
    batch_sizes = torch.tensor([3, 3, 2, 1, 1])  # lengths 5, 3, 2
    model = RaggedLSTM(batch_sizes).eval()
    inputs = {"data": torch.randn(int(batch_sizes.sum()), I), "h0": torch.randn(4, 3, H),
              "c0": torch.randn(4, 3, H), "h0_proj": torch.randn(4, 3, P)}
    proto = _export(model, tuple(inputs.values()), exporter, {name: {} for name in inputs})
    expected = []
    with torch.no_grad():
        for rnn, h0, kwargs in ((model.plain, inputs["h0"], {}), (model.proj, inputs["h0_proj"], {"proj_size": P})):
            ref = _twin(rnn, nn.LSTM, num_layers=2, bidirectional=True, **kwargs)
            out, (h_n, c_n) = ref(PackedSequence(inputs["data"], batch_sizes), (h0, inputs["c0"]))
            expected += [out.data, h_n, c_n]
    actual = _run(proto, inputs)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOL)


def test_opset_before_13_is_a_clear_error():
    model = nn.Sequential(fusedrnn.GRU(I, H)).eval()
    with pytest.raises(RuntimeError, match="needs ONNX opset 13 or later, got opset_version=12"):
        _export(model, (torch.randn(3, 2, I),), "torchscript", {"input": {}}, opset_version=12)


def test_registration_is_automatic_and_lazy():
    """`import fusedrnn` registers the translations without importing onnxscript or torch.onnx
    (about 0.7 s); they register when the exporter imports them."""
    code = (
        "import sys, fusedrnn\n"
        "assert 'onnxscript' not in sys.modules and 'torch.onnx' not in sys.modules, 'imported eagerly'\n"
        "import torch.onnx\n"
        "from torch.onnx._internal.torchscript_exporter.registration import registry\n"
        "from onnxscript.function_libs.torch_lib.registration import default_registry\n"
        "for op in ('lstm_forward', 'gru_forward', 'rnn_tanh_forward', 'rnn_relu_forward', 'lstm_inference',\n"
        "           'gru_inference'):\n"
        "    assert registry.is_registered_op('fusedrnn::' + op, 18), op\n"
        "    assert 'fusedrnn::' + op in default_registry, op\n"
        "print('ok')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


class PackedInput(nn.Module):
    def __init__(self, lengths_keyword: bool):
        super().__init__()
        self.rnn = fusedrnn.GRU(I, H)
        self.lengths_keyword = lengths_keyword

    def forward(self, x, lengths):
        if self.lengths_keyword:
            return self.rnn(x, lengths=lengths)[0]
        return self.rnn(pack_padded_sequence(x, lengths, enforce_sorted=False))[0].data


@pytest.mark.parametrize("lengths_keyword", [False, True], ids=["packed", "lengths"])
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_variable_length_input_is_a_clear_error(exporter, lengths_keyword):
    # Not supported: torch.export cannot capture packing (for torch.nn neither), and the TorchScript
    # exporter's packing pass knows only torch.nn's RNN ops.
    model = PackedInput(lengths_keyword).eval()
    with pytest.raises(RuntimeError, match="PackedSequence or lengths= input cannot be exported to ONNX"):
        _export(model, (torch.randn(4, 2, I), torch.tensor([4, 2])), exporter, {"x": {}, "lengths": {}})


# A bare layer as the exported model: the TorchScript exporter passes the defaults of every forward()
# parameter positionally, which works because `lengths` is positional (it was keyword-only once).
def test_bare_layer_exports_with_the_torchscript_exporter():
    model = fusedrnn.GRU(I, H).eval()
    x = torch.randn(*EXPORT_BT[::-1], I)
    proto = _export(model, (x,), "torchscript", {"input": {}})
    expected = nn.GRU(I, H).eval()
    expected.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(_run(proto, {"input": x})[0], expected(x)[0], **TOL)
