"""A Triton driver that compiles kernels for a GPU and launches nothing: GPU checks without one.

Swapped in for Triton's CUDA driver (`CompileOnlyDriver.active`), a kernel launch
(`kernel[grid](...)`, from the real launch code over CPU tensors of the real shapes) compiles
for the target GPU through Triton's own pipeline and ptxas (shipped inside triton), then stops
where the CUDA runtime would load it. What the runtime would refuse there is caught the same
way: shared memory over the per-block limit (Triton's own OutOfResources check, fed the
target's limit) and registers x threads over an SM's 64K registers. Each compile is reported
with its registers, spills and stack, from ptxas's own report on the kernel's PTX.

Needs kernels defined with TRITON_INTERPRET unset or 0 (interpreted ones never compile).
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from triton.backends.compiler import GPUTarget
from triton.backends.driver import DriverBase
from triton.runtime.autotuner import OutOfResources
from triton.runtime.driver import driver as triton_driver

SM_REGISTERS = 65536
"""32-bit registers in one SM's register file (every NVIDIA GPU from sm_50 to sm_100)."""
REGISTER_GRANULE = 8
"""Registers are allocated per thread in multiples of 8 (so 65 registers cost 72)."""


@dataclass
class KernelReport:
    """One compiled launch: what the target GPU would need to run it, and any refusal."""

    case: str
    kernel: str
    num_warps: int
    num_stages: int
    shared: int
    registers: int
    spilled: int  # bytes of register spill stores (legal, but slow)
    stack: int
    error: str = ""

    def line(self) -> str:
        status = self.error or "ok"
        return (
            f"{self.case:<44} {self.kernel:<16} warps {self.num_warps} stages {self.num_stages} "
            f"shared {self.shared:>6} regs {self.registers:>3} spilled {self.spilled:>4} "
            f"stack {self.stack:>3}  "
            f"{status}"
        )


@dataclass
class _Utils:
    """The driver utilities `CompiledKernel` calls when it loads a kernel (registers are
    checked in the kernel's report, from ptxas)."""

    max_shared: int

    def get_device_properties(self, device: int) -> dict[str, int]:
        return {"max_shared_mem": self.max_shared, "multiprocessor_count": 132, "warpSize": 32}

    def load_binary(self, name: str, cubin: bytes, shared: int, device: int) -> tuple:
        return ("compile-only", name, 0, 0, 1024)  # module, function, regs, spills, max threads

    def unload_module(self, module: Any) -> None:
        pass


class _NoLaunch:
    """The launcher of a compiled kernel: the compile was the point, so it runs nothing."""

    def __init__(self, src: Any, metadata: Any) -> None:
        self.metadata = metadata

    def __call__(self, *args: Any) -> None:
        pass


class CompileOnlyDriver(DriverBase):
    """Triton's driver for an sm_`arch` GPU with `max_shared` bytes of shared memory a block,
    where nothing runs (see the module's doc)."""

    launcher_cls = _NoLaunch

    def __init__(self, arch: int, max_shared: int) -> None:
        super().__init__()
        self.target = GPUTarget("cuda", arch, 32)
        self.utils = _Utils(max_shared)

    @classmethod
    def is_active(cls) -> bool:
        return False  # never picked by Triton itself

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise NotImplementedError("a compile-only driver builds no launcher")

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")

    def get_benchmarker(self) -> Callable:
        raise NotImplementedError("a compile-only driver runs nothing to time")

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def set_current_device(self, device: int) -> None:
        pass

    @contextlib.contextmanager
    def active(self) -> Iterator[CompileOnlyDriver]:
        """Make this Triton's active driver for the block, the previous one after."""
        previous = triton_driver._active
        triton_driver.set_active(self)
        try:
            yield self
        finally:
            triton_driver._active = previous

    def run(self, case: str, launch: Callable[[], None]) -> list[KernelReport]:
        """Call `launch` (which launches Triton kernels) and report every kernel it compiled."""
        from triton.runtime.jit import JITFunction

        compiled: list[Any] = []
        hook = _record_compiles(compiled)
        previous = JITFunction._do_compile
        JITFunction._do_compile = hook(previous)  # type: ignore[method-assign]
        error = ""
        try:
            launch()
        except OutOfResources as exc:
            error = f"refused: {exc}"
        finally:
            JITFunction._do_compile = previous  # type: ignore[method-assign]
        reports = [self._report(case, kernel) for kernel in compiled]
        if error and reports:
            reports[-1].error = error
        elif error:
            reports.append(KernelReport(case, "?", 0, 0, 0, 0, 0, 0, error))
        return reports

    def _report(self, case: str, kernel: Any) -> KernelReport:
        meta = kernel.metadata
        usage = ptx_usage(kernel.asm["ptx"], self.target.arch)
        report = KernelReport(
            case,
            meta.name.lstrip("_").removesuffix("_kernel"),
            meta.num_warps,
            meta.num_stages,
            meta.shared,
            usage.registers,
            usage.spilled,
            usage.stack,
        )
        granted = -(-max(usage.registers, 1) // REGISTER_GRANULE) * REGISTER_GRANULE
        if meta.shared > self.utils.max_shared:
            report.error = f"shared memory {meta.shared} > {self.utils.max_shared}"
        elif granted * meta.num_warps * 32 > SM_REGISTERS:
            report.error = f"{granted} registers x {meta.num_warps * 32} threads > {SM_REGISTERS}"
        return report


def _record_compiles(compiled: list[Any]) -> Callable:
    def wrap(do_compile: Callable) -> Callable:
        def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
            kernel = do_compile(self, *args, **kwargs)
            if kernel is not None:
                compiled.append(kernel)
            return kernel

        return recording

    return wrap


@dataclass(frozen=True)
class PtxUsage:
    """What ptxas reports for a kernel: registers a thread, and bytes of spills and stack."""

    registers: int
    spilled: int
    stack: int


def ptx_usage(ptx: str, arch: int) -> PtxUsage:
    """Assemble `ptx` for sm_`arch` as Triton does (its ptxas and register allocation flags),
    with ptxas's report of the function's resources."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        gpu = f"--gpu-name={sm_arch_from_capability(arch)}"
        command = [get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", gpu, str(src)]
        log = subprocess.run(
            [*command, "-o", str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
            timeout=300,
            check=True,
        ).stderr
    registers = re.search(r"Used (\d+) registers", log)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    if registers is None or frame is None:
        raise RuntimeError(f"ptxas -v printed no resource report:\n{log}")
    return PtxUsage(int(registers.group(1)), int(frame.group(2)), int(frame.group(1)))
