"""The CLI as a user runs it: streaming output, and one-line errors with a non-zero exit code."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run(*args, stdin=None):
    p = subprocess.run(
        [sys.executable, "-m", "nanovl.cli", *args], input=stdin, capture_output=True, text=True, env=ENV, timeout=120
    )
    return p.returncode, p.stdout, p.stderr


def assert_one_line_error(rc, err, pattern):
    import re

    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("nanovl: error: ") and re.search(pattern, lines[0]), lines[0]


def test_generate_streams_the_library_completion(tiny_llama):
    import nanovl

    rc, out, err = run("generate", "--model", str(tiny_llama), "--prompt", "Invoice total", "--max-tokens", "12")
    assert rc == 0, err
    want = nanovl.load(tiny_llama).generate("Invoice total", max_new_tokens=12).text
    assert out == want + "\n"


def test_generate_with_seed_is_repeatable(tiny_qwen2):
    args = ["generate", "--model", str(tiny_qwen2), "--prompt", "x", "--max-tokens", "16"]
    args += ["--temperature", "0.9", "--top-p", "0.9", "--seed", "7", "--stats"]
    a, b = run(*args), run(*args)
    assert a[0] == 0 and a[1] == b[1]
    assert "tokens/s" in a[2]


def test_a_reader_that_leaves_stops_the_stream_quietly(tiny_llama):
    """`nanovl generate ... | head -c 1`: the pipe closes after the first bytes; the next write fails,
    and the command ends with 141 (as Unix tools do on SIGPIPE), not a traceback."""
    cmd = [sys.executable, "-m", "nanovl.cli", "generate", "--model", str(tiny_llama), "--prompt", "Once",
           "--max-tokens", "400"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert p.stdout.read(1)
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err, err


def test_chat_multi_turn_from_stdin(tiny_llama):
    rc, out, err = run("chat", "--model", str(tiny_llama), "--max-tokens", "5", stdin="hello\nand again\n/exit\n")
    assert rc == 0, err
    assert len(out.strip().splitlines()) >= 1


def test_make_tiny_writes_hf_layout(tmp_path):
    rc, out, err = run("make-tiny", "qwen2", str(tmp_path / "q"))
    assert rc == 0, err
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]:
        assert (tmp_path / "q" / name).is_file()
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


@pytest.fixture
def broken(tiny_llama, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_llama, d)
    return d


def gen(d, *extra):
    return run("generate", "--model", str(d), "--prompt", "hi", "--max-tokens", "2", *extra)


def test_error_model_folder_missing(tmp_path):
    rc, _, err = gen(tmp_path / "nope")
    assert_one_line_error(rc, err, "does not exist")


def test_error_no_config(broken):
    (broken / "config.json").unlink()
    rc, _, err = gen(broken)
    assert_one_line_error(rc, err, "no config.json")


def test_error_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (broken / "config.json").write_text(json.dumps(cfg))
    rc, _, err = gen(broken)
    assert_one_line_error(rc, err, "unsupported architecture MixtralForCausalLM; supported: .*Qwen2ForCausalLM")


def test_error_missing_tensor(broken):
    s = load_file(broken / "model.safetensors")
    s.pop("lm_head.weight")
    save_file(s, broken / "model.safetensors")
    rc, _, err = gen(broken)
    assert_one_line_error(rc, err, r"missing tensor lm_head\.weight")


def test_error_misshaped_tensor(broken):
    s = load_file(broken / "model.safetensors")
    s["model.embed_tokens.weight"] = s["model.embed_tokens.weight"][:-1]
    save_file(s, broken / "model.safetensors")
    rc, _, err = gen(broken)
    assert_one_line_error(rc, err, r"model\.embed_tokens\.weight in model\.safetensors has shape")


def test_error_corrupt_safetensors(broken):
    (broken / "model.safetensors").write_bytes(b"garbage" * 10)
    rc, _, err = gen(broken)
    assert_one_line_error(rc, err, "model.safetensors")


def test_error_prompt_longer_than_context(broken):
    rc, _, err = run("generate", "--model", str(broken), "--prompt", "word " * 700)
    assert_one_line_error(rc, err, r"prompt is \d+ tokens, but the model's context is 512 tokens")


@pytest.mark.parametrize(
    "flags, pattern",
    [
        (["--temperature", "-0.5"], "temperature"),
        (["--top-p", "0"], "top_p"),
        (["--max-tokens", "0"], "max_new_tokens"),
        (["--repetition-penalty", "-1"], "repetition_penalty"),
    ],
)
def test_error_invalid_sampling_values(tiny_llama, flags, pattern):
    rc, _, err = gen(tiny_llama, *flags)
    assert_one_line_error(rc, err, pattern)


def test_ask_streams_and_tiles_prints(tiny_v1, tmp_path):
    from PIL import Image

    Image.new("RGB", (800, 600), "white").save(tmp_path / "page.png")
    rc, out, err = run("ask", "--model", str(tiny_v1), str(tmp_path / "page.png"), "Total?", "--max-tokens", "4")
    assert rc == 0, err
    assert out.endswith("\n") and len(out) > 1
    rc, out, err = run("tiles", str(tmp_path / "page.png"), "--model", str(tiny_v1), "--json")
    assert rc == 0, err
    assert json.loads(out) == [{"grid": [4, 3], "tiles": 13, "thumbnail": True, "image_tokens": 3328}]


def ask_error(capsys, *args):
    from nanovl.cli import main

    rc = main(list(args))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and err and err[-1].startswith("nanovl: error: ")
    return err[-1]


def test_ask_bad_inputs_are_one_line_errors(tiny_v1, tiny_llama, tmp_path, capsys):
    from test_media import make_pdf

    m = str(tiny_v1)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    pdf = make_pdf(tmp_path / "two.pdf", 2)
    locked = make_pdf(tmp_path / "locked.pdf", 1, encrypt="pw")
    assert "not an image or PDF" in ask_error(capsys, "ask", "--model", m, str(tmp_path / "notes.txt"), "Q")
    assert "broken.jpg" in ask_error(capsys, "ask", "--model", m, str(tmp_path / "broken.jpg"), "Q")
    assert "page 3 is out of range" in ask_error(capsys, "ask", "--model", m, str(pdf), "Q", "--pages", "3")
    assert "encrypted" in ask_error(capsys, "ask", "--model", m, str(locked), "Q")
    assert "no such file" in ask_error(capsys, "ask", "--model", m, str(tmp_path / "missing.png"), "Q")
    assert "then the question" in ask_error(capsys, "ask", "--model", m, "only-a-question")
    assert "text-only" in ask_error(capsys, "ask", "--model", str(tiny_llama), str(pdf), "Q")
    too_many = ["--max-tiles", "12", *[str(pdf)] * 4]
    assert "over the context of 16384" in ask_error(capsys, "ask", "--model", m, *too_many, "Q", "--dpi", "300")


def test_broken_inputs_are_one_line_errors(tiny_v1, tmp_path, capsys):
    from PIL import Image
    from test_media import make_pdf

    from nanovl.cli import main

    Image.effect_mandelbrot((300, 200), (-2, -1, 1, 1), 30).convert("RGB").save(tmp_path / "x.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "x.png").read_bytes()[:100])  # head -c 100 x.png
    pdf = str(make_pdf(tmp_path / "d.pdf", 1))
    runs = [
        (["ask", "--model", str(tiny_v1), str(tmp_path / "cut.png"), "Q"], "corrupt or truncated"),
        (["ask", "--model", str(tiny_v1), pdf, "Q", "--dpi", "0"], "above 0"),
        (["tiles", pdf, "--model", str(tiny_v1), "--dpi", "0"], "above 0"),
        (["ask", "--model", str(tiny_v1), str(tmp_path), "Q"], "is a folder"),
        (["ask", "--model", str(tiny_v1), pdf, "Q", "--pages", "1,,1"], "empty item"),
        (["ask", "--model", str(tiny_v1), pdf, "Q", "--max-tiles", "5000"], "max tiles must be in"),
        (["tiles", pdf, "--model", str(tiny_v1), "--max-tiles", "5000"], "max tiles must be in"),
    ]
    for argv, message in runs:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("nanovl: error:") and message in err and "\n" not in err, (argv, err)
