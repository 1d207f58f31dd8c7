"""Shipping what a run trained: ``python -m finetune export`` and :func:`finetune.export`.

Owns the export formats and everything between a run directory and a checked artifact, one module a concern:

- :mod:`.export`: the formats, the order they run in, writing each beside its destination and renaming it into place
  only after its checks pass; recording the result in the run.
- :mod:`.plan`: what an export will do before it starts (formats, output sizes, disk needed and free, where the
  reference runs, expected time); a disk too small is refused here, before anything is written.
- :mod:`.merge`: the adapter folded into the base tensor by tensor (on the GPU when there is one), bf16 or MXFP4
  requantized, written in shards as it goes.
- :mod:`.weights`: a merged export's files read back, every adapted tensor held against the exact merge.
- :mod:`.parity`: probes, the trained model as reference, each artifact's consumers, comparisons and pass criteria.
- :mod:`.gguf`: llama.cpp's gpt-oss GGUF and GGUF LoRA, and llama.cpp runs for the checks.
- :mod:`.ollama`: the Ollama Modelfile (a Harmony template rendering what our renderer renders).

May import: ``inference`` public names, transformers, peft (parity only), safetensors, gguf / llama-cpp-python (the
``gguf`` extra, imported lazily), and ``finetune.recipe`` / ``finetune.data.prepare`` / ``finetune.track.tracking``
for the run it ships. The runtime pieces a check needs (loading, layer-streamed forward) live in ``inference``.
"""

from finetune.ship.export import FORMATS, MIN_EFFECT_KEPT, ExportFailed, ExportResult, export, vllm_rank_warning

__all__ = ["FORMATS", "MIN_EFFECT_KEPT", "ExportFailed", "ExportResult", "export", "vllm_rank_warning"]
