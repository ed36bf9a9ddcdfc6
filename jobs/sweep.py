"""Ray job: Ray Tune sweep over K, the objective (theta or density) and the algorithm on one extraction.

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/presets/sweep_default.yaml
"""

import _common

from actclust.orchestration.sweep import run_sweep


def job() -> int:
    args = _common.parse(__doc__)
    data = _common.values(args, _common.SMOKE)
    print(run_sweep(data, source=args.config or "arguments"))
    return 0


if __name__ == "__main__":
    _common.main(job)
