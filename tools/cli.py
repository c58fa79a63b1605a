"""The ``tandem`` command.

    tandem generate [--url URL | --model DIR] [--max-tokens N] [--temperature T] [--top-p P]
                    [--top-k K] [--seed S] [--stop STR] [--dtype D] [--device D] PROMPT
    tandem up [--model DIR] [--prefill N] [--decode M] [--mixed K] [--http-port P] [--grpc-port G]
              [--etcd URL] [--router-processes R]
    tandem down
    tandem status
    tandem kv stats|clear
    tandem serve prefill|decode|mixed|router --etcd URL [...]     (router: [--processes N])
    tandem bench engine|roofline|decode-profile|steps|moe|moe-decode|sampler|serve|disagg|disagg-merge [...]

``generate`` runs the engine in-process (the built-in demo model unless ``--model``)
and streams only the completion text to stdout; logs go to stderr. Bad input exits
with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from tools import cluster_cmd, kv_cmd, serve_cmd
from tools.demo import DEMO_MODEL_DIR

_EXIT_BAD_INPUT = 2
_EXIT_BROKEN_PIPE = 141  # as a shell reports a process ended by SIGPIPE


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # stdout's reader left (``tandem generate ... | head``): not an error to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit-time flush must not fail too
        return _EXIT_BROKEN_PIPE


def _main(argv: list[str] | None) -> int:
    parser = _build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "bench":
        return _bench(args, rest)
    if args.command == "serve":
        return serve_cmd.run(args)
    if args.command in ("up", "down", "status"):
        return cluster_cmd.run(args)
    if args.command == "kv":
        return kv_cmd.run(args, args.state_dir or cluster_cmd.default_state_dir())
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return _generate(args)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Disaggregated LLM serving.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a completion in-process")
    gen.add_argument("prompt", help="prompt text")
    gen.add_argument("--model", type=Path, default=DEMO_MODEL_DIR, help="Hugging Face model directory "
                     "(default: the built-in demo model)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    gen.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    gen.add_argument("--url", default=None, help="a running router (http://host:port or host:port for gRPC) "
                     "instead of an in-process engine")

    serve_cmd.add_parser(sub)
    cluster_cmd.add_parsers(sub)
    kv_cmd.add_parser(sub)

    # add_help=False: `tandem bench serve --help` reaches the benchmark's own parser
    bench = sub.add_parser("bench", help=f"benchmarks (`tandem bench {'|'.join(_BENCHMARKS)} --help`)",
                           add_help=False)
    bench.add_argument("target", choices=list(_BENCHMARKS))
    return parser


def _generate(args: argparse.Namespace) -> int:
    if args.url:
        return _generate_remote(args)
    from services.engine.config import EngineConfig
    from services.engine.engine import LLMEngine
    from services.engine.errors import EngineError
    from services.engine.request import SamplingParams

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, seed=args.seed, stop=tuple(args.stop))
        engine = LLMEngine.from_pretrained(args.model, EngineConfig(device=args.device, dtype=args.dtype))
        engine.add_request("cli", args.prompt, params)
        while engine.has_unfinished():
            for out in engine.step():
                sys.stdout.write(out.new_text)
                sys.stdout.flush()
    except (EngineError, ValueError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    sys.stdout.write("\n")
    return 0


def _generate_remote(args: argparse.Namespace) -> int:
    from tools.remote_generate import RemoteError, generate_remote

    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_p": args.top_p}
    if args.top_k:
        sampling["top_k"] = args.top_k
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.stop:
        sampling["stop"] = args.stop
    try:
        generate_remote(args.url, args.prompt, sampling)
    except RemoteError as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return _EXIT_BAD_INPUT
    sys.stdout.write("\n")
    return 0


_BENCHMARKS = {"engine": "engine_bench", "roofline": "roofline_bench", "decode-profile": "decode_profile",
               "steps": "step_bench", "moe": "moe_bench", "moe-decode": "moe_decode_bench",
               "sampler": "sampler_bench", "serve": "serve_bench", "disagg": "disagg_bench",
               "disagg-merge": "disagg_merge"}
"""``tandem bench TARGET`` -> the module of tools.bench that runs it (imported only when asked for)."""


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    module = importlib.import_module(f"tools.bench.{_BENCHMARKS[args.target]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
