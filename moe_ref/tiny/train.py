"""Training the tiny MoE LM: AdamW, warm-up + cosine schedule, Mixtral's auxiliary load-balancing loss.

Legend: B batch, S sequence length, V vocabulary, E experts, K top-k.
The loss optimised is next-byte cross entropy + router_aux_loss_coef * load-balancing loss
(transformers' load_balancing_loss_func, switched on by output_router_logits=True).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .data import heldout_windows, load_corpus
from .model import CHECKPOINT_DIR, SMOKE_SIZE, build_model, tiny_config

__all__ = ["TrainConfig", "evaluate", "lr_at", "machine_info", "train"]


@dataclass
class TrainConfig:
    """What a training run does; smoke() is a seconds-long CI check of the same code path."""

    steps: int = 3000
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 100
    eval_windows: int = 32  # held-out windows [eval_windows, S] per evaluation (fixed positions)
    final_eval_windows: int = 128
    max_minutes: float = 18.0  # the schedule also advances by wall time: the run ends by then
    threads: int = 2
    out_dir: str = str(CHECKPOINT_DIR)
    experts_implementation: str = "grouped_mm"
    size: dict = field(default_factory=dict)  # overrides of model.TINY_SIZE

    @classmethod
    def smoke(cls, out_dir: str) -> TrainConfig:
        return cls(steps=6, batch_size=2, seq_len=32, warmup=2, eval_every=3, eval_windows=2,
                   final_eval_windows=4, max_minutes=1.0, out_dir=out_dir, size=dict(SMOKE_SIZE))

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_every", "eval_windows", "final_eval_windows",
                     "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not (self.lr > 0 and self.max_minutes > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError(f"lr and max_minutes must be > 0 and min_lr_ratio in [0, 1], got "
                             f"{self.lr}, {self.max_minutes}, {self.min_lr_ratio}")


def lr_at(progress: float, cfg: TrainConfig, step: int) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine from cfg.lr to cfg.lr * min_lr_ratio by progress 1."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-byte cross entropy (nats/byte) of `model` over windows [n, S + 1]."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk[:, :-1]).logits  # [b, S, V]
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(),
                                                         reduction="sum"))
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def machine_info() -> dict:
    """Where a run happened: platform, processor, cores, torch threads and version."""
    return dict(platform=platform.platform(), machine=platform.machine(), processor=platform.processor(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__)


def _step(model, opt, batch: torch.Tensor, lr: float, clip: float) -> tuple[float, float]:
    """One optimiser step on batch [B, S + 1]; returns (cross entropy, aux loss)."""
    for g in opt.param_groups:
        g["lr"] = lr
    out = model(input_ids=batch[:, :-1], output_router_logits=True)  # logits [B, S, V]
    ce = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), batch[:, 1:].flatten())
    (ce + model.config.router_aux_loss_coef * out.aux_loss).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return ce.item(), out.aux_loss.item()


def _save(model, log: dict, out: Path) -> None:
    from .charts import loss_figure

    out.mkdir(parents=True, exist_ok=True)
    model.config.experts_implementation = "eager"  # the portable default for whoever loads it
    model.save_pretrained(out, safe_serialization=True)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    loss_figure(log).savefig(out / "loss.png", dpi=110)


def train(cfg: TrainConfig, progress_bar: bool = True) -> dict:
    """Train from scratch with cfg, save checkpoint + train_log.json + loss.png in cfg.out_dir; return the log."""
    from tqdm.auto import tqdm

    torch.set_num_threads(cfg.threads)
    corpus = load_corpus()
    model = build_model(tiny_config(cfg.experts_implementation, max_seq_len=max(1024, cfg.seq_len), **cfg.size),
                        seed=cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([dict(params=decay, weight_decay=cfg.weight_decay), dict(params=rest, weight_decay=0.0)],
                            lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = heldout_windows(cfg.eval_windows, cfg.seq_len + 1)  # [n, S + 1]
    history = dict(step=[], train_loss=[], aux_loss=[], lr=[], eval_step=[], heldout_loss=[])
    t0, step = time.perf_counter(), 0
    bar = tqdm(total=cfg.steps, desc="train tiny MoE", disable=not progress_bar)
    while step < cfg.steps:
        progress = max(step / cfg.steps, (time.perf_counter() - t0) / (60 * cfg.max_minutes))
        if progress >= 1:
            break
        lr = lr_at(progress, cfg, step)
        ce, aux = _step(model, opt, corpus.batch("train", cfg.batch_size, cfg.seq_len, gen), lr, cfg.grad_clip)
        step += 1
        for k, v in (("step", step), ("train_loss", ce), ("aux_loss", aux), ("lr", lr)):
            history[k].append(v)
        if step % cfg.eval_every == 0:
            history["eval_step"].append(step)
            history["heldout_loss"].append(evaluate(model, windows))
        held = f", held-out {history['heldout_loss'][-1]:.3f}" if history["heldout_loss"] else ""
        bar.set_postfix_str(f"loss {ce:.3f} aux {aux:.3f}{held}", refresh=False)
        bar.update(1)
    bar.close()
    train_s = time.perf_counter() - t0
    last = history["train_loss"][-20:]  # mean of the last batches
    final = evaluate(model, heldout_windows(cfg.final_eval_windows, cfg.seq_len + 1))
    log = dict(config=asdict(cfg), model=dict(model.config.to_diff_dict()), steps=step,
               tokens_seen=step * cfg.batch_size * cfg.seq_len, wall_time_s=round(train_s, 1),
               final_heldout_loss=final, final_train_loss=sum(last) / len(last),
               uniform_loss=math.log(256), python=corpus.python, seed=cfg.seed,
               corpus=dict(train_files=corpus.train_files, heldout_files=corpus.heldout_files,
                           train_bytes=corpus.train.numel(), heldout_bytes=corpus.heldout.numel()),
               machine=machine_info(), parameters=sum(p.numel() for p in model.parameters()), history=history)
    _save(model, log, Path(cfg.out_dir))
    return log
