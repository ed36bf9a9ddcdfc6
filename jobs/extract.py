"""Ray job: record FFN activation masks to Parquet (``actclust extract`` on a preset).

    ray job submit --working-dir . -- python jobs/extract.py --config jobs/presets/embedded_default.yaml --out /shared/masks
"""

import _common

SMOKE = dict(model="tiny:opt", corpus="embedded:pydoc", seq_len=64, max_tokens=64 * 32, workers=1)


def job() -> int:
    args = _common.parse(__doc__)
    return _common.run_command("extract", _common.values(args, SMOKE), args)


if __name__ == "__main__":
    _common.main(job)
