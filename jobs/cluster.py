"""Ray job: distributed Hamming k-means of a mask directory (``actclust cluster`` on a preset).

    ray job submit --working-dir . -- python jobs/cluster.py --config my_cluster.yaml
"""

import _common


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        paths = _common.smoke_inputs(with_centroids=False)
        smoke = dict(masks=paths["masks"], out=f"{paths['root']}/clusters", k=8, workers=2)
    return _common.run_command("cluster", _common.values(args, smoke), args)


if __name__ == "__main__":
    _common.main(job)
