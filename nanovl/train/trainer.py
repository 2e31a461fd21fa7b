"""`nanovl train --config FILE`: one curriculum stage, resumable, single process or torchrun.

- Master weights in float32; matmuls under bf16 autocast (config `bf16`, by default where it is
  fast: GPUs and AMX CPUs); AdamW; linear warm-up then
  cosine decay to lr * min_lr_ratio; gradient accumulation; clipping by global norm.
- The loss of an optimizer step is the summed token cross-entropy over every assistant token of the
  step's samples divided by their count, so it does not depend on how the samples are split into
  micro-batches or processes: torchrun with N processes and accumulation A gives the loss curve of
  one process with accumulation N * A.
- The sample order is a seeded permutation per epoch; step s always trains on the same samples, so
  the data position of a checkpoint is its step.
- Checkpoints (every `save_every` steps, at the end, and on SIGTERM) hold the trainable weights,
  the optimizer state, the RNG state and the step, written to a temporary folder and renamed; the
  `latest` pointer is replaced atomically. Running the same command again resumes.
- At the end OUT/model is a checkpoint folder in the HF layout of the starting model (or, with
  LoRA, OUT/adapter in PEFT's layout; `nanovl train merge-lora` folds it in).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nanovl.errors import DataError
from nanovl.models.nemotron_h import NemotronHForCausalLM
from nanovl.models.vlm import merge_embeddings
from nanovl.train.config import TrainConfig, config_dict
from nanovl.train.data import IGNORE, Encoder, Example, Skips, collate, read_records
from nanovl.train.lora import add_lora, save_adapter

# Fields that may change between a run and its resumption.
RESUMABLE = {"steps", "save_every", "keep", "threads", "skip_bad", "device"}
CHECKPOINT_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                    "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")  # fmt: skip


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


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(trainable: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms and biases)."""
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # fmt: skip
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """auto: bf16 autocast where bf16 matmuls are fast (GPUs, CPUs with AMX); measured on an AVX-512
    CPU without AMX, bf16 steps were ~1.5x slower than float32 (BENCHMARKS.md)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or torch.cpu._is_amx_tile_supported()


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    return rank, world, device


def build_model(cfg: TrainConfig):
    """(TrainModel, tokenizer, Encoder, TileSpec | None, checkpoint) with the stage's parameters trainable."""
    from nanovl.api import load_text_model, load_vlm
    from nanovl.config import load_config
    from nanovl.models.vlm import VLMS
    from nanovl.tokenizer import Tokenizer

    ckpt = load_config(cfg.model)
    if ckpt.raw.get("quantization_config") or (Path(cfg.model) / "hf_quant_config.json").is_file():
        raise DataError(f"{cfg.model}: a quantized checkpoint; train from the bf16/fp32 release")
    tok = Tokenizer(cfg.model, ckpt.text.eos_token_ids)
    # Trained weights need float32 masters; with LoRA the frozen base stays in its own dtype (an 8B
    # base in bf16 is 16 GB instead of 32) and only the adapters are float32.
    dtype = "auto" if cfg.lora is not None else "float32"
    if ckpt.architecture in VLMS:
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


class Checkpoints:
    def __init__(self, out: Path, keep: int):
        self.dir, self.keep = out / "checkpoints", keep

    def latest(self) -> Path | None:
        ptr = self.dir / "latest"
        if not ptr.is_file():
            return None
        path = self.dir / ptr.read_text().strip()
        return path if (path / "trainer.json").is_file() else None

    def save(self, step: int, model: TrainModel, opt: torch.optim.Optimizer, info: dict):
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"step-{step:08d}"
        tmp, final = self.dir / (name + ".tmp"), self.dir / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        state = opt.state_dict()
        tensors = {f"{i}.{k}": v.contiguous() for i, s in state["state"].items() for k, v in s.items()}
        tensors["rng.cpu"] = torch.get_rng_state()
        save_file(tensors, tmp / "optimizer.safetensors")
        (tmp / "trainer.json").write_text(json.dumps({**info, "step": step, "param_groups": state["param_groups"]}))
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        ptr_tmp = self.dir / "latest.tmp"
        ptr_tmp.write_text(name)
        os.replace(ptr_tmp, self.dir / "latest")
        for old in sorted(self.dir.glob("step-*[0-9]"))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume(self, model: nn.Module, opt: torch.optim.Optimizer, info: dict) -> int:
        """Load the latest checkpoint, if any, into model and opt; the step to go on from. A checkpoint
        of a run configured otherwise (beyond RESUMABLE fields) is refused."""
        latest = self.latest()
        if latest is None:
            return 0
        saved = json.loads((latest / "trainer.json").read_text())["config"]
        changed = [k for k in saved if k not in RESUMABLE and saved[k] != info["config"].get(k)]
        if changed:
            raise DataError(f"{self.dir.parent} holds a run with another {changed[0]} ({saved[changed[0]]!r}); "
                            "use --restart or another out folder")  # fmt: skip
        return self.load(latest, model, opt)["step"]

    @staticmethod
    def load(path: Path, model: TrainModel, opt: torch.optim.Optimizer) -> dict:
        info = json.loads((path / "trainer.json").read_text())
        params = dict(model.named_parameters())
        for name, t in load_file(path / "trainable.safetensors").items():
            if name not in params or not params[name].requires_grad:
                raise DataError(f"{path}: trainable weight {name} is not trainable in this configuration")
            params[name].data.copy_(t)
        tensors = load_file(path / "optimizer.safetensors")
        torch.set_rng_state(tensors.pop("rng.cpu"))
        state: dict = {}
        for key, v in tensors.items():
            i, k = key.split(".", 1)
            state.setdefault(int(i), {})[k] = v
        opt.load_state_dict({"state": state, "param_groups": info["param_groups"]})
        return info


