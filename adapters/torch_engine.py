"""Plain PyTorch / transformers: the engine every other one falls back to.

It serves the transformers model itself through the shared decode loop (``adapters.hf_decode``); loading,
streaming, the conversation cache and errors are the family's (``adapters.hf_engine``). Greedy outputs equal
``model.generate``'s.

torch and transformers are imported only inside methods.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

from adapters.base import Availability, Capabilities, ModelSpec
from adapters.cpu_linear import pack_linears
from adapters.hf_decode import TorchEncode, TorchForward
from adapters.hf_engine import Backend, HfEngine, HfParts

__all__ = ["TorchEngine"]

log = logging.getLogger(__name__)


class TorchEngine(HfEngine):
    """transformers ``AutoModelForCausalLM`` (generate) or ``AutoModel`` (embed: mean pooling + L2 norm).

    Settings (``TorchEngineConfig``): ``threads`` sets ``torch.set_num_threads`` (process-wide) at load;
    ``packed_linear`` (default on) runs the large float32 linear layers of a model on the CPU on oneDNN over weights
    packed at load (``adapters.cpu_linear``).
    Per-model options as for every engine of the family (``kv_cache``, ``inject_delay_s``; see ``HfEngine``).
    """

    name = "torch"
    capabilities = Capabilities(streaming=True, max_batch_size=32)

    @classmethod
    def available(cls, settings: Mapping[str, Any] | None = None) -> Availability:
        for mod in ("torch", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return Availability(False, f"{mod} is not installed: pip install 'muai[torch]'")
        return Availability(True)

    def _backend(self, parts: HfParts, spec: ModelSpec) -> Backend:
        if parts.device.type == "cpu" and self.settings.get("packed_linear", True):
            packed = pack_linears(parts.model)
            if packed:
                log.info("model %r: %d linear layers packed for oneDNN", spec.name, packed)
        if spec.task == "generate":
            return Backend(forward=TorchForward(parts.model), model=parts.model)
        return Backend(encode=TorchEncode(parts.model), model=parts.model)
