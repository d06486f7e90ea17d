"""The Triton kernels of qtensors.torch, one module per job:

* ``dequant``: decode a quantized tensor into a dense one (``torch.ops.qtensors.dequantize``);
* ``tiled``: ``x @ W^T`` from int32 words of codes (groups along the input dim): a CUDA-core
  kernel for a few rows of ``x``, a ``tl.dot`` kernel for more, split-K;
* ``gemv`` / ``gemm``: the byte-tile kernels, for the weights ``tiled`` does not take (groups
  along the output dim, rows not of whole words) and as the baseline of the sweep;
* ``mma`` / ``mma_int8`` / ``mma_int8_gluon``: tensor-core kernels for a few to 64 rows;
* ``gemm16_gluon`` / ``gemm16_regs_gluon``: Gluon, sm_90, 65-256 rows on the large weights;
* ``scales``: group scales as fp32 in every stored format (float, E8M0, E4M3 x tensor scale);
* ``epilogue``: what both matmul kernels share (code values, the split-K reduction, the store);
* ``launch``: shapes -> launch configuration, and the launches (``torch.ops.qtensors.linear``);
* ``startup``: Triton's per-process start-up hash, kept on disk (installed here, on import);
* ``kept``: buffers the kernels keep across calls, allocated where no CUDA-graph pool claims them.

Importing any of them needs Triton; this package itself does not.
"""

try:
    from .startup import remember_triton_key
except ImportError:  # no Triton: nothing compiles
    pass
else:
    remember_triton_key()
