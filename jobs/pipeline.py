"""Ray job: extract -> cluster -> evaluate -> report.

    ray job submit --working-dir . -- python jobs/pipeline.py --config jobs/presets/embedded_default.yaml
"""

import _common

from actclust.config import build
from actclust.orchestration.pipeline import run_pipeline
from actclust.orchestration.runconfig import RunConfig


def job() -> int:
    args = _common.parse(__doc__)
    cfg = build(RunConfig, _common.values(args, _common.SMOKE), source=args.config or "arguments")
    print(run_pipeline(cfg))
    return 0


if __name__ == "__main__":
    _common.main(job)
