"""The workstation continual trainer: tasks in sequence with the paper's losses, resumable.

Per task ``t`` (see ``docs``/method.md): prototypes initialised from class-mean images; for each
batch one AdamW step on backbone, hypernetwork and prototypes with cross-entropy plus logit
distillation of every earlier task against the previous model, then one step on the prototypes
alone with prototype distillation. After each task the test accuracy of every task seen so far is
appended to the accuracy matrix and the checkpoint is rewritten atomically, so ``--resume``
continues after the last finished task. Each task draws its randomness from ``(seed, task)``
alone, which makes a resumed run identical to an uninterrupted one.

A frozen backbone (``backbone_lr`` 0 from trained weights) stays in eval mode, and with
``cache_features`` (the default) each image's features are computed once, in memory or, for a large
image set, in a memory-mapped file under the run directory that is deleted when training ends.
Generator and prototypes then train on those features; only prototypes still pass through the
backbone (prototype distillation). The results equal the uncached path's up to float rounding.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from pah_edge.atomic import atomic_write_json
from pah_edge.workstation.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint, save_checkpoint
from pah_edge.workstation.backbones import canonical_backbone_name
from pah_edge.workstation.config import RunConfig, TrainConfig, absolute_folder, resolve
from pah_edge.machine import library_versions
from pah_edge.workstation.data import ImageSet, Task, load_benchmark, load_image_folder
from pah_edge.workstation.distributed import DistContext
from pah_edge.errors import CheckpointError
from pah_edge.workstation.hypernetwork import PrototypeGenerator
from pah_edge.workstation.metrics import summarize
from pah_edge.workstation.model import PAHModel, build_model
from pah_edge.workstation.plots import plot_accuracy_matrix, plot_prototypes
from pah_edge.preprocess import Preprocess
from pah_edge.progress import bar_progress

log = logging.getLogger("pah_edge")

EVAL_BATCH = 256
# On a CPU, large batches spill the caches (4x slower at 256 than at 16; docs/benchmarks.md, "The main job").
CPU_EVAL_BATCH = 16
FEATURES_IN_MEMORY_MAX = 1 << 30  # bytes of one image set's features; a larger set's go to a memory-mapped file


@dataclass
class RunState:
    """What survives between tasks: the model, the accuracy matrix and per-task validation accuracy."""

    model: PAHModel
    acc_matrix: list[list[float]]
    val_acc: list[float]


def run_training(cfg: RunConfig, out_dir: Path, *, resume: bool = False, show_progress: bool = True) -> dict:
    """Resolve ``cfg``, load its tasks and train them: what ``pah-edge train`` runs."""
    cfg = resolve(dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, backbone=canonical_backbone_name(cfg.model.backbone))))
    _refuse_to_overwrite(out_dir, resume)  # before minutes of data loading
    resumed = _resumable(cfg, out_dir) if resume else None  # its options checked before the data loads too
    # A resumed run keeps the preprocessing it started with: one begun before the area resize rule goes
    # on training, and is exported, with the rule its first tasks were trained on.
    preprocess = (Preprocess.from_dict(resumed["preprocess"]) if resumed is not None
                  else Preprocess(image_size=cfg.model.image_size))
    tasks = load_tasks(cfg, preprocess, cfg.data.limit_per_class)
    return train_continual(cfg, tasks, preprocess, out_dir, resumed=resumed, show_progress=show_progress)


def load_tasks(cfg: RunConfig, preprocess: Preprocess, limit_per_class: int | None) -> list[Task]:
    """The tasks of ``cfg``'s data (folder or benchmark), at most ``limit_per_class`` images per class and split."""
    data = cfg.data
    if data.folder is not None:
        return load_image_folder(data.folder, preprocess=preprocess, limit_per_class=limit_per_class,
                                 seed=cfg.train.seed, val_fraction=data.val_fraction)
    return load_benchmark(data.benchmark, preprocess=preprocess, data_dir=data.data_dir, num_tasks=data.num_tasks,
                          classes_per_task=data.classes_per_task, limit_per_class=limit_per_class,
                          seed=cfg.train.seed, val_fraction=data.val_fraction, download=data.download)


