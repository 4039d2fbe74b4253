"""Catch host/device tensor mixing on a CPU-only machine.

On CUDA, `torch.stack([cuda_tensor, torch.tensor(1.0)])` fails ("Expected all tensors to be on the same device");
on CPU both are CPU tensors and it silently works, so every CPU test passed while the first GPU run crashed in
evaluation. `HostTensorGuard` makes CPU behave like a machine with two devices:

  * a tensor made by a factory (`torch.tensor`, `torch.zeros`, `torch.arange`, ...) called from moe_train code
    without a `device=` argument is *host-born* (on a GPU run it would be on the CPU while the model is on CUDA);
    an op called from moe_train code whose tensor inputs are all host-born gives host-born outputs;
  * tensors made by the data pipeline (moe_train/data/, host-side by design) are host-born, until
    moe_train/data/device.py moves them: `.to(device)` / `.cuda()` with a device give a device tensor;
  * everything else (parameters, activations, gradients, the `*_like` / `new_*` results of device tensors, tensors
    made inside torch itself) counts as a device tensor;
  * an op called from moe_train code that mixes a host-born tensor with a device tensor raises `DeviceMixError`.

Only ops called from moe_train's own files are checked and tagged (the first caller frame outside torch): torch's
internals (optimizers keep their step counters on the CPU on purpose) are not this project's bugs. This is stricter
than CUDA, which lets a 0-dim CPU tensor into elementwise ops: trainer code should not rely on that either.
"""

from __future__ import annotations

import pathlib
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

MOE_TRAIN_DIR = str(pathlib.Path(__file__).resolve().parents[1] / "moe_train")
TORCH_DIR = str(pathlib.Path(torch.__file__).resolve().parent)
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "eye", "scalar_tensor"}
MOVES = {"to", "cuda"}
HOST_PACKAGE = MOE_TRAIN_DIR + "/data/"  # the data pipeline works on the host by design ...
MOVER = HOST_PACKAGE + "device.py"  # ... and this moves its batches to the device


class DeviceMixError(RuntimeError):
    pass


def _caller_file() -> str:
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith(TORCH_DIR) or frame.f_code.co_filename == __file__):
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else ""


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, "_host_born", False)


def _gives_device(name: str, args, kwargs) -> bool:
    """`.to(device)` / `.cuda()` move to the compute device; `.to(dtype)` does not."""
    if name == "cuda":
        return True
    return "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args[1:])


def _tag(out) -> None:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            t._host_born = True


class HostTensorGuard(TorchFunctionMode):
    """Inside `with HostTensorGuard():` mixing host-born and device tensors in moe_train code raises."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        caller = _caller_file()
        if not caller.startswith(MOE_TRAIN_DIR):
            return func(*args, **kwargs)
        if caller.startswith(HOST_PACKAGE) and caller != MOVER:
            out = func(*args, **kwargs)
            _tag(out)
            return out
        name = getattr(func, "__name__", "")
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if _is_host(t)]
        if host and len(host) < len(tensors):
            raise DeviceMixError(f"{name}: a tensor created without device= (host) meets a device tensor; on CUDA "
                                 f"this fails. Create it with device=..., or move it with .to(device)")
        out = func(*args, **kwargs)
        if name in MOVES and _gives_device(name, args, kwargs):
            # On CPU a move to the CPU returns the tensor itself: hand back an untagged alias instead.
            return out.view_as(out) if _is_host(out) else out
        if (name in FACTORIES and "device" not in kwargs) or (host and name not in ("tolist", "item")):
            _tag(out)
        return out
