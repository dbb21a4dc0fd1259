"""Free memory per device: what a node can offer the partitioner.

NVIDIA cards are read through NVML (ctypes, no extra dependency) or `nvidia-smi`; AMD cards through the amdgpu
sysfs files; everything else reports system RAM. A `--memory` override replaces the measurement entirely.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import psutil

logger = logging.getLogger(__name__)

DRM_ROOT = Path("/sys/class/drm")
NVML_LIBRARY = "libnvidia-ml.so.1"

_KINDS: dict[str, str] = {
    "CUDA": "nvidia",
    "NV": "nvidia",
    "PTX": "nvidia",
    "AMD": "amd",
    "HIP": "amd",
    "CL": "opencl",
    "GPU": "opencl",
    "OPENCL": "opencl",
    "CPU": "cpu",
    "CLANG": "cpu",
    "LLVM": "cpu",
    "PYTHON": "cpu",
    "NPY": "cpu",
}
_MIB = 1024 * 1024
_warned: set[str] = set()


@dataclass(frozen=True)
class DeviceMemory:
    total: int  # bytes
    free: int  # bytes
    # False when system RAM stands in for a device with no counters we can read (an OpenCL card, an NVIDIA one
    # without NVML): good enough to plan with, not to refuse a load or limit sessions by
    of_device: bool = True


def device_kind(device: str) -> str:
    """Map a tinygrad device name ("CUDA:1", "AMD", "CL", "CPU", ...) to nvidia/amd/opencl/cpu/other."""
    return _KINDS.get(device.split(":", 1)[0].strip().upper(), "other")


def device_index(device: str) -> int:
    """The ordinal after the colon ("CUDA:1" -> 1); 0 when there is none."""
    _, sep, rest = device.partition(":")
    if not sep or not rest.strip():
        return 0
    try:
        index = int(rest)
    except ValueError:
        raise ValueError(f"bad device index in {device!r}: expected NAME or NAME:N") from None
    if index < 0:
        raise ValueError(f"bad device index in {device!r}: must not be negative")
    return index


def device_memory(device: str, *, override: int | None = None, used: int = 0) -> DeviceMemory:
    """Total and free bytes on `device`.

    With `override` (from `--memory`) the node claims exactly that much and `used` (bytes its loaded shards
    hold) is subtracted; a measured number already accounts for loaded shards, so `used` applies only there.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"memory override must be positive, got {override}")
        return DeviceMemory(total=override, free=max(0, override - max(0, used)))
    kind = device_kind(device)
    if kind == "nvidia":
        mem = _nvidia_memory(device_index(device))
        if mem is not None:
            return mem
        _warn_once(device, "no NVML or nvidia-smi answered for %s; reporting system memory instead")
    elif kind == "amd":
        mem = _amd_vram(device_index(device))
        if mem is not None:
            return mem
        _warn_once(device, "no amdgpu VRAM counters found for %s; reporting system memory instead")
    ram = system_memory()
    return ram if kind == "cpu" else replace(ram, of_device=False)


def system_memory() -> DeviceMemory:
    """System RAM: total and MemAvailable (what can be allocated without swapping)."""
    vm = psutil.virtual_memory()
    return DeviceMemory(total=int(vm.total), free=int(vm.available))


def _warn_once(device: str, msg: str) -> None:
    # The node polls memory periodically; one warning per device is enough.
    if device not in _warned:
        _warned.add(device)
        logger.warning(msg, device)


def _nvidia_memory(index: int) -> DeviceMemory | None:
    target = _nvidia_target(index, os.environ.get("CUDA_VISIBLE_DEVICES"))
    return _nvml_memory(target) or _nvidia_smi_memory(target)


def _nvidia_target(index: int, visible: str | None) -> int | str:
    """Translate a CUDA ordinal into what NVML and nvidia-smi expect (physical index or GPU UUID).

    CUDA_VISIBLE_DEVICES renumbers devices for CUDA but not for NVML, so "CUDA:0" with CUDA_VISIBLE_DEVICES=2
    is NVML index 2.
    """
    if not visible or not visible.strip():
        return index
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    if index >= len(entries):
        return index
    entry = entries[index]
    return int(entry) if entry.isdigit() else entry


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


def _nvml_memory(target: int | str, library: str = NVML_LIBRARY) -> DeviceMemory | None:
    """Free VRAM from NVML; None when the library or the device is missing."""
    try:
        nvml = ctypes.CDLL(library)
    except OSError:
        return None
    try:
        if nvml.nvmlInit_v2() != 0:
            return None
    except AttributeError:
        return None
    try:
        handle = ctypes.c_void_p()
        if isinstance(target, int):
            rc = nvml.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(target), ctypes.byref(handle))
        else:
            rc = nvml.nvmlDeviceGetHandleByUUID(ctypes.c_char_p(target.encode()), ctypes.byref(handle))
        if rc != 0:
            logger.debug("NVML has no device %s (error %d)", target, rc)
            return None
        info = _NvmlMemory()
        rc = nvml.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(info))
        if rc != 0:
            logger.debug("NVML memory query for device %s failed (error %d)", target, rc)
            return None
        return DeviceMemory(total=int(info.total), free=int(info.free))
    except AttributeError:  # a stub library without these symbols
        return None
    finally:
        nvml.nvmlShutdown()


def _nvidia_smi_memory(target: int | str, executable: str | None = None) -> DeviceMemory | None:
    """Free VRAM from `nvidia-smi` (MiB in its output); None when it is missing or fails."""
    exe = executable or shutil.which("nvidia-smi")
    if exe is None:
        return None
    cmd = [exe, "--query-gpu=memory.total,memory.free", "--format=csv,noheader,nounits", "-i", str(target)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        logger.debug("nvidia-smi failed: %s", e)
        return None
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        total, free = (int(float(v)) for v in lines[0].split(","))
    except (IndexError, ValueError):
        logger.debug("unexpected nvidia-smi output: %r", out)
        return None
    return DeviceMemory(total=total * _MIB, free=free * _MIB)


def _amd_vram(index: int, root: Path = DRM_ROOT) -> DeviceMemory | None:
    """VRAM of the `index`-th amdgpu card under `root` (cards without VRAM counters are skipped)."""
    cards: list[tuple[int, Path]] = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return None
    for entry in entries:
        m = re.fullmatch(r"card(\d+)", entry.name)  # skips connector entries such as card0-DP-1
        dev = entry / "device"
        if m and (dev / "mem_info_vram_total").is_file() and (dev / "mem_info_vram_used").is_file():
            cards.append((int(m.group(1)), dev))
    cards.sort()
    if index >= len(cards):
        return None
    dev = cards[index][1]
    try:
        total = int((dev / "mem_info_vram_total").read_text().strip())
        used = int((dev / "mem_info_vram_used").read_text().strip())
    except (OSError, ValueError) as e:
        logger.debug("unreadable VRAM counters in %s: %s", dev, e)
        return None
    return DeviceMemory(total=total, free=max(0, total - used))