def train_continual(cfg: RunConfig, tasks: list[Task], preprocess: Preprocess, out_dir: Path, *,
                    resumed: dict | None = None, show_progress: bool = True) -> dict:
    """Train ``tasks`` in order (or jointly for ``method == "joint"``); returns the metrics dict.

    ``resumed``: continue the run in ``out_dir`` from its checkpoint, read and checked by ``_resumable``.

    Writes ``checkpoint.pt``, ``config.json``, ``metrics.json``, ``accuracy_matrix.png`` and
    ``prototypes.png`` into ``out_dir`` (rank 0 only).
    """
    dist = DistContext.setup(cfg.train.device)
    try:
        state = _start_or_resume(cfg, tasks, out_dir, resumed)
        if dist.is_main:
            atomic_write_json(out_dir / "config.json", {"config": cfg.to_dict(), "preprocess": preprocess.to_dict(),
                                                        "versions": library_versions()})
        model = state.model.to(dist.device)
        mean, std = (torch.tensor(v, device=dist.device).view(1, 3, 1, 1) for v in (preprocess.mean, preprocess.std))
        normalize = _Normalizer(mean, std)
        frozen = _frozen_backbone(cfg)
        cache = _FeatureCache(tasks, model.backbone, normalize, out_dir) if frozen and cfg.train.cache_features else None
        phases = [list(range(len(tasks)))] if cfg.train.method == "joint" else [[t] for t in range(len(tasks))]
        for task in tasks:  # a generator built for one class count refuses the others before any training
            state.model.generator.param_shape(task.num_classes)

        def accuracy(task: int, split: str) -> float:
            features = cache.features(task, split) if cache else None
            return evaluate(model, task, getattr(tasks[task], split), normalize, features)

        with _progress(show_progress and dist.is_main) as progress, closing(cache) if cache else nullcontext():
            todo = phases[len(state.acc_matrix):]
            for phase in todo:
                started = time.perf_counter()
                _seed(cfg.train.seed, phase[0])
                prev = _frozen_copy(model) if model.num_tasks else None
                for t in phase:
                    init = _initial_params(model, tasks[t].train, normalize, cfg, t)
                    model.add_task(init.to(dist.device))
                fit_batchnorm = phase[0] == 0 and not frozen
                train_mode = functools.partial(_train_mode, model, batchnorm_stats=fit_batchnorm, frozen=frozen)
                _train_phase(model, prev, phase, tasks, normalize, cfg.train, dist, progress, train_mode, cache)
                if fit_batchnorm:
                    _recalibrate_batchnorm(model, [tasks[t].train for t in phase], normalize)
                model.eval()
                state.val_acc.extend(accuracy(t, "val") for t in phase)
                state.acc_matrix.append([accuracy(j, "test") for j in range(model.num_tasks)])
                if dist.is_main:
                    _save_run(out_dir, cfg, tasks, preprocess, state)
                    _log_phase(phase, tasks, state, time.perf_counter() - started)
                dist.barrier()
        if dist.is_main and not todo:  # a finished run resumed: its outputs again (a crash may have lost them)
            _write_outputs(out_dir, cfg, tasks, state)
        return _metrics(cfg, tasks, state)
    finally:
        dist.shutdown()


def evaluate(model: PAHModel, task: int, images: ImageSet, normalize, features: torch.Tensor | None = None) -> float:
    """Task-aware accuracy of ``task`` on ``images`` (fraction in [0, 1]); ``features``: their backbone
    features when computed before (a frozen backbone), else the backbone runs."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    with torch.no_grad():
        head = model.head(task)
        batches = _backbone_batches(model.backbone, images, normalize) if features is None else features.split(EVAL_BATCH)
        pred = torch.cat([(f.to(device) @ head.T).argmax(1) for f in batches]).cpu().numpy()
    model.train(was_training)
    return int((pred == images.labels).sum()) / len(images)


def _backbone_batches(backbone: nn.Module, images: ImageSet, normalize) -> Iterator[torch.Tensor]:
    """The backbone's outputs for ``images``, in order, a batch at a time (smaller on a CPU)."""
    on_cpu = next(backbone.parameters()).device.type == "cpu"
    step = CPU_EVAL_BATCH if on_cpu else EVAL_BATCH
    for start in range(0, len(images), step):
        yield backbone(normalize(torch.from_numpy(images.images[start : start + step])))


