"""Compress by quantization: grids, RTN, GPTQ, Hadamard rotations (QuaRot), packed storage."""
