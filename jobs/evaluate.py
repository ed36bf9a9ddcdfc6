"""Ray job: precision/recall and masked perplexity of fitted centroids, or of a
training-free anchor (``anchor``, ``anchor_sparsity`` and ``masks`` in the config):
``actclust evaluate`` on a preset.

    ray job submit --working-dir . -- python jobs/evaluate.py --config my_eval.yaml
"""

import _common


def job() -> int:
    args = _common.parse(__doc__)
    smoke = {}
    if args.smoke_test:
        paths = _common.smoke_inputs(with_centroids=True)
        smoke = dict(centroids=paths["centroids"], out=f"{paths['root']}/eval",
                     max_tokens=64 * 4)
    return _common.run_command("evaluate", _common.values(args, smoke), args)


if __name__ == "__main__":
    _common.main(job)
