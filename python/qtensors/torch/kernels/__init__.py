"""The Triton kernels of qtensors.torch, one module per job:

* ``dequant``: decode a quantized tensor into a dense one (``torch.ops.qtensors.dequantize``);
* ``gemv``: ``x @ W^T`` for a few rows of ``x`` (batch 1-16), CUDA cores, split-K;
* ``gemm``: ``x @ W^T`` for many rows, a decoded weight tile fed to ``tl.dot``, split-K;
* ``epilogue``: what both matmul kernels share (code values, the split-K reduction, the store);
* ``launch``: shapes -> launch configuration, and the launches (``torch.ops.qtensors.linear``).

Importing any of them needs Triton; this package itself does not.
"""
