"""What TPU-MLIR does to weights: its chips, its formats and its exact round-to-nearest."""
