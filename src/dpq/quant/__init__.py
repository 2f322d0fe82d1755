"""4-bit and 8-bit quantization: fake quantization and packing (fake), PTQ (ptq), QAT (qat), the packed
checkpoint (packed) and ONNX files are in dpq.onnx."""

from . import ptq  # noqa: E402, F401  (registers the post-training methods rtn and gptq)
