"""Evaluation: token perplexity with the GPTQ protocol."""
