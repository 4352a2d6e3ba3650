"""The numerical cores of the methods: tensors in, tensors out, no model knowledge."""
