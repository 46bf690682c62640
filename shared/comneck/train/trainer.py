"""The training loop of every scenario: stages, optimizers, mixed precision, checkpoints, logs.

One process, or one per device under ``torchrun`` (DistributedDataParallel; gloo on CPU,
nccl on GPUs). Rank 0 writes the logs, checkpoints and the export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..zero_shot import label_embeddings
from ..clip_split import ClipSplit
from ..errors import ComneckInputError, ErrorCode
from ..models import WeightFiles, build_cloud_models, seeded
from ..pipeline import check_device
from ..presets import get_preset
from ..unet import UNet
from ..weights_folder import write_folder
from .checkpointing import latest_checkpoint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import TrainConfig
from .data import ResumableSampler, build_dataset
from .interrupt import Interrupted, StopRequest, ignore_sigint
from .objectives import Stage, ZeroShotHead, bits_per_pixel, combine, stage_plan
from .student import Student, Target

AUX_LR = 1e-3  # CompressAI's learning rate for the entropy bottleneck's quantiles


def _pretrained_clip(name: str, tag: str) -> nn.Module:
    """open_clip's own loader for a pretrained tag (downloads or reads its cache)."""
    import open_clip

    try:
        return open_clip.create_model(name, pretrained=tag).eval()
    except Exception as exc:  # open_clip raises many kinds (no network, a broken cache); the first line says which
        reason = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        raise ComneckInputError(f"cannot load CLIP {name} pretrained={tag}: {reason}", ErrorCode.BAD_WEIGHTS) from None


def text_embeddings(clip: nn.Module, names: list[str], cache: Path, key: str) -> torch.Tensor:
    """Frozen, normalised CLIP text embeddings of "a photo of a {name}." per class, cached in ``cache``."""
    if cache.is_file():
        stored = load_file(str(cache))
        if stored.get("key") is not None and bytes(stored["key"].tolist()).decode() == key:
            return stored["embeddings"]
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
    embeddings = label_embeddings(clip, tokenizer, names).cpu()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # processes of one run may write at once
    save_file({"embeddings": embeddings, "key": torch.tensor(list(key.encode()), dtype=torch.uint8)}, str(tmp))
    os.replace(tmp, cache)
    return embeddings


