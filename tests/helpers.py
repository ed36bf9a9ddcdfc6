"""Assertions shared by test modules (fixtures stay in conftest.py)."""

import re
from pathlib import Path

FORMATS = Path(__file__).resolve().parent.parent / "docs" / "formats.md"


def assert_same_layers(a: dict, b: dict) -> None:
    """Two {layer: pyarrow.Table} maps hold the same, non-empty set of layers, each equal."""
    assert a, "no layers to compare"
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for layer in a:
        assert a[layer].equals(b[layer]), f"layer {layer} differs"


def undocumented_fields(record: dict, prefixes: tuple = ()) -> list[str]:
    """Keys of ``record`` that docs/formats.md never names in backticks.

    A key that is one of ``prefixes`` followed by a documented name counts as documented
    (results rows carry the neuron predictor's figures as ``neuron_<field>``).
    """
    named = set(re.findall(r"`([a-z_0-9]+)", FORMATS.read_text(encoding="utf-8")))
    return [key for key in record if key not in named
            and not any(key.startswith(p) and key[len(p):] in named for p in prefixes)]
