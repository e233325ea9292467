"""What real programs do with recurrent modules (issue 17, issue 14 item 4): save the whole model and
load it with torch.load's defaults, swap modules with convert() in a seeded program, share modules and
tie weights, and select modules with isinstance(m, nn.LSTM) and read nn.RNNBase's attributes."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fusedrnn

FUSED = [fusedrnn.LSTM, fusedrnn.GRU, fusedrnn.RNN, fusedrnn.LSTMCell, fusedrnn.GRUCell, fusedrnn.RNNCell]
TORCH = [nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell]


class EveryModule(nn.Module):
    """One of each module: LSTM with proj_size, GRU, relu RNN, and the three cells (relu RNNCell)."""

    def __init__(self, lib=fusedrnn):
        super().__init__()
        self.lstm = lib.LSTM(3, 6, num_layers=2, proj_size=4, bidirectional=True, batch_first=True)
        self.gru = lib.GRU(8, 5, bias=False)
        self.rnn = lib.RNN(5, 5, nonlinearity="relu")
        self.lstm_cell = lib.LSTMCell(5, 4)
        self.gru_cell = lib.GRUCell(4, 4)
        self.rnn_cell = lib.RNNCell(4, 3, nonlinearity="relu")

    def forward(self, x):
        out, _ = self.lstm(x)
        out, _ = self.gru(out.transpose(0, 1))
        out, h = self.rnn(out)
        h, c = self.lstm_cell(out[-1])
        return self.rnn_cell(self.gru_cell(h)), c


class LanguageModel(nn.Module):
    """pytorch/examples' word_language_model in small: embedding, dropout, a 2-layer LSTM with
    inter-layer dropout, a GRU cell on top, dropout, decoder."""

    def __init__(self, lib):
        super().__init__()
        self.encoder = nn.Embedding(30, 8)
        self.drop = nn.Dropout(0.3)
        self.rnn = lib.LSTM(8, 12, num_layers=2, dropout=0.4)
        self.cell = lib.GRUCell(12, 12)
        self.decoder = nn.Linear(12, 30)

    def forward(self, tokens):
        out, _ = self.rnn(self.drop(self.encoder(tokens)))
        return self.decoder(self.drop(self.cell(out[-1])))


def _parameter_ids(model):
    return [id(p) for p in model.parameters()]


# ---- 1. whole-model checkpoints under torch.load's defaults -------------------------------------

def _save(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return buffer


def test_whole_model_checkpoint_loads_with_torch_load_defaults_where_torch_nns_would():
    torch.manual_seed(0)
    model = EveryModule().double().eval()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = model(x)
    # The program's own allow-list: its classes and the nn classes it uses, as for the nn model.
    allowed = [EveryModule, *TORCH]
    nn_checkpoint = _save(EveryModule(nn))
    with torch.serialization.safe_globals(allowed):
        assert isinstance(torch.load(nn_checkpoint).lstm, nn.LSTM)
        loaded = torch.load(_save(model))  # weights_only=True, torch's default
    assert [type(m) for m in loaded.children()] == FUSED
    got = loaded(x)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert loaded.lstm._flat_weights == [getattr(loaded.lstm, n) for n in loaded.lstm._flat_weights_names]
    with pytest.raises(pickle.UnpicklingError, match="EveryModule"):  # the default is weights_only=True
        torch.load(_save(model))
    # A bare module needs no allow-list at all.
    for module in (fusedrnn.LSTM(3, 4, proj_size=2), fusedrnn.RNN(3, 4, nonlinearity="relu"), fusedrnn.GRUCell(3, 4)):
        back = torch.load(_save(module))
        assert type(back) is type(module)
        assert all(torch.equal(a, b) for a, b in zip(back.parameters(), module.parameters()))


def test_pickle_and_deepcopy_keep_the_module_working():
    torch.manual_seed(0)
    model = EveryModule().double()
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    expected = model(x)
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert all(torch.equal(a, b) for a, b in zip(clone(x), expected))
        assert clone.lstm._flat_weights[0] is clone.lstm.weight_ih_l0


def test_a_pickle_written_before_the_modules_were_nn_rnnbase_still_loads():
    """fusedrnn 0.1.0's layers had no `_flat_weights`; nn.RNNBase.__setstate__ needs one."""
    module = fusedrnn.GRU(3, 4, num_layers=2)
    state = module.__getstate__()
    del state["_flat_weights"]
    old = fusedrnn.GRU.__new__(fusedrnn.GRU)
    old.__setstate__(state)
    assert old._flat_weights == [getattr(module, n) for n in module._flat_weights_names]
    x = torch.randn(5, 2, 3)
    assert torch.equal(old(x)[0], module(x)[0])


