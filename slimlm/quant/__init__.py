"""Compress by quantization: uniform integer grids (``grids``), RTN and GPTQ (``rtn``, ``gptq``, also onto
llama.cpp's grids), the quantizers by name (``methods``) and packed storage (``packing``). Outlier transforms
and rotations live in ``slimlm.transforms``, inference-time hooks in ``slimlm.hooks``, llama.cpp's types in
``slimlm.gguf``."""
