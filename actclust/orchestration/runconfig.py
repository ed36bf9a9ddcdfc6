"""The whole pipeline's configuration (``actclust run``; the sweep's extends it)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from actclust import config as C
from actclust.errors import UserError
from actclust.kernels.rules import valid_fraction, valid_k


BITS_BY = ("frequency", "activation_mass")  # how a predicted trial's centroid bits are chosen

def objective_label(theta: float | None, density: float | None) -> str:
    return f"density={density:g}" if density is not None else f"theta={theta:g}"


def trial_name(k: int, theta: float | None, algorithm: str = "hamming-kmeans",
               density: float | None = None) -> str:
    suffix = "" if algorithm == "hamming-kmeans" else f"-{algorithm}"
    return f"k={k}-{objective_label(theta, density)}{suffix}"


@dataclasses.dataclass(frozen=True)
class TrialPoint:
    """One trial of a run or sweep: K, the objective (theta or density) and the algorithm."""

    k: int
    theta: Optional[float]
    algorithm: str = "hamming-kmeans"
    density: Optional[float] = None

    @property
    def name(self) -> str:
        """The trial's directory name under OUT/clusters/ and OUT/eval/."""
        return trial_name(self.k, self.theta, self.algorithm, self.density)

    @property
    def objective(self) -> str:
        return objective_label(self.theta, self.density)


