"""One training run: assembling it, its state, checkpoints and resume, the run dir and its
metric trackers, validation, the exported student (HF, ONNX) and the loop (`train`)."""
