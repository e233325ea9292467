"""Swap torch.nn recurrent modules for their fusedrnn twins (and back), weights kept."""

from typing import Dict, Type

from torch import nn

from . import modules

_TO_FUSED: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.LSTM: modules.LSTM,
    nn.GRU: modules.GRU,
    nn.RNN: modules.RNN,
    nn.LSTMCell: modules.LSTMCell,
    nn.GRUCell: modules.GRUCell,
    nn.RNNCell: modules.RNNCell,
}
_TO_TORCH: Dict[Type[nn.Module], Type[nn.Module]] = {v: k for k, v in _TO_FUSED.items()}


def _constructor_kwargs(module: nn.Module) -> dict:
    if hasattr(module, "num_layers"):  # a whole-sequence layer
        kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, num_layers=module.num_layers,
                      bias=module.bias, batch_first=module.batch_first, dropout=module.dropout,
                      bidirectional=module.bidirectional)
        if getattr(module, "proj_size", 0):
            kwargs["proj_size"] = module.proj_size
    else:
        kwargs = dict(input_size=module.input_size, hidden_size=module.hidden_size, bias=module.bias)
    if hasattr(module, "nonlinearity"):
        kwargs["nonlinearity"] = module.nonlinearity
    return kwargs


def _twin(module: nn.Module, mapping: Dict[Type[nn.Module], Type[nn.Module]]):
    # Exact type match: a user's subclass may override forward, and swapping it would drop that.
    cls = mapping.get(type(module))
    if cls is None:
        return None
    first = next(module.parameters())
    twin = cls(**_constructor_kwargs(module), device=first.device, dtype=first.dtype)
    twin.load_state_dict(module.state_dict())
    for (_, src), (_, dst) in zip(module.named_parameters(), twin.named_parameters()):
        dst.requires_grad_(src.requires_grad)
    twin.train(module.training)
    return twin


def _convert(model: nn.Module, mapping) -> nn.Module:
    twin = _twin(model, mapping)
    if twin is not None:
        return twin
    for name, child in model.named_children():
        new = _convert(child, mapping)
        if new is not child:
            setattr(model, name, new)
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replaces every nn.LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell inside `model` (or `model`
    itself) by its fusedrnn twin with the same weights, device, dtype, requires_grad and train/eval
    mode. Changes `model` in place and returns it (or the twin, when `model` itself is one)."""
    return _convert(model, _TO_FUSED)


def revert(model: nn.Module) -> nn.Module:
    """The way back: replaces fusedrnn modules by their torch.nn namesakes, weights kept."""
    return _convert(model, _TO_TORCH)
