"""Typed, validated configuration for every command.

A config is a dataclass; the stage configs (extract, cluster, evaluate) are
frozen, and what travels to the clustering actors is a frozen
:class:`FitSpec`. Values come from an optional YAML file and are then
overridden by command-line flags; unknown keys and wrong types are errors that
name the key and the file, raised as :class:`UserError` at load time.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional

from actclust.errors import UserError
from actclust.kernels.rules import DEFAULT_THETA, valid_fraction, valid_k

DEFAULT_MODEL = "embedded:smollm2-135m"
DEFAULT_CORPUS = "embedded:pydoc"
SITES = ("intermediate", "gate", "up", "down_out")
SPLITS = ("train", "heldout", "all")
BACKENDS = ("auto", "numpy", "torch", "cupy")
ALGORITHMS = ("hamming-kmeans", "brb-kmeans", "activation-aware")
MASK_MODES = ("replace", "and")
# mass-bits at a new density: every centroid of a layer alike, or its fitted count scaled.
BIT_COUNTS = ("equal", "fitted")
# How a neuron predictor turns logits into a mask: its per-layer logit threshold, or per
# token the top round(d * width) neurons, d the clustering's density on the training tokens.
NEURON_SELECT = ("threshold", "topk")
# Training-free FFN sparsity evaluated beside the clustering (actclust.evaluation.anchors).
ANCHORS = ("teal", "cats", "wina")
# How an anchor's sparsity is spread over layers (greedy: teal only).
ANCHOR_ALLOCATIONS = ("uniform", "greedy")
LAYOUTS = ("auto", "slab", "gather")  # sparse FFN weight layouts
DEFAULT_SLAB_BUDGET_MB = 1024.0


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """What text to read and how to cut it into windows."""

    model: str = DEFAULT_MODEL
    corpus: str = DEFAULT_CORPUS
    text_column: str = "text"
    seq_len: int = 256
    max_tokens: Optional[int] = None
    heldout_every: int = 10
    trust_remote_code: bool = False

    def validate(self) -> None:
        if self.seq_len < 2:
            raise UserError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.max_tokens is not None and self.max_tokens < self.seq_len:
            raise UserError(
                f"max_tokens ({self.max_tokens}) is smaller than one window "
                f"(seq_len {self.seq_len}); raise --max-tokens or lower --seq-len"
            )
        if self.heldout_every < 2:
            raise UserError(f"heldout_every must be at least 2, got {self.heldout_every}")


@dataclasses.dataclass(frozen=True)
class ExtractConfig(CorpusConfig):
    # What a mask directory was made from: a rerun with other values is refused.
    IDENTITY: typing.ClassVar[tuple] = (
        "model", "corpus", "text_column", "seq_len", "sites", "split", "heldout_every",
        "max_tokens", "sparsity", "threshold", "shard_windows", "calibration_windows")

    out: Optional[str] = None
    sparsity: Optional[float] = None
    threshold: Optional[float] = None
    sites: "list | str" = "intermediate"  # one site, or several: "gate,up,down_out"
    split: str = "train"
    workers: int = 1
    shard_windows: int = 16
    batch_windows: int = 4
    calibration_windows: int = 8

    def validate(self) -> None:
        super().validate()
        _require(self.out, "out", "--out DIR")
        if self.sparsity is not None and self.threshold is not None:
            raise UserError("give either --sparsity or --threshold, not both")
        if self.sparsity is not None and not 0.0 < self.sparsity < 1.0:
            raise UserError(f"sparsity must be in (0, 1), got {self.sparsity}")
        if self.threshold is not None and self.threshold < 0:
            raise UserError(f"threshold must be >= 0, got {self.threshold}")
        # Canonical form (part of the identity): "gate" for one site, "gate,up" for several.
        object.__setattr__(self, "sites", ",".join(parse_sites(self.sites)))
        _choice(self.split, SPLITS, "split")
        _positive(self.workers, "workers")
        _positive(self.shard_windows, "shard_windows")
        _positive(self.batch_windows, "batch_windows")
        _positive(self.calibration_windows, "calibration_windows")


@dataclasses.dataclass(frozen=True)
class FitSpec:
    """What a clustering worker needs to fit a layer: the typed, frozen part of a
    :class:`ClusterConfig` that travels to the actors."""

    k: int
    theta: Optional[float]
    seed: int
    init: str
    batch_size: Optional[int]
    max_iter: int
    tol: float
    backend: str
    algorithm: str
    memory_budget_mb: Optional[float]
    pool_rows: int = 200_000  # rows kept when --pool-layers pools every layer's masks
    density: Optional[float] = None  # fixed-budget centroids instead of theta


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    # What a clustering directory was fitted with (with the masks' digest).
    IDENTITY: typing.ClassVar[tuple] = ("k", "theta", "density", "seed", "algorithm", "init",
                                        "batch_size", "max_iter", "tol", "pool_layers")

    masks: Optional[str] = None
    out: Optional[str] = None
    k: Optional[int] = None
    theta: Optional[float] = None  # DEFAULT_THETA unless density is given
    density: Optional[float] = None
    seed: int = 0
    workers: int = 1
    backend: str = "auto"
    algorithm: str = "hamming-kmeans"
    init: str = "k-means++"
    batch_size: Optional[int] = None
    max_iter: int = 30
    tol: float = 1e-3
    layers: Optional[list] = None
    pool_layers: bool = False
    verify: bool = True
    memory_budget_mb: Optional[float] = 4096.0  # per worker; a larger share streams from Parquet

    def validate(self) -> None:
        _require(self.masks, "masks", "--masks DIR (the output of actclust extract)")
        _require(self.out, "out", "--out DIR")
        _require(self.k, "k", "--k K (number of clusters)")
        if not valid_k(self.k):
            raise UserError(f"k must be at least 1, got {self.k}")
        if self.theta is not None and self.density is not None:
            raise UserError("give --theta or --density, not both (theta sets the member frequency "
                            "that keeps a centroid bit, density the number of bits)")
        if self.density is None and self.theta is None:
            object.__setattr__(self, "theta", DEFAULT_THETA)
        _fractions(self, "theta", "density")
        _positive(self.workers, "workers")
        _choice(self.backend, BACKENDS, "backend")
        _choice(self.algorithm, ALGORITHMS, "algorithm")
        _choice(self.init, ("k-means++", "random"), "init")
        if self.batch_size is not None:
            _positive(self.batch_size, "batch_size")
        _positive(self.max_iter, "max_iter")
        if not 0.0 <= self.tol < 1.0:
            raise UserError(f"tol must be in [0, 1), got {self.tol}")
        if self.memory_budget_mb is not None and self.memory_budget_mb <= 0:
            raise UserError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb}")
        if self.layers is not None and not all(isinstance(v, int) for v in self.layers):
            raise UserError("layers must be a list of integers")

    def fit_spec(self) -> FitSpec:
        return FitSpec(k=self.k, theta=self.theta, density=self.density, seed=self.seed,
                       init=self.init,
                       batch_size=self.batch_size, max_iter=self.max_iter, tol=self.tol,
                       backend=self.backend, algorithm=self.algorithm,
                       memory_budget_mb=self.memory_budget_mb)


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Model, corpus and window length default to those the centroids were fitted on."""

    centroids: Optional[str] = None
    out: Optional[str] = None
    model: Optional[str] = None
    corpus: Optional[str] = None
    text_column: Optional[str] = None
    seq_len: Optional[int] = None
    max_tokens: Optional[int] = None
    heldout_every: Optional[int] = None
    split: str = "heldout"
    workers: int = 1
    batch_windows: int = 4
    seed: int = 0
    trust_remote_code: bool = False
    dense_prefix: int = 1
    # and (a*m*c): of the centroid's neurons only those the token fires reach down; the
    # same perplexity as replace (a*c) at 10% fewer FFN bytes (docs/results.md).
    mask_mode: str = "and"
    bootstrap_resamples: int = 1000
    baseline: Optional[str] = None  # directory caching the dense and oracle passes of a run
    predictor: Optional[str] = None  # adds the mode `predicted` (actclust train-predictor)
    top_m: int = 1
    neuron_select: str = "threshold"
    # The random-mask pass (random_ppl); actclust run and sweep make it opt-in.
    random: bool = True
    # An anchor (teal, cats, wina) in place of centroids: calibrated on the fitting windows
    # of the masks directory, evaluated on its held-out windows.
    anchor: Optional[str] = None
    anchor_sparsity: Optional[float] = None
    anchor_allocation: str = "uniform"  # or greedy: per-layer sparsities, same FFN bytes
    masks: Optional[str] = None
    calibration_windows: int = 16

    def validate(self) -> None:
        if self.anchor is None:
            _require(self.centroids, "centroids",
                     "--centroids DIR (the output of actclust cluster)")
        else:
            _choice(self.anchor, ANCHORS, "anchor")
            _require(self.masks, "masks", "--masks DIR (the output of actclust extract)")
            _require(self.anchor_sparsity, "anchor_sparsity", "--anchor-sparsity S")
            _choice(self.anchor_allocation, ANCHOR_ALLOCATIONS, "anchor_allocation")
            if self.anchor_allocation == "greedy" and self.anchor != "teal":
                raise UserError(f"--anchor-allocation greedy applies to teal, not {self.anchor}")
            if not 0.0 < self.anchor_sparsity < 1.0:
                raise UserError(f"anchor_sparsity must be in (0, 1), got {self.anchor_sparsity}")
            if self.centroids is not None or self.predictor is not None:
                raise UserError("--anchor evaluates a training-free method on its own; drop "
                                "--centroids and --predictor")
        _require(self.out, "out", "--out DIR")
        _positive(self.calibration_windows, "calibration_windows")
        _choice(self.split, SPLITS, "split")
        _choice(self.mask_mode, MASK_MODES, "mask_mode")
        _choice(self.neuron_select, NEURON_SELECT, "neuron_select")
        _non_negative(self.dense_prefix, "dense_prefix")
        _positive(self.bootstrap_resamples, "bootstrap_resamples")
        _positive(self.top_m, "top_m")
        _positive(self.workers, "workers")
        _positive(self.batch_windows, "batch_windows")
        if self.seq_len is not None and self.seq_len < 2:
            raise UserError(f"seq_len must be at least 2, got {self.seq_len}")


