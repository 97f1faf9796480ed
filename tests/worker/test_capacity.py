"""What a worker offers: a CPU worker offers the host's real memory, less a margin."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.config import Settings
from app.routing import Resources, can_hold
from worker import capacity
from worker.capacity import cpu_memory_offer_gib, detect_capacity, host_memory_bytes

GIB = 2**30


class TestCpuWorker:
    def test_a_24_gib_host_does_not_take_a_70_gib_job(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(capacity, "host_memory_bytes", lambda: 24 * GIB)
        offer, device = detect_capacity(Settings(device="cpu"))
        assert (offer, device) == (Resources(1, 21.0), "cpu")  # 24 GiB less 10 % (2.4 GiB), whole GiB
        assert not can_hold(offer, Resources(1, 70)) and can_hold(offer, Resources(1, 20))

    def test_the_offer_is_at_most_what_this_host_has(self) -> None:
        offer, _ = detect_capacity(Settings(device="cpu"))
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        assert 1 <= offer.memory_gib < physical / GIB

    def test_processes_share_the_memory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(capacity, "host_memory_bytes", lambda: 64 * GIB)
        assert detect_capacity(Settings(device="cpu", worker_gpus=2))[0] == Resources(2, 28.0)

    def test_the_setting_overrides_the_detected_memory(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(capacity, "host_memory_bytes", lambda: 24 * GIB)
        assert detect_capacity(Settings(device="cpu", worker_gpu_memory_gb=6))[0] == Resources(1, 6)

    @pytest.mark.parametrize(("host", "offer"), [(1.0, 1.0), (4.0, 2.0), (16.0, 14.0), (128.0, 115.0)])
    def test_margin(self, host: float, offer: float) -> None:
        assert cpu_memory_offer_gib(host, 1) == offer  # 10 %, at least 2 GiB kept; at least 1 offered


class TestHostMemory:
    def test_a_container_limit_below_the_physical_memory_wins(self, tmp_path: Path) -> None:
        v2, v1 = tmp_path / "memory.max", tmp_path / "memory.limit_in_bytes"
        v2.write_text(f"{3 * GIB}\n")
        assert host_memory_bytes((v2, v1)) == 3 * GIB

    def test_no_limit_is_the_physical_memory(self, tmp_path: Path) -> None:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        (tmp_path / "memory.max").write_text("max\n")
        (tmp_path / "v1").write_text(f"{2**63 - 4096}\n")  # cgroup v1's "unlimited"
        assert host_memory_bytes((tmp_path / "memory.max", tmp_path / "missing")) == physical
        assert host_memory_bytes((tmp_path / "v1",)) == physical
