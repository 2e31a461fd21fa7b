"""`nanovl train --config FILE`: the language stages (projector, pretrain, sft) and the stage dispatch.

- What they feed the shared loop (nanovl/train/loop.py, which owns the optimizer, lr schedule,
  clipping, metrics, checkpoints, SIGTERM and resumption): the model with the stage's parameters
  trainable (`build_model`), the epoch's samples and, per step, the forward and backward of its
  micro-batches (`LanguageStage`). `stage = "vision"` goes to nanovl/train/vision.py, `"readout"` to
  nanovl/train/readout.py.
- Master weights in float32 (with LoRA the frozen base keeps its own dtype and only the adapters are
  float32); matmuls under the loop's bf16 autocast where config `bf16` asks for it.
- The loss of an optimizer step is the summed token cross-entropy over every assistant token of the
  step's samples divided by their count, so it does not depend on how the samples are split into
  micro-batches or processes: torchrun with N processes and accumulation A gives the loss curve of
  one process with accumulation N * A.
- The sample order is a seeded permutation per epoch; step s always trains on the same samples, so
  the data position of a checkpoint is its step.
- At the end OUT/model is a checkpoint folder in the HF layout of the starting model (or, with
  LoRA, OUT/adapter in PEFT's layout; `nanovl train merge-lora` folds it in).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from nanovl.errors import DataError
from nanovl.models.vlm import merge_embeddings
from nanovl.train.config import TrainConfig, config_dict
from nanovl.train.data import IGNORE, Encoder, Example, Skips, collate, read_records
from nanovl.train.export import export_model
from nanovl.train.loop import Run, Stage
from nanovl.train.lora import add_lora, save_adapter


class TrainModel(nn.Module):
    """What DDP wraps: a batch in, the summed cross-entropy of its trained tokens out."""

    def __init__(self, lm, vlm=None, context_id: int | None = None, vision_grad: bool = False):
        super().__init__()
        self.lm, self.vlm, self.context_id, self.vision_grad = lm, vlm, context_id, vision_grad

    def forward(self, ids, targets, positions, mask, pixels):
        x = self.lm.embed(ids)  # (B, L, C)
        if pixels is not None:
            with torch.set_grad_enabled(self.vision_grad and torch.is_grad_enabled()):
                feats = self.vlm.vision_features(pixels)
            x = merge_embeddings(x, ids, self.context_id, self.vlm.project(feats).flatten(0, 1))  # row-major order
        logits = self.lm(embeds=x, positions=positions, mask=mask)
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="sum")


def build_model(cfg: TrainConfig):
    """(TrainModel, tokenizer, Encoder, TileSpec | None, checkpoint) with the stage's parameters trainable."""
    from nanovl.checkpoint import load_config, load_text_model, load_vlm
    from nanovl.models import is_vlm
    from nanovl.tokenizer import Tokenizer

    ckpt = load_config(cfg.model)
    if ckpt.raw.get("quantization_config") or (Path(cfg.model) / "hf_quant_config.json").is_file():
        raise DataError(f"{cfg.model}: a quantized checkpoint; train from the bf16/fp32 release")
    tok = Tokenizer(cfg.model, ckpt.text.eos_token_ids)
    # Trained weights need float32 masters; with LoRA the frozen base stays in its own dtype (an 8B
    # base in bf16 is 16 GB instead of 32) and only the adapters are float32.
    dtype = "auto" if cfg.lora is not None else "float32"
    if is_vlm(ckpt.architecture):
        vlm, _ = load_vlm(cfg.model, dtype=dtype)
        lm, tiles = vlm.language_model, vlm.config.tiles
        context_id = tok.token_to_id(vlm.context_token)
        encoder = Encoder(tok, tiles, vlm.image_text, cfg.max_tiles, cfg.sample_tiles)
    else:
        if cfg.stage == "projector":
            raise DataError(f"{cfg.model}: stage projector needs a vision-language checkpoint")
        lm, _ = load_text_model(cfg.model, dtype=dtype)
        vlm, tiles, context_id, encoder = None, None, None, Encoder(tok)
    root = vlm if vlm is not None else lm
    root.requires_grad_(False)
    if cfg.lora is not None:
        lora = cfg.lora
        under = ["language_model"] if vlm is not None else [n for n, _ in lm.named_children() if n != "lm_head"]
        add_lora(root, lora.targets, lora.rank, lora.alpha, under)
        if vlm is not None and lora.projector:
            add_lora(root, ["*"], lora.rank, lora.alpha, ["mlp1"])
        for name, p in root.named_parameters():
            p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    else:
        if vlm is not None:
            vlm.mlp1.requires_grad_(True)
        if cfg.stage != "projector":
            lm.requires_grad_(True)
            if vlm is not None and cfg.train_vision:
                vlm.vision_model.requires_grad_(True)
    model = TrainModel(lm, vlm, context_id, vision_grad=cfg.train_vision)
    return model, tok, encoder, tiles, ckpt