def write_model(model: TrainModel, cfg: TrainConfig, ckpt, out: Path) -> Path:
    """The trained model as a checkpoint folder in the starting model's HF layout (and dtype); with
    LoRA, the adapter alone (OUT/adapter)."""
    root = model.vlm if model.vlm is not None else model.lm
    if cfg.lora is not None:
        save_adapter(root, out / "adapter", cfg.model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.targets)
        return out / "adapter"
    return export_model(root, ckpt, cfg.model, out / "model", vlm=model.vlm is not None)


def export_model(root: nn.Module, ckpt, src_dir: str | Path, dest: Path, vlm: bool) -> Path:
    """Write root's weights under the release names, in the checkpoint's dtype, beside copies of the
    source folder's config and tokenizer files; written aside and renamed into place."""
    from nanovl.weights import save_weights

    dtype = getattr(torch, ckpt.text.dtype, torch.float32)
    prefix = "" if vlm else ckpt.text_prefix
    state = {prefix + n: t.to(dtype) for n, t in root.state_dict().items()}
    if ckpt.text.tie_word_embeddings:
        state = {n: t for n, t in state.items() if not n.endswith("lm_head.weight")}
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_weights(state, tmp, max_shard_bytes=5 * 2**30)
    for name in CHECKPOINT_FILES:
        if (Path(src_dir) / name).is_file():
            shutil.copy(Path(src_dir) / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def merge_checkpoint(adapter: str | Path, out: str | Path, base: str | Path | None = None) -> Path:
    """base checkpoint + LoRA adapter -> a plain checkpoint folder with the adapter folded in."""
    from nanovl.api import load_text_model, load_vlm
    from nanovl.config import load_config
    from nanovl.models.vlm import VLMS
    from nanovl.train.lora import load_adapter, merge_lora

    cfg_path = Path(adapter) / "adapter_config.json"
    if not cfg_path.is_file():
        raise DataError(f"{adapter}: no adapter_config.json (expected OUT/adapter of a LoRA run)")
    base = base or json.loads(cfg_path.read_text())["base_model_name_or_path"]
    ckpt = load_config(base)
    is_vlm = ckpt.architecture in VLMS
    root, _ = load_vlm(base, dtype="float32") if is_vlm else load_text_model(base, dtype="float32")
    load_adapter(root, adapter)
    merge_lora(root)
    return export_model(root, ckpt, base, Path(out), vlm=is_vlm)


def plot_losses(metrics: Path, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1)
    ax.set(xlabel="step", ylabel="loss", yscale="log", title=f"nanovl train: {out.parent.name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return True


def last_loss(path: Path) -> float:
    """The loss of the last step in metrics.jsonl (what a finished run reports when run again)."""
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
    return rows[-1]["loss"] if rows else float("nan")


def truncate_metrics(path: Path, step: int):
    """Keep the metric lines of the steps up to the checkpoint (the resumed run redoes the rest)."""
    if path.is_file():
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in keep))


