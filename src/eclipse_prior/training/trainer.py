"""`train(cfg)`: the training loop of `eclipse-prior train`, from an embedding store to a run folder.

Reading order: `train` builds everything, `_training_step` holds the loop body, and `objective_loss` is where
the objective picks its loss from `eclipse_prior.losses` (eclipse -> projection + lam * InfoNCE; projection and
diffusion -> the paper's squared-L2 projection loss on the predicted embedding, x0 for the diffusion prior).

Determinism: the data order is a seeded permutation per epoch, and each sample's noise (timestep, condition
dropout) is drawn from (seed, micro-step, position in the global batch). A run resumed from a checkpoint
therefore sees exactly the batches and noise it would have seen uninterrupted, and ends with the same weights.

Several processes (torchrun / accelerate launch): rank r takes rows [r*b, (r+1)*b) of each global batch of
world_size*b rows, so ranks never overlap; with the per-sample randomness above, DDP's gradient averaging and
InfoNCE negatives gathered from all ranks, N processes x batch b train like one process with batch N*b.
Only the main process writes the run folder.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from eclipse_prior.config import save_config
from eclipse_prior.data.store import BufferRing, token_positions
from eclipse_prior.errors import ConfigError, EclipsePriorError, StoreError
from eclipse_prior.losses import contrastive_loss, projection_loss
from eclipse_prior.outputs import progress as progress_bar
from eclipse_prior.outputs import write_json_atomic
from eclipse_prior.training.checkpoint import EMA, safetensors_io_errors, save_checkpoint
from eclipse_prior.training.config import TrainConfig
from eclipse_prior.training.curves import plot_training_curves
from eclipse_prior.training.resume import (
    check_data_fingerprint,
    check_run_dir,
    claim_run,
    data_fingerprint,
    load_latest_good_checkpoint,
    note,
    read_metrics,
    read_run_info,
    refuse_if_held,
    remove_stale_temporaries,
    silent,
    truncate_metrics,
)
from eclipse_prior.training.validation_images import validation_images


def objective_loss(
    objective: str,
    pred: torch.Tensor,
    batch: dict[str, torch.Tensor],
    lam: float,
    tau: float,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    hard_negatives: int = 4,
    grad_ratio: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss of one objective on `prior.training_prediction(...)`, plus its parts for logging.

    Every objective but diffusion is projection + lam * a contrastive term (`eclipse_prior.losses.OBJECTIVES`
    says which): eclipse and residual use the paper's InfoNCE against the batch's texts, image-contrastive and
    hard-negatives a symmetric InfoNCE against the batch's true image embeddings (hard-negatives: each row's
    `hard_negatives` nearest other captions only); projection and ridge have no second term, diffusion compares
    the predicted x0 with the clean image. Under several processes `gather` (an all-gather that keeps
    gradients) gives the contrastive term the whole global batch, as one process with the global batch would
    have; the projection term is a per-sample mean that DDP's gradient averaging already makes global.

    `grad_ratio`: also return `grad_ratio` = ||d contrastive / d pred|| / ||d projection / d pred|| (unweighted;
    lam x it is the contrastive term's share of the gradient the network receives). Taken at the output, not
    the parameters: both terms reach the parameters through the same Jacobian of `pred`, so the output ratio is
    what lam actually sets, it is free of the network's conditioning, and it costs two backward passes through
    the loss alone instead of two more through the network.
    """
    from eclipse_prior.losses import OBJECTIVES, hard_negative_loss, image_contrastive_loss

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown objective {objective!r} ({', '.join(OBJECTIVES)})")
    image_embeds = batch["image_embeds"]
    projection = projection_loss(pred, image_embeds)
    kind = OBJECTIVES[objective]
    if kind is None:  # projection, ridge, diffusion (x0 prediction against the clean image)
        return projection, {"projection": projection}
    g = gather or (lambda t: t)
    ids = g(batch["caption_ids"])
    if kind == "text":
        contrastive = contrastive_loss(g(pred), g(batch["text_embeds"]), tau=tau, caption_ids=ids)
    elif kind == "image":
        contrastive = image_contrastive_loss(g(pred), g(image_embeds), tau=tau, caption_ids=ids)
    else:
        contrastive = hard_negative_loss(g(pred), g(image_embeds), g(batch["text_embeds"]), hard_negatives,
                                         tau=tau, caption_ids=ids)
    terms = {"projection": projection, "contrastive": contrastive}
    if grad_ratio:
        (d_proj,) = torch.autograd.grad(projection, pred, retain_graph=True)
        (d_con,) = torch.autograd.grad(contrastive, pred, retain_graph=True)
        terms["grad_ratio"] = d_con.norm() / d_proj.norm().clamp_min(1e-12)
    return projection + lam * contrastive, terms


