"""The one place the Triton kernels import triton, so a machine without it gets one clear error.

Importing quantvla_kernels never comes here; only the Triton modules (and dispatch, lazily, on
CUDA tensors) do.

The kernels call only triton.language builtins, never its @jit-defined helpers (tl.cdiv,
tl.zeros, tl.max, tl.sum, ...): those are built when triton is first imported, and if that
happened before TRITON_INTERPRET=1 was set (another module imported triton first), the CPU
interpreter cannot call them. Our own @jit helpers are built when our modules are imported.
"""

try:
    import triton
    import triton.language as tl
except ModuleNotFoundError as e:
    if e.name != "triton":
        raise
    raise ModuleNotFoundError(
        "quantvla_kernels: the Triton kernels need triton, which is not installed "
        "(pip install the pin in requirements.txt, or use the exact reference in quantvla_kernels).",
        name="triton",
    ) from e

import torch

__all__ = ["check_device", "interpreted", "tl", "triton"]


def interpreted(kernel) -> bool:
    """Whether @triton.jit built `kernel` for the CPU interpreter (TRITON_INTERPRET=1 when it was decorated)."""
    return not isinstance(kernel, triton.runtime.JITFunction)


def check_device(fn: str, kernel, *tensors: torch.Tensor) -> None:
    """Compiled kernels read CUDA memory only; interpreted ones read host memory."""
    want = "cpu" if interpreted(kernel) else "cuda"
    for t in tensors:
        if t.device.type != want:
            mode = "the interpreter (TRITON_INTERPRET=1)" if want == "cpu" else "compiled Triton"
            raise ValueError(f"{fn}: {mode} needs {want} tensors, got one on {t.device}.")
