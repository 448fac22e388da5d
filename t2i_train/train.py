"""`t2i-train`: one trainer for T2I and ImageNet on deepspeed | fsdp | ddp | single.

    deepspeed --num_gpus 8 -m t2i_train.train --config configs/t2i_512.yaml [key.sub=value ...]
    torchrun --nproc_per_node 8 -m t2i_train.train --config configs/imagenet256_xl.yaml backend.name=fsdp
    python -m t2i_train.train --config configs/demo/t2i_tiny.yaml

The loop below never knows which backend runs (engine/backends.py). Randomness of the objective (time, noise,
condition dropout) is drawn from a generator seeded by (seed, roll-backs, step, micro-shard), so a resumed run
repeats an uninterrupted one step for step, and 2 ranks reproduce one process that accumulates 2 micro-batches.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import random
import resource
import signal
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

from t2i_train.config import (ConfigError, TrainConfig, check_global_batch, dump_yaml, load_config,
                              resolve_effective_lr, to_dict)
from t2i_train.engine import dist as d
from t2i_train.engine.backends import TrainModule, build_backend
from t2i_train.engine.banner import banner, check_resumed_config
from t2i_train.engine.checkpoint import CheckpointManager, ResumeError, step_of
from t2i_train.engine.ema import ShardedEMA
from t2i_train.engine.monitor import Monitor, json_line, peak_flops
from t2i_train.engine.paths import check_local_paths
from t2i_train.engine.preflight import check_run
from t2i_train.engine.schedule import clip_at, lr_at
from t2i_train.engine.spike import SpikeGuard, SpikeGuardError
from t2i_train.engine.text_adapter import build_text_encoder
from t2i_train.models.wrapping import compile_wanted


def derive_seed(*parts) -> int:
    h = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------ data sources

class FixedSource:
    """An in-memory set of samples, the same every step (tests: overfitting, backend agreement, resume)."""

    def __init__(self, cfg: TrainConfig, model):
        g = torch.Generator().manual_seed(derive_seed(cfg.run.seed, "fixed-data"))
        n, s = cfg.data.fixed_num_samples, cfg.data.fixed_image_size
        low = torch.rand(n, 3, max(1, s // 8), max(1, s // 8), generator=g) * 2 - 1
        self.images = torch.nn.functional.interpolate(low, size=(s, s), mode="bilinear", align_corners=False)
        self.cfg = cfg
        if model.is_t2i:
            L, D = model.config["txt_len"], model.config["txt_dim"]
            self.text = torch.randn(n, L, D, generator=g)
            lengths = torch.randint(1, L + 1, (n,), generator=g)
            self.mask = (torch.arange(L)[None] < lengths[:, None]).long()
        else:
            self.labels = torch.randint(0, model.config["num_classes"], (n,), generator=g)
        self.rollbacks = 0

    def micro_batches(self, step: int) -> list[dict]:
        b, a, w, r = self.cfg.backend.micro_batch, self.cfg.backend.grad_accum, d.world_size(), d.rank()
        n = self.images.shape[0]
        total = b * a * w
        order = torch.randperm(n, generator=torch.Generator().manual_seed(
            derive_seed(self.cfg.run.seed, self.rollbacks, step, "order")))
        order = order.repeat(math.ceil(total / n))[:total]
        out = []
        for m in range(a):
            idx = order[(m * w + r) * b: (m * w + r + 1) * b]
            batch = {"image": self.images[idx], "key": [f"fixed/{int(i)}" for i in idx]}
            if hasattr(self, "text"):
                batch["text_emb"], batch["text_mask"] = self.text[idx], self.mask[idx]
            else:
                batch["label"] = self.labels[idx]
            out.append(batch)
        return out

    def state_dict(self) -> dict:
        return {"rollbacks": self.rollbacks}

    def load_state_dict(self, state: dict) -> None:
        pass

    def reseed(self, rollbacks: int) -> None:
        self.rollbacks = rollbacks

    counters: dict = {}


class LoaderSource:
    """The streaming shard loader of data_pipeline (exactly resumable; bad-data counters)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.seed = cfg.run.seed
        self._build()

    def _build(self):
        from data_pipeline.loader import build_loader

        try:
            self.loader = build_loader(self.cfg.data.loader, rank=d.rank(), world_size=d.world_size(),
                                       seed=self.seed, batch_size=self.cfg.backend.micro_batch)
        except (ValueError, TypeError, OSError) as e:
            raise ConfigError(f"data.loader: {e}") from e
        self.it = None

    def _next(self) -> dict:
        for _ in range(2):
            if self.it is None:
                self.it = iter(self.loader)
            try:
                return next(self.it)
            except StopIteration:
                self.it = None
        raise RuntimeError(f"the data loader yielded no batch (data.loader = {self.cfg.data.loader})")

    def micro_batches(self, step: int) -> list[dict]:
        return [self._next() for _ in range(self.cfg.backend.grad_accum)]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "loader": self.loader.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            self.seed = state["seed"]
            self._build()
        self.loader.load_state_dict(state["loader"])
        self.it = None

    def reseed(self, rollbacks: int) -> None:
        """A different data order after a roll-back: a fresh stream with a derived seed."""
        seed = self.cfg.run.seed if rollbacks == 0 else derive_seed(self.cfg.run.seed, "rollback", rollbacks) % 2 ** 31
        if seed != self.seed:
            self.seed = seed
            self._build()

    @property
    def counters(self) -> dict:
        return self.loader.bad_data_counters


