"""Models in other formats, into qtensors: one module per foreign format.

`detect(path)` names the format of a file; `import_model(src, dst)` dispatches to its importer.
"""

from __future__ import annotations

import os
from typing import Any

from .common import ImportReport, TensorReport

__all__ = ["ImportReport", "TensorReport", "detect", "import_model"]


def detect(path: str | os.PathLike[str]) -> str | None:
    """ "gguf" for a GGUF file (by its magic bytes); "gptq", "awq" or "compressed-tensors" for a
    model folder quantized so (by config.json's quantization_config); else None."""
    p = os.fspath(path)
    if os.path.isdir(p):
        from .quantized_folder import quantization_config

        found = quantization_config(p)
        return None if found is None else found[0]
    if not os.path.isfile(p):
        return None
    with open(p, "rb") as fh:
        magic = fh.read(4)
    return "gguf" if magic == b"GGUF" else None


def import_model(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], **kw: Any
) -> ImportReport:
    """Import the foreign model `src` into the qtensors model folder `dst`."""
    fmt = detect(src)
    if fmt == "gguf":
        from .gguf import import_gguf

        return import_gguf(src, dst, **kw)
    if fmt is not None:
        from .quantized_folder import import_quantized_folder

        if kw.pop("quant", None) is not None:
            raise ValueError(
                f"{os.fspath(src)}: a {fmt} model maps exactly: quantization options do not apply"
            )
        return import_quantized_folder(src, dst, **kw)
    raise ValueError(
        f"{os.fspath(src)}: not a format qtensors imports (a GGUF file, or a GPTQ, AWQ or "
        "compressed-tensors model folder)"
    )
