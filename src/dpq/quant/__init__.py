"""4-bit and 8-bit quantization: fake quantization and packing (fake), PTQ (ptq), QAT (qat), the packed
checkpoint (packed) and ONNX Runtime integer exports (onnx_quant)."""