# ---- 2. convert() and revert(): no random numbers, no throwaway weights, the same Parameters ----

class _DeviceOps(TorchDispatchMode):
    """Records every ATen op whose tensors are not on the meta device."""

    def __init__(self):
        super().__init__()
        self.real = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
        device = (kwargs or {}).get("device")
        if any(t.device.type != "meta" for t in tensors) or (device is not None and
                                                             torch.device(device).type != "meta"):
            self.real.append(str(func))
        return out


def test_convert_and_revert_draw_no_random_numbers_and_allocate_no_weights():
    torch.manual_seed(0)
    model = EveryModule(nn)
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    ids = _parameter_ids(model)
    with _DeviceOps() as ops:
        fusedrnn.convert(model)
    assert [type(m) for m in model.children()] == FUSED
    with ops:
        fusedrnn.revert(model)
    assert [type(m) for m in model.children()] == TORCH
    assert ops.real == []  # nothing allocated, initialised or copied outside the meta device
    assert torch.equal(torch.get_rng_state(), cpu)
    if cuda is not None:
        assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), cuda))
    assert _parameter_ids(model) == ids


def _train(model, steps=6):
    """A seeded program after the model is built: batches, dropout masks and updates all draw from
    the global generator."""
    optimiser = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(steps):
        tokens = torch.randint(0, 30, (7, 4))
        loss = nn.functional.cross_entropy(model(tokens), torch.randint(0, 30, (4,)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


def test_seeded_training_is_bitwise_the_same_built_with_fusedrnn_or_converted_from_torch_nn():
    torch.manual_seed(1234)
    direct = _train(LanguageModel(fusedrnn))
    torch.manual_seed(1234)
    converted = fusedrnn.convert(LanguageModel(nn))
    assert type(converted.rnn) is fusedrnn.LSTM and type(converted.cell) is fusedrnn.GRUCell
    assert _train(converted) == direct
    # and back: revert() leaves the stream alone too (nn's own kernels from here on)
    torch.manual_seed(99)
    reverted = LanguageModel(nn)
    expected = _train(reverted)
    torch.manual_seed(99)
    model = fusedrnn.revert(fusedrnn.convert(LanguageModel(nn)))
    assert type(model.rnn) is nn.LSTM
    assert _train(model) == expected


def test_an_optimizer_built_before_convert_trains_the_converted_model():
    torch.manual_seed(0)
    model = LanguageModel(nn)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1)
    before = _parameter_ids(model)
    fusedrnn.convert(model)
    assert _parameter_ids(model) == before
    weight = model.rnn.weight_hh_l1.detach().clone()
    loss = model(torch.randint(0, 30, (5, 3))).square().mean()
    loss.backward()
    optimiser.step()
    assert not torch.equal(model.rnn.weight_hh_l1, weight)
    assert optimiser.state[model.rnn.weight_hh_l1]["step"] == 1


def test_convert_keeps_hooks_modes_requires_grad_devices_dtypes_and_user_attributes():
    lstm = nn.LSTM(3, 4, num_layers=2).double().eval()
    lstm.weight_hh_l1.requires_grad_(False)
    lstm.tag = "encoder"
    calls = []
    handle = lstm.register_forward_hook(lambda module, args, out: calls.append(type(module)))
    pre = lstm.register_forward_pre_hook(lambda module, args: calls.append("pre"))
    fused = fusedrnn.convert(lstm)
    assert type(fused) is fusedrnn.LSTM and fused is not lstm
    assert not fused.training and fused.tag == "encoder" and not fused.weight_hh_l1.requires_grad
    assert all(p.dtype == torch.float64 for p in fused.parameters())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(fused(x)[0], lstm(x)[0], rtol=0, atol=1e-10)
    assert calls == ["pre", fusedrnn.LSTM, "pre", nn.LSTM]
    handle.remove()
    pre.remove()
    fused(x)
    assert len(calls) == 4
    # The twin's own registrations do not reach back into the original.
    fused.register_buffer("extra", torch.zeros(1))
    assert "extra" not in dict(lstm.named_buffers())


# ---- 3. shared modules stay shared, tied weights stay tied (issue 14 item 4) --------------------

class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        encoder = nn.GRU(3, 4)
        self.a = self.b = encoder
        cell = nn.LSTMCell(4, 4)
        self.left = nn.ModuleList([nn.Linear(4, 4), cell])  # shared between two parents deeper down
        self.right = nn.ModuleDict({"cell": cell})
        block = nn.Sequential(nn.RNN(4, 4))
        self.p = self.q = block  # a shared container holding a recurrent module
        self.enc = nn.LSTM(3, 4)
        self.dec = nn.LSTM(3, 4)
        self.dec.weight_ih_l0 = self.enc.weight_ih_l0  # tied between two different modules


@pytest.mark.parametrize("direction", ["convert", "revert"])
def test_shared_modules_stay_shared_and_tied_weights_tied(direction):
    torch.manual_seed(0)
    model = Siamese()
    names = list(model.state_dict())
    if direction == "revert":
        fusedrnn.convert(model)
    ids = _parameter_ids(model)
    getattr(fusedrnn, direction)(model)
    lib = fusedrnn if direction == "convert" else nn
    assert type(model.a) is lib.GRU and model.a is model.b
    assert type(model.left[1]) is lib.LSTMCell and model.left[1] is model.right["cell"]
    assert model.p is model.q and type(model.p[0]) is lib.RNN
    assert type(model.dec) is lib.LSTM and model.dec.weight_ih_l0 is model.enc.weight_ih_l0
    assert _parameter_ids(model) == ids and list(model.state_dict()) == names
    # Tied weights train as one: both uses' gradients accumulate in the one Parameter.
    x = torch.randn(2, 1, 3)
    grads = [torch.autograd.grad(m(x)[0].sum(), m.weight_ih_l0)[0] for m in (model.enc, model.dec)]
    (model.enc(x)[0].sum() + model.dec(x)[0].sum()).backward()
    torch.testing.assert_close(model.enc.weight_ih_l0.grad, grads[0] + grads[1])


def test_convert_and_revert_of_a_recurrent_module_itself_keep_its_parameters():
    for cls, extra in ((nn.LSTM, dict(proj_size=2)), (nn.RNN, dict(nonlinearity="relu")), (nn.GRUCell, {})):
        original = cls(3, 4, **extra)
        params = list(original.parameters())
        fused = fusedrnn.convert(original)
        assert type(fused) is FUSED[TORCH.index(cls)]
        assert all(a is b for a, b in zip(fused.parameters(), params))
        back = fusedrnn.revert(fused)
        assert type(back) is cls and all(a is b for a, b in zip(back.parameters(), params))
        if cls is nn.RNN:
            assert back.nonlinearity == "relu" and fused.nonlinearity == "relu"


# ---- 4. isinstance and nn.RNNBase's attributes --------------------------------------------------

def test_the_drop_ins_are_instances_of_torch_nns_classes():
    for fused, torch_cls in zip(FUSED, TORCH):
        module = fused(3, 4)
        assert isinstance(module, torch_cls)
        base = nn.RNNBase if torch_cls in (nn.LSTM, nn.GRU, nn.RNN) else nn.RNNCellBase
        assert isinstance(module, base)
    assert not isinstance(fusedrnn.GRU(3, 4), nn.LSTM) and not isinstance(fusedrnn.LSTMCell(3, 4), nn.GRUCell)
    # our forward, not nn's: lengths= is accepted
    x = torch.randn(4, 2, 3)
    out, _ = fusedrnn.GRU(3, 4)(x, lengths=torch.tensor([4, 2]))
    assert torch.equal(out[2:, 1], torch.zeros(2, 4))


def test_an_isinstance_init_loop_treats_ours_as_torch_nns():
    """The usual init loop of a program: orthogonal recurrent weights, zero biases, forget bias 1."""
    def init(model):
        for m in model.modules():
            if isinstance(m, (nn.LSTM, nn.LSTMCell)):
                for name, p in m.named_parameters():
                    if "weight_hh" in name:
                        nn.init.orthogonal_(p)
                    elif "bias" in name:
                        nn.init.zeros_(p)
                        p.data[m.hidden_size:2 * m.hidden_size] = 1.0
            elif isinstance(m, nn.RNNBase):
                for p in m.all_weights[0]:
                    nn.init.constant_(p, 0.1)
            elif isinstance(m, nn.RNNCellBase):
                nn.init.constant_(m.weight_ih, 0.2)
        return model

    torch.manual_seed(5)
    ref = init(EveryModule(nn))
    torch.manual_seed(5)
    ours = init(EveryModule(fusedrnn))
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("cls,kwargs", [(nn.LSTM, dict(num_layers=2, proj_size=2, bidirectional=True)),
                                        (nn.GRU, dict(num_layers=2, bias=False)),
                                        (nn.RNN, dict(nonlinearity="relu", bidirectional=True))])
def test_flat_weights_and_all_weights_behave_as_torch_nns(cls, kwargs):
    ours_cls = {nn.LSTM: fusedrnn.LSTM, nn.GRU: fusedrnn.GRU, nn.RNN: fusedrnn.RNN}[cls]
    modules = [cls(3, 4, **kwargs), ours_cls(3, 4, **kwargs)]
    for m in modules:
        def consistent():
            return (len(m._flat_weights) == len(m._flat_weights_names)
                    and all(w is getattr(m, n) for w, n in zip(m._flat_weights, m._flat_weights_names)))

        assert consistent()
        assert [[id(p) for p in ws] for ws in m.all_weights] == [
            [id(getattr(m, n)) for n in names] for names in m._all_weights]
        m.weight_hh_l0 = nn.Parameter(torch.randn_like(m.weight_hh_l0))  # reassigned
        assert consistent()
        m.double()
        assert consistent() and m._flat_weights[0].dtype == torch.float64
        state = {k: v.detach().clone() + 1 for k, v in m.state_dict().items()}
        m.load_state_dict(state, assign=True)
        assert consistent() and torch.equal(m._flat_weights[1], state[m._flat_weights_names[1]])
        assert m.flatten_parameters() is None and consistent()
    ref, ours = modules
    assert ours._flat_weights_names == ref._flat_weights_names and ours._all_weights == ref._all_weights
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], ref(x)[0], rtol=0, atol=1e-10)


