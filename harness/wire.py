"""The HTTP body encoding of protocol objects: a small JSON header followed by raw little-endian arrays.

    frame  = header_length (uint32, little-endian) | header (UTF-8 JSON object) | buffer_1 | buffer_2 | ...
    header = {"fields": {name: JSON value, ...}, "arrays": [{"name": str, "dtype": "float32" | "int32",
              "shape": [int, ...]}, ...]}

Each array's buffer is its C-order bytes, little-endian, in the order the header lists them, with no padding;
the frame ends where the last buffer ends. Texts and other scalars travel in the header's fields as JSON. Media
type: application/x-bbt-frame. Errors are plain JSON (`{"error": {"code": ..., "message": ...}}`).

Decoding is strict, because the server decodes what anyone sends: a field the object does not have, a missing
one, a value of the wrong type, an array of another dtype or rank, NaN or inf in a float array, or a frame whose
length disagrees with its header is a ProtocolError naming the problem.
"""

from __future__ import annotations

import json
import math
import struct
import types
import typing
from dataclasses import MISSING, asdict, fields

import numpy as np

from harness.prompting import ProjectionSpec, PromptSpec
from harness.protocol import ProtocolError

MEDIA_TYPE = "application/x-bbt-frame"
DTYPES = {"float32": np.dtype("<f4"), "int32": np.dtype("<i4")}
INT_ARRAYS = {"lengths"}  # every other array field is float32
MAX_RANK = 4


def _is_array(hint) -> bool:
    return hint is np.ndarray or (typing.get_origin(hint) in (typing.Union, types.UnionType) and np.ndarray in typing.get_args(hint))


def _hints(cls) -> dict:
    return {f.name: typing.get_type_hints(cls)[f.name] for f in fields(cls)}


def encode(obj) -> bytes:
    """A protocol dataclass as one frame."""
    header: dict = {"fields": {}, "arrays": []}
    buffers = []
    for name, value in ((f.name, getattr(obj, f.name)) for f in fields(obj)):
        if isinstance(value, np.ndarray):
            dtype = DTYPES["int32" if name in INT_ARRAYS else "float32"]
            array = np.ascontiguousarray(value, dtype=dtype)
            header["arrays"].append({"name": name, "dtype": dtype.name, "shape": list(array.shape)})
            buffers.append(array.tobytes())
        elif isinstance(value, PromptSpec):
            header["fields"][name] = asdict(value)
        elif isinstance(value, tuple):
            header["fields"][name] = list(value)
        elif value is not None:
            header["fields"][name] = value
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return struct.pack("<I", len(head)) + head + b"".join(buffers)


def _bad(message: str, code: str = "invalid_request", status: int = 422) -> ProtocolError:
    return ProtocolError(message, status, code)


