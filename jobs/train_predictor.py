"""Ray job: train a cluster-id (or neuron) predictor with Ray Train
(``actclust train-predictor`` on a preset).

    ray job submit --working-dir . -- python jobs/train_predictor.py --config my_predictor.yaml

The YAML holds train-predictor's keys (centroids, out, kind, rank, epochs, workers, ...).
"""

import _common


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        paths = _common.smoke_inputs(with_centroids=True)
        smoke = dict(centroids=paths["centroids"], out=f"{paths['root']}/predictor", epochs=2,
                     workers=2)
    return _common.run_command("train-predictor", _common.values(args, smoke), args)


if __name__ == "__main__":
    _common.main(job)