class _FeatureCache:
    """Each image set's features under a frozen backbone, computed on first use (float32 [N, D] on the CPU).

    A set whose features exceed ``FEATURES_IN_MEMORY_MAX`` bytes goes to a memory-mapped file in a
    temporary folder under ``out_dir``; ``close`` deletes it.
    """

    def __init__(self, tasks: list[Task], backbone: nn.Module, normalize, out_dir: Path):
        self.tasks, self.backbone, self.normalize, self.out_dir = tasks, backbone, normalize, out_dir
        self._features: dict[tuple[int, str], torch.Tensor] = {}
        self._folder: Path | None = None

    def features(self, task: int, split: str) -> torch.Tensor:
        """Features of ``tasks[task]``'s ``split`` ("train", "val" or "test")."""
        key = (task, split)
        if key not in self._features:
            self._features[key] = self._compute(getattr(self.tasks[task], split), f"{task}-{split}")
        return self._features[key]

    def _compute(self, images: ImageSet, name: str) -> torch.Tensor:
        shape = (len(images), self.backbone.feature_dim)
        if 4 * shape[0] * shape[1] <= FEATURES_IN_MEMORY_MAX:
            out = np.empty(shape, np.float32)
        else:
            if self._folder is None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                self._folder = Path(tempfile.mkdtemp(prefix=".features-", dir=self.out_dir))
            out = np.lib.format.open_memmap(self._folder / f"{name}.npy", mode="w+", dtype=np.float32, shape=shape)
        self.backbone.eval()
        with torch.no_grad():
            start = 0
            for batch in _backbone_batches(self.backbone, images, self.normalize):
                out[start : start + len(batch)] = batch.cpu().numpy()
                start += len(batch)
        return torch.from_numpy(out)

    def close(self) -> None:
        self._features.clear()
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)


class _Normalizer:
    """uint8 NHWC batch -> normalised float NCHW on the model's device."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.mean, self.std = mean, std

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std


def _frozen_backbone(cfg: RunConfig) -> bool:
    """The backbone does not train: ``backbone_lr`` 0 from trained weights. Its features are fixed (cacheable).

    It keeps the weights' BatchNorm statistics: re-estimating them on a first task of two grayscale
    classes made folded EfficientNet-Lite0 weights so large that INT8 calibration collapsed (feature
    cosine 0.34 against 0.98 as shipped).
    """
    return cfg.train.backbone_lr == 0 and bool(cfg.model.pretrained or cfg.model.weights)


def _train_phase(model: PAHModel, prev: PAHModel | None, phase: list[int], tasks: list[Task], normalize,
                 cfg: TrainConfig, dist: DistContext, progress: Progress | None, train_mode: Callable[[], None],
                 cache: _FeatureCache | None) -> None:
    """Train the tasks of one phase (one task, or all of them for joint training). ``train_mode`` puts the
    model in its training mode; with ``cache`` batches are the images' cached features."""
    old = list(range(phase[0]))
    distill_logits = cfg.stability > 0 and bool(old)
    distill_protos = cfg.proto_distill_weight > 0 and bool(old) and isinstance(model.generator, PrototypeGenerator)
    optimizer = torch.optim.AdamW(
        [{"params": model.backbone.parameters(), "lr": cfg.backbone_lr},
         {"params": [*model.generator.parameters(), *model.task_params], "lr": cfg.lr}],
        weight_decay=cfg.weight_decay,
    )
    proto_optimizer = torch.optim.AdamW(list(model.task_params), lr=cfg.lr, weight_decay=cfg.weight_decay)
    prev_proto_logits = [prev.prototype_logits(k).detach() for k in old] if distill_protos else []
    inputs = [cache.features(t, "train") if cache else torch.from_numpy(tasks[t].train.images) for t in phase]
    loaders = [dist.loader(TensorDataset(x, torch.from_numpy(tasks[t].train.labels)),
                           batch_size=cfg.batch_size, seed=cfg.seed * 1000 + t) for x, t in zip(inputs, phase)]
    cached = cache is not None
    steps = max(len(loader) for loader, _ in loaders)
    wrapped = dist.wrap(model)
    bar = progress.add_task(_phase_name(phase, tasks), total=cfg.epochs * steps) if progress else None
    train_mode()
    for epoch in range(cfg.epochs):
        started = time.perf_counter()
        for _, sampler in loaders:
            sampler.set_epoch(epoch)
        for batches in zip(*(_cycle(loader, steps) for loader, _ in loaders)):
            x = torch.cat([b[0] for b in batches])
            x = x.to(dist.device) if cached else normalize(x)
            y = [b[1].to(x.device) for b in batches]
            heads = phase + old if distill_logits else phase
            logits = wrapped(x, heads, cached=cached)
            loss = _joint_cross_entropy(logits[: len(phase)], y)
            if distill_logits:
                with torch.no_grad():
                    prev_logits = prev(x, old, cached=cached)
                loss = loss + cfg.stability * sum(_kl(p, c, cfg.temperature) for p, c in zip(prev_logits, logits[len(phase):]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if distill_protos or cfg.proto_hard_weight > 0:
                _prototype_step(model, prev_proto_logits, phase, cfg, proto_optimizer, train_mode)
            if bar is not None:
                progress.update(bar, advance=1, description=f"{_phase_name(phase, tasks)} epoch {epoch + 1}/{cfg.epochs} loss {loss.item():.3f}")
        seconds = time.perf_counter() - started
        log.debug("%s epoch %d done in %.2f s", _phase_name(phase, tasks), epoch + 1, seconds,
                  extra={"phase": phase, "epoch": epoch, "epoch_seconds": seconds})
    if bar is not None:
        progress.remove_task(bar)


def _prototype_step(model: PAHModel, prev_proto_logits: list[torch.Tensor], phase: list[int], cfg: TrainConfig,
                    optimizer: torch.optim.Optimizer, train_mode: Callable[[], None]) -> None:
    """The paper's second step: keep old prototypes' outputs stable, optionally classify own prototypes.

    Runs the backbone in eval mode (tiny upsampled prototypes must not shift BatchNorm statistics) and
    takes gradients for the prototypes only, outside DDP's reducer: they are identical on every rank.
    """
    model.backbone.eval()
    loss = sum(cfg.proto_distill_weight * _kl(p, model.prototype_logits(k), cfg.temperature)
               for k, p in enumerate(prev_proto_logits))
    if cfg.proto_hard_weight > 0:
        for k in range(phase[-1] + 1):
            logits = model.prototype_logits(k)
            loss = loss + cfg.proto_hard_weight * F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))
    params = list(model.task_params)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    optimizer.zero_grad(set_to_none=True)
    for param, grad in zip(params, grads):
        param.grad = grad
    optimizer.step()
    train_mode()


