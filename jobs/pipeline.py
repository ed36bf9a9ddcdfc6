"""Ray job: extract -> cluster -> evaluate -> report (``actclust run`` on a preset).

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/presets/embedded_default.yaml
"""

import _common


def job() -> int:
    args = _common.parse(__doc__)
    return _common.run_command("run", _common.values(args, _common.SMOKE), args)


if __name__ == "__main__":
    _common.main(job)
