"""Compile the engine's Triton kernels for a CUDA GPU on a machine without one.

Triton's interpreter (triton_interpreter.py) runs a kernel's Python on NumPy and checks what
it computes, but not what the compiler accepts: a kernel it runs may still fail to compile
(one that gave a variable an int32 value, then an int64 one in a branch, did, and every CUDA
worker failed at start). Triton's front end, its MLIR passes and the bundled ptxas need no
GPU, so the tests here compile each kernel as its wrapper launches it: the wrapper is called
on CPU tensors with the kernel replaced by ``Launches``, which keeps each launch's arguments,
and ``compile_for_cuda`` builds the signature Triton would from them and compiles to a cubin.
"""

from __future__ import annotations

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8",
          torch.bool: "i1"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


class Launches:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **kwargs)`` is kept, not run."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def _scalar_type(value) -> str:
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__} {value!r}")


def compile_for_cuda(kernel, args: tuple, kwargs: dict, capability: int = 90):
    """Compile ``kernel`` for an sm_``capability`` GPU with the argument types of one launch."""
    names = kernel.arg_names
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    constexprs = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    signature = {}
    for name, value in zip(names, args):
        signature[name] = f"*{_TYPES[value.dtype]}" if isinstance(value, torch.Tensor) else _scalar_type(value)
    missing = [n for n in names if n not in signature and n not in constexprs]
    assert not missing, f"{kernel.fn.__name__}: no value for {missing}"
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(fn=kernel, signature={n: signature[n] for n in names},
                       constexprs={(names.index(n),): v for n, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
