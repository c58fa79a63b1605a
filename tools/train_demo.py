"""Train a tiny demo causal LM on the Python standard library and save it in
Hugging Face format.

The resulting models are meant for exercising the serving engine (loading,
tokenizing, batching, sampling, MoE routing), not for being useful: they are
~1.3M-parameter models that have learned what Python source code looks like.

Pipeline:
  1. collect_corpus  -- read the stdlib's own ``.py`` files (sorted, test /
                        IDLE / generated-table directories excluded).
  2. train_tokenizer -- byte-level BPE (``tokenizers``) with ``<|endoftext|>``
                        as EOS / document separator and ChatML markers.
  3. build_config    -- LlamaConfig (dense) or MixtralConfig (8 experts, top-2).
  4. train           -- AdamW on random 256-token windows of the token stream,
                        for a wall-clock (``--minutes``) or ``--steps`` budget.
  5. save            -- bfloat16 ``model.safetensors`` + config, generation
                        config, tokenizer.json and tokenizer_config.json, then
                        reload the directory, check sizes and print samples.

Usage:
  python tools/train_demo.py --out tools/demo_models/dense --arch dense --minutes 12 --seed 0
  python tools/train_demo.py --out tools/demo_models/moe   --arch moe   --minutes 12 --seed 0

``--steps N`` replaces the time budget with a fixed number of optimizer steps
(fully deterministic schedule).  The time budget covers the training loop only;
corpus loading and tokenizer training take well under a minute more.
Progress is printed to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (EOS, IM_START, IM_END)

VOCAB_SIZE = 3072
CONTEXT = 256
MAX_POSITIONS = 1024
MAX_FILE_BYTES = 3 * 1024 * 1024

# Directory names anywhere in the path that are not "real library code".
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idlelib", "turtledemo", "site-packages", "__pycache__",
    "encodings",    # generated codec tables
    "pydoc_data",   # one huge generated string literal
})

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

PROMPT = "def fibonacci(n):"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def collect_corpus() -> list[str]:
    """Return the stdlib's .py sources as a sorted, deterministic list of texts."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        if rel.name.startswith(("test_", "_sysconfigdata")):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = text.replace("\r\n", "\n").strip("\n")
        if text:
            docs.append(text + "\n")
    log(f"corpus: {len(docs)} files, {sum(len(d) for d in docs) / 1e6:.1f}M chars from {root}")
    return docs


def train_tokenizer(docs: list[str], vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    """Byte-level BPE: decode(encode(text)) == text, whitespace included."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    sample = "def f(x):\n\tif x:\n        return  x  # done\n\n"
    assert tok.decode(tok.encode(sample).ids) == sample, "byte-level round trip failed"
    log(f"tokenizer: vocab {tok.get_vocab_size()}, eos id {tok.token_to_id(EOS)}")
    return tok


def build_config(arch: str, vocab_size: int, eos_id: int):
    """Small Llama (dense) or Mixtral (8 experts, top-2) config with GQA."""
    from transformers import LlamaConfig, MixtralConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        num_hidden_layers=5,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=MAX_POSITIONS,
        initializer_range=0.02,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        attention_dropout=0.0,
    )
    if arch == "dense":
        return LlamaConfig(intermediate_size=352, **common)
    if arch == "moe":
        return MixtralConfig(
            intermediate_size=48,          # per expert
            num_local_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.01,
            output_router_logits=False,    # aux loss is requested explicitly in train()
            **common,
        )
    raise ValueError(f"unknown arch {arch!r}")


def encode_stream(tok: Tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate documents, each followed by <|endoftext|>, as one id tensor."""
    eos_id = tok.token_to_id(EOS)
    ids = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos_id)
    return torch.tensor(ids, dtype=torch.long)


def lr_at(progress: float, step: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of peak over progress in [0, 1]."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def lm_loss(model, batch: torch.Tensor, moe: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (total loss used for backprop, plain next-token cross-entropy)."""
    out = model(input_ids=batch[:, :-1], use_cache=False, output_router_logits=moe or None)
    ce = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, out.logits.size(-1)).float(), batch[:, 1:].reshape(-1)
    )
    total = ce + model.config.router_aux_loss_coef * out.aux_loss if moe else ce
    return total, ce


