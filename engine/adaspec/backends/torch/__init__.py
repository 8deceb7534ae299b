"""CPU reference backend: the whole AdaSpec loop with transformers models (Qwen2/Llama).

`TorchBackend` implements `adaspec.backends.base.Backend`; `ModelRunner` is the ragged batched
forward over a slot KV cache that it (and the profiler) use.
"""

from adaspec.backends.torch.backend import AcceptanceOverride, TorchBackend
from adaspec.backends.torch.runner import ModelRunner

__all__ = ["AcceptanceOverride", "ModelRunner", "TorchBackend"]
