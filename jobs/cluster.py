"""Ray job: distributed Hamming k-means of a mask directory.

    ray job submit --working-dir . -- python jobs/cluster.py --config my_cluster.yaml
"""

import _common

from actclust.cluster import run_cluster
from actclust.config import ClusterConfig, build


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        from actclust.config import ExtractConfig
        from actclust.extract import run_extract
        import tempfile

        root = tempfile.mkdtemp(prefix="actclust-smoke-")
        run_extract(build(ExtractConfig, dict(model="tiny:opt", seq_len=64, max_tokens=64 * 32,
                                              out=f"{root}/masks")))
        smoke = dict(masks=f"{root}/masks", out=f"{root}/clusters", k=8, workers=2)
    data = _common.values(args, smoke)
    keys = set(ClusterConfig.__dataclass_fields__)
    cfg = build(ClusterConfig, {k: v for k, v in data.items() if k in keys},
                source=args.config or "arguments")
    meta = run_cluster(cfg)
    print(f"{cfg.out}: K={meta['k']} mean Hamming cost {meta['mean_cost']:.2f}")
    return 0


if __name__ == "__main__":
    _common.main(job)
