"""The Python API's name for Hamming k-means (docs/method.md): ``actclust.kmeans.fit``.

The loop lives in :mod:`actclust.clustering.kmeans`, its datasets in
:mod:`actclust.clustering.datasets`; this module re-exports them.
"""
from actclust.clustering.datasets import ArrayDataset, MaskDataset, ParquetDataset  # noqa: F401
from actclust.clustering.kmeans import (INITS, STATE_FORMAT, KMeansResult, fit,  # noqa: F401
                                        local_allreduce)
