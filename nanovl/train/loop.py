"""The stage loop every training stage runs; a stage says only what one optimizer step computes.

- Split of work: a `Stage` does the forward and backward of one optimizer step's micro-batches and
  turns the step's totals into its loss and metric fields; `Run` owns everything around that: the
  processes, the output folder, the optimizer, the lr schedule, clipping, metrics.jsonl, the
  checkpoint schedule, SIGTERM and resumption. The stages import this module, never the reverse.
- Optimizer: AdamW with weight decay on matrices only; the lr of step s is set before the step
  (linear warm-up over warmup_steps, flat until the last `decay_fraction` of the run, then cosine
  to lr * min_lr_ratio at the last step; decay_fraction 1 is a cosine over the whole run).
- Gradients are clipped by their global norm (`clip`; 0 = not clipped, the norm is still logged).
- Processes: a stage's totals (`Stage.step`) are additive; they are summed over processes once a step,
  with the stop flag, so every process stops at the same step.
- metrics.jsonl: one line a step (step, loss, lr, grad_norm, the stage's fields, elapsed_s, and on a
  checkpoint step the fields of `Stage.at_save`), written by rank 0; on resume, cut back to the
  checkpoint's step.
- Checkpoints (every `save_every` steps, at the end, and on SIGTERM) hold the trainable weights,
  the optimizer state, the RNG state and the step, written to a temporary folder and renamed; the
  `latest` pointer is replaced atomically. Running the same command again resumes; a checkpoint of
  a run configured otherwise (beyond RESUMABLE fields) is refused.
- SIGTERM / SIGINT: the current step finishes, a checkpoint is written, the process exits with 143.
"""

from __future__ import annotations

import dataclasses
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
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from nanovl.errors import DataError
from nanovl.train.config import TrainConfig

# Fields that may change between a run and its resumption.
RESUMABLE = {"steps", "save_every", "keep", "threads", "skip_bad", "device"}


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then flat at lr until the last `decay_fraction` of the remaining
    steps, over which a cosine takes it to lr * min_lr_ratio at the last step (decay_fraction 1: the
    cosine spans everything after warm-up)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1.0, (cfg.steps - cfg.warmup_steps) * cfg.decay_fraction)
    start = cfg.steps - span  # where the decay begins
    progress = min(1.0, max(0.0, step - start) / span)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def adamw(named: list[tuple[str, nn.Parameter]], cfg: TrainConfig, scales: dict[str, float] | None = None):
    """AdamW with weight decay on matrices only (not on norms and biases); `scales` maps a parameter
    name prefix to its lr multiplier (the group's `lr_scale`)."""
    scales = scales or {}

    def scale(name: str) -> float:
        return next((v for k, v in scales.items() if name.startswith(k)), 1.0)

    groups = []
    for s in sorted({scale(n) for n, _ in named}, reverse=True):
        for decay in (True, False):
            params = [p for n, p in named if scale(n) == s and (p.ndim >= 2) == decay]
            if params:
                groups.append({"params": params, "weight_decay": cfg.weight_decay if decay else 0.0, "lr_scale": s})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas))


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """auto: bf16 autocast where bf16 matmuls are fast (GPUs, CPUs with AMX); measured on an AVX-512
    CPU without AMX, bf16 steps were ~1.5x slower than float32 (BENCHMARKS.md)."""
    if setting != "auto":
        return bool(setting)
    return device.type == "cuda" or torch.cpu._is_amx_tile_supported()


def setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    return rank, world, device


