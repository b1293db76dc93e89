"""PyTorch tensors <-> NumPy arrays with the same bits (bfloat16 and float8 included)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from functools import cache
from typing import Any

import ml_dtypes
import numpy as np

from gpupas.errors import BackendUnavailableError, UnsupportedDtypeError
from gpupas.xp import ML_DTYPES


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise BackendUnavailableError(
            "torch is not installed (needed for .pt/.pth/.bin/.ckpt files and torch tensors): pip install torch "
            "(a CPU-only build: pip install torch --index-url https://download.pytorch.org/whl/cpu)") from exc
    return torch


@cache
def _views() -> dict[Any, tuple[Any, Any]]:
    """torch dtypes NumPy knows only through ml_dtypes: (the torch dtype of their bits, the ml_dtypes type)."""
    torch = _torch()
    out = {torch.bfloat16: (torch.int16, ml_dtypes.bfloat16)}
    for name in ML_DTYPES[1:]:  # one byte each; an older torch lacks some
        if hasattr(torch, name):
            out[getattr(torch, name)] = (torch.uint8, getattr(ml_dtypes, name))
    return out


def is_torch_tensor(obj: Any) -> bool:
    """True for a torch.Tensor (a subclass too), without importing torch when it is not loaded (nor while another
    thread is importing it: the module is in sys.modules before it defines ``Tensor``, and no tensor exists yet)."""
    tensor = getattr(sys.modules.get("torch"), "Tensor", None)
    return tensor is not None and isinstance(obj, tensor)


def tensor_to_numpy(t: Any) -> np.ndarray:
    """A NumPy copy of a torch tensor (any device) with identical bits."""
    torch = _torch()
    if t.device.type == "meta":
        raise UnsupportedDtypeError("a tensor on the meta device has no data to archive; materialize the model "
                                    "first (e.g. load its weights)")
    if t.is_nested:  # (before the layout: a jagged one is told no sparse tensor's remedy)
        raise UnsupportedDtypeError("a nested tensor (torch.nested) cannot be archived as it is; store each of its "
                                    "tensors (t.unbind()) under its own name, or t.to_padded_tensor(0) and their "
                                    "lengths")
    if t.layout != torch.strided:
        parts = {torch.sparse_coo: "t.indices() and t.values()", torch.sparse_csr: "crow_indices(), col_indices() and "
                 "values()", torch.sparse_csc: "ccol_indices(), row_indices() and values()", torch.sparse_bsr:
                 "crow_indices(), col_indices() and values()", torch.sparse_bsc: "ccol_indices(), row_indices() and "
                 "values()"}.get(t.layout)
        raise UnsupportedDtypeError(f"a {t.layout} tensor cannot be archived as it is; store t.to_dense()"
                                    + (f", or its {parts}, each under its own name" if parts else ""))
    if t.is_quantized:
        raise UnsupportedDtypeError(f"a quantized tensor ({t.dtype}) cannot be archived as it is; store t.int_repr() "
                                    "with its scale and zero point, or t.dequantize()")
    views = _views()
    try:
        t = t.detach().resolve_conj().resolve_neg().cpu().contiguous()  # lazy views (c.conj().imag): values
        if t.dtype in views:
            carrier, np_dtype = views[t.dtype]
            return t.view(carrier).numpy().view(np_dtype).copy()
        return t.numpy().copy()
    except TypeError:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            raise UnsupportedDtypeError(
                f"torch dtype {t.dtype} cannot be archived (NumPy has no such dtype). Convert it first (e.g. "
                "t.float(); complex: store .real and .imag); gpupas.pas.planes.LAYOUTS lists the dtypes it stores"
            ) from None
        raise UnsupportedDtypeError(f"a {type(t).__name__} (a torch.Tensor subclass) does not read as plain tensor "
                                    "data; convert it to a plain tensor first") from None
    except RuntimeError as exc:  # a subclass whose data is not plain tensor data (a wrapper, a sharded tensor)
        hint = _SHARDED if type(t).__name__ == "DTensor" else ""
        raise UnsupportedDtypeError(f"a {type(t).__name__} tensor does not read as plain tensor data ({exc}); "
                                    f"convert it to a plain tensor first{hint}") from None


_SHARDED = ("; a DTensor holds one shard per rank (FSDP2's fully_shard, tensor parallel): give its whole tensor "
            "(t.full_tensor()), or a whole state_dict, taken on every rank: torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))")


def numpy_to_tensor(a: np.ndarray, copy: bool = True) -> Any:
    """A torch tensor with the bits of NumPy array ``a``: its own copy, or (``copy=False``, ``a`` writable)
    sharing ``a``'s memory."""
    torch = _torch()
    a = np.asarray(a)
    if copy or not a.flags.writeable:
        a = a.copy()
    for tdtype, (carrier, np_dtype) in _views().items():
        if a.dtype == np.dtype(np_dtype):
            holder = np.dtype(torch.empty(0, dtype=carrier).numpy().dtype)
            t = torch.from_numpy(a.view(holder)).view(tdtype)
            break
    else:
        try:
            t = torch.from_numpy(a)
        except TypeError:
            raise torch_lacks(a.dtype.name) from None
    return t if a.size else torch.empty(t.shape, dtype=t.dtype)  # from_numpy strides an empty one 0: no .view(dtype)


def torch_lacks(dtype_name: str) -> UnsupportedDtypeError:
    """The error for a restored dtype the installed torch has no dtype for (an older torch)."""
    return UnsupportedDtypeError(f"dtype {dtype_name} has no torch dtype in torch {_torch().__version__}; restore "
                                 "it with framework='numpy' (or export to safetensors), or upgrade torch")


def numpy_to_state_dict(arrays: Mapping[str, np.ndarray], copy: bool = True) -> dict[str, Any]:
    """NumPy arrays as a torch state_dict (``copy=False``: sharing their memory, see :func:`numpy_to_tensor`);
    UnsupportedDtypeError naming the tensor where this torch has no dtype for one."""
    out = {}
    for k, v in arrays.items():
        try:
            out[k] = numpy_to_tensor(v, copy)
        except UnsupportedDtypeError as exc:
            raise UnsupportedDtypeError(f"tensor {k!r}: {exc}") from None
    return out
