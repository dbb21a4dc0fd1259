from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest

from cluster import memory
from cluster.memory import DeviceMemory, device_index, device_kind, device_memory

GIB = 1024**3


def _meminfo() -> dict[str, int]:
    out = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def _close_to_system(mem: DeviceMemory) -> None:
    info = _meminfo()
    assert mem.total == pytest.approx(info["MemTotal"], rel=0.01)
    # MemAvailable moves while other processes run; a few percent of RAM is plenty of slack.
    assert abs(mem.free - info["MemAvailable"]) <= max(256 * 1024**2, 0.05 * info["MemTotal"])
    assert 0 < mem.free <= mem.total


@pytest.mark.parametrize(
    "device, kind",
    [
        ("CUDA", "nvidia"),
        ("cuda:1", "nvidia"),
        ("NV", "nvidia"),
        ("NV:3", "nvidia"),
        ("AMD", "amd"),
        ("AMD:1", "amd"),
        ("HIP", "amd"),
        ("CL", "opencl"),
        ("GPU", "opencl"),
        ("CPU", "cpu"),
        ("CLANG", "cpu"),
        ("LLVM", "cpu"),
        ("METAL", "other"),
        ("WEBGPU", "other"),
        ("DISK:/tmp/x", "other"),
        ("", "other"),
    ],
)
def test_device_kind(device: str, kind: str) -> None:
    assert device_kind(device) == kind


def test_device_index() -> None:
    assert device_index("CUDA") == 0
    assert device_index("CUDA:2") == 2
    with pytest.raises(ValueError, match="bad device index"):
        device_index("CUDA:x")
    with pytest.raises(ValueError, match="negative"):
        device_index("AMD:-1")


@pytest.mark.parametrize("device", ["CPU", "CLANG", "CL", "METAL"])
def test_cpu_and_other_devices_report_system_memory(device: str) -> None:
    mem = device_memory(device)
    _close_to_system(mem)
    # system RAM is the CPU's own memory; for a card with no counters it only stands in (the node then gives its
    # engines no budget to refuse a load or limit sessions by)
    assert mem.of_device == (device in ("CPU", "CLANG"))


def test_override_and_used() -> None:
    assert device_memory("CUDA", override=8 * GIB) == DeviceMemory(total=8 * GIB, free=8 * GIB)
    assert device_memory("CPU", override=8 * GIB, used=3 * GIB) == DeviceMemory(total=8 * GIB, free=5 * GIB)
    assert device_memory("AMD", override=2 * GIB, used=5 * GIB) == DeviceMemory(total=2 * GIB, free=0)
    with pytest.raises(ValueError, match="positive"):
        device_memory("CPU", override=0)


def _card(root: Path, name: str, total: int | None = None, used: int | None = None) -> None:
    dev = root / name / "device"
    dev.mkdir(parents=True)
    if total is not None:
        (dev / "mem_info_vram_total").write_text(f"{total}\n")
    if used is not None:
        (dev / "mem_info_vram_used").write_text(f"{used}\n")


def test_amd_vram_from_sysfs_tree(tmp_path: Path) -> None:
    _card(tmp_path, "card0")  # an integrated GPU of another vendor: no VRAM counters
    _card(tmp_path, "card0-DP-1")
    _card(tmp_path, "card1", total=16 * GIB, used=1 * GIB)
    _card(tmp_path, "card10", total=24 * GIB, used=20 * GIB)
    _card(tmp_path, "card2", total=8 * GIB, used=0)
    _card(tmp_path, "card3", total=8 * GIB)  # half-populated: skipped
    (tmp_path / "version").write_text("drm 1.1.0\n")

    assert memory._amd_vram(0, root=tmp_path) == DeviceMemory(total=16 * GIB, free=15 * GIB)
    assert memory._amd_vram(1, root=tmp_path) == DeviceMemory(total=8 * GIB, free=8 * GIB)
    assert memory._amd_vram(2, root=tmp_path) == DeviceMemory(total=24 * GIB, free=4 * GIB)  # numeric order
    assert memory._amd_vram(3, root=tmp_path) is None
    assert memory._amd_vram(0, root=tmp_path / "missing") is None


def test_amd_vram_garbage_counters(tmp_path: Path) -> None:
    _card(tmp_path, "card0", total=16 * GIB, used=1 * GIB)
    (tmp_path / "card0" / "device" / "mem_info_vram_used").write_text("n/a\n")
    assert memory._amd_vram(0, root=tmp_path) is None


def test_nvml_missing_library_returns_none() -> None:
    assert memory._nvml_memory(0, library="libclusterctl-no-such-nvml.so.1") is None


def test_nvidia_smi_parsing_with_fake_executable(tmp_path: Path) -> None:
    exe = tmp_path / "nvidia-smi"
    exe.write_text('#!/bin/sh\necho "$@" > "$(dirname "$0")/args"\necho "81559, 80000"\n')
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    assert memory._nvidia_smi_memory(1, executable=str(exe)) == DeviceMemory(
        total=81559 * 1024**2, free=80000 * 1024**2
    )
    assert (tmp_path / "args").read_text().split() == [
        "--query-gpu=memory.total,memory.free",
        "--format=csv,noheader,nounits",
        "-i",
        "1",
    ]

    exe.write_text("#!/bin/sh\necho 'No devices were found'\nexit 6\n")
    assert memory._nvidia_smi_memory(0, executable=str(exe)) is None
    assert memory._nvidia_smi_memory(0, executable=str(tmp_path / "absent")) is None


def test_cuda_visible_devices_mapping() -> None:
    assert memory._nvidia_target(0, None) == 0
    assert memory._nvidia_target(1, "") == 1
    assert memory._nvidia_target(0, "2,3") == 2
    assert memory._nvidia_target(1, "2, 3") == 3
    assert memory._nvidia_target(0, "GPU-8c1f5b2e") == "GPU-8c1f5b2e"


def test_nvidia_without_nvml_or_smi_falls_back_to_system_memory(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Force both probes to fail even on a machine that has a GPU.
    monkeypatch.setattr(memory, "_nvml_memory", lambda target: None)
    monkeypatch.setattr(memory, "_nvidia_smi_memory", lambda target: None)
    monkeypatch.setattr(memory, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="cluster.memory"):
        _close_to_system(device_memory("CUDA:0"))
        _close_to_system(device_memory("CUDA:0"))
    assert not device_memory("CUDA:0").of_device
    assert device_memory("CUDA:0", override=8 * GIB).of_device  # what the user granted stands
    assert [r.getMessage() for r in caplog.records].count(
        "no NVML or nvidia-smi answered for CUDA:0; reporting system memory instead"
    ) == 1


@pytest.mark.parametrize("device", ["CUDA", "NV:0", "AMD"])
def test_gpu_devices_never_raise(device: str) -> None:
    # Unpatched: real NVML/nvidia-smi/sysfs when present, system memory otherwise.
    mem = device_memory(device)
    assert mem.total > 0
    assert 0 <= mem.free <= mem.total