PREDICTOR_CHOICES = ("none", "cluster", "neuron", "both")


@dataclasses.dataclass
class PredictorConfig:
    """A cluster-id or neuron-mask predictor fitted on the centroids' fitting windows."""

    centroids: Optional[str] = None
    out: Optional[str] = None
    kind: str = "cluster"
    rank: Optional[int] = None  # default: the largest rank within 2% of the FFN's parameters
    epochs: int = 6
    workers: int = 2
    max_tokens: Optional[int] = None  # default: as many fitting tokens as the clustering saw
    batch_tokens: int = 256
    lr: float = 3e-3
    seed: int = 0
    shard_windows: int = 8
    features: Optional[str] = None  # feature directory to share between predictors
    trust_remote_code: bool = False

    def validate(self) -> None:
        _require(self.centroids, "centroids", "--centroids DIR (the output of actclust cluster)")
        _require(self.out, "out", "--out DIR")
        _choice(self.kind, ("cluster", "neuron"), "kind")
        if self.rank is not None:
            _positive(self.rank, "rank")
        for key in ("epochs", "workers", "batch_tokens", "shard_windows"):
            _positive(getattr(self, key), key)
        if self.max_tokens is not None:
            _positive(self.max_tokens, "max_tokens")
        if not 0.0 < self.lr < 1.0:
            raise UserError(f"lr must be in (0, 1), got {self.lr}")


