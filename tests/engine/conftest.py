from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from services.engine.config import EngineConfig
from services.engine.engine import LLMEngine
from services.engine.scheduler import SchedulerConfig
from tests.engine.hf_models import make_checkpoint

_TOKENIZER_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i, 'hello world')\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
] * 20


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """checkpoints(family, seed=0, **overrides) -> a saved random model directory (cached)."""
    made: dict[tuple, Path] = {}

    def get(family: str, seed: int = 0, **overrides) -> Path:
        key = (family, seed, tuple(sorted(overrides.items())))
        if key not in made:
            path = tmp_path_factory.mktemp(f"{family}-{seed}")
            made[key] = make_checkpoint(path, family, seed, **overrides)
        return made[key]

    return get


@pytest.fixture(scope="session")
def text_model(tmp_path_factory) -> Path:
    """A random Llama checkpoint with a real byte-level BPE tokenizer.json (vocab 300)."""
    path = tmp_path_factory.mktemp("text-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TOKENIZER_TEXT, trainer)
    make_checkpoint(path, "llama", seed=3, vocab_size=tok.get_vocab_size(), eos_token_id=0)
    tok.save(str(path / "tokenizer.json"))
    return path


def small_engine(path: Path, *, kv_cache_bytes: int = 4 << 20, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, prefix_caching: bool = True, step_target_s: float | None = None,
                 **kw) -> LLMEngine:
    sched = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                            step_target_s=step_target_s)
    config = EngineConfig(kv_cache_bytes=kv_cache_bytes, enable_prefix_caching=prefix_caching,
                          scheduler=sched, **kw)
    return LLMEngine.from_pretrained(path, config)