class Stop:
    """SIGTERM (or SIGINT) asks for a checkpoint at the end of the current step, then an exit."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def train(cfg: TrainConfig, restart: bool = False) -> dict:
    """Run (or resume) the stage; returns a summary. Exits with status 143 after a SIGTERM checkpoint."""
    if cfg.stage == "vision":
        from nanovl.train.vision import train_vision

        return train_vision(cfg, restart)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, device = setup_distributed(cfg)
    out = Path(cfg.out)
    ckpts = Checkpoints(out, cfg.keep)
    if restart and rank == 0:
        shutil.rmtree(ckpts.dir, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    model, tok, encoder, tiles, ckpt = build_model(cfg)
    skips = Skips()
    context = ckpt.text.max_position_embeddings
    mm = encode_all(read_records(cfg.data, cfg.skip_bad, skips), encoder, cfg, context, skips, "tokenizing data")
    text = encode_all(read_records(cfg.text_data, cfg.skip_bad, skips), encoder, cfg, context, skips, "text data")
    pool = epoch_pool(mm, text, cfg)
    per_step = cfg.samples_per_step(world)
    if len(pool) < per_step:
        raise DataError(f"{len(pool)} usable samples, fewer than one step takes ({per_step} = batch_size x "
                        f"grad_accum x processes)")  # fmt: skip
    pack = cfg.pack and not isinstance(model.lm, NemotronHForCausalLM)  # Mamba state would cross samples
    pad_id = tok.token_to_id(tok.special_tokens.get("pad_token") or "") or 0
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(trainable, cfg)
    info = {"config": config_dict(cfg), "world": world, "samples": len(pool)}
    start = ckpts.resume(model, opt, info)
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    metrics = out / "metrics.jsonl"
    bf16 = use_bf16(cfg.bf16, device)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        truncate_metrics(metrics, start)
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in model.parameters())
        print(f"nanovl train: stage {cfg.stage}, {len(pool)} samples per epoch ({len(pool) - len(mm)} text-only), "
              f"{n_train:,} of {n_all:,} parameters trainable, {world} process(es) on {device}"
              + (", bf16 autocast" if bf16 else ", float32")
              + (f", resuming at step {start}" if start else "")
              + (f"; skipped {skips.total}: {dict(skips.reasons)}" if skips.total else ""),
              file=sys.stderr)  # fmt: skip
    stop = Stop()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage}", unit="step", disable=rank != 0, mininterval=1)
    t_start, step, loss = time.perf_counter(), start, last_loss(metrics) if rank == 0 else float("nan")
    try:
        while step < cfg.steps:
            t0 = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            idx = step_indices(step, len(pool), per_step, cfg.seed)
            samples = [pool[i] for i in idx]
            n_target = sum(sum(t != IGNORE for t in e.targets) for e in samples)
            mine = samples[rank * cfg.batch_size * cfg.grad_accum : (rank + 1) * cfg.batch_size * cfg.grad_accum]
            loss_sum = torch.zeros((), dtype=torch.float64)
            tokens = 0
            for m in range(cfg.grad_accum):
                batch = collate(mine[m * cfg.batch_size : (m + 1) * cfg.batch_size], tiles, cfg.seq_len, pack, pad_id)
                tensors = [t.to(device) if t is not None else None
                           for t in (batch.ids, batch.targets, batch.positions, batch.mask, batch.pixels)]  # fmt: skip
                sync = world == 1 or m == cfg.grad_accum - 1
                with ddp.no_sync() if not sync and world > 1 else contextlib.nullcontext():
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                        part = ddp(*tensors)
                    (part * world / n_target).backward()
                loss_sum += part.detach().double().cpu()
                tokens += batch.tokens
            if world > 1:
                total = torch.tensor([loss_sum.item(), float(tokens), float(stop.requested)], dtype=torch.float64)
                dist.all_reduce(total)
                loss_sum, tokens, stop.requested = total[0], int(total[1]), bool(total[2])
            norm = torch.nn.utils.clip_grad_norm_(trainable, cfg.clip if cfg.clip > 0 else float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            loss = float(loss_sum) / n_target
            dt = time.perf_counter() - t0
            if rank == 0:
                row = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "grad_norm": float(norm),
                       "tokens": tokens, "tokens_per_s": tokens / dt, "samples_per_s": per_step / dt,
                       "elapsed_s": time.perf_counter() - t_start}  # fmt: skip
                with open(metrics, "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{tokens / dt:.0f}")
                bar.update(1)
            if step % cfg.save_every == 0 or step == cfg.steps or stop.requested:
                if rank == 0:
                    ckpts.save(step, model, opt, info)
                if world > 1:
                    dist.barrier()
            if stop.requested:
                break
    finally:
        bar.close()
        stop.restore()
    if stop.requested and step < cfg.steps:
        if rank == 0:
            print(f"nanovl train: stopped by signal; checkpoint at step {step} in {ckpts.dir}; "
                  "run the same command to resume", file=sys.stderr)  # fmt: skip
        _finish(world)
        raise SystemExit(143)
    summary = {"steps": step, "loss": loss, "samples": len(pool), "skipped": dict(skips.reasons), "out": str(out),
               "already_done": start >= cfg.steps}  # fmt: skip
    if rank == 0:
        summary["saved"] = str(write_model(model, cfg, ckpt, out))
        summary["plot"] = str(out / "loss.png") if plot_losses(metrics, out / "loss.png") else None
    _finish(world)
    return summary


def _finish(world: int):
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