@dataclasses.dataclass
class RunConfig:
    """The whole pipeline; sections reuse the stage configs' field names."""

    out: str = "runs/default"
    model: str = C.DEFAULT_MODEL
    corpus: str = C.DEFAULT_CORPUS
    seq_len: int = 256
    max_tokens: Optional[int] = 16384  # fitting tokens (train split); None: all of them
    eval_max_tokens: Optional[int] = 8192  # held-out tokens; None: every held-out window
    heldout_every: int = 10
    sparsity: Optional[float] = None
    threshold: Optional[float] = None
    k: list = dataclasses.field(default_factory=lambda: [16, 64, 256])
    theta: list = dataclasses.field(default_factory=lambda: [0.5, 0.3])
    density: list = dataclasses.field(default_factory=list)  # fixed-budget fits, besides theta
    seed: int = 0
    workers: int = 2
    algorithm: list = dataclasses.field(default_factory=lambda: ["hamming-kmeans"])
    # Blocks of trials, each a product of its own k, theta, density and algorithm (keys it
    # leaves out take the values above); empty: the one product of the values above.
    grid: list = dataclasses.field(default_factory=list)
    dense_prefix: int = 1
    mask_mode: str = "and"  # replace: a*c; and: a*m*c, fewer bytes (EvaluateConfig)
    sites: "list | str" = "intermediate"  # several: masked together (format version 2)
    pool_layers: bool = False  # one centroid set per site over all layers (baselines only)
    # Per trial, after its centroids: train this predictor kind (both: cluster and neuron)
    # with Ray Train and evaluate it (eval.json's predicted_*).
    predictor: str = "none"
    predictor_epochs: int = 6
    neuron_select: str = "threshold"  # topk: the neuron predictor at the clustering's density
    # The trials (names as in OUT/clusters/, e.g. k=256-theta=0.5) that get predictors;
    # empty: every trial.
    predictor_trials: list = dataclasses.field(default_factory=list)
    # The centroid bits of the trials that get predictors: frequency (as fitted), or
    # activation_mass (actclust mass-bits on the predictors' features, same bit counts).
    # None: activation_mass where a cluster predictor is trained (lower perplexity at
    # every budget measured), frequency otherwise.
    bits_by: Optional[str] = None
    # The cluster predictor's mask: the union of its top-M predicted centroids (evaluate's
    # --top-m); 1: the top-1 cluster's centroid.
    top_m: int = 1
    anchors: list = dataclasses.field(default_factory=list)  # one point per (anchor, sparsity)
    # The random-mask pass of every trial (random_ppl), opt-in: the front's floors are
    # the K = 1 static mask (k: [1, ...]) and the anchors.
    random: bool = False
    anchor_sparsity: list = dataclasses.field(default_factory=lambda: [0.3, 0.5, 0.7])
    # Stage actors that live for the run (the model loaded once); false: every stage
    # starts and stops its own, as separate commands do. The numbers are the same.
    warm_actors: bool = True

    def validate(self) -> None:
        self._validate_grid()
        self.sites = ",".join(C.parse_sites(self.sites))
        for anchor in self.anchors:
            C._choice(anchor, C.ANCHORS, "anchors")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) and 0 < s < 1
                   for s in self.anchor_sparsity) or (self.anchors and not self.anchor_sparsity):
            raise UserError("anchor_sparsity must be a non-empty list of values in (0, 1), "
                            f"got {self.anchor_sparsity}")
        self.anchor_sparsity = [float(s) for s in self.anchor_sparsity]
        if self.anchors and self.sites != "intermediate":
            raise UserError(f"anchors are compared with masks of sites: intermediate, got "
                            f"sites: {self.sites}")
        if self.pool_layers and "hamming-kmeans" in self.algorithm:
            raise UserError("pool_layers needs algorithm brb-kmeans or activation-aware "
                            "(hamming-kmeans fits one centroid set per layer)")
        C._choice(self.predictor, C.PREDICTOR_CHOICES, "predictor")
        C._positive(self.predictor_epochs, "predictor_epochs")
        C._choice(self.neuron_select, C.NEURON_SELECT, "neuron_select")
        if self.bits_by is None:
            self.bits_by = ("activation_mass" if self.predictor in ("cluster", "both")
                            and not self.pool_layers else "frequency")
        C._choice(self.bits_by, BITS_BY, "bits_by")
        if self.bits_by != "frequency" and self.predictor == "none":
            raise UserError(f"bits_by: {self.bits_by} applies to the trials that get a "
                            "predictor (their feature pass gives the activations); set "
                            "predictor: cluster, neuron or both")
        if self.bits_by != "frequency" and self.pool_layers:
            raise UserError(f"bits_by: {self.bits_by} needs per-layer centroids, not "
                            "pool_layers: true")
        C._positive(self.top_m, "top_m")
        if self.top_m > 1 and self.predictor not in ("cluster", "both"):
            raise UserError(f"top_m: {self.top_m} applies to a cluster predictor; set "
                            "predictor: cluster or both")
        if not all(isinstance(name, str) for name in self.predictor_trials):
            raise UserError("predictor_trials must be a list of trial names such as "
                            f"k=256-theta=0.5, got {self.predictor_trials}")
        if self.predictor != "none" and self.sites != "intermediate":
            raise UserError(f"predictor: {self.predictor} needs sites: intermediate (a predictor "
                            f"names FFN-intermediate centroids), got sites: {self.sites}")
        if not self.k or not all(valid_k(v) for v in self.k):
            raise UserError(f"k must be a list of positive integers, got {self.k}")
        for key in ("theta", "density"):
            if not all(valid_fraction(v) for v in getattr(self, key)):
                raise UserError(f"{key} must be a list of values in (0, 1], got "
                                f"{getattr(self, key)}")
        self.theta = [float(t) for t in self.theta]
        self.density = [float(v) for v in self.density]
        if not self.theta and not self.density:
            raise UserError("give at least one theta or one density to fit")
        C._positive(self.workers, "workers")
        if not self.algorithm:
            raise UserError("algorithm must name at least one of " + ", ".join(C.ALGORITHMS))
        for algorithm in self.algorithm:
            C._choice(algorithm, C.ALGORITHMS, "algorithm")
        C._choice(self.mask_mode, C.MASK_MODES, "mask_mode")
        if self.heldout_every < 2:
            raise UserError(f"heldout_every must be at least 2, got {self.heldout_every}")
        if not 0 <= self.dense_prefix < self.seq_len - 1:
            raise UserError(f"dense_prefix must be in [0, seq_len - 1), got {self.dense_prefix}")
        for key in ("max_tokens", "eval_max_tokens"):
            if getattr(self, key) is not None and getattr(self, key) < self.seq_len:
                raise UserError("max_tokens and eval_max_tokens must each hold at least one "
                                f"window of seq_len {self.seq_len}")

    def _validate_grid(self) -> None:
        if not isinstance(self.grid, list):
            raise UserError(f"grid must be a list of blocks such as {{k: [1024], density: "
                            f"[0.5]}}, got {self.grid!r}")
        for block in self.grid:
            unknown = sorted(set(block) - set(GRID_KEYS)) if isinstance(block, dict) else None
            if unknown is None or unknown:
                raise UserError(f"a grid block takes only {', '.join(GRID_KEYS)}, got "
                                f"{block!r}")
            self.block(block).validate()

    def block(self, block: dict) -> "RunConfig":
        """This config with one grid block's values (a block without theta or density
        fits only what it names)."""
        values = {key: block[key] for key in GRID_KEYS if key in block}
        if "density" in block and "theta" not in block:
            values["theta"] = []
        if "theta" in block and "density" not in block:
            values["density"] = []
        return dataclasses.replace(self, grid=[], **values)


GRID_KEYS = ("k", "theta", "density", "algorithm")