def test_torch_compile_fullgraph_takes_ours_and_still_refuses_torch_nns():
    """Dynamo refuses nn.LSTM/GRU/RNN instances (config.allow_rnn); ours, now such instances, compile
    with fullgraph=True while torch.nn's modules are refused exactly as without fusedrnn."""
    torch.manual_seed(0)
    model = nn.Sequential(fusedrnn.LSTM(3, 4, num_layers=2))
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x)[0], model(x)[0])
    assert torch._dynamo.config.allow_rnn is False
    with pytest.raises(torch._dynamo.exc.Unsupported, match="RNN, GRU, or LSTM"):
        torch.compile(nn.Sequential(nn.LSTM(3, 4)), fullgraph=True, backend="eager")(x)


@pytest.mark.parametrize("strict", [False, True])
def test_torch_export_of_the_subclassed_modules_matches_eager(strict):
    """A guard, not a fix: torch.export worked before the modules became nn.RNNBase's and must still
    (strict export goes through dynamo, which sets allow_rnn for itself)."""
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = fusedrnn.LSTM(3, 4, num_layers=2, proj_size=2)
            self.cell = fusedrnn.GRUCell(2, 3)

        def forward(self, x):
            out, _ = self.lstm(x)
            return self.cell(out[-1])

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(5, 2, 3)
    program = torch.export.export(model, (x,), strict=strict)
    assert torch.equal(program.module()(x), model(x))


