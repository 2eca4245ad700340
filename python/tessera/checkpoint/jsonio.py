"""JSON encoding of checkpoint extras (plain dicts, scheduler states, RNG states) without pickle: tensors and
numpy arrays become base64 records with their dtype and shape, tuples are tagged so they come back as tuples."""

from __future__ import annotations

import base64
import json

import numpy as np
import torch

from tessera.errors import CheckpointError, InvalidArgumentError


def _encode(obj, path: str):
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
        return {"__tensor__": {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                               "b64": base64.b64encode(raw.numpy().tobytes()).decode()}}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape),
                                "b64": base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode()}}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise InvalidArgumentError(f"checkpoint: key {k!r} at {path} is not a str or int")
            out[str(k) if isinstance(k, str) else f"__int__{k}"] = _encode(v, f"{path}.{k}")
        return out
    raise InvalidArgumentError(
        f"checkpoint: {path} holds a {type(obj).__name__}, which cannot be saved without pickle; use numbers, "
        "strings, lists, dicts, tensors or numpy arrays")


def _decode(obj):
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        rec = obj["__tensor__"]
        dtype = getattr(torch, rec["dtype"])
        raw_dtype = torch.int16 if dtype == torch.bfloat16 else dtype
        data = bytearray(base64.b64decode(rec["b64"]))
        t = torch.frombuffer(data, dtype=raw_dtype) if data else torch.empty(0, dtype=raw_dtype)
        t = t.reshape(rec["shape"])
        return t.view(torch.bfloat16) if dtype == torch.bfloat16 else t
    if "__ndarray__" in obj:
        rec = obj["__ndarray__"]
        return np.frombuffer(base64.b64decode(rec["b64"]), dtype=np.dtype(rec["dtype"])).reshape(rec["shape"]).copy()
    if "__tuple__" in obj:
        return tuple(_decode(v) for v in obj["__tuple__"])
    return {(int(k[7:]) if k.startswith("__int__") else k): _decode(v) for k, v in obj.items()}


def dumps(obj, path: str = "state") -> str:
    return json.dumps(_encode(obj, path), separators=(",", ":"))


def loads(text: str, what: str = "checkpoint extras"):
    try:
        return _decode(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{what}: cannot decode ({e})") from None
