"""Export: a saved run in the formats engines load (sparse, compressed-tensors for vLLM); reading a saved run and
its integer codes back, which the GGUF export (``slimlm.gguf.export``) uses too."""
