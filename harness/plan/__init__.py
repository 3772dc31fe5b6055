"""Know before you run: predicted memory (weights, KV cache, activations), the placed split over
devices, visual-token arithmetic.

Rule: plan predicts from configs; it never runs a model or reads a measurement.
"""