class Trainer:
    """Trains the neck (d1), codec + neck (d2, d3) or the U-Net (postproc) with the surrogate loss."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = check_device(config.device)
        preset = get_preset(config.preset)
        torch.manual_seed(config.seed)

        models = build_cloud_models(preset, WeightFiles(config.codec_weights, config.neck_weights, config.clip_weights),
                                    config.clip_final_norm, config.split_block)
        clip_model, clip = models.clip_model, models.clip
        if config.clip_pretrained:  # replaces the seeded CLIP (built once at start-up; cheap beside a training run)
            clip_model = _pretrained_clip(preset.clip.name, config.clip_pretrained)
            clip = ClipSplit(clip_model.visual, models.preset.split_block, models.clip_final_norm)
        unet = seeded(preset.seed + 3, UNet, 3, preset.unet_base) if config.scenario == "postproc" else None
        target = Target.of(config.target, config.target_block, clip.num_blocks)
        self.student = Student(models.codec, models.neck, clip, target, unet).to(self.device)
        self.clip_model = clip_model.to(self.device).requires_grad_(False)
        trained = {"unet"} if config.scenario == "postproc" else {"neck"}  # postproc leaves the neck as it was
        not_random = trained | ({"clip"} if config.clip_pretrained else set())
        self.random_parts = [part for part in models.random_parts if part not in not_random]

        self.dataset, self.class_names = build_dataset(config.data, preset.image_size, clip.visual.image_size[0])
        if len(self.dataset) < config.batch_size * self.world:
            raise ComneckInputError(f"{len(self.dataset)} images are fewer than one batch of {config.batch_size} x {self.world} processes", ErrorCode.BAD_CONFIG)
        key = hashlib.sha256(json.dumps([self.class_names, preset.name, str(config.clip_weights), config.clip_pretrained]).encode()).hexdigest()
        texts = text_embeddings(self.clip_model, self.class_names, config.output / "text_embeddings.safetensors", key)
        self.head = ZeroShotHead(texts, self.clip_model.logit_scale).to(self.device)
        self.sampler = ResumableSampler(len(self.dataset), config.seed, self.rank, self.world)
        self.loader = DataLoader(
            self.dataset, batch_size=config.batch_size, sampler=self.sampler, num_workers=config.workers, drop_last=True,
            generator=torch.Generator(),  # its own seed source, so creating an iterator leaves the global RNG alone (exact resume)
            worker_init_fn=ignore_sigint,
        )
        self.stages = stage_plan(config)
        self.position = {"stage": 0, "epoch": 0, "step_in_epoch": 0, "global_step": 0}
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.amp)
        self.autocast = torch.autocast(self.device.type, dtype=amp, enabled=amp is not None)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self._log = None
        self._resumed: dict[str, Any] | None = None  # training state of a loaded checkpoint, applied when its stage starts
        self._board = None
        if config.tensorboard and self.rank == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ComneckInputError("tensorboard: true needs the tensorboard package (pip install tensorboard)", ErrorCode.BAD_CONFIG) from None
            self._board = SummaryWriter(str(config.output / "tensorboard"))

    # -- what trains -----------------------------------------------------------------------
    def _modules(self) -> dict[str, nn.Module]:
        """The networks a checkpoint holds."""
        mods: dict[str, nn.Module] = {"neck": self.student.neck, "codec": self.student.codec.model}
        if self.student.unet is not None:
            mods["unet"] = self.student.unet
        return mods

    def _parameters(self, stage: Stage) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(main, aux) parameters of a stage; aux are the entropy bottleneck's quantiles."""
        s = self.student
        s.requires_grad_(False)
        main: list[nn.Parameter] = []
        aux: list[nn.Parameter] = []
        for part in stage.trains:
            if part in ("neck", "unet"):
                main += list(getattr(s, part).parameters())
                continue
            for name, p in s.codec.model.named_parameters():
                if name.endswith("quantiles"):
                    aux.append(p)
                elif part == "codec" or not name.startswith("g_s."):
                    main.append(p)
        for p in main + aux:
            p.requires_grad_(True)
        return main, aux

    def _set_modes(self, stage: Stage) -> None:
        """Trained networks in train mode, frozen ones in eval mode (deployed quantisation, fixed BatchNorm)."""
        s = self.student
        s.eval()
        if "neck" in stage.trains:
            s.neck.train()
        if "unet" in stage.trains:
            s.unet.train()  # type: ignore[union-attr]
        if any(p.startswith("codec") for p in stage.trains):
            s.codec.train()

    # -- one step ----------------------------------------------------------------------------
    def _step(self, stage: Stage, net: nn.Module, optim: torch.optim.Optimizer, aux_optim: torch.optim.Optimizer | None, batch: Any) -> dict[str, float]:
        (x, clip_view), labels = batch
        x, clip_view, labels = (t.to(self.device, non_blocking=True) for t in (x, clip_view, labels))
        with torch.no_grad(), self.autocast:
            clip = self.student.clip
            teacher = self.student.target.select(clip.tail(clip.head(clip_view), self.student.target.hidden_blocks())).float()
        out = net(x, with_x_hat=stage.mse > 0, autocast=self.autocast)
        dist_loss = nn.functional.mse_loss(out["student"].float(), teacher)
        ce = nn.functional.cross_entropy(self.head(out["embedding"]), labels)
        bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[-2] * x.shape[-1])
        mse = nn.functional.mse_loss(out["x_hat"].float(), x) if "x_hat" in out else None
        terms = combine(stage, ce, dist_loss, bpp, mse)
        optim.zero_grad(set_to_none=True)
        self.scaler.scale(terms.total).backward()
        self.scaler.step(optim)
        self.scaler.update()
        if self.scaler.is_enabled():  # fp16: steps whose gradients overflowed are skipped and the scale halves
            terms.values["loss_scale"] = self.scaler.get_scale()
        if aux_optim is not None:
            aux_loss = self.student.codec.model.aux_loss()
            aux_optim.zero_grad(set_to_none=True)
            aux_loss.backward()
            if self.world > 1:  # DDP syncs only the main loss's gradients
                for group in aux_optim.param_groups:
                    for p in group["params"]:
                        dist.all_reduce(p.grad)
                        p.grad /= self.world
            aux_optim.step()
            terms.values["aux"] = aux_loss.item()
        return terms.values

    # -- checkpoints ------------------------------------------------------------------------
    def _save(self, optim: torch.optim.Optimizer, aux_optim: torch.optim.Optimizer | None) -> Path | None:
        """Checkpoint the current position (rank 0 writes it); its folder, or None on other ranks."""
        if self.rank != 0:
            return None
        state = {**self.position, "stage_name": self.stages[self.position["stage"]].name, "config": self.config.model_dump(mode="json")}
        training = {
            "optimizer": optim.state_dict(),
            "aux_optimizer": aux_optim.state_dict() if aux_optim else None,
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }
        return save_checkpoint(self.config.output, self.position["global_step"], self._modules(), state, training, self.config.keep_checkpoints)

    def resume(self) -> bool:
        """Load the newest checkpoint in the output folder, if any; True when one was loaded."""
        path = latest_checkpoint(self.config.output)
        if path is None:
            return False
        weights, state, training = load_checkpoint(path)
        for name, module in self._modules().items():
            module.load_state_dict(weights[name])
        self.student.codec.update_entropy_tables()
        self.position = {k: state[k] for k in self.position}
        self._resumed = training
        return True

    # -- the loop ----------------------------------------------------------------------------
    def _log_line(self, values: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        if self._log is None:
            self.config.output.mkdir(parents=True, exist_ok=True)
            self._log = open(self.config.output / "log.jsonl", "a")
        self._log.write(json.dumps(values) + "\n")
        self._log.flush()
        if self._board is not None:
            for name in ("loss", "dist", "ce", "bpp", "mse", "aux"):
                if name in values:
                    self._board.add_scalar(f"{values['stage_name']}/{name}", values[name], values["global_step"])

    def total_steps(self) -> int:
        """Steps of the whole run, from its start."""
        return len(self.loader) * sum(stage.epochs for stage in self.config.stages)

    def _stop_signal(self, stop: StopRequest) -> int:
        """The signal that asks to stop (0: none); under DDP the one any process saw, so all stop at the same step."""
        if self.world == 1:
            return stop.signum or 0
        flag = torch.tensor([float(stop.signum or 0)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def run(self, stop_after_steps: int | None = None) -> dict[str, Any]:
        """Train from the current position to the end (or for ``stop_after_steps`` steps); export at
        the end. Ctrl-C or SIGTERM ends the step under way, saves a checkpoint and raises :class:`Interrupted`."""
        with StopRequest() as stop:
            return self._train(stop_after_steps, stop)

    def _train(self, stop_after_steps: int | None, stop: StopRequest) -> dict[str, Any]:
        steps_done = 0
        resumed, self._resumed = self._resumed, None
        for stage_index in range(self.position["stage"], len(self.stages)):
            stage = self.stages[stage_index]
            stage_cfg = self.config.stages[stage_index]
            main, aux = self._parameters(stage)
            self._set_modes(stage)
            optim = torch.optim.Adam(main, lr=stage_cfg.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            aux_optim = torch.optim.Adam(aux, lr=AUX_LR) if aux else None
            net: nn.Module = self.student
            if self.world > 1:
                net = DistributedDataParallel(self.student, find_unused_parameters=True)
            if resumed is not None:
                optim.load_state_dict(resumed["optimizer"])
                if aux_optim is not None and resumed["aux_optimizer"] is not None:
                    aux_optim.load_state_dict(resumed["aux_optimizer"])
                self.scaler.load_state_dict(resumed["scaler"])
                set_rng_state(resumed["rng"])
                resumed = None
            for epoch in range(self.position["epoch"], stage_cfg.epochs):
                skip = self.position["step_in_epoch"]
                self.sampler.set_epoch(stage_index * 10_000 + epoch, skip * self.config.batch_size)
                bar = tqdm(self.loader, desc=f"stage {stage_index + 1}/3 {stage.name} epoch {epoch + 1}/{stage_cfg.epochs}",
                           initial=skip, total=skip + len(self.loader), disable=self.rank != 0, leave=False)
                for batch in bar:
                    start = time.perf_counter()
                    values = self._step(stage, net, optim, aux_optim, batch)
                    self.position["step_in_epoch"] += 1
                    self.position["global_step"] += 1
                    steps_done += 1
                    bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()})
                    if self.position["global_step"] % self.config.log_every == 0:
                        self._log_line({**self.position, "stage_name": stage.name, "lr": stage_cfg.lr, "step_ms": (time.perf_counter() - start) * 1e3, **values})
                    if not all(math.isfinite(v) for v in values.values()):
                        raise RuntimeError(f"loss became non-finite at step {self.position['global_step']}: {values}")
                    if self.position["global_step"] % self.config.checkpoint_every == 0 or steps_done == stop_after_steps:
                        self._save(optim, aux_optim)
                    if steps_done == stop_after_steps:
                        return {"stopped_at": dict(self.position)}
                    signum = self._stop_signal(stop)
                    if signum:
                        raise Interrupted(self.position["global_step"], self._save(optim, aux_optim), signum)
                self.position.update(epoch=epoch + 1, step_in_epoch=0)
                self._save(optim, aux_optim)
            if any(p.startswith("codec") for p in stage.trains):
                self.student.codec.update_entropy_tables()  # real bitstreams must match the trained model
            self.position.update(stage=stage_index + 1, epoch=0, step_in_epoch=0)
        return self.export()

    @torch.no_grad()
    def rate_check(self, images: int = 4) -> dict[str, float]:
        """Estimated bpp (likelihoods) against real bpp (rANS bytes) on the first images, codec in eval mode."""
        codec = self.student.codec.eval().cpu()
        x = torch.stack([self.dataset[i][0][0] for i in range(min(images, len(self.dataset)))])
        est = float(bits_per_pixel(self.student.latents(x)[1], x.shape[0] * x.shape[-2] * x.shape[-1]))
        real = 8.0 * sum(codec.analyze(x[i : i + 1])[0].num_bytes for i in range(x.shape[0])) / (x.shape[0] * x.shape[-2] * x.shape[-1])
        codec.to(self.device)
        return {"estimated_bpp": est, "real_bpp": real}

    def export(self) -> dict[str, Any]:
        """Write the trained networks as a weights folder ``OUTPUT/export`` (what ``comneck-server
        --weights`` and ``comneck-edge --codec-weights`` load), replacing an earlier export; returns
        the scenario, rate and preset with the summary the manifest holds under ``training``."""
        if self.rank != 0:
            return {}
        config, codec, folder = self.config, self.student.codec, self.config.output / "export"
        codec.cpu()  # masks, tables and fingerprint as loading computes them, so they equal the loaded codec's
        codec.apply_context_masks()
        codec.update_entropy_tables()
        fingerprint = codec.fingerprint().hex()
        training: dict[str, Any] = {"steps": self.position["global_step"], "random_weights_in": self.random_parts,
                                    **self.rate_check()}  # which moves the codec back to the training device
        if config.scenario == "postproc":
            training["use"] = "unet.safetensors enhances g_s reconstructions before the full CLIP (a baseline, not served)"
        else:
            training["serve"] = (f"comneck-server --preset {config.preset} --weights {folder}; "
                                 f"edge: comneck-edge encode --preset {config.preset} --codec-weights {folder}")
        details = {"layout": "comneck", "codec_arch": codec.config.arch, "scenario": config.scenario, "rate": config.rate,
                   "lmbda": config.lmbda, "codec_fingerprint": fingerprint, "clip_final_norm": self.student.clip.final_norm,
                   "split_block": self.student.clip.split_block, "training": training}
        write_folder(folder, config.preset, self._modules(), details, force=True)
        return {"scenario": config.scenario, "rate": config.rate, "preset": config.preset, **training}
