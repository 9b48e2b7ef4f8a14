"""The shared training loop of ``train_cm.py`` and ``train_direct_cm.py`` (docs/method.md §6-§7).

The loop reads: data -> step -> optimizer -> log -> checkpoint. The step is ``step.distill_loss`` with the target
source chosen once at setup (``fast.target_source``); the eps functions come from the speed wing (``fast.build``).
Around the loop: the run folder (``run_folder``: checkpoints, resume, one run per folder, the step log), the
optimizer and batch arithmetic (``optimizer``), the step's inputs (``inputs``), the flags (``args``).
Randomness (timesteps, noise, VAE sampling, crops, data order) is a pure function of the seed and
each sample's position in the data stream, so a resumed run reproduces the uninterrupted one and
P processes reproduce one process with the same global batch, up to floating-point rounding (the teacher's
calls group samples differently: the trajectory pool restarts empty after a resume, and a process's batch
sets which calls batch their guidance passes).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from . import fast, hub, models
from .args import training_parser, validate_args
from .data import MIN_IMAGE_SIDE, caption_text, count_long_captions, make_dataloader, training_dataset
from .errors import UserError, one_line, writing
from .guidance import UNetEps
from .inputs import Encoders, prepare
from .noise import per_sample_noise
from .objectives import DistillContext
from .optimizer import check_resumed_optimizer, make_optimizer, resolve_batch_size
from .precompute import collate_precomputed, find_cache
from .progress import Progress, quiet_libraries
from .run_folder import (CONFIG_NAME, LOG_NAME, STATE_NAME, append_log, check_run_inputs, non_finite_error,
                         plan_resume, read_checkpoint, save_checkpoint, truncate_log, write_json_atomic)
from .sampling import student_sample
from .schedule import Grid, NoiseSchedule
from .solvers import get_solver
from .step import LossConfig, distill_loss

logger = logging.getLogger("cmdistill")


def check_objective_flags(args, objective: str) -> None:
    """The flags that apply to one objective only."""
    if getattr(args, "merged_target", False) and objective != "cm":
        raise UserError("--merged_target applies to train_cm.py (Direct CM has no student target pass); drop it")
    if getattr(args, "merged_target", False) and args.lora_dropout:
        raise UserError("--merged_target folds the LoRA update into the weights, without --lora_dropout's "
                        "dropout on the target pass: use one of them")
    if args.teacher_lookahead is None:  # default: on wherever it applies
        args.teacher_lookahead = 2 if objective == "direct_cm" else 0


class Trainer:
    """State and loop of one distillation run."""

    def __init__(self, args, objective: str):
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration, set_seed

        self.args, self.objective_name = args, objective
        check_objective_flags(args, objective)
        check_run_inputs(args)
        self.output_dir = Path(args.output_dir)
        report_to = None if args.report_to in (None, "none") else args.report_to
        self.accelerator = acc = Accelerator(
            gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
            log_with=report_to, project_config=ProjectConfiguration(
                project_dir=str(self.output_dir), logging_dir=str(self.output_dir / args.logging_dir)))
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
        quiet_libraries()  # the loading bars of the libraries; the loop shows its own progress
        # Per-device batch from --global_batch_size (or its default) for this number of processes.
        self.global_batch = resolve_batch_size(args, acc.num_processes)
        if not acc.is_main_process:
            logger.setLevel(logging.WARNING)
        set_seed(args.seed)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(acc.mixed_precision, torch.float32)
        if args.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # The data and the run folder before any model loads: their errors come first.
        self.dataset = training_dataset(args, acc.is_main_process)
        if args.max_train_steps is None:
            args.max_train_steps = math.ceil(args.num_train_epochs * len(self.dataset) / self.global_batch)
        self.resume = plan_resume(args, self.output_dir, self.current_settings(), acc.is_main_process)

        # Models (docs/method.md §1): one UNet; its LoRA adapter disabled is the teacher.
        teacher = models.load_teacher(args.pretrained_teacher_model, args.pretrained_vae_model_name_or_path,
                                      args.revision, args.teacher_revision, args.cache_dir)
        unet, dev = teacher.unet, acc.device
        if acc.is_main_process:
            count_long_captions(self.dataset.ds[args.caption_column], teacher.tokenizers[0])
        # Host-to-device copies of the science functions without a host sync (fast.to_device).
        self.sched = NoiseSchedule.from_scheduler(teacher.scheduler, copy=fast.to_device)
        self.grid = Grid(self.sched.T, args.num_discr_timesteps)
        self.encoders = Encoders.on_device(teacher, args, dev, self.weight_dtype)
        unet.to(dev) if self.weight_dtype == torch.float32 else unet.to(dev, dtype=self.weight_dtype)
        if args.enable_xformers_memory_efficient_attention:
            try:
                import xformers  # noqa: F401

                unet.enable_xformers_memory_efficient_attention()
            except ImportError:
                logger.info("--enable_xformers_memory_efficient_attention: xformers not installed; "
                            "using torch scaled_dot_product_attention (equivalent memory savings)")
        models.add_lora(unet, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
        for p in unet.parameters():  # fp32 LoRA parameters under mixed precision (docs/method.md §7)
            if p.requires_grad:
                p.data = p.data.float()
        # Every block checkpointed, or (--checkpointing_budget_gib) the blocks that are dearest to recompute per byte
        # kept un-checkpointed within that much activation memory; 'auto': sized after the first steps.
        self.checkpointing = fast.checkpointing.StudentCheckpointing(unet, args, self.vae_scale_factor)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        if args.scale_lr:
            args.learning_rate *= self.global_batch
        optimizer = make_optimizer(args, self.params)

        self.precomputed = find_cache(args, self.dataset, self.weight_dtype)
        # The steps read cached latents and embeddings: the text encoders and the VAE wait on the CPU until
        # validation needs them (models_on_device).
        self.offloaded = self.encoders.modules() if self.precomputed is not None and dev.type != "cpu" else []
        for m in self.offloaded:
            m.to("cpu")

        # The schedule counts optimizer steps, whatever the number of processes: it is stepped once per
        # optimizer step and not handed to accelerate (which would step it once per process).
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                          num_warmup_steps=args.lr_warmup_steps,
                                          num_training_steps=args.max_train_steps)
        self.unet, self.optimizer = acc.prepare(unet, optimizer)
        self.base_unet = acc.unwrap_model(self.unet)
        self.global_step, self.samples_seen, self.skipped_images = 0, 0, 0
        # --compile off|on|auto: which compilation this run gets (auto: whether the planned steps repay it).
        done = self.resume[1]["global_step"] if self.resume is not None else 0
        self.compiled = fast.plan.resolve(objective, args, dev, args.max_train_steps - done)
        logger.info("--compile %s", self.compiled)
        self.compile_timer = fast.plan.training_timer(objective, args)
        # The step: eps functions from the speed wing, the target source chosen once.
        self.fast = fast.build(self.unet, self.base_unet, args, objective, optimizer_step=lambda: self.global_step)
        self.ctx = DistillContext(teacher_eps=self.fast.teacher_eps, student_eps_nograd=self.fast.target_eps,
                                  step=get_solver(args.solver), sched=self.sched, grid=self.grid,
                                  timestep_scaling=args.timestep_scaling_factor, max_batch=args.teacher_max_batch)
        self.targets = fast.target_source(objective, self.ctx, lookahead=args.teacher_lookahead,
                                          capacity=args.teacher_max_batch or args.train_batch_size,
                                          autocast=acc.autocast)
        self.loss_config = LossConfig(args.timestep_scaling_factor, args.loss_type, args.huber_c)

        if self.resume is not None:
            self.load_checkpoint(*self.resume)
        hub.check_push_args(args)
        self.config = hub.recordable_config(args)  # secrets (--hub_token, ...) never recorded or logged
        self.config.update(objective=objective, num_processes=acc.num_processes, global_batch_size=self.global_batch,
                           mixed_precision=acc.mixed_precision, vae_scale_factor=self.vae_scale_factor,
                           compile_decision=self.compiled)
        self.write_config()

    def write_config(self):
        """training_config.json (by the main process), with the checkpointing plan as it stands now."""
        self.config["selective_checkpointing"] = self.checkpointing.info
        if self.accelerator.is_main_process:
            write_json_atomic(self.output_dir / CONFIG_NAME, self.config)

    @property
    def vae_scale_factor(self) -> int:
        return self.encoders.vae_scale_factor

    def current_settings(self) -> dict:
        """This run's values of COMPARED_SETTINGS as training_config.json records them (resolved max steps, the
        learning rate after --scale_lr, accelerate's mixed precision, the global batch)."""
        a, batch = self.args, self.global_batch
        return {**vars(a), "objective": self.objective_name, "global_batch_size": batch,
                "mixed_precision": self.accelerator.mixed_precision,
                "learning_rate": a.learning_rate * batch if a.scale_lr else a.learning_rate}

    # --- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self):
        """checkpoint-<step> (``run_folder.save_checkpoint``); a non-finite LoRA is never written."""
        acc = self.accelerator
        if not models.lora_is_finite(self.base_unet):  # every process decides on the same weights
            self.stop_non_finite("LoRA weights are")
        if acc.is_main_process:
            state = {"global_step": self.global_step, "samples_seen": self.samples_seen,
                     "skipped_images": self.skipped_images,
                     "optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_scheduler.state_dict(),
                     "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                     "objective": self.objective_name}
            save_checkpoint(self.output_dir, self.global_step, state, self.base_unet, self.config,
                            self.args.checkpoints_total_limit)
        acc.wait_for_everyone()

    def save_final_lora(self):
        """The finished run's files (``hub.save_final``: the LoRA with its metadata, peft/, scheduler/, the model
        card), never from non-finite weights."""
        if not models.lora_is_finite(self.base_unet):
            self.stop_non_finite("LoRA weights are")
        if self.accelerator.is_main_process:
            with writing(self.output_dir / models.LORA_WEIGHT_NAME):
                hub.save_final(self.base_unet, self.output_dir, self.sched.betas, self.config)
            logger.info("saved the final LoRA to %s (load with StableDiffusionXLPipeline.load_lora_weights; "
                        "README.md shows how)", self.output_dir)

    def stop_non_finite(self, what: str):
        """The NaN guard: stop the run before anything of this step is saved."""
        raise non_finite_error(self.global_step, what, self.output_dir)

    def load_checkpoint(self, path: Path, state: dict | None = None):
        logger.info("resuming from %s", path)
        if state is None:
            state = read_checkpoint(path)[1]
        models.load_lora_into(self.base_unet, path)
        if state.get("objective", self.objective_name) != self.objective_name:
            raise UserError(f"checkpoint {path} was trained with objective '{state['objective']}', "
                            f"not '{self.objective_name}': use another --output_dir")
        check_resumed_optimizer(path, self.args)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if state.get("scaler") is not None and self.accelerator.scaler is not None:
                self.accelerator.scaler.load_state_dict(state["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise UserError(f"{path / STATE_NAME} does not fit this run's optimizer ({one_line(e)}): resume with the "
                            "run's own settings, or use another --output_dir") from None
        self.global_step, self.samples_seen = state["global_step"], state["samples_seen"]
        self.skipped_images = state.get("skipped_images", 0)

    # --- validation ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def models_on_device(self):
        """The offloaded text encoders and VAE on the accelerator's device for the duration (validation)."""
        for m in self.offloaded:
            m.to(self.accelerator.device)
        try:
            yield
        finally:
            for m in self.offloaded:
                m.to("cpu")

    @torch.no_grad()
    def validate(self):
        with self.models_on_device():
            self._validate()

    def _validate(self):
        acc, args, vae = self.accelerator, self.args, self.encoders.vae
        prompts = args.validation_prompts or [caption_text(self.dataset.ds[i][args.caption_column])
                                              for i in range(min(4, len(self.dataset)))]
        prompts = [p for p in prompts for _ in range(args.num_images_per_prompt)]
        res = args.resolution
        cond = self.encoders.conditioning({"captions": prompts, "original_sizes": [(res, res)] * len(prompts),
                                           "crop_top_lefts": [(0, 0)] * len(prompts)})
        h = res // self.vae_scale_factor
        idx = list(range(len(prompts)))
        x_T = per_sample_noise(args.seed, idx, (4, h, h)).to(acc.device)
        images = {}
        for k in args.num_inference_steps:
            with acc.autocast():
                x0 = student_sample(UNetEps(self.base_unet, copy=fast.to_device), x_T, cond, self.sched,
                                    self.grid, k,
                                    fresh_noise=lambda j: per_sample_noise(args.seed, idx, (4, h, h), stream=j + 1),
                                    timestep_scaling=args.timestep_scaling_factor)
            img = vae.decode((x0 / vae.config.scaling_factor).to(vae.dtype)).sample
            images[k] = ((img.float().clamp(-1, 1) + 1) / 2).cpu()
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                for k, img in images.items():
                    tracker.writer.add_images(f"validation/{k}_steps", img, self.global_step, dataformats="NCHW")

    # --- the loop ----------------------------------------------------------------------------------------
    def train(self):
        acc, args = self.accelerator, self.args
        if acc.is_main_process:
            cfg = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                   for k, v in hub.redact(self.config).items()}
            acc.init_trackers(args.tracker_project_name, config=cfg)
        data = self.precomputed if self.precomputed is not None else self.dataset
        loader = make_dataloader(data, args.train_batch_size, acc.num_processes, acc.process_index, args.seed,
                                 self.samples_seen, args.dataloader_num_workers,
                                 *([collate_precomputed] if self.precomputed is not None else []))
        logger.info("training %s: %d samples, %d steps of global batch %d (%d per device x %d processes x %d "
                    "accumulation)", self.objective_name, len(self.dataset), args.max_train_steps, self.global_batch,
                    args.train_batch_size, acc.num_processes, args.gradient_accumulation_steps)
        self.bar = bar = Progress(args.max_train_steps, f"{self.objective_name} steps", "step",
                                  enabled=acc.is_local_main_process, initial=self.global_step)
        log_path = self.output_dir / LOG_NAME
        if acc.is_main_process:
            truncate_log(log_path, self.global_step)
        self.unet.train()
        upcoming = self.upcoming(iter(loader))
        while self.global_step < args.max_train_steps:
            t_step = time.perf_counter()
            losses, skipped, grad_norm = [], 0, None
            for _ in range(args.gradient_accumulation_steps):
                prep = next(upcoming)  # data
                skipped += prep["skipped"]
                with acc.accumulate(self.unet):
                    loss = distill_loss(prep, self.targets, self.fast.student_eps, self.sched,  # step
                                        self.loss_config, acc.autocast)
                    acc.backward(loss)
                    if acc.sync_gradients:  # optimizer
                        grad_norm = acc.clip_grad_norm_(self.params, args.max_grad_norm)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss.detach())
            self.lr_scheduler.step()
            self.global_step += 1
            self.samples_seen += self.global_batch
            self.log_step(losses, grad_norm, skipped, t_step, log_path)  # log
            if self.checkpointing.after_step(acc.device):  # --checkpointing_budget_gib auto: re-sized
                self.write_config()
            if args.checkpointing_steps and self.global_step % args.checkpointing_steps == 0:  # checkpoint
                self.save_checkpoint()
            if acc.is_main_process and args.validation_steps and self.global_step % args.validation_steps == 0:
                self.validate()
        bar.close()
        acc.wait_for_everyone()
        self.save_final_lora()
        if acc.is_main_process:
            if self.skipped_images:
                logger.warning("%d unreadable images (or under %d px) were skipped", self.skipped_images,
                               MIN_IMAGE_SIDE)
            if args.push_to_hub:
                self.push_to_hub()
        acc.end_training()

    def log_step(self, losses, grad_norm, skipped: int, t_step: float, log_path: Path):
        """The loss and the gradient norm reduced over processes (every process sees the same numbers: the NaN
        guard stops them all at once), logged to the trackers, ``train_log.jsonl`` and the progress bar."""
        acc = self.accelerator
        gn = grad_norm.detach().float() if torch.is_tensor(grad_norm) else torch.tensor(float(grad_norm or 0.0))
        loss_mean, norm_mean = acc.reduce(torch.stack([torch.stack(losses).mean().float(), gn.to(acc.device)]),
                                          reduction="mean").tolist()
        self.skipped_images += int(acc.reduce(torch.tensor(skipped, device=acc.device), reduction="sum").item())
        logs = {"loss": loss_mean, "lr": self.lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "skipped_images": self.skipped_images,
                "step_s": time.perf_counter() - t_step}  # up to the loss's .item() above: the GPU is done
        if acc.device.type == "cuda":  # since the start, or since --checkpointing_budget_gib auto last re-planned
            logs["peak_mem_gib"] = torch.cuda.max_memory_allocated(acc.device) / 2**30
        acc.log(logs, step=self.global_step)
        if acc.is_main_process:
            append_log(log_path, self.global_step, logs)
            self.compile_timer.observe(logs["step_s"])
        for what, value in (("loss is", loss_mean), ("gradient norm is", norm_mean)):
            if not math.isfinite(value):
                self.stop_non_finite(what)
        self.bar.update(1, loss=f"{loss_mean:.4g}")

    def upcoming(self, batches):
        """The prepared micro-batches of the rest of the run, in order, each submitted to the target source when
        prepared; the source's ``ahead`` next ones are prepared ahead (``--teacher_lookahead``)."""
        args = self.args
        total = (args.max_train_steps - self.global_step) * args.gradient_accumulation_steps
        queue: collections.deque = collections.deque()
        fetched = 0
        while fetched < total or queue:
            while fetched < total and len(queue) <= self.targets.ahead:
                prep = prepare(next(batches), self.encoders, self.sched, self.grid, args.seed)
                prep["key"] = fetched
                self.targets.submit(prep)
                queue.append(prep)
                fetched += 1
            yield queue.popleft()

    def push_to_hub(self):
        args = self.args
        hub.push_run(self.output_dir, args.hub_model_id, args.hub_token, public=args.hub_public,
                     include_logs=args.push_logs, logging_dir=args.logging_dir)


def main(objective: str, argv=None):
    from .errors import exit_on_user_error

    @exit_on_user_error
    def run():
        args = training_parser(objective).parse_args(argv)
        validate_args(args)
        trainer = Trainer(args, objective)
        try:
            trainer.train()
        finally:  # an error message starts on a line of its own, after the progress bar
            if getattr(trainer, "bar", None) is not None:
                trainer.bar.close()

    run()