class _PredictionStep(nn.Module):
    """Routes `prior.training_prediction` through `forward`, so DDP syncs gradients and autocast applies."""

    def __init__(self, prior: nn.Module) -> None:
        super().__init__()
        self.prior = prior

    def forward(
        self,
        image_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        text_states: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        **randomness: torch.Tensor,
    ) -> torch.Tensor:
        return self.prior.training_prediction(image_embeds, text_embeds, text_states, text_mask, **randomness)


def draw_randomness(
    prior: nn.Module, objective: str, seed: int, micro_step: int, global_batch: int, rows: slice
) -> dict[str, torch.Tensor]:
    """This rank's rows of the micro-step's randomness, drawn for the whole global batch on the CPU.

    Each sample's noise (and, for the diffusion prior, timestep and condition dropout) is then a function of
    (seed, micro-step, global position) alone: N processes x batch b get exactly what 1 process x batch N*b
    gets, on any device, and a resumed run gets what it would have got uninterrupted.
    """
    g = torch.Generator().manual_seed(mix_seed(seed, micro_step))
    width = prior.config.embedding_dim
    if objective == "diffusion":  # the order DiffusionPrior.training_prediction draws in
        timesteps = torch.randint(0, prior.config.num_train_timesteps, (global_batch,), generator=g)
        noise = torch.randn(global_batch, width, generator=g)
        drop = torch.rand(global_batch, generator=g) < prior.config.cond_drop_prob
        return {"noise": noise[rows], "timesteps": timesteps[rows], "drop": drop[rows]}
    return {"noise": torch.randn(global_batch, width, generator=g)[rows]}


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (SeedSequence hashing: nearby inputs give unrelated seeds)."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


class DataOrder:
    """The global sample order: a seeded permutation of the train rows per epoch, epochs concatenated.

    Micro-step m reads rows [m*G, (m+1)*G) of that stream (G = world_size * batch_size), so the position in
    the data is a function of the step alone, and resuming needs no sampler state beyond the step.
    """

    def __init__(self, indices: np.ndarray, seed: int) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.seed = seed
        self._epoch = -1
        self._perm = self.indices

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.indices)
            self._epoch = epoch
        return self._perm

    def position(self, micro_step: int, global_batch: int) -> dict[str, int]:
        start = micro_step * global_batch
        return {"epoch": start // len(self.indices), "offset": start % len(self.indices), "micro_step": micro_step}

    def global_batch(self, micro_step: int, global_batch: int) -> np.ndarray:
        start = micro_step * global_batch
        n = len(self.indices)
        out = []
        while global_batch > 0:
            epoch, offset = divmod(start, n)
            take = min(global_batch, n - offset)
            out.append(self._permutation(epoch)[offset : offset + take])
            start += take
            global_batch -= take
        return np.concatenate(out)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up to the peak LR, then a cosine decay to zero at the last step."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _open_store(cfg: TrainConfig) -> Any:
    from eclipse_prior.data.store import EmbeddingStore

    store = EmbeddingStore(cfg.data)
    if cfg.verify_store:
        store.validate()
    if len(store) == 0:
        raise StoreError(f"store {cfg.data} is empty")
    if store.normalized and not cfg.allow_normalized_store:
        raise StoreError(
            f"store {cfg.data} holds L2-normalised embeddings (clip-retrieval style) but unCLIP decoders expect raw "
            "ones; re-embed with `eclipse-prior embed`, or pass --allow-normalized-store to train on it anyway"
        )
    if store.image_dim != store.text_dim:
        raise StoreError(
            f"store {cfg.data} has image width {store.image_dim} but text width {store.text_dim}; "
            "a prior maps between embeddings of one CLIP space"
        )
    return store


def _check_batches_fit(cfg: TrainConfig, store: Any) -> None:
    """A batch (and the ones prefetched) must fit in memory: `--batch-size 100000000` is one line, not a kill."""
    from eclipse_prior.resources import available_memory, gib

    width = store.image_dim + store.text_dim
    if store.has_text_states and not cfg.pooled_only:
        width += (store.text_seq_len or 0) * ((store.text_state_dim or 0) + 1)
    need = 4 * width * cfg.batch_size * (1 + cfg.num_workers)  # float32 rows of this rank's batches in flight
    free = available_memory("cpu")  # batches are read and prefetched in host memory
    if free is not None and need > free:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} with --num-workers {cfg.num_workers} would hold {gib(need)} of embeddings "
            f"alone ({width} floats a row), but {gib(free)} is free; lower them"
        )


