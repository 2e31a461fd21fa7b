"""A newcomer's first hour: what a missing --model says, `nanovl eval --help`, the README's Train
commands against the configs they name, and the AWQ group-size error."""

import re
import shlex
from pathlib import Path

import pytest

from nanovl.cli import main
from nanovl.tiny import write_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args",
    [
        ["ask", "page.png", "What is the total?"],
        ["tiles", "page.png"],
        ["generate", "--prompt", "hi"],
        ["chat"],
        ["serve"],
        ["quantize", "--method", "int8", "--out", "q"],
    ],
)
def test_missing_model_says_where_models_come_from(args, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "the following arguments are required: --model" in err
    for hint in ("a model is required", "nvidia/Llama-3.1-Nemotron-Nano-VL-8B-V1", "nvidia/NVLM-D-72B",
                 "nvidia/NVIDIA-Nemotron-Nano-12B-v2-VL-BF16", "nanovl make-tiny"):  # fmt: skip
        assert hint in err, err


def test_eval_without_a_model_or_endpoint(capsys):
    assert main(["eval", "corpus"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nanovl: error: give --model") and "hub id" in err and "--endpoint" in err


def test_eval_help_shows_the_task_form(capsys):
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "nanovl eval [run] TASK" in out and "nanovl eval score TASK" in out


def test_awq_group_size_error_names_the_flag(tmp_path, capsys):
    model = write_checkpoint("llama", tmp_path / "m")  # in_features 64 and 160: group 32 divides both, 128 neither
    assert main(["quantize", "--model", str(model), "--method", "awq", "--out", str(tmp_path / "q")]) == 1
    err = capsys.readouterr().err
    assert "does not divide by the group size 128" in err and "pass --group-size 32" in err, err


def readme_train_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = text.split("\n## Train\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_train_commands_fit_the_configs(tmp_path):
    """Every folder a config of the README's Train block starts from is made by an earlier command,
    its data is what the README's `nanovl synth` writes, and every sample fits the stage's seq_len."""
    from nanovl.synth import write_dataset
    from nanovl.train.config import load_train_config
    from nanovl.train.data import Skips, read_records
    from nanovl.train.trainer import build_model, encode_all

    made, synth, configs = set(), None, []
    for cmd in readme_train_commands():
        args = cmd[cmd.index("nanovl.cli") + 1 :] if cmd[0] == "torchrun" else cmd[1:]
        if args[0] == "make-tiny":
            made.add(str(ROOT / args[2]))
        elif args[0] == "synth":
            synth = ROOT / args[1]
        elif args[0] == "train":
            cfg = load_train_config(ROOT / args[args.index("--config") + 1])
            assert cfg.model in made, f"{cfg.model} is not made by an earlier README command"
            assert synth and all(Path(p).parent == synth for p in cfg.data + cfg.text_data), cfg.data
            made.add(str(Path(cfg.out) / ("adapter" if cfg.lora else "model")))
            configs.append(cfg)
        elif args[0] == "merge-lora":
            assert str(ROOT / args[1]) in made
    # two of the README's documents of each kind: seeds 6 and 7, where the reports have three pages
    write_dataset(tmp_path / "synth", 2, start=6, text_count=4, augment=0)
    base = write_checkpoint("nemotron-nano-vl-v1", tmp_path / "base")
    for cfg in configs:
        cfg.model = str(base)
        cfg.data, cfg.text_data = (
            [str(tmp_path / "synth" / Path(p).name) for p in ps] for ps in (cfg.data, cfg.text_data)
        )
        _, _, encoder, _, ckpt = build_model(cfg)
        for files in (cfg.data, cfg.text_data):  # a sample over seq_len is a DataError naming it
            encode_all(read_records(files), encoder, cfg, ckpt.text.max_position_embeddings, Skips(), "check")


def test_readme_says_what_setup_installs():
    text = (ROOT / "README.md").read_text()
    pin = re.search(r'"torch([^"]*)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f'"torch{pin}"' in text and "download.pytorch.org/whl/cpu" in text
