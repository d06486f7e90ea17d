"""Programmatic dependent launch (PDL, sm_90+): a kernel launched with it may start while the
kernel before it in the stream is still finishing, and waits for it only where it reads what
that kernel wrote.

Why: a decode step is a chain of short kernels (a linear at batch 1 takes 4-12 us on the H200),
and between two kernels of a stream the GPU idles while the second is launched and its first
loads travel to HBM. The packed weights never depend on the kernel before, so a linear launched
this way puts its programs on the SMs, brings its first steps' codes into L2 and only then
waits (``griddepcontrol.wait``: the previous grid complete and its writes visible) before it
reads the activations or writes anything. Each of our kernels also lets the next one start as
soon as all of its own programs are placed (``griddepcontrol.launch_dependents``); a kernel
that is not launched this way (torch's, cuBLAS) simply starts after ours, as before.

The rule that keeps it correct: a kernel launched with ``launch_pdl`` reads nothing but its
weights, and writes nothing, before ``wait``. ``launch.PDL`` switches it off
(``QTENSORS_PDL=0``); it applies on sm_90+ only and never under the interpreter.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:  # Gluon: Triton 3.5+
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    HAVE_GLUON = True
except ImportError:  # pragma: no cover - depends on the installed Triton
    HAVE_GLUON = False


@triton.jit
def wait():
    """Until the previous grid of the stream has completed and its writes are visible (a no-op
    when this kernel was not launched with PDL)."""
    tl.inline_asm_elementwise(
        "griddepcontrol.wait; // $0", "=r,~{memory}", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def launch_dependents():
    """Let the next grid of the stream start once every program of this one has got here."""
    tl.inline_asm_elementwise(
        "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1
    )


@triton.jit
def l2_prefetch(ptrs):
    """``prefetch.global.L2`` of each address: its line comes into L2 from HBM without a
    register waiting for it."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1]; mov.b32 $0, 0;",
        "=r,l",
        [ptrs.to(tl.int64)],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


if HAVE_GLUON:

    @gluon.jit
    def gl_wait():
        """``wait`` in a Gluon kernel."""
        gl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r,~{memory}", [], dtype=gl.int32, is_pure=False, pack=1
        )

    @gluon.jit
    def gl_launch_dependents():
        """``launch_dependents`` in a Gluon kernel."""
        gl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0",
            "=r",
            [],
            dtype=gl.int32,
            is_pure=False,
            pack=1,
        )
