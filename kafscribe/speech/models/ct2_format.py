"""Read a CTranslate2 ``model.bin`` into numpy arrays.

The format (ctranslate2/specs/model_spec.py, ``_serialize``): uint32 binary
version, string spec name, uint32 revision, uint32 variable count, then per
variable: string name, uint8 rank, uint32 dims, uint8 dtype id, uint32 byte
count, raw bytes; finally uint32 alias count and (alias, target) string pairs.
Strings are uint16 length (including a NUL) + bytes + NUL. Little endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

# Order of the DataType enum in ctranslate2/types.h.
_DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")


class CT2FormatError(ValueError):
    """The file is not a CTranslate2 model this reader understands."""


@dataclass
class CT2Model:
    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    aliases: dict[str, str]

    def get(self, name: str) -> np.ndarray:
        return self.variables[self.aliases.get(name, name)]


def _read(f: BinaryIO, fmt: str):
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) != size:
        raise CT2FormatError("truncated model.bin")
    return struct.unpack("<" + fmt, data)[0]


def _read_string(f: BinaryIO) -> str:
    length = _read(f, "H")
    raw = f.read(length)
    if len(raw) != length:
        raise CT2FormatError("truncated string in model.bin")
    return raw[:-1].decode("utf-8")


def read_model(path: Path) -> CT2Model:
    with open(path, "rb") as f:
        version = _read(f, "I")
        if version < 5 or version > 6:
            raise CT2FormatError(f"unsupported CTranslate2 binary version {version}")
        spec = _read_string(f)
        revision = _read(f, "I")
        variables: dict[str, np.ndarray] = {}
        for _ in range(_read(f, "I")):
            name = _read_string(f)
            shape = tuple(_read(f, "I") for _ in range(_read(f, "B")))
            dtype_id = _read(f, "B")
            nbytes = _read(f, "I")
            raw = f.read(nbytes)
            if len(raw) != nbytes:
                raise CT2FormatError(f"truncated variable {name}")
            dtype = _DTYPES[dtype_id]
            if dtype == "bfloat16":
                bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
                array = bits.view(np.float32)
            else:
                array = np.frombuffer(raw, dtype=dtype)
            variables[name] = array.reshape(shape)
        aliases = {}
        for _ in range(_read(f, "I")):
            alias = _read_string(f)
            aliases[alias] = _read_string(f)
    return CT2Model(version, spec, revision, variables, aliases)
