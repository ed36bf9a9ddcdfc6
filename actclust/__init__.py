"""actclust: activation-sparsity masks, Hamming k-means clustering, masked perplexity."""
__version__ = "0.1.0"
