"""The exceptions qtensors raises. The Rust core raises these same classes."""

from __future__ import annotations


class QtensorsError(Exception):
    """Base class of every qtensors error."""


class FormatError(QtensorsError, ValueError):
    """The file breaks a rule of the format (spec/FORMAT.md section 7): truncated, lying offsets,
    bad JSON, overlapping parts... The message names the tensor, the part and the rule."""


class ChecksumError(FormatError):
    """A part's bytes do not match its recorded checksum: the file is corrupted."""


class UnsupportedError(FormatError):
    """A well-formed file that needs a newer qtensors: newer version, unknown encoding or dtype."""


class QuantizationError(QtensorsError, ValueError):
    """Values that cannot be quantized (NaN or Inf, a scale beyond the scale dtype's range)."""


class ForeignFormatError(QtensorsError, ValueError):
    """A file of another format (GGUF, GPTQ, ...) that cannot be imported: malformed, or using a
    layout the importer does not know. The message names the format and the tensor."""