def encode_all(records, encoder: Encoder, cfg: TrainConfig, context: int, skips: Skips, desc: str) -> list[Example]:
    out = []
    limit = min(cfg.seq_len, context)
    for r in tqdm(records, desc=desc, unit="sample", disable=not sys.stderr.isatty() or len(records) < 1000):
        e = encoder.encode(r)
        if len(e.ids) > limit:
            msg = f"{r.source}: {len(e.ids)} tokens, over seq_len {cfg.seq_len} (context {context})"
            if not cfg.skip_bad:
                raise DataError(msg + "; lower max_tiles or sample_tiles, raise seq_len, or set skip_bad")
            skips.add("longer than seq_len")
            continue
        if all(t == IGNORE for t in e.targets):
            skips.add("no trained tokens")
            continue
        out.append(e)
    return out


def epoch_pool(mm: list[Example], text: list[Example], cfg: TrainConfig) -> list[Example]:
    """The samples of an epoch: every multimodal one plus text-only ones making up text_share."""
    if not text or cfg.text_share == 0:
        return mm
    n_text = round(cfg.text_share / (1 - cfg.text_share) * len(mm))
    return mm + [text[i % len(text)] for i in range(n_text)]


def step_indices(step: int, n: int, per_step: int, seed: int) -> list[int]:
    per_epoch = n // per_step
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return perm[k * per_step : (k + 1) * per_step].tolist()


