"""The evaluation runner: local model vs endpoint, resume, failures, and bad benchmark files."""

import json

import pytest
from PIL import Image

from nanovl.eval.datasets import DataError, Item, load
from nanovl.eval.runner import EndpointBackend, LocalBackend, run


@pytest.fixture
def docvqa_dir(tmp_path):
    """A small DocVQA val file in the RRC format, with its page images."""
    (tmp_path / "documents").mkdir()
    data = []
    for i in range(5):
        Image.new("RGB", (300 + 40 * i, 400), (255, 255 - 20 * i, 255)).save(tmp_path / "documents" / f"p{i}.png")
        data.append({"questionId": 100 + i, "question": f"What is field {i}?", "image": f"documents/p{i}.png",
                     "answers": [f"value {i}"], "docId": i})  # fmt: skip
    (tmp_path / "val_v1.0_withQT.json").write_text(json.dumps({"dataset_name": "docvqa", "data": data}))
    return tmp_path


def test_endpoint_scores_equal_local_scores(tiny_v1, docvqa_dir, tmp_path):
    from test_server import LiveServer

    from nanovl.serve.app import create_app

    items = load("docvqa", docvqa_dir)
    local = LocalBackend(str(tiny_v1))
    a = run("docvqa", items, local, tmp_path / "local", max_tokens=6)
    server = LiveServer(create_app(local.model, "tiny"))
    try:
        b = run(
            "docvqa", items, EndpointBackend(server.url + "/v1"), tmp_path / "endpoint", concurrency=3, max_tokens=6
        )
    finally:
        server.stop()
    read = lambda d: {r["id"]: r for r in map(json.loads, (d / "predictions.jsonl").read_text().splitlines())}  # noqa: E731
    ra, rb = read(tmp_path / "local"), read(tmp_path / "endpoint")
    assert {k: v["prediction"] for k, v in ra.items()} == {k: v["prediction"] for k, v in rb.items()}
    assert a["score"] == b["score"] and a["n"] == b["n"] == 5
    assert (tmp_path / "local" / "summary.json").is_file() and (tmp_path / "local" / "results.md").is_file()


class Fake:
    """A backend that answers from a table, fails on chosen ids, and counts its calls."""

    name = "fake"

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def predict(self, item, max_tokens):
        self.calls.append(item.id)
        if item.id in self.fail:
            raise TimeoutError("the endpoint timed out")
        return item.gold["answers"][0], {}


def items(n=6):
    return [Item(str(i), "q", [], {"answers": [f"a{i}"]}) for i in range(n)]


def test_interrupted_run_resumes_without_redoing(tmp_path):
    first = Fake()
    run("docvqa", items()[:4], first, tmp_path)  # as if stopped after four items
    second = Fake()
    s = run("docvqa", items(), second, tmp_path)
    assert sorted(second.calls) == ["4", "5"]
    ids = [json.loads(x)["id"] for x in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(ids) == [str(i) for i in range(6)] and s["n"] == 6 and s["score"] == 100.0


def test_failed_items_are_recorded_and_retried_not_scored(tmp_path):
    s = run("docvqa", items(), Fake(fail={"2", "3"}), tmp_path)
    assert s["failed"] == 2 and s["n"] == 4 and s["score"] == 100.0
    errors = [json.loads(x) for x in (tmp_path / "predictions.jsonl").read_text().splitlines() if "error" in x]
    assert {e["id"] for e in errors} == {"2", "3"} and all("score" not in e for e in errors)
    retry = Fake()
    s = run("docvqa", items(), retry, tmp_path)
    assert sorted(retry.calls) == ["2", "3"] and s["failed"] == 0 and s["n"] == 6


def test_bad_benchmark_files(tmp_path, docvqa_dir):
    with pytest.raises(DataError, match=r"nothing: not found; expected the RRC DocVQA JSON \(val_v1.0_withQT.json\)"):
        load("docvqa", tmp_path / "nothing")
    (tmp_path / "wrong.json").write_text(json.dumps([{"q": 1}]))
    with pytest.raises(DataError, match="expected \\{'data'"):
        load("docvqa", tmp_path / "wrong.json")
    (docvqa_dir / "documents" / "p3.png").unlink()
    with pytest.raises(DataError, match="item 103: image .*p3.png is missing"):
        load("docvqa", docvqa_dir)
    with pytest.raises(DataError, match="ChartQA's test folder"):
        load("chartqa", tmp_path)


def png_bytes(color):
    import io

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buf, "PNG")
    return buf.getvalue()


def test_parquet_exports_ai2d_and_mmmu(tmp_path, tiny_v1):
    import pyarrow as pa
    import pyarrow.parquet as pq

    ai2d = [{"id": "0", "question": "Which is the sun?", "options": ["a", "b", "c", "d"], "answer": "2",
             "image": {"bytes": png_bytes((255, 200, 0)), "path": None}}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(ai2d), tmp_path / "ai2d.parquet")
    (item,) = load("ai2d", tmp_path / "ai2d.parquet")
    assert item.question.endswith(
        "\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the given choices directly."
    )
    assert isinstance(item.images[0], bytes) and item.gold["answer"] == "2"

    mmmu = [{"id": "validation_Art_1", "question": "Compare <image 2> with <image 1>.", "options": "['x', 'y']",
             "answer": "B", "question_type": "multiple-choice", "image_1": {"bytes": png_bytes((1, 1, 1))},
             "image_2": {"bytes": png_bytes((2, 2, 2))}}]  # fmt: skip
    (tmp_path / "Art").mkdir()
    pq.write_table(pa.Table.from_pylist(mmmu), tmp_path / "Art" / "validation-00000-of-00001.parquet")
    (item,) = load("mmmu", tmp_path)
    assert item.question.startswith("Compare <image> with <image>.\nA. x\nB. y") and item.gold["subject"] == "Art"
    assert item.images[0] == mmmu[0]["image_2"]["bytes"]  # the order the question names them
    s = run("mmmu", [item], LocalBackend(str(tiny_v1)), tmp_path / "out", max_tokens=4)
    assert s["n"] == 1 and s["failed"] == 0


def test_docvqa_submission_file(tmp_path):
    run("docvqa", [Item("7", "q", [], {"answers": ["x"]})], Fake(), tmp_path)
    assert json.loads((tmp_path / "submission.json").read_text()) == [{"questionId": 7, "answer": "x"}]


def test_lmms_parquet_docvqa_and_cli_alias(tmp_path, tiny_v1, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from nanovl.cli import main

    rows = [{"questionId": "5", "question": "What is the total?", "answers": ["12.50"],
             "image": {"bytes": png_bytes((250, 250, 250))}}]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "docvqa.parquet")
    assert main(["eval", "docvqa", "--data", str(tmp_path / "docvqa.parquet"), "--model", str(tiny_v1),
                 "--out", str(tmp_path / "out"), "--max-tokens", "3"]) == 0  # fmt: skip
    assert "docvqa:" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n"] == 1
