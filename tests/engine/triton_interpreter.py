"""Triton's interpreter (TRITON_INTERPRET=1) made to compute as the GPU does, for the kernel
tests' child processes: they call ``patch_interpreter()`` before running any kernel.

Triton reads TRITON_INTERPRET when ``@triton.jit`` decorates a kernel, i.e. when the kernel's
module is imported, so the kernels run interpreted only in a process started with it set.
"""

from __future__ import annotations


def patch_interpreter() -> None:
    _dot_of_bf16_values()
    _round_bf16_to_nearest_even()
    _scalar_index_of_one_element_arrays()


def _dot_of_bf16_values() -> None:
    """The interpreter keeps bfloat16 as uint16 bit patterns and its tl.dot multiplies those
    (triton-lang/triton#11584, bf16 is unsupported there). Give it the values instead, as the
    GPU does: bf16 products are exact in float32."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder

    create_dot = InterpreterBuilder.create_dot

    def dot_of_values(self, a, b, *args):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return create_dot(self, a, b, *args)

    InterpreterBuilder.create_dot = dot_of_values


def _round_bf16_to_nearest_even() -> None:
    """The interpreter (triton 3.x) truncates float32 -> bfloat16 (``create_fp_trunc`` reaches
    ``_convert_float`` without a rounding mode), where the GPU's cvt.rn.bf16.f32 and torch round
    to nearest even. Kernels that round to bfloat16 between steps would be biased by up to an
    ulp at each. Patches the conversion to round as the GPU does."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    assert hasattr(interpreter, "_convert_float"), "triton's interpreter changed: revisit this patch"
    convert = interpreter._convert_float

    def convert_rounding(data, src_dtype, dst_dtype, rounding_mode):
        if not (src_dtype == tl.float32 and dst_dtype == tl.bfloat16):
            return convert(data, src_dtype, dst_dtype, rounding_mode)
        bits = np.ascontiguousarray(data).view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        quiet_nan = (bits >> np.uint32(16)) | np.uint32(0x40)
        return np.where(np.isnan(bits.view(np.float32)), quiet_nan, rounded).astype(np.uint16)

    interpreter._convert_float = convert_rounding


def _scalar_index_of_one_element_arrays() -> None:
    """A loop bound that is a kernel argument or a loaded value becomes a Python int through the
    interpreter's __index__, which older Triton (3.6) takes as int() of a one-element array:
    NumPy 2.4 refuses that. Later Triton squeezes the array first; do the same."""
    from triton.runtime import interpreter

    patch_lang_tensor = interpreter._patch_lang_tensor

    def patch_with_scalar_index(tensor, scope):
        patch_lang_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_scalar_index