def read_frame(body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The header's fields and the arrays of a frame, checked against each other."""
    if len(body) < 4:
        raise _bad("the body is not a frame (shorter than its 4-byte header length)", "bad_frame", 400)
    (size,) = struct.unpack_from("<I", body)
    if 4 + size > len(body):
        raise _bad(f"the frame's header length {size} runs past the body's {len(body)} bytes", "bad_frame", 400)
    try:
        header = json.loads(body[4 : 4 + size].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise _bad(f"the frame's header is not JSON: {exc}", "bad_frame", 400) from None
    if not isinstance(header, dict) or set(header) - {"fields", "arrays"}:
        raise _bad("the frame's header must be an object with 'fields' and 'arrays' only", "bad_frame", 400)
    values, specs = header.get("fields", {}), header.get("arrays", [])
    if not isinstance(values, dict) or not isinstance(specs, list):
        raise _bad("the header's 'fields' must be an object and 'arrays' a list", "bad_frame", 400)
    arrays, offset = {}, 4 + size
    for spec in specs:
        name, dtype, shape = _array_spec(spec)
        if name in arrays or name in values:
            raise _bad(f"field '{name}' is given twice", "bad_frame", 400)
        nbytes = DTYPES[dtype].itemsize * math.prod(shape)
        if offset + nbytes > len(body):
            raise _bad(f"array '{name}' {shape} needs {nbytes} bytes; the body has {len(body) - offset} left", "bad_frame", 400)
        arrays[name] = np.frombuffer(body, DTYPES[dtype], math.prod(shape), offset).reshape(shape)
        offset += nbytes
    if offset != len(body):
        raise _bad(f"{len(body) - offset} bytes follow the last array the header lists", "bad_frame", 400)
    return values, arrays


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number this protocol accepts")


def _array_spec(spec) -> tuple[str, str, list[int]]:
    if not isinstance(spec, dict) or set(spec) != {"name", "dtype", "shape"}:
        raise _bad("each array is described by exactly 'name', 'dtype' and 'shape'", "bad_frame", 400)
    name, dtype, shape = spec["name"], spec["dtype"], spec["shape"]
    if not isinstance(name, str):
        raise _bad("an array's name must be a string", "bad_frame", 400)
    if dtype not in DTYPES:
        raise _bad(f"array '{name}' has dtype {dtype!r}; this protocol carries {' and '.join(DTYPES)}", "bad_dtype")
    if (not isinstance(shape, list) or len(shape) > MAX_RANK
            or not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 2**31 for n in shape)):
        raise _bad(f"array '{name}' has shape {shape!r}: a list of at most {MAX_RANK} non-negative sizes", "bad_shape")
    return name, dtype, shape


def decode(cls, body: bytes, finite: bool = True):
    """A frame as an instance of the protocol dataclass `cls`, every field checked (float arrays finite unless
    `finite` is False: a client takes the server's answer as it comes)."""
    values, arrays = read_frame(body)
    hints = _hints(cls)
    given = set(values) | set(arrays)
    unknown = sorted(given - set(hints))
    if unknown:
        raise _bad(f"unknown field(s) {unknown}; {cls.__name__} has {sorted(hints)}", "unknown_field")
    kwargs = {}
    for f in fields(cls):
        name, hint = f.name, hints[f.name]
        if name not in given:
            if _has_default(f):
                continue
            raise _bad(f"{cls.__name__} needs the field '{name}'", "missing_field")
        if _is_array(hint):
            if name not in arrays:
                raise _bad(f"field '{name}' must be an array, not a header value", "bad_type")
            kwargs[name] = _checked_array(name, arrays[name], finite)
        elif name in arrays:
            raise _bad(f"field '{name}' is a header value, not an array", "bad_type")
        else:
            kwargs[name] = _value(name, hint, values[name])
    return cls(**kwargs)


def _has_default(f) -> bool:
    return f.default is not MISSING or f.default_factory is not MISSING


def _checked_array(name: str, array: np.ndarray, finite: bool) -> np.ndarray:
    expected = "int32" if name in INT_ARRAYS else "float32"
    if array.dtype.name != expected:
        raise _bad(f"array '{name}' must be {expected}, not {array.dtype.name}", "bad_dtype")
    if finite and expected == "float32" and array.size and not np.isfinite(array).all():
        raise _bad(f"array '{name}' holds NaN or infinite values", "non_finite")
    return array


def _value(name: str, hint, value):
    if hint == tuple[str, ...]:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _bad(f"field '{name}' must be a list of strings", "bad_type")
        return tuple(value)
    if hint is str or hint is bool:
        if type(value) is not hint:
            raise _bad(f"field '{name}' must be a {hint.__name__}", "bad_type")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad(f"field '{name}' must be a number", "bad_type")
        return float(value)
    if hint is PromptSpec:
        return prompt_spec(value)
    raise _bad(f"field '{name}' cannot be read", "bad_type")


def prompt_spec(value) -> PromptSpec:
    """A PromptSpec from its JSON form, with the same strictness as a frame."""
    allowed = {f.name: f for f in fields(PromptSpec)}
    if not isinstance(value, dict) or set(value) - set(allowed):
        extra = sorted(set(value) - set(allowed)) if isinstance(value, dict) else value
        raise _bad(f"a prompt spec is an object with fields {sorted(allowed)}; unknown: {extra}", "unknown_field")
    kinds = {"n_tokens": int, "slots": int, "placeholder_start": int, "mode": str, "send": str}
    for key, kind in kinds.items():
        if key in value and (type(value[key]) is not kind):
            raise _bad(f"prompt spec field '{key}' must be {kind.__name__}", "bad_type")
    projection = value.get("projection")
    if projection is not None:
        names = {f.name for f in fields(ProjectionSpec)}
        if not isinstance(projection, dict) or set(projection) - names or not {"dim", "seed", "stds"} <= set(projection):
            raise _bad(f"a projection spec is an object with fields {sorted(names)}", "unknown_field")
        stds = projection["stds"]
        if (type(projection["dim"]) is not int or type(projection["seed"]) is not int
                or not isinstance(stds, list) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in stds)
                or not isinstance(projection.get("dist", "normal"), str)):
            raise _bad("projection fields: dim and seed integers, stds a list of numbers, dist a string", "bad_type")
        projection = ProjectionSpec(**{**projection, "stds": tuple(float(s) for s in stds)})
    try:
        return PromptSpec(**{**value, "projection": projection})
    except ProtocolError:
        raise
    except Exception as exc:  # PromptSpec's own checks (mode, send, stds per slot) raise HarnessError
        raise _bad(f"invalid prompt spec: {exc}", "invalid_prompt") from None


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
