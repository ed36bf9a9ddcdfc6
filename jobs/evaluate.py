"""Ray job: precision/recall and masked perplexity of fitted centroids.

    ray job submit --working-dir . -- python jobs/evaluate.py --config my_eval.yaml
"""

import json

import _common

from actclust.config import EvaluateConfig, build
from actclust.evaluate import run_evaluate


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        import tempfile

        from actclust.cluster import run_cluster
        from actclust.config import ClusterConfig, ExtractConfig
        from actclust.extract import run_extract

        root = tempfile.mkdtemp(prefix="actclust-smoke-")
        run_extract(build(ExtractConfig, dict(model="tiny:opt", seq_len=64, max_tokens=64 * 32,
                                              out=f"{root}/masks")))
        run_cluster(build(ClusterConfig, dict(masks=f"{root}/masks", k=8, out=f"{root}/c")))
        smoke = dict(centroids=f"{root}/c", out=f"{root}/eval", max_tokens=64 * 4)
    data = _common.values(args, smoke)
    keys = set(EvaluateConfig.__dataclass_fields__)
    cfg = build(EvaluateConfig, {k: v for k, v in data.items() if k in keys},
                source=args.config or "arguments")
    report = run_evaluate(cfg)
    print(json.dumps({k: report[k] for k in ("dense_ppl", "oracle_ppl", "cluster_ppl",
                                             "precision", "recall")}))
    return 0


if __name__ == "__main__":
    _common.main(job)
