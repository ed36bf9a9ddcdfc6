"""Ray job: record FFN activation masks to Parquet.

    ray job submit --working-dir . -- python jobs/extract.py --config jobs/presets/embedded_default.yaml --out /shared/masks
"""

import _common

from actclust.config import ExtractConfig
from actclust.capture.extract import run_extract

SMOKE = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=64, max_tokens=64 * 32, workers=1)


def job() -> int:
    args = _common.parse(__doc__)
    cfg = _common.build_from(ExtractConfig, _common.values(args, SMOKE), args)
    manifest = run_extract(cfg)
    print(f"{cfg.out}: {len(manifest['layers'])} layers x {manifest['tokens']} tokens")
    return 0


if __name__ == "__main__":
    _common.main(job)
