"""A quantized KV cache for transformers (FlexGen's other half): ``QuantizedKVCache``.

    cache = qtt.QuantizedKVCache(bits=4, group_size=64, residual_length=128)
    out = model.generate(ids, past_key_values=cache, max_new_tokens=256)
    cache.nbytes                       # codes + scales + mins + the exact window, in bytes

Keys and values, [batch, kv heads, tokens, head_dim] per layer, are quantized as each token
leaves a window of the ``residual_length`` most recent tokens, which stay exact: every token is
quantized on its own, in groups of ``group_size`` along the head dimension (FlexGen's dim 2), with
the format's affine encoding (spec 4.5), so a saved cache (``kv_files``) is ordinary qtensors
data. Since a token's groups never mix it with others, the stored cache does not depend on how
the tokens arrived (one prompt, chunks, token by token) nor on padding in the batch.

``update`` returns the layer's keys and values for attention: the quantized tokens decoded,
then the window and the new tokens exactly. They are decoded into one buffer per cache, sized
for one layer and reused by every layer (under ``torch.no_grad``; with gradients enabled each
update gets its own), so decoding never costs a dense copy of the whole cache.

Backends, one update per K or V: on CUDA the Triton kernel of ``kernels/kv.py`` (decode,
quantize and window in one launch); on the CPU the Rust core (``qtensors.quantize`` and
``ops.dequantize_cpu``); elsewhere, or without Triton, plain torch (``ops``). All three produce
the same bytes as the numpy reference of the spec.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..encodings import Affine
from ..quantized import quantize
from .ops import HAVE_TRITON, SCALE_DTYPES, dequantize_cpu, dequantize_torch, quantize_affine_torch

BITS = (2, 4, 8)
CACHE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class _Scratch:
    """The decode buffers shared by every layer of one cache: the attention input of one layer
    at a time (the model is done with layer i's keys before it updates layer i + 1)."""

    def __init__(self) -> None:
        self.bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
        n = 1
        for d in shape:
            n *= d
        if torch.is_grad_enabled():  # autograd may keep it: never overwrite
            return torch.empty(shape, dtype=dtype, device=device)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            # headroom, so that decoding token by token does not reallocate at every step
            buf = torch.empty(_round_up(n + n // 4, 1 << 16), dtype=dtype, device=device)
            self.bufs[name] = buf
        return buf[:n].view(shape)

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.bufs.values())


class _Store:
    """The keys (or values) of one layer: the quantized tokens ``[0, tq)`` in ``codes`` /
    ``scales`` / ``mins`` ([B, H, capacity, ...], grown as needed) and the exact window in one
    of two window buffers ([B, H, up to residual_length, D]; an update reads one, writes the
    other)."""

    def __init__(self, B, H, D, dtype, device, bits, group_size, scale_dtype, residual_length):
        self.D = D
        self.bits = bits
        self.group_size = group_size
        self.G = -(-D // group_size)
        self.codes = torch.empty((B, H, 0, D * bits // 8), dtype=torch.uint8, device=device)
        self.scales = torch.empty((B, H, 0, self.G), dtype=scale_dtype, device=device)
        self.mins = torch.empty_like(self.scales)
        self.residual_length = residual_length
        self.res = [torch.empty((B, H, 0, D), dtype=dtype, device=device) for _ in range(2)]
        self.cur = 0

    def reserve(self, used: int, need: int, exact: bool = False) -> None:
        """Capacity for ``need`` quantized tokens, keeping the first ``used``."""
        cap = self.codes.shape[2]
        if need <= cap:
            return
        new_cap = need if exact else _round_up(max(need, cap + cap // 4, 64), 64)
        for name in ("codes", "scales", "mins"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:2], new_cap, old.shape[3]))
            new[:, :, :used] = old[:, :, :used]
            setattr(self, name, new)

    def reserve_window(self, used: int, need: int, exact: bool = False) -> None:
        """Capacity for ``need`` (at most ``residual_length``) exact tokens in both window
        buffers, keeping the first ``used`` of the current one."""
        cap = self.res[0].shape[2]
        if need <= cap:
            return
        new_cap = need if exact else min(self.residual_length, max(need, 2 * cap, 16))
        for j, old in enumerate(self.res):
            new = old.new_empty((*old.shape[:2], new_cap, old.shape[3]))
            if j == self.cur:
                new[:, :, :used] = old[:, :, :used]
            self.res[j] = new

    def select(self, fn) -> None:
        """Apply ``fn`` (an indexing of the batch axis) to every buffer."""
        self.codes, self.scales, self.mins = fn(self.codes), fn(self.scales), fn(self.mins)
        self.res = [fn(r) for r in self.res]

    def quantized(self, tq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The parts of the quantized tokens, contiguous: codes as the flat code stream of the
        tensor [B, H, tq, D] (each row is whole bytes), scales and mins [B, H, tq, G]."""
        return (
            self.codes[:, :, :tq].contiguous().reshape(-1),
            self.scales[:, :, :tq].contiguous(),
            self.mins[:, :, :tq].contiguous(),
        )

    def nbytes(self, tq: int, tokens: int) -> int:
        B, H = self.codes.shape[:2]
        per_q = self.codes.shape[3] + 2 * self.G * self.scales.element_size()
        per_exact = self.D * self.res[0].element_size()
        return B * H * (tq * per_q + (tokens - tq) * per_exact)

    def allocated(self) -> int:
        bufs = (self.codes, self.scales, self.mins, *self.res)
        return sum(b.numel() * b.element_size() for b in bufs)


def backend(device: torch.device) -> str:
    """Which implementation updates a cache on ``device``: "triton", "rust" or "torch"."""
    if device.type == "cuda" and HAVE_TRITON:
        return "triton"
    return "rust" if device.type == "cpu" else "torch"


def _update_store(store: _Store, new, out, t_old: int, tq_old: int, tq_new: int) -> None:
    """Fill ``out`` with the decoded tokens, the window and ``new``; quantize the rows
    ``[tq_old, tq_new)``; write the next window into the other window buffer."""
    res_in, res_out = store.res[store.cur], store.res[1 - store.cur]
    kind = backend(out.device)
    if kind == "triton":
        from .kernels.kv import kv_update_triton

        kv_update_triton(
            out,
            store.codes,
            store.scales,
            store.mins,
            res_in,
            res_out,
            new,
            t_old,
            tq_old,
            tq_new,
            store.bits,
            store.group_size,
        )
        return
    B, H, T, D = out.shape
    bits, g = store.bits, store.group_size
    if tq_old:
        if kind == "rust":
            for b in range(B):
                for h in range(H):
                    dequantize_cpu(
                        store.codes[b, h, :tq_old].reshape(-1),
                        store.scales[b, h, :tq_old],
                        store.mins[b, h, :tq_old],
                        [tq_old, D],
                        "affine",
                        bits,
                        g,
                        1,
                        out.dtype,
                        out=out[b, h, :tq_old],
                    )
        else:
            codes, scales, mins = store.quantized(tq_old)
            shape = [B, H, tq_old, D]
            out[:, :, :tq_old] = dequantize_torch(
                codes, scales, mins, shape, "affine", bits, g, 3, out.dtype
            )
    out[:, :, tq_old:t_old] = res_in[:, :, : t_old - tq_old]
    out[:, :, t_old:] = new
    if tq_new > tq_old:
        x = out[:, :, tq_old:tq_new]
        if kind == "rust":
            enc = Affine(bits, g, axis=-1, scale_dtype=SCALE_DTYPES[store.scales.dtype])
            q = quantize(x, enc)
            codes = q.codes.view(B, H, tq_new - tq_old, -1)
            scales, mins = q.scales, q.mins
        else:
            codes, scales, mins = quantize_affine_torch(x, bits, g, store.scales.dtype)
        store.codes[:, :, tq_old:tq_new] = codes
        store.scales[:, :, tq_old:tq_new] = scales
        store.mins[:, :, tq_old:tq_new] = mins
    res_out[:, :, : T - tq_new] = out[:, :, tq_new:T]


class QuantizedKVLayer(CacheLayerMixin):
    """The cache of one attention layer (see the module docstring)."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(
        self,
        bits: int,
        group_size: int,
        residual_length: int,
        scale_dtype: torch.dtype,
        scratch: _Scratch,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.group_size = group_size
        self.residual_length = residual_length
        self.scale_dtype = scale_dtype
        self._scratch = scratch
        self.tokens = 0  # tokens held
        self.quantized_tokens = 0  # of which quantized: max(0, tokens - residual_length)
        self.shape: tuple[int, int, int, int] | None = None  # B, H, D of keys, D of values
        self.dtype: torch.dtype | None = None
        self.k: _Store | None = None
        self.v: _Store | None = None

    def __repr__(self) -> str:
        return f"QuantizedKVLayer(bits={self.bits}, tokens={self.tokens})"

    # -- transformers' layer API ---------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        B, H, _, Dk = key_states.shape
        Dv = value_states.shape[-1]
        if key_states.dtype not in CACHE_DTYPES:
            raise ValueError(f"keys must be float16, bfloat16 or float32, not {key_states.dtype}")
        per = 8 // self.bits
        for what, D in (("keys", Dk), ("values", Dv)):
            if D % per:
                raise ValueError(
                    f"{what}: head_dim {D} is not a multiple of {per}: {self.bits}-bit rows "
                    "must fill whole bytes"
                )
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.shape = (B, H, Dk, Dv)
        args = (self.bits, self.group_size, self.scale_dtype, self.residual_length)
        self.k = _Store(B, H, Dk, self.dtype, self.device, *args)
        self.v = _Store(B, H, Dv, self.dtype, self.device, *args)
        self.is_initialized = True

    def check_states(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Refuse states that do not fit this cache (another model, batch or dtype)."""
        for what, t in (("keys", key_states), ("values", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{what} must be a 4-D tensor [batch, kv heads, tokens, head_dim]")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(
                f"keys {list(key_states.shape)} and values {list(value_states.shape)} disagree"
            )
        if self.shape is None:
            return
        B, H, Dk, Dv = self.shape
        got = (key_states.shape[0], key_states.shape[1], key_states.shape[3], value_states.shape[3])
        if got != self.shape or key_states.dtype != self.dtype or value_states.dtype != self.dtype:
            raise ValueError(
                "these keys and values do not fit this KV cache: it holds batch "
                f"{B}, {H} kv heads, head_dim {Dk}/{Dv} (keys/values), {self.dtype}; the model "
                f"gives batch {got[0]}, {got[1]} kv heads, head_dim {got[2]}/{got[3]}, "
                f"{key_states.dtype} (a cache made with another model or batch?)"
            )
        if key_states.device != self.device or value_states.device != self.device:
            raise ValueError(f"the cache is on {self.device}, the states on {key_states.device}")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_states(key_states, value_states)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.k is not None and self.v is not None and self.shape is not None
        B, H, Dk, Dv = self.shape
        n = key_states.shape[2]
        t_old, tq_old = self.tokens, self.quantized_tokens
        T = t_old + n
        tq_new = max(0, T - self.residual_length)
        outs = []
        for store, new, name, D in ((self.k, key_states, "k", Dk), (self.v, value_states, "v", Dv)):
            out = self._scratch.get(name, (B, H, T, D), self.dtype, self.device)
            store.reserve(tq_old, tq_new)
            store.reserve_window(t_old - tq_old, T - tq_new)
            _update_store(store, new, out, t_old, tq_old, tq_new)
            outs.append(out)
        # committed only once both stores are written (the windows they read are untouched)
        self.k.cur = self.v.cur = 1 - self.k.cur
        self.tokens, self.quantized_tokens = T, tq_new
        return outs[0], outs[1]

    def get_mask_sizes(self, query_length: Any) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.tokens + int(query_length), 0

    def get_seq_length(self, *args: Any) -> int:
        return self.tokens

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:
        return -1

    def reset(self) -> None:
        self.tokens = self.quantized_tokens = 0
        self.k = self.v = None
        self.shape = self.dtype = None
        self.is_initialized = False

    def offload(self) -> None:  # kept on its device: it is already small
        pass

    def prefetch(self) -> None:
        pass

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove == 0:
            return
        raise NotImplementedError(
            "QuantizedKVCache cannot drop tokens (quantized tokens have lost their exact "
            "values): assisted generation and other rollbacks need an unquantized cache"
        )

    def _select(self, fn) -> None:
        if self.k is not None and self.v is not None and self.shape is not None:
            self.k.select(fn)
            self.v.select(fn)
            B = self.k.codes.shape[0]
            self.shape = (B, *self.shape[1:])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._select(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._select(lambda t: t[indices.to(t.device) if torch.is_tensor(indices) else indices])

    # -- qtensors ------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        if self.k is None or self.v is None:
            return 0
        tq, t = self.quantized_tokens, self.tokens
        return self.k.nbytes(tq, t) + self.v.nbytes(tq, t)

    @property
    def allocated_nbytes(self) -> int:
        if self.k is None or self.v is None:
            return 0
        return self.k.allocated() + self.v.allocated()

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values as attention sees them (a new pair of tensors)."""
        if self.k is None or self.v is None or self.shape is None:
            raise ValueError("this layer holds no tokens yet")
        B, H, Dk, Dv = self.shape
        with torch.no_grad():
            k, v = self.update(
                torch.empty((B, H, 0, Dk), dtype=self.dtype, device=self.device),
                torch.empty((B, H, 0, Dv), dtype=self.dtype, device=self.device),
            )
            return k.clone(), v.clone()


class QuantizedKVCache(Cache):
    """A transformers ``Cache`` whose keys and values are group-quantized (see the module
    docstring). ``bits`` 2, 4 or 8; ``group_size`` elements of the head dimension share a scale
    and a minimum (``scale_dtype``); the ``residual_length`` most recent tokens stay exact.
    ``config`` (optional, the model's) is recorded by ``save_kv_cache`` and checked by
    ``load_kv_cache``."""

    def __init__(
        self,
        bits: int = 4,
        group_size: int = 64,
        residual_length: int = 128,
        scale_dtype: torch.dtype = torch.float16,
        config: Any = None,
    ) -> None:
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, not {bits!r}")
        if not isinstance(group_size, int) or group_size < 1 or group_size % (8 // bits):
            raise ValueError(
                f"group_size must be a positive multiple of {8 // bits} at {bits} bits (groups "
                f"of whole bytes), not {group_size!r}"
            )
        if not isinstance(residual_length, int) or residual_length < 0:
            raise ValueError(f"residual_length must be an int >= 0, not {residual_length!r}")
        if scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {list(SCALE_DTYPES)}, not {scale_dtype}")
        super().__init__(layers=[])
        self.bits = bits
        self.group_size = group_size
        self.residual_length = residual_length
        self.scale_dtype = scale_dtype
        self.config = config
        self._scratch = _Scratch()
        self._num_layers: int | None = None  # fixed when loaded from a file

    def __repr__(self) -> str:
        return (
            f"QuantizedKVCache(bits={self.bits}, group_size={self.group_size}, residual_length="
            f"{self.residual_length}, layers={len(self.layers)}, tokens={self.get_seq_length()})"
        )

    def new_layer(self) -> QuantizedKVLayer:
        return QuantizedKVLayer(
            self.bits, self.group_size, self.residual_length, self.scale_dtype, self._scratch
        )

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx >= len(self.layers):
            if self._num_layers is not None:
                raise ValueError(
                    f"this KV cache holds {self._num_layers} layers; the model asks for layer "
                    f"{layer_idx} (a cache made with another model?)"
                )
            while len(self.layers) <= layer_idx:
                self.layers.append(self.new_layer())
        return self.layers[layer_idx].update(key_states, value_states)

    @property
    def nbytes(self) -> int:
        """Bytes of the cached keys and values: codes, scales and mins of the quantized tokens
        and the exact window (the ``allocated_nbytes`` also count spare capacity, the second
        window buffer and the shared decode buffer)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def allocated_nbytes(self) -> int:
        return sum(layer.allocated_nbytes for layer in self.layers) + self._scratch.nbytes
