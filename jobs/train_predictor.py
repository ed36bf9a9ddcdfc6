"""Ray job: train a cluster-id (or neuron) predictor with Ray Train, then evaluate it.

    ray job submit --working-dir . -- python jobs/train_predictor.py --config my_predictor.yaml

The YAML holds train-predictor's keys (centroids, out, kind, rank, epochs, workers, ...).
"""

import json

import _common

from actclust.config import PredictorConfig
from actclust.predict.train import run_train_predictor


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        paths = _common.smoke_inputs(with_centroids=True)
        smoke = dict(centroids=paths["centroids"], out=f"{paths['root']}/predictor", epochs=2,
                     workers=2)
    cfg = _common.build_from(PredictorConfig, _common.values(args, smoke), args)
    record = run_train_predictor(cfg)
    print(json.dumps({k: record[k] for k in ("kind", "rank", "params_fraction",
                                             "training_tokens", "train_seconds")}))
    return 0


if __name__ == "__main__":
    _common.main(job)