def _build_prior(cfg: TrainConfig, store: Any) -> nn.Module:
    """A prior sized by the preset (depth/heads) and the store (width, text length), or loaded by --init-from."""
    import eclipse_prior.models as models

    cls = {"diffusion": models.DiffusionPrior, "residual": models.ResidualPrior}.get(cfg.objective, models.EclipsePrior)
    if cfg.init_from:
        prior = models.load_prior(cfg.init_from, local_files_only=True if cfg.offline else None)
        if type(prior) is not cls:
            raise ConfigError(
                f"--init-from {cfg.init_from} is a {type(prior).__name__} but objective {cfg.objective} trains a "
                f"{cls.__name__}"
            )
    else:
        torch.manual_seed(cfg.seed)
        num_embeddings = store.text_seq_len if store.has_text_states else None
        prior = cls.from_preset(cfg.preset, store.image_dim, num_embeddings, pooled_only=cfg.pooled_only)
        if cfg.objective == "residual":  # start as the ridge map; the network learns the correction
            from eclipse_prior.training.linear import fit_ridge

            prior.start_from_linear_map(*fit_ridge(store, store.split_indices("train"), cfg.ridge_alpha))
    width = prior.config.embedding_dim
    if width != store.image_dim:
        raise StoreError(f"store {cfg.data} has embedding width {store.image_dim} but the prior has width {width}")
    if prior.uses_text_states:
        if not store.has_text_states:
            raise StoreError(
                f"the prior needs per-token text states but store {cfg.data} has none; re-embed with "
                "--text-states or train with --pooled-only"
            )
        want = (prior.config.num_embeddings, width)
        have = (store.text_seq_len, store.text_state_dim)
        if want != have:
            raise StoreError(
                f"store {cfg.data} has text states of (length, width) {have} but the prior expects {want}"
            )
    return prior


def _make_accelerator(cfg: TrainConfig, run_dir: Path) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed-precision fp16 needs a GPU; on a CPU use bf16 (or no)")
    try:
        return Accelerator(
            mixed_precision=cfg.mixed_precision,
            gradient_accumulation_steps=cfg.grad_accum,
            cpu=not torch.cuda.is_available(),
            dynamo_backend="inductor" if cfg.compile else None,  # prepare() then wraps the model in torch.compile
            log_with=None if cfg.report_to == "none" else cfg.report_to,
            project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        )
    except (ValueError, ImportError) as err:
        raise ConfigError(f"cannot set up accelerate ({cfg.mixed_precision}, {cfg.report_to}): {err}") from err


def _store_summary(store: Any, path: str) -> dict[str, Any]:
    return {
        "path": str(Path(path).resolve()),
        "rows": len(store),
        "train_rows": int(len(store.split_indices("train"))),
        "val_rows": int(len(store.split_indices("val"))),
        "clip_id": store.clip_id,
        "image_dim": store.image_dim,
        "text_seq_len": store.text_seq_len if store.has_text_states else 0,
        "has_text_states": store.has_text_states,
        "normalized": store.normalized,
    }


def resolved_command(cfg: TrainConfig) -> str:
    """An `eclipse-prior train` command line that reproduces `cfg` (flags for every non-default field)."""
    defaults = TrainConfig()
    argv = ["eclipse-prior", "train"]
    for f in fields(cfg):
        value, default = getattr(cfg, f.name), getattr(defaults, f.name)
        if value == default or f.name in ("resume", "allow_changed_data"):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
        else:
            argv += [flag, str(value)]
    return shlex.join(argv)


