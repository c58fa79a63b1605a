"""Engine configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.engine.scheduler import SchedulerConfig

DECODE_GRAPH_MODES = ("auto", "eager", "off")
OVERLAP_MODES = ("auto", "on", "off")
_MAX_GRAPH_BATCH = 512


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``cuda:N``."""
    dtype: str = "auto"
    """``float32``, ``bfloat16``, ``float16``, or ``auto`` (float32 on CPU, the checkpoint's dtype on GPU)."""
    block_size: int = 16
    """Tokens per KV cache block."""
    kv_cache_bytes: int | None = None
    """Memory for the KV cache; None = 512 MiB on CPU, 90% of free GPU memory after the weights on GPU."""
    device_memory_bytes: int | None = None
    """CUDA: the most this process's caching allocator may hold on its device, weights, cache and
    activations together (``torch.cuda.set_per_process_memory_fraction``). For processes sharing a
    GPU: one that reaches its share fails the step or transfer that needed more (out of device
    memory) instead of taking memory the others were counted. None: no cap. Ignored on CPU."""
    max_model_len: int | None = None
    """Longest prompt + output; None = the model's max_position_embeddings, capped by the cache size."""
    enable_prefix_caching: bool = True
    """Reuse full KV blocks across requests that share a prefix."""
    decode_graphs: str = "auto"
    """Decode-only steps: ``auto`` = replayed from CUDA graphs on CUDA (MoE models where their
    experts run fused: decode_graphs.graph_safe), eager on
    CPU; ``eager`` = the same static padded buffers without graphs (any device); ``off``."""
    mixed_graph_tokens: int = 2048
    """Steps that are not decode-only (prompt chunks, with or without decodes) of up to this many
    tokens run as per-layer graph pieces around eager attention (mixed_graphs.py), under the
    same ``decode_graphs`` mode; 0 = always eager. Capped by the scheduler's token budget."""
    overlap_decode: str = "auto"
    """Launch each decode step before the previous one's tokens are read back, its input ids
    taken on the device (overlap.py): ``auto`` = on CUDA, ``on`` = wherever decode steps run
    on the static buffers (CPU too: how it is tested), ``off``. Needs ``decode_graphs`` on."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if not (self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError(f"kv_cache_bytes must be positive, got {self.kv_cache_bytes}")
        if self.device_memory_bytes is not None and self.device_memory_bytes <= 0:
            raise ValueError(f"device_memory_bytes must be positive, got {self.device_memory_bytes}")
        if self.decode_graphs not in DECODE_GRAPH_MODES:
            raise ValueError(f"decode_graphs must be one of {', '.join(DECODE_GRAPH_MODES)}, got {self.decode_graphs!r}")
        if self.overlap_decode not in OVERLAP_MODES:
            raise ValueError(f"overlap_decode must be one of {', '.join(OVERLAP_MODES)}, got {self.overlap_decode!r}")
        if self.mixed_graph_tokens < 0:
            raise ValueError(f"mixed_graph_tokens must be >= 0, got {self.mixed_graph_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")

    def graph_batch_limit(self) -> int:
        """The largest decode batch that runs on the static buffers."""
        return min(self.scheduler.max_num_seqs, _MAX_GRAPH_BATCH)
