"""Quantized models out of qlab: GGUF (llama.cpp) and safetensors writers and readers."""
