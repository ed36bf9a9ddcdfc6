"""Clustering: the k-means loop, its datasets and seeding, the baselines, and the distributed driver."""
