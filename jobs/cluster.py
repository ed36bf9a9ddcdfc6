"""Ray job: distributed Hamming k-means of a mask directory.

    ray job submit --working-dir . -- python jobs/cluster.py --config my_cluster.yaml
"""

import _common

from actclust.clustering.distributed import run_cluster
from actclust.config import ClusterConfig


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        paths = _common.smoke_inputs(with_centroids=False)
        smoke = dict(masks=paths["masks"], out=f"{paths['root']}/clusters", k=8, workers=2)
    cfg = _common.build_from(ClusterConfig, _common.values(args, smoke), args)
    meta = run_cluster(cfg)
    print(f"{cfg.out}: K={meta['k']} mean Hamming cost {meta['mean_cost']:.2f}")
    return 0


if __name__ == "__main__":
    _common.main(job)