# ------------------------------------------------------------------------------------------------ RNG state

def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "python_ver": random.getstate()[0], "python_gauss": random.getstate()[2],
            "numpy": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate((state["python_ver"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ------------------------------------------------------------------------------------------------ trainer

class Trainer:
    def __init__(self, cfg: TrainConfig):
        from t2i_train.diffusion import ConditionDropout, FlowObjective
        from t2i_train.models import build_model

        self.cfg = cfg
        self.device = d.pick_device(cfg.backend.device)
        d.init_distributed(self.device, cfg.backend.dist_backend, use_deepspeed=cfg.backend.name == "deepspeed",
                           needs_group=cfg.backend.name != "single")
        self.global_batch = check_global_batch(cfg, d.world_size())
        self.lr_scale = resolve_effective_lr(cfg, self.global_batch) / cfg.optim.lr
        self.run_dir = cfg.run_dir
        self.ckpt = CheckpointManager(self.run_dir, cfg.checkpoint.keep_last, cfg.checkpoint.verify)
        resume = self.ckpt.resume_target(cfg.checkpoint.resume)
        resume_from = resume.path
        check_local_paths(cfg, resuming=resume_from is not None)
        changed = check_resumed_config(self.run_dir / "config.yaml", cfg) if resume_from is not None else []
        d.barrier()
        if d.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, self.run_dir / "config.yaml")
            print(f"[t2i-train] effective lr {cfg.optim.effective_lr:.4g} (optim.lr {cfg.optim.lr:g}, lr_scaling "
                  f"{cfg.optim.lr_scaling}, global batch {self.global_batch})", flush=True)
        d.barrier()

        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        overrides = dict(cfg.model.overrides)
        if cfg.objective.repa_weight > 0:
            overrides.setdefault("repa_block", cfg.objective.repa_block)
        if cfg.run.task == "t2i":  # the export then says whether the denoiser was trained seeing the text mask
            overrides.setdefault("use_text_mask", bool(cfg.text.use_mask))
        model = build_model(cfg.model.spec, **overrides)
        model.set_activation_checkpointing(cfg.model.activation_checkpointing)
        if compile_wanted(cfg.model.compile, self.device):
            model.compile_blocks()
        init_checksum = None
        if cfg.model.init_from and resume_from is None:
            load_weights(model, str(init_weights_path(cfg.model)))
            init_checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
        self.model_config = model.export_config()
        obj_cfg = {k: getattr(cfg.objective, k) for k in
                   ("timestep_sampling", "logit_mean", "logit_std", "shift", "repa_weight", "repa_block",
                    "repa_projector_dim", "repa_encoder", "repa_teacher_resolution")}
        objective = FlowObjective(obj_cfg, hidden_size=model.hidden_size)
        n_params = (sum(p.numel() for p in model.parameters()),  # before a backend shards them
                    sum(p.numel() for p in objective.parameters() if p.requires_grad))
        self.is_t2i = model.is_t2i

        try:
            self.text_encoder = build_text_encoder(cfg.text, model.config["txt_dim"], model.config["txt_len"],
                                                   self.device) if self.is_t2i else None
            null_emb, null_mask = self._null_text(model) if self.is_t2i else (None, None)
        except (OSError, ValueError) as e:
            raise ConfigError(f"text.encoder: {e}") from e
        if self.is_t2i:
            self.cond_drop = ConditionDropout(cfg.objective.cond_drop_prob, null_emb=null_emb, null_mask=null_mask)
        else:
            self.cond_drop = ConditionDropout(cfg.objective.cond_drop_prob, num_classes=model.num_classes)

        self.backend = build_backend(cfg, TrainModule(model, objective), self.device)
        self.ema = ShardedEMA(*self.backend.ema_params()) if cfg.ema.enabled else None
        self.guard = SpikeGuard(cfg.spike_guard)
        self.source = FixedSource(cfg, model) if cfg.data.source == "fixed" else LoaderSource(cfg)
        self.step = 0
        self.rollbacks = 0
        self._save_due = False
        self._unconfirmed = None  # the checkpoint that the next accepted step proves good
        if d.is_main():
            for w in resume.warnings():
                print(f"[t2i-train] warning: {w}", file=sys.stderr, flush=True)
        if resume_from is not None:
            self._restore(resume_from)
        elif cfg.model.init_optimizer:
            self._carry_optimizer(previous_checkpoint(cfg.model))
        self.stop_signal = None
        self.monitor = Monitor(cfg, self.run_dir, self.step, to_dict(cfg))
        if d.is_main():
            print(banner(cfg, run_dir=self.run_dir, resumed_from=resume_from, step=self.step, backend=self.backend.name,
                         world_size=d.world_size(), device=self.device,
                         params=n_params[0], extra_params=n_params[1], global_batch=self.global_batch), flush=True)
            for line in changed:
                print(f"[t2i-train] changed since the saved config: {line}", flush=True)
        self._flops_per_sample = None
        self._event("start", backend=self.backend.name, world_size=d.world_size(), global_batch=self.global_batch,
                    shift=objective.cfg.shift, repa_weight=objective.cfg.repa_weight,
                    init_from=cfg.model.init_from if init_checksum is not None else None,
                    init_checksum=init_checksum, resumed_from=str(resume_from) if resume_from else None,
                    resume_warnings=resume.warnings())

    # -------------------------------------------------------------------- conditions
    def _null_text(self, model):
        if self.text_encoder is not None:
            emb, mask = self.text_encoder.encode_null("")
            return emb.float().cpu(), mask.cpu()
        data_dir = self.cfg.data.loader.get("path") or self.cfg.data.loader.get("datasets")
        if self.cfg.data.source == "loader" and data_dir:
            from t2i_train.text.cache import load_null_embedding

            first = data_dir[0] if isinstance(data_dir, list) else data_dir
            first = first.get("path", first) if isinstance(first, dict) else first
            try:
                return load_null_embedding(first)
            except (OSError, KeyError) as e:
                raise ValueError(f"no text.encoder and no cached null embedding in {first}: {e}") from e
        L, D = model.config["txt_len"], model.config["txt_dim"]
        return torch.zeros(1, L, D), torch.cat([torch.ones(1, 1), torch.zeros(1, L - 1)], 1).long()

    def _condition(self, batch: dict, gen: torch.Generator):
        images = batch["image"].to(self.device, non_blocking=True)
        if self.is_t2i:
            if "text_emb" in batch:
                cond, mask = batch["text_emb"], batch.get("text_mask")
            elif self.text_encoder is not None:
                cond, mask = self.text_encoder.encode(list(batch["caption"]))
            else:
                raise ValueError("T2I batch has no text_emb and no text.encoder is configured")
            cond = cond.to(self.device, torch.float32)
            mask = None if mask is None else mask.to(self.device)
            cond, mask = self._pad_text(cond, mask)
            cond, mask = self.cond_drop(cond, mask, generator=gen)
            if not self.cfg.text.use_mask:
                mask = None
        else:
            if "label" not in batch:
                raise ValueError("class-conditional batch has no 'label'")
            cond, mask = self.cond_drop(batch["label"].to(self.device), None, generator=gen)
        return images, cond, mask

    def _pad_text(self, cond: torch.Tensor, mask: torch.Tensor | None):
        """Cached embeddings are padded to the longest caption of the batch; bring them to the null's length."""
        L = self.cond_drop.null_emb.shape[0]
        if cond.shape[1] == L:
            return cond, mask
        if cond.shape[1] > L:
            raise ValueError(f"text embeddings have {cond.shape[1]} tokens, more than the configured {L}")
        b, n, dim = cond.shape
        if mask is None:
            mask = torch.ones(b, n, dtype=torch.long, device=cond.device)
        cond = torch.cat([cond, cond.new_zeros(b, L - n, dim)], 1)
        mask = torch.cat([mask, mask.new_zeros(b, L - n)], 1)
        return cond, mask

    def _generator(self, step: int, shard: int) -> torch.Generator:
        g = torch.Generator(self.device)
        g.manual_seed(derive_seed(self.cfg.run.seed, self.rollbacks, step, shard))
        return g

    # -------------------------------------------------------------------- state
    def _extras(self) -> dict:
        return {"step": self.step, "rollbacks": self.rollbacks, "rng": rng_state(),
                "ema": self.ema.state_dict() if self.ema else None, "guard": self.guard.state_dict(),
                "data": self.source.state_dict()}

    def save(self) -> Path:
        path = self.ckpt.save(self.step, self.backend, self._extras(), {"rollbacks": self.rollbacks})
        self._save_due, self._unconfirmed = False, path
        self._event("checkpoint", path=str(path))
        return path

    def _may_save(self) -> bool:
        """Never save while updates are being skipped: the weights may be the diverged ones."""
        if self.guard.consecutive == 0:
            return True
        self._event("checkpoint_deferred", consecutive_skips=self.guard.consecutive)
        return False

    def _restore(self, path: Path) -> None:
        extras = self.ckpt.load(path, self.backend)
        self.step = int(extras["step"])
        self.rollbacks = int(extras["rollbacks"])
        set_rng_state(extras["rng"])
        if self.ema is not None and extras["ema"] is not None:
            self.ema.load_state_dict(extras["ema"])
        self.guard.load_state_dict(extras["guard"])
        self.source.reseed(self.rollbacks)
        self.source.load_state_dict(extras["data"])
        self._unconfirmed = path
        if d.is_main():
            print(f"[t2i-train] resumed from {path} at step {self.step}", flush=True)

    def _carry_optimizer(self, path: Path) -> None:
        """`model.init_optimizer`: the previous stage's raw weights and optimiser state (step, schedule, EMA,
        data position start afresh)."""
        self.backend.load(path)
        if self.ema is not None:
            self.ema.copy_from_model()
        if d.is_main():
            print(f"[t2i-train] weights and optimiser state from {path}", flush=True)

    def _event(self, kind: str, **info) -> None:
        if d.is_main():
            with open(self.run_dir / "events.jsonl", "a") as f:
                f.write(json_line({"step": self.step, "event": kind, **info}))

    def export(self, name: str = "ema") -> Path | None:
        """Gather the EMA (or the weights when EMA is off) and write a save_pretrained directory (rank 0)."""
        from t2i_train.models import build_model
        from t2i_train.engine.run_info import build_run_info
        from t2i_train.models.io import save_pretrained, save_run_info

        source = self.ema if self.ema is not None and name == "ema" else ShardedEMA(*self.backend.ema_params())
        full = source.full_state_dict()
        out = self.run_dir / "export" / name
        if d.is_main():
            model = build_model(self.model_config)
            missing, unexpected = model.load_state_dict(full, strict=False)
            persistent = {n for n, _ in model.named_parameters()}
            if unexpected or set(missing) & persistent:
                raise RuntimeError(f"export: missing {sorted(set(missing) & persistent)[:5]}, "
                                   f"unexpected {unexpected[:5]}")
            save_pretrained(model, out, metadata={"step": self.step, "source": name})
            save_run_info(out, build_run_info(self.cfg, self.model_config))
        d.barrier()
        return out if d.is_main() else None

    # -------------------------------------------------------------------- signals
    def _install_signals(self) -> None:
        """SIGTERM / SIGUSR1 (Slurm pre-emption) / SIGINT (Ctrl-C) → checkpoint at the end of the current step,
        then exit. A second Ctrl-C interrupts at once."""
        def handler(signum, _frame):
            if signum == signal.SIGINT:
                if self.stop_signal is not None:
                    raise KeyboardInterrupt
                if d.is_main():
                    print("\n[t2i-train] Ctrl-C: checkpointing at the end of this step (Ctrl-C again to abort)",
                          file=sys.stderr, flush=True)
            self.stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, handler)
        # slurm/common.sh forwards the batch script's USR1 to the pids listed here
        self.pid_file = self.run_dir / "pids" / f"{socket.gethostname()}.{d.rank()}"
        self.pid_file.parent.mkdir(parents=True, exist_ok=True)
        self.pid_file.write_text(str(os.getpid()))

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal is not None else 0.0], device=self.device)
        return bool(d.all_reduce_sum(flag).item() > 0)

    # -------------------------------------------------------------------- one step
    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        lr, clip = lr_at(step, cfg.optim) * self.lr_scale, clip_at(step, cfg.optim)
        micro = self.source.micro_batches(step)
        a, w, r = cfg.backend.grad_accum, d.world_size(), d.rank()
        flag, losses, repa = None, [], []
        nb = cfg.logging.timestep_buckets
        bucket_sum = torch.zeros(nb, device=self.device)
        bucket_cnt = torch.zeros(nb, device=self.device)
        for m, batch in enumerate(micro):
            gen = self._generator(step, m * w + r)
            images, cond, mask = self._condition(batch, gen)
            out = self.backend.forward(images=images, cond=cond, mask=mask, generator=gen)
            loss = out["loss"]
            if step in cfg.spike_guard.inject_nan_at and r == 0 and self.rollbacks == 0:
                loss = loss * float("nan")
            global_loss = float(d.all_reduce_mean(loss.detach().float().reshape(1)).item())
            if flag is None:
                flag = self.guard.check_loss(global_loss)
            self.backend.backward(loss, boundary=m == a - 1, poison=flag is not None)
            losses.append(global_loss)
            if out.get("repa_loss") is not None:
                repa.append(float(out["repa_loss"]))
            idx = (out["t"].float().clamp(0, 1 - 1e-6) * nb).long().to(self.device)
            bucket_sum.index_add_(0, idx, out["per_sample"].float().to(self.device))
            bucket_cnt.index_add_(0, idx, torch.ones_like(idx, dtype=torch.float32))
        grad_norm, applied = self.backend.step(lr, clip)
        step_loss = sum(losses) / len(losses)
        if applied and flag is None and math.isfinite(grad_norm):
            self.guard.accept(step_loss, step)
            if self._unconfirmed is not None:
                self.ckpt.mark_good(self._unconfirmed)
                self._unconfirmed = None
            if self.ema is not None:
                self.ema.update(cfg.ema.decay if step >= cfg.ema.start_step else 0.0)
        else:
            reason = flag or self.guard.check_grad(grad_norm) or "not_applied"
            self.guard.skip()
            keys = [k for part in d.all_gather_object([str(k) for b in micro for k in b.get("key", [])])
                    for k in part]
            self._event("skipped_update", reason=reason, loss=step_loss, grad_norm=grad_norm, keys=keys)
        self.step += 1
        return dict(loss=step_loss, grad_norm=grad_norm, lr=lr, clip=clip, applied=bool(applied and flag is None),
                    repa_loss=sum(repa) / len(repa) if repa else None, bucket_sum=bucket_sum,
                    bucket_cnt=bucket_cnt, images=micro[0]["image"])

    def roll_back(self) -> None:
        """Restore the last known-good checkpoint (the newest one a later step accepted) with a new data order."""
        good = self.ckpt.known_good()
        choice = self.ckpt.find(upto=step_of(good) if good is not None else None)
        if choice.path is None:
            raise SpikeGuardError(f"spike guard: {self.guard.consecutive} consecutive skipped updates at step "
                                  f"{self.step} and no intact checkpoint to roll back to in {self.ckpt.root}")
        path, failed_at = choice.path, self.step
        discarded = self.ckpt.discard_newer(path)  # the abandoned timeline is never resumed
        self.guard.check_rollback_allowed(failed_at, path.name)
        counts = self.guard.state_dict()
        rollbacks = self.rollbacks + 1
        self._restore(path)
        self.rollbacks = rollbacks
        self.guard.rollbacks, self.guard.rollbacks_in_a_row = counts["rollbacks"], counts["rollbacks_in_a_row"]
        self.guard.total_skipped = counts["total_skipped"]
        self.guard.note_rollback(failed_at)
        self.source.reseed(self.rollbacks)
        self._event("rollback", checkpoint=str(path), failed_at=failed_at, rollbacks=self.rollbacks,
                    rollbacks_in_a_row=self.guard.rollbacks_in_a_row, discarded=discarded,
                    skipped=[f"{name}: {why}" for name, why in choice.skipped])

    # -------------------------------------------------------------------- loop
    def fit(self) -> dict:
        cfg = self.cfg
        self._install_signals()
        log_every = cfg.logging.every
        window = dict(loss=0.0, n=0, repa=0.0, nrepa=0, skipped=0, t0=time.time(), steps=0)
        buckets = None
        history = []
        status = "finished"
        while self.step < cfg.run.max_steps:
            out = self.train_step()
            history.append(out["loss"])
            self.monitor.advance()
            window["steps"] += 1
            if out["applied"]:
                window["loss"] += out["loss"]
                window["n"] += 1
            else:
                window["skipped"] += 1
            if out["repa_loss"] is not None:
                window["repa"] += out["repa_loss"]
                window["nrepa"] += 1
            bs = torch.stack([out["bucket_sum"], out["bucket_cnt"]])
            buckets = bs if buckets is None else buckets + bs
            if self.guard.should_roll_back():
                self.roll_back()
                continue
            if self.step % log_every == 0 or self.step == cfg.run.max_steps:
                self._log(out, window, buckets)
                window = dict(loss=0.0, n=0, repa=0.0, nrepa=0, skipped=0, t0=time.time(), steps=0)
                buckets = None
            if cfg.logging.val_every and self.step % cfg.logging.val_every == 0:
                self.validate()
            if cfg.checkpoint.export_every and self.step % cfg.checkpoint.export_every == 0:
                self.export()
            if self._stop_requested():
                status = f"stopped by signal {self.stop_signal}"
                if self._may_save():
                    self.save()
                else:
                    status += " (updates were being skipped: no new checkpoint, the last one is kept)"
                break
            if self.step % cfg.checkpoint.every == 0 and self.step < cfg.run.max_steps:
                self._save_due = True
            if self._save_due and self._may_save():
                self.save()
            if cfg.run.debug_kill_at_step is not None and self.step == cfg.run.debug_kill_at_step:
                d.barrier()
                os.kill(os.getpid(), signal.SIGKILL)
        if status == "finished":
            if self._may_save():
                self.save()
            self.export()
            self.export("raw")  # the next stage's model.init_weights: raw (the T2I reference's load_from)
            if not (cfg.logging.val_every and self.step % cfg.logging.val_every == 0):
                self.validate()  # every run ends with a grid of its final EMA weights
        self._event("end", status=status)
        self.monitor.close()
        self.pid_file.unlink(missing_ok=True)
        return {"status": status, "step": self.step, "losses": history}

    def close(self) -> None:
        """Release the backend (DeepSpeed's engine) once the run is over; the trainer is unusable afterwards."""
        self.backend.close()

    def _log(self, out: dict, window: dict, buckets: torch.Tensor) -> None:
        elapsed = max(time.time() - window["t0"], 1e-9)
        buckets = d.all_reduce_sum(buckets)
        metrics = {
            "loss": window["loss"] / max(window["n"], 1) if window["n"] else out["loss"],
            "grad_norm": out["grad_norm"], "lr": out["lr"], "clip": out["clip"],
            "samples_per_s": window["steps"] * self.global_batch / elapsed,
            "skipped": window["skipped"], "skipped_total": self.guard.total_skipped, "rollbacks": self.rollbacks,
        }
        if window["nrepa"]:
            metrics["repa_loss"] = window["repa"] / window["nrepa"]
        nb = buckets.shape[1]
        for i in range(nb):
            if buckets[1, i] > 0:
                metrics[f"loss_t/{i / nb:.2f}-{(i + 1) / nb:.2f}"] = float(buckets[0, i] / buckets[1, i])
        if self.device.type == "cuda":
            metrics["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 30
            peak = peak_flops(self.device)
            if peak:
                fps = self._flops(out["images"])
                if fps:
                    metrics["mfu"] = fps * metrics["samples_per_s"] / d.world_size() / peak
        else:
            metrics["rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        for k, v in (self.source.counters or {}).items():
            metrics[f"data/{k}"] = v
        self.monitor.log(self.step, metrics)

    def _flops(self, images: torch.Tensor) -> float | None:
        if self._flops_per_sample is None:
            try:
                from t2i_train.models import build_model
                from t2i_train.tools.flops import count_forward_flops

                with torch.device("meta"):
                    m = build_model(self.model_config)
                h, w = images.shape[-2:]
                self._flops_per_sample = 3.0 * count_forward_flops(m, h, w, batch=1)
            except Exception:  # MFU is an estimate; never stop training for it
                self._flops_per_sample = 0.0
        return self._flops_per_sample or None

    @torch.no_grad()
    def validate(self) -> Path | None:
        """Sample the validation prompts (or class ids) with the EMA weights; save a PNG grid and log it."""
        cfg = self.cfg.logging
        source = self.ema or ShardedEMA(*self.backend.ema_params())
        full = source.full_state_dict()
        path = None
        if d.is_main() and cfg.val_prompts:
            path = self._sample_grid(full)
        d.barrier()
        return path

    def _sample_grid(self, full: dict) -> Path | None:
        from t2i_train.diffusion import SamplerConfig, make_noise, sample
        from t2i_train.models import build_model

        cfg = self.cfg.logging
        model = build_model(self.model_config)
        model.load_state_dict(full, strict=False)
        model.to(self.device).eval()
        n = len(cfg.val_prompts)
        size = cfg.val_image_size or (self.cfg.data.fixed_image_size if self.cfg.data.source == "fixed"
                                      else int(self.cfg.data.loader.get("resolution", 256)))
        if self.is_t2i:
            if self.text_encoder is None:
                self._event("validation_skipped", reason="no text.encoder for the prompts")
                return None
            cond, mask = self.text_encoder.encode([str(p) for p in cfg.val_prompts])
            unc, umask = self.cond_drop.null_emb[None].expand(n, -1, -1), \
                self.cond_drop.null_mask[None].expand(n, -1)
            cond, unc = cond.float().to(self.device), unc.float().to(self.device)
            mask, umask = mask.to(self.device), umask.to(self.device)
            if not self.cfg.text.use_mask:
                mask = umask = None
        else:
            cond = torch.tensor([int(p) for p in cfg.val_prompts], device=self.device)
            unc, mask, umask = torch.full_like(cond, model.num_classes), None, None
        noise = make_noise(range(n), (3, size, size), self.device)
        shift = cfg.val_shift if cfg.val_shift is not None else self.cfg.objective.shift
        scfg = SamplerConfig(name=cfg.val_sampler, steps=cfg.val_steps, shift=shift, cfg_scale=cfg.val_cfg_scale,
                             cfg_interval=tuple(cfg.val_cfg_interval))
        images = sample(model, noise, cond, mask, unc, umask, scfg)
        path = save_grid(images, self.run_dir / "val" / f"step_{self.step:08d}.png")
        self.monitor.log_image(self.step, path)
        return path


def save_grid(images: torch.Tensor, path: Path) -> Path:
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().cpu()
    n = x.shape[0]
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    _, c, h, w = x.shape
    grid = torch.zeros(c, rows * h, cols * w, dtype=torch.uint8)
    for i in range(n):
        grid[:, (i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = x[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(grid.permute(1, 2, 0).numpy()).save(tmp)
    tmp.replace(path)
    return path


def init_weights_path(model_cfg) -> Path:
    """`model.init_from`: an export directory / .safetensors, or a run directory → its export/<init_weights>."""
    p = Path(model_cfg.init_from)
    if (p / "checkpoints").is_dir() or (p / "export").is_dir():
        return p / "export" / model_cfg.init_weights
    if model_cfg.init_weights == "raw" and p.name == "ema":
        raise ValueError(f"model.init_from {p} is an EMA export but model.init_weights is raw; name the run "
                         f"directory ({p.parent.parent}) or {p.parent / 'raw'}")
    return p


def previous_checkpoint(model_cfg) -> Path:
    """`model.init_optimizer`: the latest checkpoint of the run directory that `model.init_from` names."""
    from t2i_train.engine.checkpoint import CheckpointManager

    if not model_cfg.init_from:
        raise ValueError("model.init_optimizer needs model.init_from (the previous stage's run directory)")
    run_dir = Path(model_cfg.init_from)
    latest = CheckpointManager(run_dir, 1).latest() if (run_dir / "checkpoints").is_dir() else None
    if latest is None:
        raise FileNotFoundError(f"model.init_optimizer: {run_dir} has no checkpoints/latest; model.init_from must "
                                "name the previous stage's run directory (e.g. runs/t2i_512)")
    return latest


def load_weights(model: torch.nn.Module, path: str) -> None:
    """`model.init_from`: weights only, from a save_pretrained directory or a .safetensors file."""
    from safetensors.torch import load_file

    p = Path(path)
    file = p / "model.safetensors" if p.is_dir() else p
    if not file.is_file():
        raise ConfigError(f"model.init_from: {file} does not exist (expected an export directory "
                          "written by the previous stage, e.g. runs/<name>/export/ema)")
    state = load_file(str(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    persistent = {n for n, _ in model.named_parameters()}
    if unexpected or set(missing) & persistent:
        raise ConfigError(f"model.init_from {file}: does not match the model (missing "
                         f"{sorted(set(missing) & persistent)[:5]}, unexpected {sorted(unexpected)[:5]})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="t2i-train", description="Train PixelDiT (T2I or ImageNet).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="Every config key, with its type, default and meaning: docs/CONFIG.md. "
                                       "Relative paths resolve against the current directory.")
    p.add_argument("--config", required=True, help="run YAML (configs/*.yaml)")
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides (see docs/CONFIG.md)")
    p.add_argument("--print-recipe", action="store_true",
                   help="print the resolved recipe beside the paper's and the reference's values, then exit")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args, unknown = p.parse_known_args(argv)
    bad = [u for u in unknown if not u.startswith("--deepspeed")]
    if bad:
        p.error(f"unrecognised arguments: {bad}")
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    return args


def _fail(message: str, code: int) -> int:
    """One line on stderr (from the first rank only) and the exit code; the launcher stops the other ranks."""
    if os.environ.get("RANK", "0") == "0":
        print(f"t2i-train: {message}", file=sys.stderr, flush=True)
    return code


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_recipe:
            from t2i_train.recipe import recipe_table

            print(recipe_table(cfg, int(os.environ.get("WORLD_SIZE", 1))))
            return 0
        check_global_batch(cfg, int(os.environ.get("WORLD_SIZE", "1")))  # before any process group or import
        check_run(cfg)
    except ConfigError as e:
        return _fail(f"config error: {e}", 2)
    try:
        trainer = Trainer(cfg)
    except ConfigError as e:  # checks that need the launcher's world size, the run directory or the disk
        d.shutdown()
        return _fail(f"config error: {e}", 2)
    except ResumeError as e:
        d.shutdown()
        return _fail(f"cannot resume: {e}", 4)
    try:
        result = trainer.fit()
    except SpikeGuardError as e:
        trainer._event("end", status="spike guard gave up", error=str(e))
        return _fail(str(e), 3)
    if d.is_main():
        print(f"[t2i-train] {result['status']} at step {result['step']}", flush=True)
    d.barrier()
    trainer.close()
    del trainer
    d.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
