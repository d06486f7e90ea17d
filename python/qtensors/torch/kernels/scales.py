"""Group scales as fp32 inside the kernels, whatever their stored format, so no torch pass
converts them first (spec 4.8 / 4.9):

* ``SFMT_FLOAT``: float16 / bfloat16 / float32 scales, converted;
* ``SFMT_E8M0`` (MXFP4): byte ``b`` is ``2^(b - 127)``; 0 is the subnormal ``2^-127``, 255 NaN;
* ``SFMT_E4M3`` (NVFP4): FP8 E4M3 bytes (given as uint8) decoded with integer operations, times
  the per-tensor fp32 scale at ``tscale_ptr``, rounded once (the spec's product).

Built from bits rather than with ``tl`` float8 casts: the same on every GPU and in the
interpreter. The work is per group, not per weight, so its cost does not matter.
"""

from __future__ import annotations

import triton
import triton.language as tl

SFMT_FLOAT = 0
SFMT_E8M0 = 1
SFMT_E4M3 = 2
#: the scale format of each encoding (default: float)
SCALE_FORMATS = {"mxfp4": SFMT_E8M0, "nvfp4": SFMT_E4M3}


@triton.jit
def group_scale(scales_ptr, idx, mask, tscale_ptr, SFMT: tl.constexpr):
    """The fp32 scales at ``idx`` (masked lanes: a finite value)."""
    if SFMT == 0:
        s = tl.load(scales_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    elif SFMT == 1:
        b = tl.load(scales_ptr + idx, mask=mask, other=127).to(tl.int32)
        s = (b << 23).to(tl.float32, bitcast=True)
        s = tl.where(b == 0, 2.0**-127, s)  # the exponent field 0 would read as +0
        s = tl.where(b == 255, float("nan"), s)
    else:
        b = tl.load(scales_ptr + idx, mask=mask, other=0x38).to(tl.int32)
        s = e4m3(b) * tl.load(tscale_ptr)
    return s


@triton.jit
def e4m3(b):
    """FP8 E4M3 bytes (int32 0..255) as fp32: exact, NaN for 0x7F / 0xFF."""
    e = (b >> 3) & 15
    m = b & 7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, m.to(tl.float32) * 2.0**-9, normal)  # subnormals: m * 2^-9
    mag = tl.where((b & 0x7F) == 0x7F, float("nan"), mag)
    return tl.where((b & 0x80) != 0, -mag, mag)
