"""The `device` setting: auto picks CUDA only when present; a device this machine lacks is one
sentence naming the setting, before anything is loaded."""

from __future__ import annotations

import pytest
import torch

from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.device import resolve_device

pytestmark = pytest.mark.unit


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_auto_is_the_cpu_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_cuda_without_cuda_is_one_sentence_naming_the_setting(no_cuda):
    for name in ("cuda", "cuda:1"):
        with pytest.raises(QuantVLAError, match=rf"Device '{name}' is not available here .*set --device") as err:
            resolve_device(name)
        assert "\n" not in str(err.value) and "auto" in str(err.value)


def test_a_name_torch_does_not_know_is_refused():
    with pytest.raises(QuantVLAError, match="'gpu' is not a torch device; use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


def test_a_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(QuantVLAError, match=r"'cuda:3' is not available here \(this machine has 1 CUDA device"):
        resolve_device("cuda:3")
