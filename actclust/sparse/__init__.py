"""Sparse execution: an FFN that computes only the neurons of a token's predicted centroid.

``layout``: the FFN weights laid out once per layer, neuron-major, with per-centroid slabs;
``ffn``: the torch module that replaces a model's FFN; ``generate``: generation with it.
"""
