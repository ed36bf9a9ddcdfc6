"""Train a predictor with Ray Train: ``actclust train-predictor``.

    actclust train-predictor --centroids runs/c --out runs/p --kind cluster --workers 2

The driver reads the clustering's identity, takes the same fitting windows (never a
held-out one), and starts a ``TorchTrainer`` (DDP over gloo on CPU, NCCL on GPU).
Each worker first writes its share of the missing feature shards (see
:mod:`actclust.predict.features`), then trains on its share of the training shards;
every rank runs the same number of steps per epoch, so DDP stays in lockstep.
A checkpoint is reported every epoch; rerunning the same command after the driver was
killed resumes from the last one. The driver then picks the neuron thresholds,
measures train/validation figures and writes the predictor (:mod:`.model`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import numpy as np

from actclust.io import mask_store as store
from actclust.io import predictor_store, storage
from actclust.io.centroid_store import load_centroids, require_single_site
from actclust.io.corpus import load_windows
from actclust.io.models import ffn_param_counts, load_model, load_tokenizer
from actclust.predict import features as F
from actclust.predict import model as M
from actclust.predict.features import Targets, split_shards
from actclust.predict.figures import finish
from actclust.runtime.raycluster import cluster_gpus, init_ray

log = logging.getLogger(__name__)

STATE = "state.pt"
# Ray Train's controller polls its workers every 2 s by default, seconds of idle time
# around a fit that itself takes seconds; it reads the interval from the driver's
# environment, so a user's own setting wins.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}


@dataclasses.dataclass(frozen=True)
class TrainLoop:
    """What every Ray Train worker trains from; travels from the driver to the workers."""

    spec: F.FeatureSpec
    seq: np.ndarray  # (W,) window numbers of the fitting windows
    ids: np.ndarray  # (W, T) their tokens
    kind: str  # cluster or neuron
    rank: int  # the predictor's low rank
    k: int
    epochs: int
    batch_tokens: int
    lr: float
    seed: int
    centroids: str
    threads: int = 1  # torch threads per worker (set where the workers are placed)
    log_level: str = "INFO"


def run_train_predictor(cfg) -> dict:
    """Fit, finish and write the predictor; returns predictor.json's content."""
    meta, _ = load_centroids(cfg.centroids)
    require_single_site(meta, cfg.centroids, "train-predictor")
    out = storage.normalize(cfg.out)
    ident = _identity(cfg, meta)
    done = predictor_store.finished_run(out, ident)
    if done is not None:
        log.info("%s already holds this predictor", out)
        return done
    windows = _fitting_windows(meta, cfg.max_tokens, cfg.trust_remote_code)
    ident.update(_window_identity(windows))
    if predictor_store.open_run(out, ident):
        log.info("resuming the predictor run in %s", out)
    d_model, ffn_params = _model_shape(meta["model"], meta["layers"], cfg.trust_remote_code)
    out_dim = meta["k"] if cfg.kind == "cluster" else meta["d_ff"]
    rank = cfg.rank or M.default_rank(d_model, out_dim, min(ffn_params))
    spec = _feature_spec(meta, cfg.features or storage.join(out, "features"), d_model,
                         cfg.shard_windows, cfg.trust_remote_code)
    _open_features(spec, ident)

    start = time.perf_counter()
    loop = TrainLoop(spec=spec, seq=windows.seq, ids=windows.ids, kind=cfg.kind, rank=rank,
                     k=meta["k"], epochs=cfg.epochs, batch_tokens=cfg.batch_tokens, lr=cfg.lr,
                     seed=cfg.seed, centroids=storage.normalize(cfg.centroids))
    state = _fit(loop, cfg.workers, out)
    seconds = time.perf_counter() - start
    net = M.make_net(len(spec.layers), d_model, rank, out_dim)
    net.load_state_dict(state["model"])
    figures = finish(net, spec, loop)
    params = M.params_per_layer(d_model, rank, out_dim)
    record = {
        "kind": cfg.kind, "rank": rank, "k": meta["k"], "width": meta["d_ff"],
        "d_model": d_model, "layers": list(meta["layers"]), "activation": "gelu",
        "params": params * len(spec.layers), "params_per_layer": params,
        "ffn_params_per_layer": ffn_params,
        "params_fraction": params * len(spec.layers) / sum(ffn_params),
        "training_tokens": figures.pop("training_tokens"),
        "validation_tokens": figures.pop("validation_tokens"),
        "epochs": cfg.epochs, "workers": cfg.workers, "batch_tokens": cfg.batch_tokens,
        "lr": cfg.lr, "seed": cfg.seed, "train_seconds": round(seconds, 1),
        "resumed_after_epoch": state["first_epoch"],
        "placement": state["placement"],
        **figures, "identity": ident,
    }
    tensors = {n: p.detach() for n, p in net.state_dict().items()}
    if cfg.kind == "neuron":
        import torch

        tensors["threshold"] = torch.tensor([r["threshold"] for r in record["per_layer"]])
    predictor_store.save(out, record, tensors)
    return record


