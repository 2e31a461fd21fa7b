"""The synthetic-document generator: pages drawn with their ground truth, and the training and
evaluation records made from them (`nanovl synth`; also quantization calibration, `nanovl eval
synthdocs` data, `make-tiny --spec` tokenizer corpora and the vision stage's pages).

- render.py: a `Page` that records every string it draws (the ground truth is what was drawn);
  `degrade` spoils a finished page and reports its rotation, `rotate_points` follows it.
- kinds.py: the seven document kinds; `make_doc(kind, seed)` is deterministic; seeds from
  `EVAL_SEED_START` up are evaluation data.
- records.py: documents -> task JSONL (transcribe, interleaved, qa, extract, text, crops) and
  eval.jsonl (`write_dataset`).
- Imports go one way: records -> kinds -> render; nothing here imports training code.
"""

from nanovl.synth.kinds import EVAL_SEED_START, KINDS, QA_TYPES, Doc, make_doc, text_corpus
from nanovl.synth.records import TASKS, write_dataset
from nanovl.synth.render import Page, degrade, fonts_available, rotate_points

__all__ = ["EVAL_SEED_START", "KINDS", "QA_TYPES", "TASKS", "Doc", "Page", "degrade", "fonts_available", "make_doc",
           "rotate_points", "text_corpus", "write_dataset"]  # fmt: skip
