"""Ray job: record FFN activation masks to Parquet.

    ray job submit --working-dir . -- python jobs/extract.py --config jobs/presets/embedded_default.yaml --out /shared/masks
"""

import _common

from actclust.config import ExtractConfig, build
from actclust.extract import run_extract

SMOKE = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=64, max_tokens=64 * 32, workers=1)


def job() -> int:
    args = _common.parse(__doc__)
    data = _common.values(args, SMOKE)
    keys = {f for f in ExtractConfig.__dataclass_fields__}
    cfg = build(ExtractConfig, {k: v for k, v in data.items() if k in keys},
                source=args.config or "arguments")
    manifest = run_extract(cfg)
    print(f"{cfg.out}: {len(manifest['layers'])} layers x {manifest['tokens']} tokens")
    return 0


if __name__ == "__main__":
    _common.main(job)