def save_prior_atomic(prior: nn.Module, target: Path) -> None:
    """`save_pretrained` into a temporary folder, then swap it in, so `target` is never half-written."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with safetensors_io_errors(target):
            prior.save_pretrained(tmp, safe_serialization=True)
    except BaseException:  # a full disk: the previous prior/ stays, no temporary folder is left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


class _Batches:
    """This rank's micro-batches as device tensors, fetched ahead by a background thread.

    The host reads only what the run uses (no text states for a pooled-only run), in the store's dtype, with text
    states ragged (each row's tokens up to its last unmasked one) into pinned buffers on CUDA; the copy is
    non-blocking, and padding to the prior's text length and the conversion to float32 happen on the device.
    """

    def __init__(self, store: Any, order: DataOrder, cfg: TrainConfig, rank: int, world: int, device: Any) -> None:
        self.store, self.order, self.cfg = store, order, cfg
        self.rank, self.world, self.device = rank, world, torch.device(device)
        self.fields = ("image_embeds", "text_embeds") if cfg.pooled_only else store.array_names
        self.pin = self.device.type == "cuda"
        # pageable host buffers are reused; each batch is copied out by _to_device before its slot comes round
        self.ring = BufferRing(cfg.num_workers + 2)
        self.pool = ThreadPoolExecutor(max_workers=1) if cfg.num_workers > 0 else None
        self.pending: dict[int, Future] = {}

    def _allocate(self, pinned: dict[int, torch.Tensor]) -> Callable[[tuple[int, ...], np.dtype], np.ndarray]:
        """Output buffers for the store: pinned torch tensors on CUDA (kept, so the copy uses the pinned storage)."""
        def allocate(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
            tensor = torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], pin_memory=True)
            array = tensor.numpy()
            pinned[array.__array_interface__["data"][0]] = tensor
            return array

        return allocate

    def _load(self, micro_step: int) -> dict[str, Any]:
        b = self.cfg.batch_size
        rows = self.order.global_batch(micro_step, b * self.world)[self.rank * b : (self.rank + 1) * b]
        pinned: dict[int, torch.Tensor] = {}
        batch = self.store.get_batch(
            rows, fields=self.fields, dtype=None, text_length="ragged",
            allocate=self._allocate(pinned) if self.pin else self.ring.batch(),
        )
        batch["caption_ids"] = self.store.caption_ids(rows)
        if "text_states" in batch:
            row_of, position = token_positions(batch.pop("text_rows"), batch.pop("text_lengths"))
            batch["text_index"] = np.stack([row_of, position])
        return {k: _host_tensor(v, pinned) for k, v in batch.items()}

    def _to_device(self, host: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        moved = {k: v.to(self.device, non_blocking=self.pin) for k, v in host.items()}
        out = {k: moved[k].to(torch.float32, copy=True) for k in ("image_embeds", "text_embeds")}
        out["caption_ids"] = moved["caption_ids"]
        if "text_states" in moved:
            n, length = out["image_embeds"].shape[0], self.store.text_seq_len
            row_of, position = moved["text_index"].unbind(0)
            states = torch.zeros(n, length, moved["text_states"].shape[1], device=self.device)
            mask = torch.zeros(n, length, dtype=torch.bool, device=self.device)
            states[row_of, position] = moved["text_states"].float()
            mask[row_of, position] = moved["text_mask"]
            out["text_states"], out["text_mask"] = states, mask
        return out

    def get(self, micro_step: int) -> dict[str, torch.Tensor]:
        if self.pool is None:
            host = self._load(micro_step)
        else:
            future = self.pending.pop(micro_step, None) or self.pool.submit(self._load, micro_step)
            for ahead in range(micro_step + 1, micro_step + 1 + self.cfg.num_workers):
                if ahead not in self.pending:
                    self.pending[ahead] = self.pool.submit(self._load, ahead)
            host = future.result()
        return self._to_device(host)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _host_tensor(array: np.ndarray, pinned: dict[int, torch.Tensor]) -> torch.Tensor:
    """The pinned tensor behind ``array`` when the loader allocated it, else a tensor sharing its memory."""
    tensor = pinned.get(array.__array_interface__["data"][0])
    return tensor if tensor is not None and tensor.numel() == array.size else torch.from_numpy(array)


_TORCH_DTYPES = {np.dtype(np.float16): torch.float16, np.dtype(np.float32): torch.float32,
                 np.dtype(bool): torch.bool, np.dtype(np.int64): torch.int64}


def _param_groups(prior: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: decaying biases and LayerNorm gains only hurts."""
    decay, no_decay = [], []
    for p in prior.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _flat_hparams(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in asdict(cfg).items() if isinstance(v, int | float | str | bool)}


def train(cfg: TrainConfig, command: str | None = None) -> Path:
    """Train a prior on an embedding store; returns the run folder (load it with `load_prior(run_dir)`).

    `command` is recorded in run.json and the model card (the CLI passes its own argv); without it the
    equivalent command built from the resolved config is recorded.
    """
    cfg.check()
    if cfg.objective == "ridge":  # closed form, no training loop
        from eclipse_prior.training.linear import train_ridge

        return train_ridge(cfg, command)
    run_dir = Path(cfg.out)
    refuse_if_held(run_dir)  # a run in progress there is said first, naming it
    check_run_dir(cfg, run_dir)  # early one-line errors, before the store is verified; checked again once claimed
    store = _open_store(cfg)
    if not store.has_text_states and not cfg.pooled_only:
        cfg.pooled_only = True  # a store without token states can only train a pooled-only prior
    train_rows = store.split_indices("train")
    if len(train_rows) == 0:
        raise StoreError(f"store {cfg.data} has no rows in its train split")
    _check_batches_fit(cfg, store)
    accelerator = _make_accelerator(cfg, run_dir)
    claim = ExitStack()
    try:
        rank, world = accelerator.process_index, accelerator.num_processes
        main = accelerator.is_main_process
        fingerprint = _claim_and_check_run(claim, cfg, run_dir, store, accelerator, command)

        prior = _build_prior(cfg, store)
        ema = EMA(prior, cfg.ema_decay)
        optimizer = _make_optimizer(prior, cfg)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, cfg.warmup_steps, cfg.steps)
        )

        checkpoints_dir = run_dir / "checkpoints"
        start_step = 0
        loaded = _resume_from_checkpoint(cfg, checkpoints_dir, prior, ema, optimizer, scheduler, main)
        if loaded is not None:
            latest, state = loaded
            start_step = int(state["step"])
            if main:
                print(f"resuming {run_dir} from {latest.name} (step {start_step})", file=sys.stderr)
                if state.get("world_size", world) != world:
                    print(
                        f"note: checkpoint written by {state['world_size']} process(es), this run has {world}: "
                        "training continues, but batches and noise differ from an uninterrupted run",
                        file=sys.stderr,
                    )
        ema.model.to(accelerator.device)
        model, optimizer = accelerator.prepare(_PredictionStep(prior), optimizer)

        summary = _store_summary(store, cfg.data)
        metrics_path = run_dir / "metrics.jsonl"
        if main:
            run_dir.mkdir(parents=True, exist_ok=True)
            run_info = read_run_info(run_dir) or {}
            invoked = command or resolved_command(cfg)
            run_info.setdefault("command", invoked)
            run_info.setdefault("invocations", []).append({"command": invoked, "start_step": start_step})
            run_info.update(
                resolved_command=resolved_command(cfg),
                store=summary,
                prior_class=type(prior).__name__,
                prior_config=dict(prior.config),
                parameters=sum(p.numel() for p in prior.parameters()),
                world_size=world,
                global_batch=cfg.batch_size * world * cfg.grad_accum,
                status="running",
                data_fingerprint=fingerprint,
            )
            write_json_atomic(run_dir / "run.json", run_info)
            save_config(cfg, run_dir / "config.yaml")  # after run.json: a folder with config.yaml has both
            truncate_metrics(metrics_path, start_step)
            if cfg.report_to != "none":
                accelerator.init_trackers("eclipse-prior", config=_flat_hparams(cfg))
            if cfg.val_every:
                _announce_validation(store, cfg)
        accelerator.wait_for_everyone()

        val_images = validation_images(cfg, store, ema.model, run_dir, accelerator.device) if main else None
        order = DataOrder(train_rows, cfg.seed)
        batches = _Batches(store, order, cfg, rank, world, accelerator.device)
        global_micro = cfg.batch_size * world
        progress = progress_bar(total=cfg.steps, initial=start_step, enabled=main and cfg.progress, desc="train")
        window: list[torch.Tensor] = []
        window_terms: dict[str, list[torch.Tensor]] = {}
        t0, samples = time.perf_counter(), 0
        try:
            for step in range(start_step, cfg.steps):
                for micro in range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum):
                    loss, terms = _training_step(model, prior, accelerator, optimizer, batches.get(micro), cfg, micro)
                    window.append(loss)
                    for k, v in terms.items():
                        window_terms.setdefault(k, []).append(v)
                    samples += global_micro
                scheduler.step()
                ema.update(prior)
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    mean_loss = accelerator.reduce(torch.stack(window).mean(), reduction="mean").item()
                    parts = {
                        k: accelerator.reduce(torch.stack(v).mean(), reduction="mean").item()
                        for k, v in window_terms.items()
                    }
                    if "grad_ratio" in parts:  # lam re-expressed as the contrastive share of the output gradient
                        parts["lam_grad_ratio"] = cfg.lam * parts["grad_ratio"]
                    window, window_terms = [], {}
                    rate = samples / max(time.perf_counter() - t0, 1e-9)  # this window, training time only
                    t0, samples = time.perf_counter(), 0
                    if main:
                        row = {"step": done, "loss": mean_loss, **parts, "lr": scheduler.get_last_lr()[0],
                               "samples_per_s": rate}
                        _append_jsonl(metrics_path, row)
                        if cfg.report_to != "none":
                            accelerator.log({f"train/{k}": v for k, v in row.items() if k != "step"}, step=done)
                        progress.set_postfix(loss=f"{mean_loss:.4g}", samples_s=f"{rate:.0f}")
                paused = time.perf_counter()
                if main and cfg.val_every and (done % cfg.val_every == 0 or done == cfg.steps):
                    _validate(ema.model, store, cfg, done, metrics_path, accelerator)
                if val_images is not None and val_images.due(done, cfg.steps):
                    val_images.log(ema.model, done, accelerator)
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    if main:
                        extra = {"data_position": order.position(done * cfg.grad_accum, global_micro),
                                 "world_size": world, "seed": cfg.seed}
                        save_checkpoint(checkpoints_dir, done, prior, ema, optimizer, scheduler, extra,
                                        cfg.keep_checkpoints)
                        save_prior_atomic(ema.model, run_dir / "prior")
                    accelerator.wait_for_everyone()
                t0 += time.perf_counter() - paused  # validation and checkpoints do not count against samples/s
                progress.update(1)
        finally:
            batches.close()
            progress.close()
        if main:
            if not (run_dir / "prior").is_dir():  # resumed a finished run: nothing ran, make sure prior/ exists
                save_prior_atomic(ema.model, run_dir / "prior")
            run_info = json.loads((run_dir / "run.json").read_text())
            run_info["status"] = "finished"
            write_json_atomic(run_dir / "run.json", run_info)
            plot_training_curves(run_dir)
    except BaseException:
        claim.__exit__(*sys.exc_info())  # the claim learns the run failed: a folder it created and left empty goes
        raise
    finally:
        claim.close()  # released (a no-op after a failure)
        _release(accelerator)
    return run_dir