def _identity(cfg, meta: dict) -> dict:
    return {"model": meta["model"], "corpus": meta["corpus"], "text_column": meta["text_column"],
            "seq_len": meta["seq_len"], "heldout_every": meta["heldout_every"],
            "sites": meta["sites"], "thresholds": meta["thresholds"], "k": meta["k"],
            "theta": meta.get("theta"), "masks": meta.get("masks"),
            "centroids": storage.normalize(cfg.centroids),
            "centroids_sha256": store.sha256_file(storage.join(cfg.centroids,
                                                               "centroids.parquet")),
            "kind": cfg.kind, "rank": cfg.rank, "epochs": cfg.epochs, "max_tokens": cfg.max_tokens,
            "seed": cfg.seed}


def write_features(centroids: str, features: str, shard_windows: int = 8,
                   trust_remote_code: bool = False) -> int:
    """Write the missing feature shards of ``centroids``' fitting windows into ``features``
    in this process (train-predictor writes them inside its Ray Train workers), so that
    what needs the features before a predictor (``mass-bits``) can have them; returns the
    number of shards written."""
    meta, _ = load_centroids(centroids)
    windows = _fitting_windows(meta, None, trust_remote_code)
    d_model, _ = _model_shape(meta["model"], meta["layers"], trust_remote_code)
    spec = _feature_spec(meta, features, d_model, shard_windows, trust_remote_code)
    _open_features(spec, {**meta, **_window_identity(windows)})
    return F.write_missing(spec, windows.seq, windows.ids)


def _fitting_windows(meta: dict, max_tokens: int | None, trust_remote_code: bool):
    tokenizer = load_tokenizer(meta["model"], trust_remote_code=trust_remote_code)
    return load_windows(meta["corpus"], tokenizer, meta["seq_len"], split="train",
                        max_tokens=max_tokens or meta["tokens"],
                        heldout_every=meta["heldout_every"], text_column=meta["text_column"])


def _window_identity(windows) -> dict:
    return {"first_seq": int(windows.seq[0]), "last_seq": int(windows.seq[-1]),
            "windows": len(windows), "split": "train"}


def _feature_spec(meta: dict, root: str, d_model: int, shard_windows: int,
                  trust_remote_code: bool) -> F.FeatureSpec:
    return F.FeatureSpec(root=storage.normalize(root), model=meta["model"], site=meta["sites"],
                         layers=tuple(meta["layers"]), thresholds=tuple(meta["thresholds"]),
                         d_model=d_model, width=meta["d_ff"], shard_windows=shard_windows,
                         trust_remote_code=trust_remote_code)


def _open_features(spec: F.FeatureSpec, ident: dict) -> None:
    keys = ("model", "corpus", "text_column", "seq_len", "heldout_every", "sites", "thresholds",
            "first_seq", "last_seq", "windows")
    predictor_store.open_features(spec.root, {**{k: ident[k] for k in keys},
                                              "shard_windows": spec.shard_windows,
                                              "layers": list(spec.layers)})


