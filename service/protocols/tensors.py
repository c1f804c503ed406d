"""Open Inference Protocol tensors on the wire: JSON `data`, and Triton's binary tensor data extension.

A request body is a JSON header, optionally followed by raw tensor bytes; the header's length is the
`Inference-Header-Content-Length` HTTP header, and each binary input says its byte count in
`parameters.binary_data_size`, in the order the inputs are listed. Responses are built the same way.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from lstm_serve.core.inputs import Limits, check_body_size
from lstm_serve.errors import InvalidInput, MalformedRequest, UnsupportedMediaType
from lstm_serve.protocols.codec import dumps, parse
from lstm_serve.protocols.oip_schemas import InferenceRequest, InferInputTensor

HEADER_LENGTH = "inference-header-content-length"
# OIP datatype -> numpy little-endian dtype; BYTES are length-prefixed strings
DTYPES = {
    "BOOL": "|b1",
    "UINT8": "|u1",
    "UINT16": "<u2",
    "UINT32": "<u4",
    "UINT64": "<u8",
    "INT8": "|i1",
    "INT16": "<i2",
    "INT32": "<i4",
    "INT64": "<i8",
    "FP16": "<f2",
    "FP32": "<f4",
    "FP64": "<f8",
}
NUMERIC_KINDS = {"b": "b", "u": "iu", "i": "iu", "f": "iuf"}  # JSON numbers each datatype accepts
BYTE_COUNT = re.compile(r"[0-9]{1,20}")
GZIP_MAGIC, MAX_GZIP_MEMBERS = b"\x1f\x8b", 64
MAX_DIMENSIONS = 16
MAX_DIMENSION = 2**62


@dataclass
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    array: np.ndarray  # float32, or an object array of bytes for BYTES
    binary: bool


def decompress(body: bytes, encoding: str | None, limits: Limits) -> bytes:
    """Content-Encoding gzip or deflate (what tritonclient's request_compression_algorithm sends)."""
    encoding = (encoding or "").strip().lower()  # content codings are case-insensitive (RFC 9110 8.4.1)
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; use gzip, deflate or none")
    if encoding == "deflate":
        if not zlib_header(body):
            return inflate_raw(body, limits)
        try:
            return inflate(body, encoding, limits)
        except MalformedRequest:  # a raw stream whose first bytes happen to read as a zlib header (1 in ~500)
            return inflate_raw(body, limits)
    return inflate(body, encoding, limits)


def inflate(body: bytes, encoding: str, limits: Limits) -> bytes:
    data, rest = b"", body
    for _ in range(MAX_GZIP_MEMBERS):  # gzip is a series of members (RFC 1952 2.2); zlib is one stream
        inflater = zlib.decompressobj(wbits=47)  # 32 + 15: zlib or gzip framing, detected from the header
        try:
            data += inflater.decompress(rest, limits.max_body_bytes + 1 - len(data))
        except zlib.error as error:
            raise MalformedRequest(f"the {encoding} body could not be decompressed: {error}") from None
        check_body_size(len(data), limits, "the decompressed body")
        if not inflater.eof:
            raise MalformedRequest(f"the {encoding} body could not be decompressed: it ends before its stream does")
        rest = inflater.unused_data
        if not rest:
            return data
        if not rest.startswith(GZIP_MAGIC):
            raise MalformedRequest(f"the {encoding} body has bytes after its compressed stream")
    raise MalformedRequest(f"the gzip body has more than {MAX_GZIP_MEMBERS} members")


def zlib_header(body: bytes) -> bool:
    """Whether `body` starts as a zlib stream does (RFC 1950: method 8, check bits that make a multiple of 31)."""
    return len(body) >= 2 and body[0] & 0x0F == 8 and (body[0] << 8 | body[1]) % 31 == 0


def inflate_raw(body: bytes, limits: Limits) -> bytes:
    """Deflate as many clients send it: a raw stream without RFC 9110's zlib wrapper (browsers take either too)."""
    inflater = zlib.decompressobj(wbits=-15)
    try:
        data = inflater.decompress(body, limits.max_body_bytes + 1)
    except zlib.error as error:
        raise MalformedRequest(f"the deflate body could not be decompressed: {error}") from None
    check_body_size(len(data), limits, "the decompressed body")
    if not inflater.eof:
        raise MalformedRequest("the deflate body could not be decompressed: it ends before its stream does")
    if inflater.unused_data:
        raise MalformedRequest("the deflate body has bytes after its compressed stream")
    return data


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """The JSON header and the binary tail that follows it."""
    if header_length is None:
        return body, memoryview(b"")
    # ASCII digits only: str.isdigit() also takes '²', which int() refuses, and int() takes '٣' and '1_0'
    if not BYTE_COUNT.fullmatch(header_length) or int(header_length) > len(body):
        raise MalformedRequest(
            f"Inference-Header-Content-Length {header_length!r} is not a byte count within the {len(body)}-byte body"
        )
    n = int(header_length)
    return body[:n], memoryview(body)[n:]


def element_count(name: str, shape: list[int]) -> int:
    """The number of elements a shape holds, in Python's exact integers: numpy's int64 product wraps
    around (2**32 x 2**32 is 0), and a wrapped count would pass for the data actually sent."""
    if len(shape) > MAX_DIMENSIONS:
        raise InvalidInput(f"input {name!r} has {len(shape)} dimensions; a tensor has at most {MAX_DIMENSIONS}")
    if any(n < 0 for n in shape):
        raise InvalidInput(f"input {name!r} has shape {shape}; dimensions cannot be negative")
    if any(n > MAX_DIMENSION for n in shape):
        raise InvalidInput(f"input {name!r} has shape {shape}; no dimension can exceed {MAX_DIMENSION}")
    return math.prod(shape)


def read_request(body: bytes, header_length: str | None) -> tuple[InferenceRequest, dict[str, np.ndarray]]:
    """The request and its input tensors as numpy arrays of their declared shape and datatype."""
    header, tail = split_body(body, header_length)
    request = parse(InferenceRequest, header, "inference request")
    tensors, offset = {}, 0
    for tensor in request.inputs:
        if tensor.name in tensors:
            raise InvalidInput(f"input {tensor.name!r} is given twice")
        if tensor.datatype not in DTYPES:
            raise InvalidInput(
                f"input {tensor.name!r} has datatype {tensor.datatype!r}; numeric inputs take "
                f"one of {', '.join(DTYPES)}"
            )
        count = element_count(tensor.name, tensor.shape)
        size = tensor.parameters.get("binary_data_size")
        if size is not None:
            if tensor.data is not None:  # the binary extension: "the data field must not be present"
                raise InvalidInput(f"input {tensor.name!r} has both data and parameters.binary_data_size")
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(tail):
                raise MalformedRequest(
                    f"input {tensor.name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(tail) - offset} bytes of binary data left in the body"
                )
            tensors[tensor.name] = from_bytes(tensor, count, tail[offset : offset + size])
            offset += size
        elif tensor.data is None:
            raise InvalidInput(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
        else:
            tensors[tensor.name] = from_json(tensor, count, tensor.data)
    if offset != len(tail):
        raise MalformedRequest(f"the body has {len(tail) - offset} bytes of binary data that no input claims")
    return request, tensors


def from_bytes(tensor: InferInputTensor, count: int, raw: memoryview) -> np.ndarray:
    dtype = np.dtype(DTYPES[tensor.datatype])
    if len(raw) != count * dtype.itemsize:
        raise InvalidInput(
            f"input {tensor.name!r}: {len(raw)} bytes of binary data, but shape {tensor.shape} of "
            f"{tensor.datatype} takes {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(tensor.shape)


def from_json(tensor: InferInputTensor, count: int, data: list) -> np.ndarray:
    """Row-major data, flat or nested; JSON numbers only (booleans for BOOL), of a kind and range the
    datatype holds. numpy alone would take `true` among numbers as 1, wrap an INT32 of 2**32 + 5 to 5, and
    not read an integer literal past int64 as a number at all."""
    name, datatype, dtype = tensor.name, tensor.datatype, np.dtype(DTYPES[tensor.datatype])
    try:
        values = np.asarray(data)
        if values.dtype == object and dtype.kind == "f":  # integers past int64 are numbers all the same
            if not set(map(type, values.ravel())) <= {int, float}:  # not "3" or null taken as numbers
                raise TypeError("not numbers")
            values = np.asarray(data, np.float64)
    except (ValueError, TypeError, OverflowError):
        raise InvalidInput(
            f"input {name!r}: data must be JSON {'booleans' if datatype == 'BOOL' else 'numbers'} in nested lists "
            f"of one shape, at most {MAX_DIMENSIONS} deep (or flat, in row-major order)"
        ) from None
    if values.size != count:
        raise InvalidInput(f"input {name!r}: {values.size} values in data, but shape {tensor.shape} holds {count}")
    if not count:
        return values.astype(dtype).reshape(tensor.shape)
    if values.dtype.kind not in NUMERIC_KINDS[dtype.kind] or (dtype.kind != "b" and holds_booleans(values, data)):
        what = "booleans" if datatype == "BOOL" else "integers" if dtype.kind in "iu" else "numbers"
        raise InvalidInput(f"input {name!r}: data of datatype {datatype} must be JSON {what}")
    if dtype.kind in "iu":
        bounds = np.iinfo(dtype)
        if values.min() < bounds.min or values.max() > bounds.max:
            raise InvalidInput(
                f"input {name!r}: data of datatype {datatype} must lie between {bounds.min} and {bounds.max}"
            )
    return values.astype(dtype).reshape(tensor.shape)


def holds_booleans(values: np.ndarray, data: list) -> bool:
    """Whether JSON `true` or `false` hides among numbers, where numpy read it as 1 or 0: looked for element
    by element only in data holding a 0 or a 1."""
    zero_or_one = np.flatnonzero(np.logical_or(values == 0, values == 1))
    if not zero_or_one.size:
        return False
    return bool in set(map(type, np.asarray(data, dtype=object).ravel()[zero_or_one]))


def bytes_elements(array: np.ndarray) -> bytes:
    """BYTES tensor serialisation: each element as a little-endian uint32 length and its bytes."""
    return b"".join(struct.pack("<I", len(item)) + item for item in array.ravel())


def write_response(head: dict, outputs: list[OutputTensor]) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON header."""
    tensors, tail = [], []
    for out in outputs:
        tensor: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if out.binary:
            raw = bytes_elements(out.array) if out.datatype == "BYTES" else out.array.astype("<f4").tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            tail.append(raw)
        elif out.datatype == "BYTES":
            tensor["data"] = [item.decode() for item in out.array.ravel()]
        else:
            tensor["data"] = np.ascontiguousarray(out.array, np.float32).ravel()
        tensors.append(tensor)
    header = dumps({**head, "outputs": tensors})
    if not tail:
        return header, None
    return header + b"".join(tail), len(header)
