"""Load a Hugging Face checkpoint directory into a :class:`CausalLM`.

Reads ``config.json``, then ``model.safetensors`` or the shards listed in
``model.safetensors.index.json``. Names map one-to-one onto the model's parameters,
except MoE experts: per-expert tensors (Mixtral ``block_sparse_moe.experts.<e>.w1|w3|w2``,
Qwen ``mlp.experts.<e>.gate_proj|up_proj|down_proj``) are stacked into the fused
``mlp.experts.gate_up_proj`` / ``down_proj``; already-fused checkpoints load directly.
Likewise q/k/v and gate/up projections are copied into their rows of the model's fused
``qkv_proj`` / ``gate_up_proj`` (layers.FusedLinear), and missing ones are reported under
their checkpoint names.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from services.engine.errors import ModelLoadError
from services.engine.layers import FusedLinear
from services.engine.model import CausalLM
from services.engine.model_config import ModelConfig, load_model_config

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")
# (layer, prefix) + expert + projection
_PER_EXPERT = re.compile(
    r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)
# which half of gate_up_proj a per-expert tensor fills; None = down_proj
_EXPERT_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}


def resolve_dtype(name: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    """``auto`` = float32 on CPU, the checkpoint's dtype elsewhere."""
    if name == "auto":
        name = "float32" if device.type == "cpu" else config.checkpoint_dtype
    if name not in _DTYPES:
        raise ModelLoadError(f"dtype {name!r} is not supported; choose one of {', '.join(_DTYPES)} or auto")
    return _DTYPES[name]


def weight_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"cannot read {index}: {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
    elif (model_dir / "model.safetensors").is_file():
        files = [model_dir / "model.safetensors"]
    else:
        raise ModelLoadError(f"no model.safetensors or model.safetensors.index.json in {model_dir}")
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ModelLoadError(f"weight shards listed in the index are missing: {', '.join(missing)}")
    return files


def model_fingerprint(model_dir: str | Path) -> str:
    """A short id of the checkpoint: config.json's content plus the weight files' names and sizes."""
    model_dir = Path(model_dir)
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in weight_files(model_dir):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:16]


def load_model(model_dir: str | Path, dtype: str = "auto", device: str = "cpu") -> CausalLM:
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelLoadError(f"model directory {model_dir} does not exist")
    config = load_model_config(model_dir)
    return build_model(config, _read_safetensors(weight_files(model_dir)), dtype, device)


def build_model(
    config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], dtype: str = "auto", device: str = "cpu"
) -> CausalLM:
    """A model from checkpoint-named tensors (read from files, or another model's state_dict)."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device cuda was asked for but CUDA is not available")
    torch_dtype = resolve_dtype(dtype, config, dev)
    with torch.device("meta"):
        model = CausalLM(config)
    # the dtype first, on meta: materialising in float32 and converting after reserves twice the
    # bfloat16 weights on the device, which the caching allocator keeps (out of reach of another
    # process sharing the GPU)
    model = model.to(torch_dtype).to_empty(device=dev)
    _load_weights(model, tensors)
    return model.eval().requires_grad_(False)


def _read_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read weights from {path}: {e}") from None


def _load_weights(model: CausalLM, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    params = dict(model.named_parameters())
    fused = _fused_rows(model)
    loaded: set[str] = set()
    expert_parts: dict[str, int] = {}  # fused param name -> per-expert slices filled
    for name, tensor in _renamed(model.config, tensors):
        if name in fused:
            target, rows = fused[name]
            _copy(name, params[target].data[rows], tensor)
            loaded.add(name)
        else:
            _load_one(name, tensor, params, loaded, expert_parts)
    _check_experts(model.config, params, expert_parts, loaded)
    if "lm_head.weight" not in loaded and model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
        loaded.add("lm_head.weight")
    fused_targets = {target for target, _ in fused.values()}
    parts_needed = {name for name, (target, _) in fused.items() if target not in loaded}  # not stored fused
    missing = sorted((set(params) - fused_targets | parts_needed) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"checkpoint lacks weights: {shown}")


def _renamed(config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors under the model's names (config.weight_prefixes; without them, as they are)."""
    for name, tensor in tensors:
        if not config.weight_prefixes:
            yield name, tensor
        elif match := next(((o, t) for o, t in config.weight_prefixes if name.startswith(o)), None):
            yield match[1] + name[len(match[0]):], tensor


def _fused_rows(model: CausalLM) -> dict[str, tuple[str, slice]]:
    """Checkpoint name of each projection stacked in a FusedLinear -> (its parameter, rows)."""
    rows = {}
    for prefix, module in model.named_modules():
        if isinstance(module, FusedLinear):
            parent = prefix.rpartition(".")[0]
            kinds = ("weight", "bias") if module.bias is not None else ("weight",)
            for part, part_rows in module.part_rows().items():
                for kind in kinds:
                    rows[f"{parent}.{part}.{kind}"] = (f"{prefix}.{kind}", part_rows)
    return rows


def _load_one(name: str, tensor: torch.Tensor, params, loaded: set[str], expert_parts: dict[str, int]) -> None:
    if _IGNORED.search(name):
        return
    per_expert = _PER_EXPERT.match(name)
    if per_expert:
        layer, expert, proj = per_expert.groups()
        part = _EXPERT_PART[proj]
        fused = f"model.layers.{layer}.mlp.experts.{'down_proj' if part is None else 'gate_up_proj'}"
        if fused not in params:
            raise ModelLoadError(f"checkpoint has {name} but layer {layer} is not a MoE layer in config.json")
        dest = params[fused].data[int(expert)]
        if part is not None:
            half = dest.shape[0] // 2
            dest = dest[part * half : (part + 1) * half]
        _copy(name, dest, tensor)
        expert_parts[fused] = expert_parts.get(fused, 0) + 1
        return
    name = name.replace(".block_sparse_moe.", ".mlp.")
    if name not in params:
        raise ModelLoadError(f"checkpoint tensor {name} has no place in the layout config.json describes")
    _copy(name, params[name].data, tensor)
    loaded.add(name)


def _check_experts(config: ModelConfig, params, expert_parts: dict[str, int], loaded: set[str]) -> None:
    if config.moe is None:
        return
    for fused, count in expert_parts.items():
        expected = config.moe.num_experts * (2 if fused.endswith("gate_up_proj") else 1)
        if count != expected:
            raise ModelLoadError(f"{fused}: checkpoint has {count} of {expected} per-expert tensors")
        loaded.add(fused)


def _copy(name: str, dest: torch.Tensor, src: torch.Tensor) -> None:
    if tuple(dest.shape) != tuple(src.shape):
        raise ModelLoadError(f"{name}: checkpoint shape {tuple(src.shape)} != expected {tuple(dest.shape)}")
    dest.copy_(src)
