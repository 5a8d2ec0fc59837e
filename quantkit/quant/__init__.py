"""Quantization: GPTQ solver (gptq.py) and int32 bit packing, incl. the GPTQ checkpoint layout (pack.py)."""