def _claim_and_check_run(
    claim: ExitStack, cfg: TrainConfig, run_dir: Path, store: Any, accelerator: Any, command: str | None
) -> dict[str, Any]:
    """Hold RUN (rank 0) until `claim` closes, recheck it under the claim, and return the store's fingerprint
    (checked against the run's on --resume)."""
    claim.enter_context(claim_run(run_dir, accelerator, f"train --out {run_dir}" if command is None else command))
    check_run_dir(cfg, run_dir)  # another run may have started there between the first check and the claim
    fingerprint = data_fingerprint(store)
    main = accelerator.is_main_process
    if cfg.resume:
        check_data_fingerprint(cfg, run_dir, fingerprint, log=note if main else silent)
    if main:
        remove_stale_temporaries(run_dir)
    return fingerprint


def _resume_from_checkpoint(
    cfg: TrainConfig, checkpoints_dir: Path, prior: nn.Module, ema: EMA, optimizer: Any, scheduler: Any, main: bool
) -> tuple[Path, dict[str, Any]] | None:
    """With --resume: the newest checkpoint that reads (damaged ones skipped with a note), or None before the
    first checkpoint (the run starts from step 0, said once)."""
    if not cfg.resume:
        return None
    log = note if main else silent
    loaded = load_latest_good_checkpoint(checkpoints_dir, prior, ema, optimizer, scheduler, log=log)
    if loaded is None:
        log(f"note: {cfg.out} has no checkpoint yet (stopped before its first one): starting from step 0")
    return loaded


