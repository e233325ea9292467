"""Swap torch.nn recurrent modules for their fusedrnn twins (and back), weights kept.

The twin takes over the original's very Parameter objects (so an optimizer built before the swap
keeps training the model, requires_grad / device / dtype / tied weights stay as they were), its
train/eval mode, its hooks and any attribute the user set on it. It is built on the meta device,
so a swap allocates no weights and draws no random numbers: a seeded program runs the same
random stream with or without convert(). A module reached twice (shared between two places of
the model) gets one twin, used in both places.
"""

import copy
import warnings
from typing import Dict, Optional, Type

from torch import nn
from torch.nn.utils import parametrize

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

# nn.Module's own state, which the twin takes from the original: containers copied (the twin can
# then register or reassign without touching the original), hook dicts shared (so a handle the user
# holds still removes its hook from the twin).
_COPIED = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")
_MODULE_STATE = frozenset(nn.Module().__dict__)
# Set on our modules by torch.jit.script (modules._RNNBase.__prepare_scriptable__): not the user's.
_NOT_CARRIED = frozenset({"_script_weights"})


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


def _on_meta(cls: Type[nn.Module], kwargs: dict) -> nn.Module:
    """An instance of cls with meta weights: no memory, no random numbers. Warnings (dropout with one
    layer) were given when the original was built."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(**kwargs, device="meta")


def _module_class(module: nn.Module) -> Type[nn.Module]:
    """The class the user built: for a parametrized module (torch.nn.utils.parametrize gives it a
    generated subclass, ParametrizedLSTM, that only adds the weights' properties) the class below."""
    cls = type(module)
    if parametrize.is_parametrized(module) and len(cls.__bases__) == 1:
        return cls.__bases__[0]
    return cls


def _twin(module: nn.Module, mapping: Dict[Type[nn.Module], Type[nn.Module]]) -> Optional[nn.Module]:
    # Exact type match: a user's subclass may override forward, and swapping it would drop that.
    base = _module_class(module)
    cls = mapping.get(base)
    if cls is None:
        return None
    parametrized = base is not type(module)
    kwargs = _constructor_kwargs(module)
    twin = _on_meta(cls, kwargs)
    # What the original's class sets up itself (configuration, the weights' bookkeeping) the twin's
    # constructor has set up for its class; everything else in the original's __dict__ is the user's.
    class_state = set(_on_meta(base, kwargs).__dict__) - _MODULE_STATE
    for key, value in module.__dict__.items():
        if key in _COPIED:
            twin.__dict__[key] = copy.copy(value)
        elif key not in class_state and key not in _NOT_CARRIED:
            twin.__dict__[key] = value  # nn.Module's state (training, hooks) and the user's attributes
    if parametrized:
        # The twin holds the original's `parametrizations` (its ParametrizationLists: the same original
        # Parameters, the same parametrization modules and their buffers, e.g. spectral_norm's u and v);
        # it needs the same generated class, whose properties compute each weight from them on access.
        # torch.nn.utils.parametrize builds that class and those properties with these two functions when
        # it registers a parametrization; calling them here registers nothing new and, unlike
        # register_parametrization, does not run right_inverse on the weights.
        parametrize._inject_new_class(twin)
        for name in module.parametrizations:
            parametrize._inject_property(twin, name)
    if isinstance(twin, nn.RNNBase):
        if parametrized:
            # Reading a parametrized weight runs its parametrization (spectral_norm in training mode steps its
            # power iteration): take the original's bookkeeping instead of reading the weights once more.
            for key in ("_flat_weights", "_flat_weight_refs"):
                if key in module.__dict__:
                    twin.__dict__[key] = list(module.__dict__[key])
        else:
            twin._init_flat_weights()  # _flat_weights of the moved Parameters (torch.nn's flattens them for cuDNN)
    return twin


def _convert(module: nn.Module, mapping, memo: Dict[int, nn.Module]) -> nn.Module:
    """module's replacement (itself when it is not swapped), its children swapped in place. memo maps
    id(original) to the replacement, so that a module reached twice is visited once."""
    done = memo.get(id(module))
    if done is not None:
        return done
    twin = _twin(module, mapping)
    if twin is not None:
        memo[id(module)] = twin
        return twin
    memo[id(module)] = module
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        new = _convert(child, mapping, memo)
        if new is not child:
            setattr(module, name, new)
    return module


def convert(model: nn.Module) -> nn.Module:
    """Replaces every nn.LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell inside `model` (or `model`
    itself) by its fusedrnn twin, which holds the same Parameter objects (so the same weights,
    device, dtype, requires_grad and ties, and an optimizer built before still applies), the same
    train/eval mode and hooks. A module used in several places gets one twin, used in all of them.
    Allocates nothing and draws no random numbers. Changes `model` in place and returns it (or the
    twin, when `model` itself is one); the original recurrent modules are left as they were, sharing
    their Parameters with the twins. A parametrized module (torch.nn.utils.parametrize: weight_norm,
    spectral_norm, orthogonal, your own) becomes a parametrized twin that shares the original's
    parametrizations. Subclasses of torch.nn's classes are left alone."""
    return _convert(model, _TO_FUSED, {})


def revert(model: nn.Module) -> nn.Module:
    """The way back: replaces fusedrnn modules by their torch.nn namesakes, in the same way."""
    return _convert(model, _TO_TORCH, {})