class Checkpoints:
    """OUT/checkpoints: step-NNNNNNNN folders (the last `keep`) and the `latest` pointer."""

    def __init__(self, out: Path, keep: int):
        self.dir, self.keep = out / "checkpoints", keep

    def latest(self) -> Path | None:
        ptr = self.dir / "latest"
        if not ptr.is_file():
            return None
        path = self.dir / ptr.read_text().strip()
        return path if (path / "trainer.json").is_file() else None

    def save(self, step: int, model: nn.Module, opt: torch.optim.Optimizer, info: dict):
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
        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # fields newer than the run
        keys = set(saved) | set(info["config"])
        was, now = ({k: c.get(k, defaults.get(k)) for k in keys} for c in (saved, info["config"]))
        changed = sorted(k for k in keys if k not in RESUMABLE and was[k] != now[k])
        if changed:
            raise DataError(f"{self.dir.parent} holds a run with another {changed[0]} ({was[changed[0]]!r}); "
                            "use --restart or another out folder")  # fmt: skip
        return self.load(latest, model, opt)["step"]

    @staticmethod
    def load(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
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


class Stage:
    """What a stage feeds the loop: one optimizer step's computation and what to log about it."""

    def step(self, step: int) -> dict[str, float]:
        """Forward and backward of optimizer step `step` (gradients left in .grad, not applied); this
        process's additive totals of the step, which the loop sums over processes."""
        raise NotImplementedError

    def report(self, totals: dict[str, float], dt: float) -> tuple[float, dict]:
        """(the step's loss, the stage's metric fields) from the summed totals and the step's seconds."""
        raise NotImplementedError

    def at_save(self) -> dict:
        """Metric fields added on a checkpoint step (evaluations); none by default."""
        return {}

    def postfix(self, row: dict) -> dict:
        """Progress-bar fields beside loss and lr."""
        return {}


class Run:
    """One stage's run: its processes, output folder, optimizer and the loop that drives a `Stage`."""

    def __init__(self, cfg: TrainConfig, restart: bool = False):
        """Threads and processes set up; with restart, the output folder's checkpoints and metrics gone."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.cfg = cfg
        self.rank, self.world, self.device = setup_distributed(cfg)
        self.out = Path(cfg.out)
        self.ckpts = Checkpoints(self.out, cfg.keep)
        self.metrics = self.out / "metrics.jsonl"
        self.bf16 = use_bf16(cfg.bf16, self.device)
        self.trainable: list[nn.Parameter] = []
        if restart and self.rank == 0:
            shutil.rmtree(self.ckpts.dir, ignore_errors=True)
            self.metrics.unlink(missing_ok=True)
        if self.world > 1:
            dist.barrier()

    def start(self, model: nn.Module, info: dict, scales: dict[str, float] | None = None):
        """(optimizer, the step to go on from): model on the device in training mode, its optimizer
        (`scales`: lr multipliers by parameter name prefix), the latest checkpoint, when there is one,
        loaded; `info` is stored in each checkpoint."""
        model.to(self.device).train()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.trainable = [p for _, p in named]
        opt = adamw(named, self.cfg, scales)
        start = self.ckpts.resume(model, opt, info)
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            truncate_metrics(self.metrics, start)
        return opt, start

    def autocast(self):
        """The forward's context: bf16 autocast where `bf16` asks for it."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def announce(self, start: int, what: str, tail: str = ""):
        """The run's first line on stderr (rank 0): the stage, `what`, the precision, the resume step."""
        if self.rank == 0:
            print(f"nanovl train: stage {self.cfg.stage}, {what}" + (", bf16 autocast" if self.bf16 else ", float32")
                  + (f", resuming at step {start}" if start else "") + tail, file=sys.stderr)  # fmt: skip

    def loop(self, stage: Stage, model: nn.Module, opt: torch.optim.Optimizer, start: int, info: dict):
        """Steps start..cfg.steps -> (the last step, its loss). After SIGTERM / SIGINT: the step's
        checkpoint, a message, SystemExit(143)."""
        cfg, rank = self.cfg, self.rank
        stop = Stop()
        bar = tqdm(total=cfg.steps, initial=start, desc=f"train {cfg.stage}", unit="step", disable=rank != 0,
                   mininterval=1)  # fmt: skip
        t_start, step, loss = time.perf_counter(), start, last_loss(self.metrics) if rank == 0 else float("nan")
        try:
            while step < cfg.steps:
                t0 = time.perf_counter()
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, cfg) * g.get("lr_scale", 1.0)
                totals = stage.step(step)
                if self.world > 1:
                    summed = torch.tensor([*totals.values(), float(stop.requested)], dtype=torch.float64)
                    dist.all_reduce(summed)
                    totals, stop.requested = dict(zip(totals, summed.tolist())), bool(summed[-1])
                norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.clip if cfg.clip > 0 else float("inf"))
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                loss, fields = stage.report(totals, dt)
                row = {"step": step, "loss": loss, "lr": lr_at(step - 1, cfg), "grad_norm": float(norm), **fields,
                       "elapsed_s": time.perf_counter() - t_start}  # fmt: skip
                stopping = stop.requested  # read once: a signal arriving later is taken at the next step's end
                save = step % cfg.save_every == 0 or step == cfg.steps or stopping
                if save:
                    row.update(stage.at_save())
                if rank == 0:
                    with open(self.metrics, "a") as f:
                        f.write(json.dumps(row) + "\n")
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", **stage.postfix(row))
                    bar.update(1)
                if save:
                    if rank == 0:
                        self.ckpts.save(step, model, opt, info)
                    if self.world > 1:
                        dist.barrier()
                if stopping:
                    break
        finally:
            bar.close()
            stop.restore()
        if stop.requested and step < cfg.steps:
            if rank == 0:
                print(f"nanovl train: stopped by signal; checkpoint at step {step} in {self.ckpts.dir}; "
                      "run the same command to resume", file=sys.stderr)  # fmt: skip
            self.finish()
            raise SystemExit(143)
        return step, loss

    def plot(self) -> str | None:
        """OUT/loss.png from metrics.jsonl (its path), or None without matplotlib."""
        return str(self.out / "loss.png") if plot_losses(self.metrics, self.out / "loss.png") else None

    def finish(self):
        """Leave the process group (after the others reach this point)."""
        if self.world > 1 and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