@dataclasses.dataclass
class MassBitsConfig:
    """actclust mass-bits: centroid bits chosen by activation mass (actclust.predict.mass)."""

    centroids: Optional[str] = None
    features: Optional[str] = None
    out: Optional[str] = None
    density: Optional[float] = None  # default: each centroid keeps its fitted bit count
    budget: Optional[float] = None  # per-layer densities meeting this FFN bytes fraction
    counts: str = "equal"  # at a new density: every centroid alike, or its fitted count scaled
    mask_mode: str = "and"  # what the budget's bytes and errors assume
    sample_tokens: int = 4096  # fitting tokens the per-layer errors are measured on
    dense_prefix: int = 1  # window positions the budget leaves out (never masked)
    threads: Optional[int] = None
    trust_remote_code: bool = False

    def validate(self) -> None:
        _require(self.centroids, "centroids", "--centroids DIR (the output of actclust cluster)")
        _require(self.features, "features", "--features DIR (a predictor's features directory)")
        _require(self.out, "out", "--out DIR")
        if self.density is not None and self.budget is not None:
            raise UserError("give --density (one density for every layer) or --budget "
                            "(per-layer densities), not both")
        _fractions(self, "density", "budget")
        _choice(self.counts, BIT_COUNTS, "counts")
        if self.counts != "equal" and self.density is None and self.budget is None:
            raise UserError("--counts applies to a new density: give --density or --budget")
        _choice(self.mask_mode, MASK_MODES, "mask_mode")
        _positive(self.sample_tokens, "sample_tokens")
        _non_negative(self.dense_prefix, "dense_prefix")
        if self.threads is not None:
            _positive(self.threads, "threads")


