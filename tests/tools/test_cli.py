"""The `tandem` command as a user runs it: real subprocesses, stdout vs stderr, exit codes."""

from __future__ import annotations

import subprocess
import sys

from services.engine.engine import LLMEngine
from services.engine.request import SamplingParams
from tools.demo import DEMO_MODEL_DIR


def _tandem(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_generate_prints_only_the_completion():
    done = _tandem("generate", "--max-tokens", "24", "def fibonacci(n):")
    assert done.returncode == 0, done.stderr
    want = LLMEngine.from_pretrained(DEMO_MODEL_DIR).generate(
        ["def fibonacci(n):"], SamplingParams(max_tokens=24, temperature=0))[0].text
    assert done.stdout == want + "\n"


def test_generate_with_moe_model_and_sampling_options():
    done = _tandem("generate", "--model", str(DEMO_MODEL_DIR.parent / "moe"), "--max-tokens", "8",
                   "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--dtype", "bfloat16", "import os\n")
    again = _tandem("generate", "--model", str(DEMO_MODEL_DIR.parent / "moe"), "--max-tokens", "8",
                    "--temperature", "0.7", "--top-p", "0.9", "--seed", "3", "--dtype", "bfloat16", "import os\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == again.stdout and done.stdout.strip()


def test_bad_input_exits_2_with_one_clear_line():
    cases = {
        ("--max-tokens", "0", "x"): "max_tokens must be an integer >= 1",
        ("--temperature", "-1", "x"): "temperature must be >= 0",
        ("--model", "/nonexistent", "x"): "does not exist",
        ("",): "prompt is empty",
        ("--max-tokens", "2000", "x"): "exceeds the context length",
        ("--device", "tpu", "x"): "device must be",
    }
    for args, message in cases.items():
        done = _tandem("generate", *args)
        assert done.returncode == 2, (args, done.stderr)
        assert message in done.stderr and done.stdout == "", (args, done.stderr)
        assert "Traceback" not in done.stderr


def test_generate_url_reports_an_unreachable_router():
    done = _tandem("generate", "--url", "http://127.0.0.1:9", "x")
    assert done.returncode == 2 and "cannot reach" in done.stderr