def _release(accelerator: Any) -> None:
    """Close trackers and forget accelerate's process-wide settings, so a later `train` in the same process
    (tests, notebooks, sweeps) may use another precision or accumulation; the process group stays up."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.end_training()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def _make_optimizer(prior: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it: the same update, but on a CPU the default per-parameter loop
    (foreach/fused are off for CPU tensors) took ~3x longer for the 34M network (benchmarks/README.md)."""
    groups = _param_groups(prior, cfg.weight_decay)
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


def _attention_backend(device: torch.device, mixed_precision: str) -> Any:
    """Plain (math) attention for mixed precision on CPU: torch's CPU flash-attention backward with our additive mask
    and 32-wide heads took ~24% of a bf16 step for <3% of its FLOPs; the math path is the same arithmetic. In fp32
    it did not help (benchmarks/README.md), so torch keeps its choice there and on GPUs."""
    use_math = device.type == "cpu" and mixed_precision != "no"
    return sdpa_kernel(SDPBackend.MATH) if use_math else nullcontext()


def _training_step(
    model: nn.Module,
    prior: nn.Module,
    accelerator: Any,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    cfg: TrainConfig,
    micro_step: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One micro-batch: forward, loss, backward; the optimizer steps at the end of each accumulation window."""
    rank, world, b = accelerator.process_index, accelerator.num_processes, cfg.batch_size
    torch.manual_seed(mix_seed(cfg.seed, micro_step, rank))  # anything left on the global RNG (dropout)
    randomness = draw_randomness(prior, cfg.objective, cfg.seed, micro_step, b * world, slice(rank * b, (rank + 1) * b))
    with accelerator.accumulate(model), _attention_backend(accelerator.device, cfg.mixed_precision):
        pred = model(
            batch["image_embeds"],
            batch["text_embeds"],
            batch.get("text_states"),
            batch.get("text_mask"),
            **{k: v.to(accelerator.device) for k, v in randomness.items()},
        )
        gather = _gather_with_grad if world > 1 else None
        done = micro_step // cfg.grad_accum + 1  # the optimizer step this micro-batch belongs to
        measure = done % cfg.log_every == 0 or done == cfg.steps  # the ratio is logged at log steps only
        loss, terms = objective_loss(cfg.objective, pred.float(), batch, cfg.lam, cfg.tau, gather,
                                     cfg.hard_negatives, grad_ratio=measure)
        if not torch.isfinite(loss):
            raise EclipsePriorError(
                f"training diverged: loss {loss.item()} at micro-step {micro_step}; lower --lr or check the store"
            )
        accelerator.backward(loss)
        if accelerator.sync_gradients and cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss.detach(), {k: v.detach() for k, v in terms.items()}


def _gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to each rank's own rows."""
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(t.contiguous()), dim=0)


