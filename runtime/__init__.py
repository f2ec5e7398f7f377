"""edgeft runtime: load exported artifacts, generate, and measure latency and accuracy.

Importable without torch: an edge device may have only onnxruntime and llama.cpp. The
PyTorch back-ends import torch when they are used.
"""
