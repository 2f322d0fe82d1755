"""ONNX files for ONNX Runtime on the CPU: the fp32 export (export), dynamic int8 (int8), real 4-bit from dpq's
own codes (int4), the same codes on int8 kernels (int4_int8), and running them (runtime)."""
