"""Model families described as data, and loading them from disk."""
