"""Command-line options: the global ones (--json, --debug) work before or after the subcommand, as in git or pip."""

from __future__ import annotations

import json

import pytest
import torch

import fvtransform as fvt
from fvtransform.cli._main import _parser, main


@pytest.fixture
def ckpt(tmp_path):
    fvt.save(fvt.ParamTree({"a.w": torch.zeros(2, 3, dtype=torch.bfloat16)}), tmp_path / "ckpt", max_shard_size=None)
    return tmp_path / "ckpt"


@pytest.mark.parametrize("argv", [
    ["--json", "inspect", "X"],
    ["inspect", "X", "--json"],
    ["inspect", "--json", "X"],
    ["--debug", "inspect", "X", "--json"],
    ["inspect", "X", "--json", "--debug"],
    ["--json", "--debug", "inspect", "X"],
])
def test_global_options_parse_on_either_side_of_the_subcommand(argv):
    args = _parser().parse_args(argv)
    assert args.command == "inspect" and args.path == "X"
    assert args.json is True
    assert args.debug is ("--debug" in argv)


@pytest.mark.parametrize("command", [
    ["demo"], ["inspect", "X"], ["merge", "B", "L", "-o", "O"], ["convert-lora", "S", "-o", "O", "--to", "peft"],
    ["extract-lora", "B", "T", "-o", "O", "--rank", "2"],
])
def test_every_subcommand_takes_the_global_options_and_defaults_them_off(command):
    plain = _parser().parse_args(command)
    assert plain.json is False and plain.debug is False
    after = _parser().parse_args([*command, "--json", "--debug"])
    assert after.json is True and after.debug is True


def test_inspect_json_after_the_path_prints_json(ckpt, capsys):
    assert main(["inspect", str(ckpt), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert main(["--json", "inspect", str(ckpt)]) == 0
    before = json.loads(capsys.readouterr().out)
    assert after == before
    assert [t["key"] for t in after["tensors"]] == ["a.w"]


def test_debug_after_the_subcommand_shows_the_traceback(tmp_path, capsys):
    missing = tmp_path / "nothing-here.safetensors"
    assert main(["inspect", str(missing)]) == 2
    assert "fvtransform: error:" in capsys.readouterr().err
    with pytest.raises(fvt.errors.NotFoundError, match=r"nothing-here\.safetensors: no such file or folder"):
        main(["inspect", str(missing), "--debug"])


def test_an_unknown_option_is_still_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["inspect", "X", "--jsn"])
    assert e.value.code == 2
    assert "unrecognized arguments: --jsn" in capsys.readouterr().err
