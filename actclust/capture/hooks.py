"""Mask capture: the pure threshold function and the hooks that read or mask `a`.

Hooks are registered inside context managers that always remove them.
Site ``intermediate`` reads the *input* of the FFN output projection (the `a`
of docs/method.md); ``gate``, ``up`` and ``down_out`` read the *output* of the
named projection (the paper artifact's sites).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np

from actclust.devices import model_input, to_host
from actclust.io.models import ffn_sites


def mask_of(a, tau):
    """``|a| > tau`` as a bool tensor; ``tau`` a float or a tensor broadcastable to ``a``."""
    return a.abs() > tau


def _reads_input(site: str) -> bool:
    return site == "intermediate"


@contextlib.contextmanager
def captured(model, site: str = "intermediate") -> Iterator[list]:
    """Yield a list that collects, per forward pass, one (..., width) tensor per layer.

    ``out[l]`` holds the latest activation of layer ``l`` (overwritten each pass).
    """
    with captured_modules(ffn_sites(model, site), reads_input=_reads_input(site)) as out:
        yield out


@contextlib.contextmanager
def captured_modules(modules: list, reads_input: bool) -> Iterator[list]:
    """Yield a list whose entry ``i`` is the latest input (``reads_input``) or output of
    ``modules[i]``; the hooks are always removed."""
    out: list = [None] * len(modules)
    handles = []
    for index, module in enumerate(modules):
        if reads_input:
            def hook(mod, args, index=index):
                out[index] = args[0].detach()
            handles.append(module.register_forward_pre_hook(hook))
        else:
            def hook(mod, args, output, index=index):
                out[index] = output.detach()
            handles.append(module.register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


MaskFn = Callable[[int, "object"], "object"]


@contextlib.contextmanager
def masking(model, mask_fn: MaskFn, site: str = "intermediate") -> Iterator[None]:
    """Replace each layer's site activation ``a`` by ``a * mask_fn(layer, a)``.

    ``mask_fn`` returns a tensor broadcastable to ``a`` (bool or 0/1), or None to
    leave that layer unmasked.
    """
    modules = ffn_sites(model, site)
    handles = []
    for index, module in enumerate(modules):
        if _reads_input(site):
            def hook(mod, args, index=index):
                mask = mask_fn(index, args[0])
                if mask is None:
                    return None
                return (args[0] * mask.to(args[0].dtype),) + tuple(args[1:])
            handles.append(module.register_forward_pre_hook(hook))
        else:
            def hook(mod, args, output, index=index):
                mask = mask_fn(index, output)
                return None if mask is None else output * mask.to(output.dtype)
            handles.append(module.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def per_layer_on_host(model, ids: np.ndarray, site: str, batch_windows: int,
                      transform: Callable) -> list[list[np.ndarray]]:
    """Forward ``ids`` (W, T) a batch of windows at a time on the model's device;
    ``transform(layer, a)`` of each layer's activation, brought to the host, one
    list of batches per layer."""
    return per_site_on_host(model, ids, [site], batch_windows,
                            lambda site, layer, a: transform(layer, a))[site]


def per_site_on_host(model, ids: np.ndarray, sites: list[str], batch_windows: int,
                     transform: Callable) -> dict[str, list[list[np.ndarray]]]:
    """Like :func:`per_layer_on_host` for several sites read in the *same* forward passes:
    ``{site: per layer, a list of batches of transform(site, layer, a)}``."""
    import torch

    per_site: dict[str, list[list[np.ndarray]]] = {site: [] for site in sites}
    with contextlib.ExitStack() as stack, torch.inference_mode():
        acts = {site: stack.enter_context(captured(model, site)) for site in sites}
        for start in range(0, len(ids), batch_windows):
            model(model_input(model, ids[start:start + batch_windows]))
            for site in sites:
                if not per_site[site]:
                    per_site[site] = [[] for _ in acts[site]]
                for layer, a in enumerate(acts[site]):
                    per_site[site][layer].append(to_host(transform(site, layer, a)))
    return per_site


def calibrate_thresholds(model, ids: np.ndarray, sparsity: float, site: str = "intermediate",
                         batch_windows: int = 4) -> list[float]:
    """Per-layer ``tau_l``: the ``sparsity``-quantile of ``|a|`` over the tokens of ``ids``."""
    return calibrate_site_thresholds(model, ids, sparsity, [site], batch_windows)[site]


def calibrate_site_thresholds(model, ids: np.ndarray, sparsity: float, sites: list[str],
                              batch_windows: int = 4) -> dict[str, list[float]]:
    """Per-site, per-layer ``tau``, each the ``sparsity``-quantile of that site's ``|a|``,
    all from the same forward passes."""
    per_site = per_site_on_host(model, ids, sites, batch_windows,
                                lambda site, layer, a: a.abs().reshape(-1).float())
    return {site: [float(np.quantile(np.concatenate(chunks), sparsity)) for chunks in per_layer]
            for site, per_layer in per_site.items()}


def layer_masks(model, ids: np.ndarray, thresholds: list[float], site: str = "intermediate",
                batch_windows: int = 4) -> list[np.ndarray]:
    """Bool masks of every layer for windows ``ids`` (W, T): a list of (W*T, width) arrays."""
    return site_masks(model, ids, {site: thresholds}, batch_windows)[site]


def site_masks(model, ids: np.ndarray, thresholds: dict[str, list[float]],
               batch_windows: int = 4) -> dict[str, list[np.ndarray]]:
    """Bool masks of every site in ``thresholds`` and every layer, from the same forward
    passes: ``{site: [(W*T, width) per layer]}``."""
    per_site = per_site_on_host(model, ids, list(thresholds), batch_windows,
                                lambda site, layer, a: mask_of(a, thresholds[site][layer])
                                .reshape(-1, a.shape[-1]))
    return {site: [np.concatenate(chunks) for chunks in per_layer]
            for site, per_layer in per_site.items()}