def _model_shape(model_name: str, layers: list[int], trust_remote_code: bool):
    model = load_model(model_name, trust_remote_code=trust_remote_code).model
    counts = ffn_param_counts(model)
    return int(model.config.hidden_size), [counts[layer] for layer in layers]


def _fit(loop: TrainLoop, workers: int, out: str) -> dict:
    """Ray Train fit; checkpoints under ``out/ray`` (local or object store), so rerunning
    the same command after the driver was killed resumes from the last one."""
    import torch
    from ray.train import CheckpointConfig, LoggingConfig, RunConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    for name, value in TRAIN_ENV.items():
        os.environ.setdefault(name, value)
    path, filesystem = predictor_store.checkpoint_storage(out)
    threads, scaling, placement = _scaling(workers)
    log_level = _train_log_level()
    loop = dataclasses.replace(loop, threads=threads, log_level=log_level)
    trainer = TorchTrainer(
        train_loop, train_loop_config={"loop": loop}, scaling_config=scaling,
        run_config=RunConfig(name="train", storage_path=path, storage_filesystem=filesystem,
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             logging_config=LoggingConfig(log_level=log_level)))
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError("training ended without a checkpoint")
    with result.checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE, map_location="cpu", weights_only=True)
    state["first_epoch"] = int(result.metrics.get("first_epoch", 0))
    state["placement"] = placement
    return state


def _train_log_level() -> str:
    """Ray Train's own lines (worker group, checkpoints, every reported result) at the
    command's verbosity: warnings by default, everything with -v."""
    return "WARNING" if logging.getLogger().getEffectiveLevel() >= logging.WARNING else "INFO"


# Inside a Tune trial (a sweep that trains predictors) Ray Train cannot place its workers
# in the trial's placement group: it gang-schedules a group of its own, and reserving the
# trial's CPUs a second time could wait forever behind the trials that hold them. The
# trial's stages run one after another, so its worker bundles sit idle while it trains:
# the trainer's workers stand in for them, pinned to the trial's node, each running as
# many threads as one bundle has CPUs, with only a nominal reservation of their own.
TRIAL_WORKER_CPU = 0.01


def _scaling(workers: int):
    """(threads per worker, ScalingConfig, "own" or "trial") for a standalone run or one
    inside a Tune trial."""
    import ray
    from ray.train import ScalingConfig
    from ray.util import get_current_placement_group

    group = get_current_placement_group()
    if group is not None:
        bundle = (group.bundle_specs[1:] or group.bundle_specs)[0]
        node = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
        return max(1, int(bundle.get("CPU", 1))), ScalingConfig(
            num_workers=workers, use_gpu=False, label_selector=node,
            resources_per_worker={"CPU": TRIAL_WORKER_CPU}), "trial"
    if cluster_gpus() > 0:
        return 1, ScalingConfig(num_workers=workers, use_gpu=True), "own"
    threads = max(1, _cpus() // workers)
    return threads, ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}), \
        "own"


def _cpus() -> int:
    import ray

    return int(ray.cluster_resources().get("CPU", 1))


def shard_tokens(n_windows: int, shard_windows: int, seq_len: int, index: int) -> int:
    return min(shard_windows, n_windows - index * shard_windows) * seq_len


def loss_fn(kind: str, logits, target):
    import torch.nn.functional as nnf

    if kind == "cluster":
        return nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    p = target.mean(dim=(0, 2)).clamp(1e-3, 1 - 1e-3)  # (L,) true density in this batch
    pos_weight = ((1 - p) / p).clamp(0.1, 10.0)[:, None]  # rare active neurons weigh more
    return nnf.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)


