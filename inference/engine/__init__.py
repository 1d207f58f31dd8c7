"""The engine: generation for many sequences at once over one loaded model.

Owns the Python API (:mod:`.api`: :class:`Engine`, its requests, deltas and errors), continuous batching
(:mod:`.scheduler`), the KV memory of many sequences (:mod:`.cache`), batched forward steps and their CUDA graphs
(:mod:`.batch`) and token choice (:mod:`.sampling`). May import ``inference`` modules below it (runtime, kernels,
harmony, conversations, errors) and torch; never the HTTP layer or ``finetune``.
"""

from inference.engine.api import BadParameter, Completion, Delta, Engine, PromptTooLong, SamplingParams, UnknownModel
from inference.engine.scheduler import Overloaded, QueueTimeout, TooLarge

__all__ = ["BadParameter", "Completion", "Delta", "Engine", "Overloaded", "PromptTooLong", "QueueTimeout",
           "SamplingParams", "TooLarge", "UnknownModel"]