@dataclasses.dataclass
class GenerateConfig:
    """actclust generate: greedy generation with the sparse FFN (actclust.sparse)."""

    model: Optional[str] = None  # default: the centroids' model
    centroids: Optional[str] = None
    predictor: Optional[str] = None
    prompt: Optional[str] = None
    max_new_tokens: int = 32
    dense: bool = False
    layout: str = "auto"
    slab_budget_mb: float = DEFAULT_SLAB_BUDGET_MB
    threads: Optional[int] = None
    trust_remote_code: bool = False
    # and: of the centroid's neurons, only |a| > tau_l reach down; None: and for centroids
    # of site intermediate, replace for gate or up (their thresholds are not |a|'s).
    mask_mode: Optional[str] = None

    def validate(self) -> None:
        if self.prompt is None or self.prompt == "":
            raise UserError("generate needs --prompt TEXT")
        if self.mask_mode is not None:
            _choice(self.mask_mode, MASK_MODES, "mask_mode")
        _positive(self.max_new_tokens, "max_new_tokens")
        _choice(self.layout, LAYOUTS, "layout")
        if self.slab_budget_mb < 0:
            raise UserError(f"slab_budget_mb must be >= 0, got {self.slab_budget_mb}")
        if not self.dense and (self.centroids is None or self.predictor is None):
            raise UserError("sparse generation needs --centroids DIR and --predictor DIR "
                            "(or --dense for the dense model)")
        if self.dense and self.model is None and self.centroids is None:
            raise UserError("dense generation needs --model M "
                            "(or --centroids DIR to take its model)")


def parse_sites(value: Any) -> list[str]:
    """``"gate,up,down_out"``, ``["gate", "up"]`` or ``"intermediate"`` as a list of sites.

    Any non-empty subset of the FFN sites, without duplicates; ``intermediate`` (the input
    of the output projection) stands alone: it is the same tensor the others produce.
    """
    items = value if isinstance(value, (list, tuple)) else [value]
    sites = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not sites:
        raise UserError(f"sites must name at least one of {', '.join(SITES)}; got {value!r}")
    for site in sites:
        _choice(site, SITES, "sites")
    duplicates = sorted({s for s in sites if sites.count(s) > 1})
    if duplicates:
        raise UserError(f"sites lists {', '.join(duplicates)} more than once; name each site once")
    if "intermediate" in sites and len(sites) > 1:
        raise UserError("sites: intermediate cannot be combined with other sites (it is the "
                        "input of the output projection); give intermediate alone or a subset "
                        "of gate,up,down_out")
    return sites


def identity(config: Any) -> dict:
    """The values of ``config``'s IDENTITY keys: what its outputs are made from."""
    return {k: getattr(config, k) for k in type(config).IDENTITY}


def _require(value: Any, key: str, hint: str) -> None:
    if value is None:
        raise UserError(f"missing {key}: give {hint} or set '{key}' in the config file")


def _positive(value: int, key: str) -> None:
    if value < 1:
        raise UserError(f"{key} must be at least 1, got {value}")


def _non_negative(value: int, key: str) -> None:
    if value < 0:
        raise UserError(f"{key} must be >= 0, got {value}")


def _fractions(cfg, *keys: str) -> None:
    """Each of ``keys`` that is set is a theta or density: in (0, 1]."""
    for key in keys:
        value = getattr(cfg, key)
        if value is not None and not valid_fraction(value):
            raise UserError(f"{key} must be in (0, 1], got {value}")


def _choice(value: str, choices: tuple, key: str) -> None:
    if value not in choices:
        raise UserError(f"{key} must be one of {', '.join(choices)}; got {value!r}")


def load_yaml(path: str | Path) -> dict:
    """Read a YAML mapping; a missing or malformed file is a UserError."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values")
    return data


def build(cls: type, file_values: dict | None = None, overrides: dict | None = None,
          source: str = "config"):
    """Make a validated ``cls`` from file values, then non-None overrides."""
    values = dict(file_values or {})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise UserError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} in {source}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(name, value, hints[name], source) for name, value in values.items()}
    config = cls(**kwargs)
    config.validate()
    return config


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
    elif hint is list or origin is list:
        if isinstance(value, list):
            return value
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return [value]
    else:
        return value
    raise UserError(
        f"{name} in {source} must be {getattr(hint, '__name__', hint)}, got {value!r}"
    )


def as_dict(config: Any) -> dict:
    return dataclasses.asdict(config)
