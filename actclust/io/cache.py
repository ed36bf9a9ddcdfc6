"""Where actclust caches what it makes once: dequantised models, fetched GGUFs, fonts."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$ACTCLUST_CACHE``, else ``$XDG_CACHE_HOME/actclust`` (``~/.cache/actclust``)."""
    root = os.environ.get("ACTCLUST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "actclust")
    return Path(root)
