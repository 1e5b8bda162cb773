"""dllm kernels: one op per file, each a Triton kernel + launcher + `*_ref` torch reference.

Importing this package needs neither a GPU nor triton; the `*_ref` functions always work.
The Triton ops run on CUDA, or on CPU under TRITON_INTERPRET=1 (see `triton_available`).
"""

from .paged_attention import paged_decode_attention, paged_decode_attention_ref
from .rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref
from .rope import rope, rope_cache, rope_ref, rope_store_kv, rope_store_kv_ref
from .swiglu import swiglu, swiglu_ref
from .tree_attention import pack_masks, tree_attention, tree_attention_ref
from .utils import HAS_TRITON, interpret_mode, triton_available
from .w4a16_matmul import (
    W4Packed, dequantize_w4_ref, new_locks, quantize_w4, unpack_w4_ref, w4a16_matmul, w4a16_matmul_ref,
)

__all__ = [
    "HAS_TRITON", "interpret_mode", "triton_available",
    "rmsnorm", "rmsnorm_ref", "add_rmsnorm", "add_rmsnorm_ref",
    "rope", "rope_ref", "rope_cache", "rope_store_kv", "rope_store_kv_ref",
    "swiglu", "swiglu_ref",
    "paged_decode_attention", "paged_decode_attention_ref",
    "tree_attention", "tree_attention_ref", "pack_masks",
    "W4Packed", "quantize_w4", "unpack_w4_ref", "dequantize_w4_ref", "w4a16_matmul", "w4a16_matmul_ref",
    "new_locks",
]
