"""Writing results: the output folder, Hugging Face folders for TPU-MLIR."""
