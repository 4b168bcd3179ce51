"""Linear layers on the CPU with their weights packed once, at load, for oneDNN (the torch engine's CPU fast path).

``torch.nn.functional.linear`` on the CPU is MKL's float32 GEMM over the weight as stored. On a model whose weights do
not fit in the caches (bench-llama: 84 matrices, 340 MB), every forward streams them from memory, and MKL does that
slowly for the few rows a decode step or a reused conversation turn has. oneDNN's linear over a weight reordered into
its blocked layout (``torch.ops.mkldnn._reorder_linear_weight``, what ``torch.compile`` uses on the CPU with frozen
weights) streams it near the memory's speed. Measured here (two threads, AVX-512, bench-llama's 84 matrices, median
of 20):

    rows   MKL (dense)   oneDNN (packed)
    1        24.0 ms        13.3 ms
    15       48.8 ms        18.0 ms
    424     423.0 ms       342.3 ms

and each row of a packed product equals bit for bit the same row of a product over more rows (1, 2, 15, 16 and 100
of 424 checked, one and two threads): a reused turn's new tokens compute exactly what recomputing the whole prompt
computes for them, so reuse and recompute give the same text. A call costs about 14 us more than MKL's, which on a
small matrix that stays in the cache is more than it saves (tiny-llama's 14 matrices, one row: 5 vs 19 us a call):
only matrices of at least ``MIN_WEIGHTS`` elements are packed, so the tiny models keep plain ``Linear``.

The packed weight replaces the dense one (no second copy is kept); a packed layer has no ``weight`` parameter, so
this is for serving only (no training, no export: the ONNX and DeepSpeed engines load their own model).
"""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["MIN_WEIGHTS", "pack_linears", "packing_available"]

MIN_WEIGHTS = 256 * 1024
"""Elements a weight needs (1 MB in float32) before packing pays: below, the matrix stays in the caches and the
per-call cost of oneDNN outweighs what its layout saves."""


def packing_available() -> bool:
    """Whether this torch build has oneDNN's packed linear (x86 and ARM builds with mkldnn do)."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    ops = torch.ops.mkldnn
    return hasattr(ops, "_linear_pointwise") and hasattr(ops, "_reorder_linear_weight")


@functools.cache
def _packed_linear_class() -> type:
    import torch

    class PackedLinear(torch.nn.Module):
        """``y = x W^T + b`` on oneDNN over ``W`` in its packed layout."""

        def __init__(self, linear: Any) -> None:
            super().__init__()
            self.in_features = linear.in_features
            self.out_features = linear.out_features
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous())
            self.register_buffer("packed_weight", packed, persistent=False)
            self.bias = None if linear.bias is None else torch.nn.Parameter(linear.bias.detach(), requires_grad=False)

        def forward(self, x: Any) -> Any:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed_weight, self.bias, "none", [], "")

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    return PackedLinear


def pack_linears(model: Any, *, min_weights: int | None = None) -> int:
    """Replace every float32 CPU ``torch.nn.Linear`` of ``model`` with at least ``min_weights`` (default
    ``MIN_WEIGHTS``) weights by a packed one, in place; returns how many were replaced (0 where the build has no
    oneDNN)."""
    import torch

    if min_weights is None:
        min_weights = MIN_WEIGHTS
    if not packing_available():
        return 0
    packed_linear = _packed_linear_class()
    # A weight tied to another module (an output layer sharing the embeddings) stays: packing would leave that
    # module a second copy.
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    targets = []
    for module in model.modules():
        for child_name, child in module.named_children():
            if (type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
                    and child.weight.device.type == "cpu" and child.weight.numel() >= min_weights
                    and uses.get(id(child.weight), 0) == 1):
                targets.append((module, child_name, child))
    for parent, child_name, child in targets:
        setattr(parent, child_name, packed_linear(child))
    return len(targets)
