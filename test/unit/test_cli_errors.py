"""What `quantvla` prints when something goes wrong: one sentence for a user's mistake, a
traceback for a bug."""

from __future__ import annotations

import pytest

from quantvla_ros import cli
from quantvla_ros.data.bags import BagError
from quantvla_ros.data.buffer import BufferError
from quantvla_ros.data.messages import MessageError
from quantvla_ros.errors import QuantVLAError
from quantvla_ros.models.common.checkpoint import CheckpointError

pytestmark = pytest.mark.unit


def test_every_user_error_class_shares_one_base():
    for error in (CheckpointError, BufferError, BagError, MessageError):
        assert issubclass(error, QuantVLAError)
    assert issubclass(QuantVLAError, ValueError)


def test_a_user_error_is_one_line(monkeypatch, capsys):
    def fails(args):
        raise QuantVLAError("Checkpoint /x is missing config.json; pass a checkpoint folder.")

    monkeypatch.setattr(cli, "cmd_info", fails)
    assert cli.main(["info", "/x"]) == 2
    err = capsys.readouterr().err
    assert err == "quantvla info: Checkpoint /x is missing config.json; pass a checkpoint folder.\n"


def test_an_internal_error_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise ValueError("operands could not be broadcast together with shapes (3,) (4,)")

    monkeypatch.setattr(cli, "cmd_info", bug)
    with pytest.raises(ValueError, match="could not be broadcast"):
        cli.main(["info", "/x"])


def test_the_parser_spells_the_methods_and_transforms_of_quant_config():
    from quantvla_ros.quant.config import ATM_KEYS, METHODS, STAT_POOLINGS, TRANSFORMS

    assert cli.METHOD_NAMES == tuple(METHODS) and cli.TRANSFORM_NAMES == TRANSFORMS
    assert cli.STAT_POOLING_NAMES == STAT_POOLINGS and cli.ATM_KEY_NAMES == ATM_KEYS
