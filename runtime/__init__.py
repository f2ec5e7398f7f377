"""edgeft runtime: load exported artifacts, generate, and measure latency and accuracy.

Importable without torch: an edge device may have only onnxruntime and llama.cpp. The
PyTorch back-ends import torch when they are used.

Modules, from pure to I/O:

- ``metrics``: agreement of next-token distributions, perplexity (numpy);
- ``thresholds``: the accuracy bars per precision class (data and logic);
- ``latency``: one timed generation, and median/spread/percentile summaries;
- ``weights``: bytes of weights per artifact from file headers (GGUF, ONNX, safetensors);
- ``machine``: CPU, cores, load, versions, memory bandwidth;
- ``artifacts``: what a path is (adapter, merged, ONNX, GGUF), its precision and size;
- ``backends``: one generation interface over PyTorch, ONNX Runtime and llama.cpp;
- ``worker``: one artifact benchmarked in its own process (``python -m runtime.worker``);
- ``bench``: ``run_bench``, the ``edgeft bench`` pipeline; ``report``: its files and table;
- ``cli_bench``: the Click command (``bench_cmd``).
"""
