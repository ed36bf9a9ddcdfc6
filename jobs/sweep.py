"""Ray job: Ray Tune sweep over K, the objective (theta or density) and the algorithm on
one extraction (``actclust sweep`` on a preset).

    ray job submit --working-dir . -- python jobs/sweep.py --config jobs/presets/sweep_default.yaml
"""

import _common


def job() -> int:
    args = _common.parse(__doc__)
    return _common.run_command("sweep", _common.values(args, _common.SMOKE), args)


if __name__ == "__main__":
    _common.main(job)
