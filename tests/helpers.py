"""Assertions shared by test modules (fixtures stay in conftest.py)."""


def assert_same_layers(a: dict, b: dict) -> None:
    """Two {layer: pyarrow.Table} maps hold the same, non-empty set of layers, each equal."""
    assert a, "no layers to compare"
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for layer in a:
        assert a[layer].equals(b[layer]), f"layer {layer} differs"