def _train_mode(model: PAHModel, *, batchnorm_stats: bool, frozen: bool) -> None:
    """Train mode; BatchNorm statistics update only when ``batchnorm_stats`` (the first task).

    Later tasks keep them frozen: re-estimating them on new data alone would shift every old task's
    features (forgetting that no distillation loss sees), and the device runs them folded anyway.
    A ``frozen`` backbone stays in eval mode altogether: its features are those the device computes
    (and the cache holds), without EfficientNet-Lite's stochastic depth.
    """
    model.train()
    if frozen:
        model.backbone.eval()
    elif not batchnorm_stats:
        for module in model.backbone.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def _recalibrate_batchnorm(model: PAHModel, sets: list[ImageSet], normalize) -> None:
    """Re-estimate BatchNorm statistics as exact averages over the training images, weights fixed.

    Running averages lag behind weights that move fast in a short first task, and eval-mode accuracy
    then collapses; one forward pass with cumulative averaging makes them match the final weights.
    Every rank uses all images, so the statistics agree across processes.
    """
    norms = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.backbone.train()
    with torch.no_grad():
        for images in sets:
            for _ in _backbone_batches(model.backbone, images, normalize):
                pass  # the forward passes average the statistics
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum


def _joint_cross_entropy(logits: list[torch.Tensor], labels: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy of each task's head on its own slice of the concatenated batch."""
    loss, start = 0.0, 0
    for task_logits, y in zip(logits, labels):
        loss = loss + F.cross_entropy(task_logits[start : start + len(y)], y)
        start += len(y)
    return loss


def _kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """LwF-style distillation: KL(teacher || student) at ``temperature``, scaled by T^2."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.log_softmax(teacher_logits / temperature, dim=1),
                    log_target=True, reduction="batchmean") * temperature**2


def _cycle(loader, steps: int):
    """``steps`` batches from ``loader``, restarting it when a shorter task runs out (joint training)."""
    done = 0
    while done < steps:
        for batch in loader:
            if done == steps:
                return
            yield batch
            done += 1


def _initial_params(model: PAHModel, train: ImageSet, normalize, cfg: RunConfig, task: int) -> torch.Tensor:
    """Task parameters from the per-class mean of the normalised training images (or random)."""
    num_classes = int(train.labels.max()) + 1
    means = torch.stack([normalize(torch.from_numpy(train.images[train.labels == c])).mean(0).cpu()
                         for c in range(num_classes)])
    generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + task)
    return model.generator.init_params(means, random=cfg.model.prototype_init == "random", generator=generator)


def _start_or_resume(cfg: RunConfig, tasks: list[Task], out_dir: Path, state: dict | None) -> RunState:
    _refuse_to_overwrite(out_dir, state is not None)
    if state is None:
        _seed(cfg.train.seed, -1)
        return RunState(build_model(cfg.model, first_task_classes=tasks[0].num_classes), [], [])
    if state["tasks"] != _task_records(tasks):
        raise CheckpointError(f"--resume with different data than the run in {out_dir}; pass the original data options")
    return RunState(model_from_checkpoint(state), state["acc_matrix"], state["val_acc"])


def _resumable(cfg: RunConfig, out_dir: Path) -> dict:
    """The checkpoint of the run in ``out_dir``; CheckpointError unless it was run with ``cfg``'s options."""
    state = load_checkpoint(out_dir / CHECKPOINT_NAME)
    # Options added since the run take their defaults; a run from before folders were stored absolute
    # gave its folder relative to where it was started, as the resuming command does.
    saved = absolute_folder(RunConfig.from_dict(state["config"])).to_dict()
    if saved != cfg.to_dict():
        changed = _changed_keys(saved, cfg.to_dict())
        raise CheckpointError(f"--resume with different options than the run in {out_dir} ({', '.join(changed)}); "
                              "pass the original options or choose another --out")
    return state


def _refuse_to_overwrite(out_dir: Path, resume: bool) -> None:
    if not resume and (out_dir / CHECKPOINT_NAME).exists():
        raise CheckpointError(f"{out_dir} already holds a run; pass --resume to continue it or choose another --out")


def _save_run(out_dir: Path, cfg: RunConfig, tasks: list[Task], preprocess: Preprocess, state: RunState) -> None:
    """Checkpoint first, then the human-facing outputs: a crash between them loses nothing."""
    model = state.model
    save_checkpoint(out_dir / CHECKPOINT_NAME, {
        "config": cfg.to_dict(),
        "preprocess": preprocess.to_dict(),
        "tasks": _task_records(tasks),
        "completed": model.num_tasks,
        "feature_dim": model.backbone.feature_dim,
        "acc_matrix": state.acc_matrix,
        "val_acc": state.val_acc,
        "versions": library_versions(),
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    })
    _write_outputs(out_dir, cfg, tasks, state)


def _write_outputs(out_dir: Path, cfg: RunConfig, tasks: list[Task], state: RunState) -> None:
    """metrics.json and the plots of the state the checkpoint holds."""
    model = state.model
    atomic_write_json(out_dir / "metrics.json", _metrics(cfg, tasks, state))
    names = [t.name for t in tasks]
    plot_accuracy_matrix(state.acc_matrix, names, out_dir / "accuracy_matrix.png")
    if isinstance(model.generator, PrototypeGenerator):
        protos = [p.detach().cpu().numpy() for p in model.task_params]
        plot_prototypes(protos, names, [t.class_names for t in tasks], out_dir / "prototypes.png")


def _metrics(cfg: RunConfig, tasks: list[Task], state: RunState) -> dict:
    return {
        **summarize(state.acc_matrix),
        "val_acc": state.val_acc,
        "tasks": [t.name for t in tasks],
        "method": cfg.train.method,
        "backbone": cfg.model.backbone,
        "completed_tasks": state.model.num_tasks,
    }


def _task_records(tasks: list[Task]) -> list[dict]:
    return [{"name": t.name, "class_names": list(t.class_names), "train_size": len(t.train)} for t in tasks]


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return keys


def _frozen_copy(model: PAHModel) -> PAHModel:
    prev = copy.deepcopy(model).eval()
    for p in prev.parameters():
        p.requires_grad_(False)
    return prev


def _seed(seed: int, task: int) -> None:
    """Seed every generator from ``(seed, task)`` only, so resuming at ``task`` replays identically."""
    torch.manual_seed(seed * 1000 + task + 1)
    np.random.seed((seed * 1000 + task + 1) % 2**32)


def _phase_name(phase: list[int], tasks: list[Task]) -> str:
    return "joint" if len(phase) > 1 else f"task {phase[0] + 1}/{len(tasks)} ({tasks[phase[0]].name})"


def _log_phase(phase: list[int], tasks: list[Task], state: RunState, seconds: float) -> None:
    row = " ".join(f"{100 * a:.1f}" for a in state.acc_matrix[-1])
    val = " ".join(f"{100 * a:.1f}" for a in state.val_acc[-len(phase):])
    log.info("%s done in %.1f s: val acc %s%%, test acc on tasks so far %s%%", _phase_name(phase, tasks), seconds, val, row)


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    return bar_progress()


class _NoProgress:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
