"""edgeft export: turn a merged model into edge artifacts (ONNX, GGUF), each verified against PyTorch.

One module per format, each with one public entry function that the CLI calls
(``export.onnx.export_onnx``, ``export.gguf.export_gguf``). Heavy back-ends are imported inside
those functions, so importing this package is cheap.
"""
