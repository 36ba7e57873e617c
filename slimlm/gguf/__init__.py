"""GGUF, llama.cpp's file format, in one place.

``types``: llama.cpp's weight types as grids and their scale search (fit, decode); ``blocks``: their byte layouts
(the one encoder of every type); ``mixes``: llama-quantize's named per-tensor mixes (Q4_K_M, ...); ``sizing``: our
own mixes fitted to a size; ``writer``, ``tokenizer`` and ``metadata``: writing a file (hyperparameters,
tokenizer, tensors) and reading its header back; ``quantize``: any loaded model quantized onto llama.cpp's types
(``slimlm.to_gguf``); ``export``: a saved run written as GGUF through the same encoder.

Kept empty of imports: ``quant.gptq`` reads ``gguf.types`` while ``gguf.quantize`` runs GPTQ.
"""