def write_model(model: TrainModel, cfg: TrainConfig, ckpt, out: Path) -> Path:
    """The trained model as a checkpoint folder in the starting model's HF layout (and dtype); with
    LoRA, the adapter alone (OUT/adapter)."""
    root = model.vlm if model.vlm is not None else model.lm
    if cfg.lora is not None:
        save_adapter(root, out / "adapter", cfg.model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        return out / "adapter"
    return export_model(root, ckpt, cfg.model, out / "model", vlm=model.vlm is not None)


class LanguageStage(Stage):
    """One optimizer step of a language stage: the step's samples, this process's share of them in
    grad_accum micro-batches, gradients of the loss over all the step's trained tokens."""

    def __init__(self, run: Run, ddp: nn.Module, pool: list[Example], tiles, pack: bool, pad_id: int):
        self.run, self.ddp, self.pool, self.tiles, self.pack, self.pad_id = run, ddp, pool, tiles, pack, pad_id
        self.per_step = run.cfg.samples_per_step(run.world)
        self.n_target = 0  # trained tokens of the current step, over all processes

    def step(self, step: int) -> dict[str, float]:
        cfg, world, device = self.run.cfg, self.run.world, self.run.device
        samples = [self.pool[i] for i in step_indices(step, len(self.pool), self.per_step, cfg.seed)]
        self.n_target = sum(sum(t != IGNORE for t in e.targets) for e in samples)
        per_rank = cfg.batch_size * cfg.grad_accum
        mine = samples[self.run.rank * per_rank : (self.run.rank + 1) * per_rank]
        loss_sum = torch.zeros((), dtype=torch.float64)
        tokens = 0
        for m in range(cfg.grad_accum):
            batch = collate(mine[m * cfg.batch_size : (m + 1) * cfg.batch_size], self.tiles, cfg.seq_len, self.pack,
                            self.pad_id)  # fmt: skip
            # ids, targets, positions (B, L); mask (B, 1, L, L) or None; pixels (tiles, 3, S, S) or None
            tensors = [t.to(device) if t is not None else None
                       for t in (batch.ids, batch.targets, batch.positions, batch.mask, batch.pixels)]  # fmt: skip
            sync = world == 1 or m == cfg.grad_accum - 1  # DDP all-reduces gradients at the last micro-batch
            with self.ddp.no_sync() if not sync else contextlib.nullcontext():
                with self.run.autocast():
                    part = self.ddp(*tensors)  # summed cross-entropy of the micro-batch
                (part * world / self.n_target).backward()  # DDP averages over processes: * world undoes it
            loss_sum += part.detach().double().cpu()
            tokens += batch.tokens
        return {"loss_sum": float(loss_sum), "tokens": tokens}

    def report(self, totals: dict[str, float], dt: float) -> tuple[float, dict]:
        tokens = int(totals["tokens"])
        return totals["loss_sum"] / self.n_target, {"tokens": tokens, "tokens_per_s": tokens / dt,
                                                    "samples_per_s": self.per_step / dt}  # fmt: skip

    def postfix(self, row: dict) -> dict:
        return {"tok_s": f"{row['tokens_per_s']:.0f}"}


def train(cfg: TrainConfig, restart: bool = False) -> dict:
    """Run (or resume) the stage; returns a summary. Exits with status 143 after a SIGTERM checkpoint."""
    if cfg.stage == "vision":
        from nanovl.train.vision import train_vision

        return train_vision(cfg, restart)
    if cfg.stage == "readout":
        from nanovl.train.readout import train_readout

        return train_readout(cfg, restart)
    run = Run(cfg, restart)
    torch.manual_seed(cfg.seed)
    model, tok, encoder, tiles, ckpt = build_model(cfg)
    skips = Skips()
    context = ckpt.text.max_position_embeddings
    mm = encode_all(read_records(cfg.data, cfg.skip_bad, skips), encoder, cfg, context, skips, "tokenizing data")
    text = encode_all(read_records(cfg.text_data, cfg.skip_bad, skips), encoder, cfg, context, skips, "text data")
    pool = epoch_pool(mm, text, cfg)
    per_step = cfg.samples_per_step(run.world)
    if len(pool) < per_step:
        raise DataError(f"{len(pool)} usable samples, fewer than one step takes ({per_step} = batch_size x "
                        f"grad_accum x processes)")  # fmt: skip
    pack = cfg.pack and not model.lm.recurrent  # Mamba state would cross samples
    pad_id = tok.token_to_id(tok.special_tokens.get("pad_token") or "") or 0
    info = {"config": config_dict(cfg), "world": run.world, "samples": len(pool)}
    opt, start = run.start(model, info)
    ddp = nn.parallel.DistributedDataParallel(model) if run.world > 1 else model
    n_train, n_all = sum(p.numel() for p in run.trainable), sum(p.numel() for p in model.parameters())
    run.announce(start, f"{len(pool)} samples per epoch ({len(pool) - len(mm)} text-only), {n_train:,} of {n_all:,} "
                 f"parameters trainable, {run.world} process(es) on {run.device}",
                 f"; skipped {skips.total}: {dict(skips.reasons)}" if skips.total else "")  # fmt: skip
    step, loss = run.loop(LanguageStage(run, ddp, pool, tiles, pack, pad_id), model, opt, start, info)
    summary = {"steps": step, "loss": loss, "samples": len(pool), "skipped": dict(skips.reasons), "out": str(run.out),
               "already_done": start >= cfg.steps}  # fmt: skip
    if run.rank == 0:
        summary["saved"] = str(write_model(model, cfg, ckpt, run.out))
        summary["plot"] = run.plot()
    run.finish()
    return summary
