"""Export: a saved run in the formats engines load (sparse, compressed-tensors for vLLM, GGUF for llama.cpp)."""
