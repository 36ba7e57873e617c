"""Inference-time hooks: what a quantized model computes at inference besides its weights. Simulated KV-cache
quantization (``kvcache``), IntactKV's full-precision pivot cache (``intactkv``), and ``runtime``, which records
every hook of a run (these, and the online transforms and activation quantizers of ``slimlm.transforms``) and
puts them back on a reloaded model (``apply_runtime``)."""
