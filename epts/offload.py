"""Block-streamed models: only the embeddings, the final norm and the head live in memory; each
decoder block's weights stay in the checkpoint's safetensors files until the block is used, are
loaded onto the compute device one tensor at a time, and are released after it.

Built on accelerate's engines, not a loader of our own: the skeleton is made under
`init_empty_weights`, `OffloadedWeightsLoader` reads one tensor at a time with safetensors'
`safe_open`, and every block carries an `AlignDevicesHook` that loads it for each forward call and
puts it back on the meta device after. `resident` holds one block on the device for a stretch of
work (an optimisation trains through it many times).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .arch import decoder_blocks, prunable_linears
from .streams import ScratchSpaceError, scratch_prefix


SHARD_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def checkpoint_files(folder: Path) -> list[Path]:
    """The safetensors files that hold the folder's checkpoint, as transformers picks them: a
    `model.safetensors`, else the files its shard index names, else every safetensors file.
    Files of another revision beside them (a download tool leaves old shards) are not among them.
    Raises ValueError when a `model.safetensors` sits beside a shard index that does not name it
    (two revisions: transformers would read one, the index names the other) or when the index
    names a missing file."""
    folder = Path(folder)
    index = folder / SHARD_INDEX
    if not index.is_file():
        single = folder / SINGLE_FILE
        return [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    try:
        named = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index} is damaged ({type(err).__name__}: {err}): copy or download the model again") from None
    if (folder / SINGLE_FILE).is_file() and SINGLE_FILE not in named:
        raise ValueError(f"{folder} holds both {SINGLE_FILE} and the shard index {SHARD_INDEX}, which names other "
                         f"files: two revisions of the model side by side; remove the one you do not want")
    missing = [name for name in named if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{index} names {', '.join(missing[:3])}, missing from {folder}: copy or download the model "
                         f"again")
    return [folder / name for name in named]


def weight_index(folder: Path, dtype: torch.dtype) -> dict[str, dict]:
    """{tensor name: where it is} for every tensor of the folder's checkpoint files
    (`checkpoint_files`), read from their headers only; float tensors are cast to `dtype` when
    read."""
    index = {}
    for file in checkpoint_files(folder):
        with file.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            entry = {"safetensors_file": str(file), "weight_name": name}
            if info["dtype"] in ("F32", "F16", "BF16", "F64"):
                entry["dtype"] = str(dtype).removeprefix("torch.")
            index[name] = entry
    return index


def load_streamed(folder: str | Path, dtype: torch.dtype | None, device: torch.device,
                  trust_remote_code: bool = False) -> nn.Module | None:
    """A causal LM of the safetensors folder whose decoder blocks stream from disk (see the module
    docstring), in eval mode; the other weights are loaded on `device`, in `dtype` (None: the
    config's own). None when the checkpoint does not name every tensor as the model does (an
    incomplete checkpoint, or one that transformers renames on load): load that one whole."""
    from accelerate import init_empty_weights
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset, set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    dtype = dtype or config.dtype or torch.float32
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    weights = OffloadedWeightsLoader(index=weight_index(folder, dtype))
    # Tied weights (an output head sharing the embeddings) are saved once, under one name.
    expected = set(model.state_dict()) - set(getattr(model, "all_tied_weights_keys", None) or {})
    if expected - set(weights):
        return None
    names = {id(m): n for n, m in model.named_modules()}
    prefixes = tuple(names[id(block)] + "." for block in decoder_blocks(model))
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith(prefixes):
            continue
        if name in weights:
            set_module_tensor_to_device(model, name, device, value=weights[name])
        elif not tensor.is_meta:  # a buffer computed at construction (rotary tables)
            set_module_tensor_to_device(model, name, device, value=tensor)
    model.tie_weights()
    for block, prefix in zip(decoder_blocks(model), prefixes):
        add_hook_to_module(block, AlignDevicesHook(device, offload=True, weights_map=PrefixedDataset(weights, prefix),
                                                   place_submodules=True))
    return model.eval()


def is_streamed(block: nn.Module) -> bool:
    hook = getattr(block, "_hf_hook", None)
    return hook is not None and getattr(hook, "offload", False)


@contextmanager
def resident(block: nn.Module, keep: bool | Callable[[], bool] = False) -> Iterator[nn.Module]:
    """Hold a streamed block's weights on its compute device for the duration (its hook taken off,
    so calls inside neither reload nor release them), then release them; with `keep` (or `keep()`
    true at the exit, for a caller that learns only while holding the block whether it changes it),
    the weights as they are then (pruned, say) are first written to a scratch file that the block
    streams from afterwards (removed with the block). A block in memory is left as it is."""
    from accelerate.hooks import add_hook_to_module, remove_hook_from_module

    if not is_streamed(block):
        yield block
        return
    hook = block._hf_hook
    hook.pre_forward(block)
    remove_hook_from_module(block)
    try:
        yield block
        if keep() if callable(keep) else keep:
            _keep_weights(block, hook)
    finally:
        hook.post_forward(block, None)
        add_hook_to_module(block, hook)


def _keep_weights(block: nn.Module, hook) -> None:
    from accelerate.utils import OffloadedWeightsLoader
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    if not hasattr(hook, "scratch"):
        hook.scratch = tempfile.TemporaryDirectory(prefix=scratch_prefix("block"))
        hook.kept = 0
    # A new file each time: the block's current tensors may be mapped from the previous one.
    hook.kept += 1
    file = Path(hook.scratch.name) / f"weights-{hook.kept}.safetensors"
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in block.state_dict().items()}
    try:
        save_file(tensors, str(file), metadata={"format": "pt"})
    except (OSError, SafetensorError) as err:  # a full disk: safetensors says only "No space left on device"
        file.unlink(missing_ok=True)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        raise ScratchSpaceError(f"cannot write a decoder block's changed weights ({nbytes / 2**20:.0f} MiB) to "
                                f"{hook.scratch.name} ({' '.join(str(err).split())}): set TMPDIR to a disk with "
                                f"room for the whole decoder") from None
    hook.weights_map = OffloadedWeightsLoader(index={name: {"safetensors_file": str(file), "weight_name": name}
                                                     for name in tensors})
    for old in Path(hook.scratch.name).glob("weights-*.safetensors"):
        if old != file:
            old.unlink()


def release_scratch(model: nn.Module) -> None:
    """Remove the scratch files of `model`'s kept blocks now, not when the model is collected (an
    export in a loop would otherwise hold a decoder's worth of TMPDIR per model). The model's
    changed blocks are unreadable afterwards: call it when the model is done with."""
    for module in model.modules():
        scratch = getattr(getattr(module, "_hf_hook", None), "scratch", None)
        if scratch is not None:
            scratch.cleanup()


def check_scratch_space(model: nn.Module, what: str, copies: bool = False) -> None:
    """Refuse, before the work, a TMPDIR that cannot hold the changed weights of every streamed
    block of `model` (pruning and materialising keep each changed block in a scratch file there,
    `resident(keep=True)`) and, with `copies`, a copy of their prunable weights besides (the
    refit's choice keeps one to undo a losing candidate, `epts.refit`); `what` names the work in
    the error. A model in memory needs none."""
    streamed = [block for block in decoder_blocks(model) if is_streamed(block)]
    if not streamed:
        return
    need = sum(t.numel() * t.element_size() for block in streamed for t in block.state_dict().values())
    if copies:
        need += sum(layer.weight.numel() * layer.weight.element_size()
                    for block in streamed for layer in prunable_linears(model, block).values())
    folder = tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if need > free:
        kept = "the changed decoder blocks" + (" and a copy of their weights" if copies else "")
        raise ScratchSpaceError(f"{what} keeps {kept} in scratch files in TMPDIR ({folder}): "
                                f"{need / 2**20:.0f} MiB needed, {free / 2**20:.0f} MiB free there: set TMPDIR to a "
                                f"disk with room")


def save_streamed(model: nn.Module, folder: Path) -> None:
    """`save_pretrained` for a streamed model, one shard per block (each loaded, written, released)
    and a last one for the other weights, with the shard index transformers reads."""
    from safetensors.torch import save_file

    names = {id(m): n for n, m in model.named_modules()}
    blocks = decoder_blocks(model)
    prefixes = tuple(names[id(block)] + "." for block in blocks)
    count = len(blocks) + 1
    weight_map, total = {}, 0

    def write(index: int, tensors: dict[str, torch.Tensor]) -> None:
        nonlocal total
        file = f"model-{index:05d}-of-{count:05d}.safetensors"
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())

    for i, (block, prefix) in enumerate(zip(blocks, prefixes)):
        with resident(block):
            write(i + 1, {prefix + k: t.detach().to("cpu").contiguous() for k, t in block.state_dict().items()})
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    write(count, {k: t.detach().to("cpu").contiguous() for k, t in model.state_dict().items()
                  if not k.startswith(prefixes) and k not in tied})
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    model.config.architectures = [type(model).__name__]
    if getattr(model, "_auto_class", None) is not None:  # code shipped with the model: its auto_map needs the files
        from transformers.dynamic_module_utils import custom_object_save

        custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)


def streamed_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the model's state dict in name order, each tensor of a streamed block read
    from its file when its turn comes (one at a time, never the whole model twice)."""
    sources: Mapping[str, Mapping] = {f"{name}.": module._hf_hook.weights_map for name, module in model.named_modules()
                                      if is_streamed(module)}
    for name, tensor in sorted(model.state_dict().items(), key=lambda item: item[0]):
        if tensor.is_meta:
            prefix = next(p for p in sources if name.startswith(p))
            tensor = sources[prefix][name.removeprefix(prefix)]
        yield name, tensor