def _append_jsonl(path: Path, row: dict[str, Any]) -> None:
    from eclipse_prior.evaluation.embedding_metrics import dumps_json

    with open(path, "a") as f:
        f.write(dumps_json(row) + "\n")


def _val_rows(store: Any, cfg: TrainConfig) -> int:
    return min(len(store.split_indices("val")), cfg.val_max_samples)


def _announce_validation(store: Any, cfg: TrainConfig) -> None:
    """Say once, before training, when validation is skipped (< 2 rows) or its metrics will be noisy."""
    from eclipse_prior.evaluation.embedding_metrics import split_size_warning

    n = _val_rows(store, cfg)
    if n < 2:
        print(f"note: validation skipped: the store's val split has {n} row(s), the metrics need at least 2 "
              "(re-embed with a larger --val-fraction)", file=sys.stderr)
    elif (warning := split_size_warning(n, "val")) is not None:
        print(warning, file=sys.stderr)


def _validate(
    ema_model: nn.Module, store: Any, cfg: TrainConfig, step: int, metrics_path: Path, accelerator: Any
) -> None:
    """Embedding metrics of the EMA weights (what prior/ and exports hold) on the store's val split."""
    from eclipse_prior.evaluation.embedding_metrics import evaluate_prior

    if _val_rows(store, cfg) < 2:
        return
    metrics = evaluate_prior(
        ema_model,
        store,
        split="val",
        seed=cfg.seed,
        max_samples=cfg.val_max_samples,
        num_inference_steps=cfg.val_steps,
        guidance_scale=cfg.val_guidance,
        verify_store=False,  # checked once when the store was opened (unless --no-verify-store)
    )
    _append_jsonl(metrics_path, {"step": step, "split": "val", **metrics})
    if cfg.report_to != "none":
        accelerator.log({f"val/{k}": v for k, v in metrics.items() if v is not None}, step=step)


def iter_metrics(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Rows of RUN_DIR/metrics.jsonl (train log lines and validation lines with "split")."""
    yield from read_metrics(Path(run_dir) / "metrics.jsonl")