def train_loop(config: dict) -> None:
    """Ray Train worker: write missing features, then train with DDP, checkpoint per epoch."""
    import os
    import tempfile

    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    loop: TrainLoop = config["loop"]
    spec = loop.spec
    torch.set_num_threads(loop.threads)
    # Ray Train's per-report lines come from loggers outside ``ray.train`` (its own
    # LoggingConfig does not reach them); the worker's root level does.
    logging.getLogger().setLevel(loop.log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    F.write_missing(spec, loop.seq, loop.ids, rank, world, str(device))
    dist.barrier()

    meta, centroids = load_centroids(loop.centroids)
    targets = Targets(loop.kind, centroids, spec.width, meta.get("rule"))
    out_dim = loop.k if loop.kind == "cluster" else spec.width
    net = M.make_net(len(spec.layers), spec.d_model, loop.rank, out_dim,
                     seed=loop.seed).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=loop.lr, weight_decay=0.01)
    start = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = torch.load(Path(d) / STATE, map_location=device, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = state["epoch"]
        if rank == 0:
            log.info("resuming predictor training after epoch %d", start)
    ddp = torch.nn.parallel.DistributedDataParallel(net)

    n_windows, seq_len = loop.ids.shape
    n_shards = F.shard_count(n_windows, spec.shard_windows)
    train, val = split_shards(n_shards)
    batch = loop.batch_tokens
    mine = train[rank::world]
    # Equal steps on every rank (the smallest share), so DDP's all-reduces pair up.
    steps = min(sum(shard_tokens(n_windows, spec.shard_windows, seq_len, i)
                    for i in train[r::world]) // batch for r in range(world))
    cache = F.ShardCache(spec, targets)
    for epoch in range(start, loop.epochs):
        rng = np.random.default_rng([loop.seed, epoch, rank])
        done, loss_sum = 0, torch.zeros(2, dtype=torch.float64, device=device)
        ddp.train()
        for i in rng.permutation(mine):
            if done >= steps:
                break
            h, prepared = cache.get(int(i))
            order = torch.from_numpy(rng.permutation(len(h)))
            for s in range(0, len(h) - batch + 1, batch):
                if done >= steps:
                    break
                idx = order[s:s + batch]
                loss = loss_fn(loop.kind, ddp(h[idx].to(device, torch.float32)),
                               targets.select(prepared, idx).to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += torch.tensor([float(loss.detach()), 1.0], dtype=torch.float64, device=device)
                done += 1
        metrics = _validate(net, cache, loop.kind, val[rank::world], device)
        dist.all_reduce(loss_sum)
        dist.all_reduce(metrics)
        report = {"epoch": epoch + 1, "first_epoch": start, "train_loss": float(loss_sum[0] / max(1, loss_sum[1])),
                  "validation_loss": float(metrics[0] / max(1, metrics[2])),
                  "validation_accuracy": float(metrics[1] / max(1, metrics[2]))}
        with tempfile.TemporaryDirectory() as tmp:
            saved = None
            if rank == 0:
                torch.save({"epoch": epoch + 1, "model": net.state_dict(),
                            "optimizer": opt.state_dict()}, os.path.join(tmp, STATE))
                saved = ray.train.Checkpoint.from_directory(tmp)
                log.debug("epoch %d: %s", epoch + 1, report)
            ray.train.report(report, checkpoint=saved)


def _validate(net, cache: F.ShardCache, kind: str, shards, device):
    """Summed [loss * tokens, top-1 hits (cluster) , tokens*L] over this rank's shards."""
    import torch

    sums = torch.zeros(3, dtype=torch.float64, device=device)
    net.eval()
    with torch.no_grad():
        for i in shards:
            h, prepared = cache.get(i)
            for s in range(0, len(h), 512):
                rows = slice(s, s + 512)
                target = cache.targets.select(prepared, rows).to(device)
                logits = net(h[rows].to(device, torch.float32))
                n = target.shape[0] * target.shape[1]
                sums[0] += float(loss_fn(kind, logits, target)) * n
                if kind == "cluster":
                    sums[1] += float((logits.argmax(-1) == target).sum())
                sums[2] += n
    net.train()
    return sums