def sample_batch(stream: torch.Tensor, batch_size: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - CONTEXT - 1, (batch_size,), generator=gen)
    return torch.stack([stream[s : s + CONTEXT + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model, val_batches: list[torch.Tensor], moe: bool) -> float:
    model.eval()
    losses = [lm_loss(model, b, moe)[1].item() for b in val_batches]
    model.train()
    return sum(losses) / len(losses)


def train(model, train_ids: torch.Tensor, val_ids: torch.Tensor, *, minutes: float | None,
          steps: int | None, seed: int, batch_size: int = 16, peak_lr: float = 3e-3,
          warmup: int = 100) -> dict:
    """Train on random windows until the step or wall-clock budget is spent."""
    moe = hasattr(model.config, "num_local_experts")
    gen = torch.Generator().manual_seed(seed)
    val_gen = torch.Generator().manual_seed(seed + 1)
    val_batches = [sample_batch(val_ids, batch_size, val_gen) for _ in range(8)]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=peak_lr, betas=(0.9, 0.95), eps=1e-8,
    )
    budget_s = None if minutes is None else minutes * 60.0
    tokens_per_step = batch_size * CONTEXT
    model.train()
    t0 = time.perf_counter()
    t_log, ema, step = t0, None, 0
    while True:
        elapsed = time.perf_counter() - t0
        progress = step / steps if steps is not None else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = lr_at(progress, step, peak_lr, warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        loss, ce = lm_loss(model, sample_batch(train_ids, batch_size, gen), moe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = ce.item() if ema is None else 0.98 * ema + 0.02 * ce.item()
        if step % 50 == 0:
            now = time.perf_counter()
            tps = 50 * tokens_per_step / (now - t_log)
            t_log = now
            log(f"step {step:5d} | loss {ce.item():.3f} (ema {ema:.3f}) | lr {lr:.2e} "
                f"| {tps:,.0f} tok/s | {now - t0:6.0f}s")
        if step % 500 == 0:
            log(f"step {step:5d} | val loss {evaluate(model, val_batches, moe):.3f}")
    wall = time.perf_counter() - t0
    stats = {
        "steps": step,
        "tokens": step * tokens_per_step,
        "train_loss_ema": round(ema, 4),
        "val_loss": round(evaluate(model, val_batches, moe), 4),
        "wall_s": round(wall, 1),
    }
    log(f"done: {json.dumps(stats)}")
    return stats


def save(model, tok: Tokenizer, out: Path) -> None:
    """Write the HF model directory (bf16 weights) and tokenizer files."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    eos_id = tok.token_to_id(EOS)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=None).save_pretrained(out)
    tok.save(str(out / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": None,
        "pad_token": None,
        "unk_token": None,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")


def verify_and_sample(out: Path, seed: int) -> dict:
    """Reload the saved directory, check file sizes and print generation samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("config.json", "model.safetensors", "tokenizer.json",
                 "generation_config.json", "tokenizer_config.json"):
        size = (out / name).stat().st_size
        log(f"  {name:24s} {size:>10,d} bytes")
        assert size <= MAX_FILE_BYTES, f"{name} is larger than 3 MB"
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                      tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", chat
    n_params = sum(p.numel() for p in model.parameters())
    log(f"reloaded {type(model).__name__}: {n_params:,} parameters")

    ids = torch.tensor([tok.encode(PROMPT).ids])
    eos_id = tok.token_to_id(EOS)
    samples = {}
    torch.manual_seed(seed)
    for name, kwargs in (("greedy", {"do_sample": False}),
                         ("temperature 0.8", {"do_sample": True, "temperature": 0.8, "top_k": 0})):
        gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=60,
                             pad_token_id=eos_id, **kwargs)
        samples[name] = tok.decode(gen[0].tolist(), skip_special_tokens=False)
        log(f"--- sample ({name}) ---\n{samples[name]}\n---")
    return {"params": n_params, "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output model directory")
    parser.add_argument("--arch", choices=("dense", "moe"), default="dense")
    parser.add_argument("--minutes", type=float, default=12.0, help="training wall-clock budget")
    parser.add_argument("--steps", type=int, default=None, help="fixed step budget (overrides --minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(min(args.threads, 2))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    docs = collect_corpus()
    tok = train_tokenizer(docs)
    val_docs = docs[::50]                                   # every 50th file is held out
    train_docs = [d for i, d in enumerate(docs) if i % 50]
    train_ids, val_ids = encode_stream(tok, train_docs), encode_stream(tok, val_docs)
    log(f"tokens: train {len(train_ids):,}, val {len(val_ids):,}")

    from transformers import AutoModelForCausalLM

    config = build_config(args.arch, tok.get_vocab_size(), tok.token_to_id(EOS))
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    log(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")

    stats = train(model, train_ids, val_ids, minutes=None if args.steps else args.minutes,
                  steps=args.steps, seed=args.seed)
    save(model, tok, args.out)
    result = verify_and_sample(args.out, args.seed)
    print(json.dumps({**stats, **result}, indent=2))


if __name__ == "__main__":
    main()
