"""The conversion CLIs: --help, a conversion end to end, bad input -> exit 2 and `error:`."""

from __future__ import annotations

import pytest

from tools import convert_checkpoint, inspect_checkpoint


@pytest.mark.parametrize("argv", [["--help"], ["zero-to-safetensors", "--help"],
                                  ["import-llama", "--help"], ["resize-mixing", "--help"]])
def test_convert_help(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        convert_checkpoint.main(argv)
    assert exc.value.code == 0 and "usage" in capsys.readouterr().out


def test_inspect_help(capsys):
    with pytest.raises(SystemExit) as exc:
        inspect_checkpoint.main(["--help"])
    assert exc.value.code == 0 and "safetensors" in capsys.readouterr().out


def test_bad_inputs_exit_2_with_an_error(tmp_path, capsys):
    assert convert_checkpoint.main(["zero-to-safetensors", str(tmp_path / "nope"),
                                    str(tmp_path / "m.safetensors")]) == 2
    assert "error:" in capsys.readouterr().err
    assert inspect_checkpoint.main([str(tmp_path / "nope")]) == 2
    assert "error:" in capsys.readouterr().err
    assert convert_checkpoint.main(["import-llama", str(tmp_path), str(tmp_path / "x")]) == 2
    assert "no .safetensors" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_llama_import_then_inspect(tmp_path, capsys):
    from tests.convert.test_import_llama import hf_llama

    hf_llama(tmp_path / "hf")
    out = tmp_path / "m.safetensors"
    assert convert_checkpoint.main(["import-llama", str(tmp_path / "hf"), str(out),
                                    "--block-size", "16"]) == 0
    assert "created  layers.0.attn.mixing" in capsys.readouterr().out
    assert convert_checkpoint.main(["resize-mixing", str(out), str(tmp_path / "r.safetensors"),
                                    "max_seq_len=128"]) == 0
    capsys.readouterr()
    assert inspect_checkpoint.main([str(tmp_path / "r.safetensors")]) == 0
    assert "layers.1.attn.mixing 8x8" in capsys.readouterr().out


def test_dit_import(tmp_path, capsys):
    import torch

    from tests.convert.test_import_dit import fake_dit

    torch.save({"model": fake_dit()}, tmp_path / "dit.pt")
    out = tmp_path / "m.safetensors"
    assert convert_checkpoint.main(["import-dit", str(tmp_path / "dit.pt"), str(out),
                                    "num_heads=4", "block_grid=[1,2,2]"]) == 0
    text = capsys.readouterr().out
    assert "created  blocks.1.attn.mixing" in text and "dropped  pos_embed" in text
    assert convert_checkpoint.main(["import-dit", str(tmp_path / "dit.pt"),
                                    str(tmp_path / "x.safetensors"), "block_grid=[1,2,2]"]) == 2
    assert "give num_heads" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()
    with pytest.raises(SystemExit) as exc:
        convert_checkpoint.main(["import-dit", "--help"])
    assert exc.value.code == 0