def test_convert_carries_pruning_and_weight_norm():
    """torch.nn.utils.prune / weight_norm replace a weight by `<name>_orig` / `_g`, `_v` Parameters, a
    buffer and a forward pre-hook: the twin carries them all and computes what the original does."""
    from torch.nn.utils import prune

    torch.manual_seed(0)
    pruned = nn.LSTM(3, 4, num_layers=2)
    prune.l1_unstructured(pruned, "weight_hh_l0", 0.5)
    with pytest.warns(FutureWarning):
        normed = torch.nn.utils.weight_norm(nn.GRU(3, 4), "weight_ih_l0")
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for original in (pruned.double(), normed.double()):
        expected = original(x)[0]
        names = [n for n, _ in original.named_parameters()] + [n for n, _ in original.named_buffers()]
        fused = fusedrnn.convert(original)
        assert type(fused) in FUSED
        assert [n for n, _ in fused.named_parameters()] + [n for n, _ in fused.named_buffers()] == names
        torch.testing.assert_close(fused(x)[0], expected, rtol=0, atol=1e-10)
        with torch.no_grad():  # the hook recomputes the weight from the moved Parameters
            next(p for n, p in fused.named_parameters() if n.endswith(("_orig", "_v"))).mul_(2)
        torch.testing.assert_close(fused(x)[0], original(x)[0], rtol=0, atol=1e-10)
        assert not torch.equal(fused(x)[0], expected)
