"""What a model is: the four Qwen-VL families, tiny and true-size checkpoint folders, the shipped
architectures and their seeded weights.

Rule: models knows nothing of matrices, cells or runs; it imports only harness.errors.
"""
