"""Ray job: precision/recall and masked perplexity of fitted centroids, or of a
training-free anchor (``anchor``, ``anchor_sparsity`` and ``masks`` in the config).

    ray job submit --working-dir . -- python jobs/evaluate.py --config my_eval.yaml
"""

import json

import _common

from actclust.config import EvaluateConfig
from actclust.evaluation.anchor_eval import run_anchor
from actclust.evaluation.evaluate import run_evaluate


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        paths = _common.smoke_inputs(with_centroids=True)
        smoke = dict(centroids=paths["centroids"], out=f"{paths['root']}/eval",
                     max_tokens=64 * 4)
    cfg = _common.build_from(EvaluateConfig, _common.values(args, smoke), args)
    if cfg.anchor is not None:
        report = run_anchor(cfg)
        keys = ("anchor", "anchor_sparsity", "dense_ppl", "anchor_ppl", "ffn_bytes_fraction")
    else:
        report = run_evaluate(cfg)
        keys = ("dense_ppl", "oracle_ppl", "cluster_ppl", "precision", "recall")
    print(json.dumps({k: report[k] for k in keys}))
    return 0


if __name__ == "__main__":
    _common.main(job)
