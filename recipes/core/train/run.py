"""What every recipe sets up the same way around its training loop: the checks of output_dir and the
checkpoint a run starts from (before anything is loaded; nothing is written), the check that the data
make at least one optimizer step (before any DataLoader exists), then, once the model is prepared and the
plan is known, output_dir itself (an old run there replaced as a whole), the checkpointer, the resumed
state, the recorded config and plan, the trackers, and the loop itself with the probes the config asks
for (core/train/probes.py)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from accelerate.utils import set_seed

from recipes.core.distributed.deepspeed_config import save_resolved_config as save_resolved_deepspeed_config
from recipes.core.distributed.ranks import Ranks
from recipes.core.errors import USER_ERRORS, DataError, StoppedWithMainProcess
from recipes.core.output.checkpoint import Checkpointer
from recipes.core.output.checkpoint_io import CheckpointIO
from recipes.core.output.records import RunRecords
from recipes.core.output.run_dir import Start, claim, find_start
from recipes.core.output.tracking import Trackers
from recipes.core.plan.steps import Plan, plan_for_config
from recipes.core.train.loop import Course, Evaluation, LoopOutputs, TrainingLoop
from recipes.core.train.nonfinite import NonFiniteSteps
from recipes.core.train.probes import CompileCounter, MemoryCensus, Probe
from recipes.core.train.recipe import Recipe

T = TypeVar("T")


@dataclasses.dataclass
class Run:
    recipe: Recipe
    cfg: Any
    ranks: Ranks
    start: Start
    records: RunRecords
    log: Callable[[str], None]
    accelerator: Any = None
    census: MemoryCensus | None = None  # with memory_census, from the model's loading on
    data: dict | None = None  # what the data are made of, for plan.json (check_data)

    @classmethod
    def begin(
        cls,
        recipe: Recipe,
        cfg: Any,
        ranks: Ranks,
        *,
        accelerator: Any = None,
        log: Callable[[str], None] = print,
    ) -> Run:
        """Seed every RNG, check the trackers report_to names and output_dir, and choose the checkpoint to
        resume, writing nothing; the run's records are written once training starts."""
        set_seed(cfg.seed)
        trackers = Trackers(cfg.report_to, cfg.output_dir, recipe.name)
        start = find_start(cfg, ranks, log)
        records = RunRecords(
            cfg.output_dir,
            ranks.is_main_process,
            trackers,
            logging_steps=cfg.logging_steps,
            resume_step=start.resume_step,
        )
        census = MemoryCensus() if cfg.memory_census else None
        return cls(recipe, cfg, ranks, start, records, log, accelerator, census)

    @classmethod
    def of_accelerator(cls, recipe: Recipe, cfg: Any, accelerator: Any) -> Run:
        """`begin` on the processes of an Accelerator, printing on the main process only."""
        ranks = Ranks.of_accelerator(accelerator)
        return cls.begin(recipe, cfg, ranks, accelerator=accelerator, log=accelerator.print)

    def model_loaded(self) -> None:
        """load_pretrained's on_loaded: with memory_census, what loading the model left in memory."""
        if self.census is not None:
            self.census.model_loaded()

    def main_process_first(self, load: Callable[[], T]) -> T:
        """`load()` on the main process, then on the others: the main process tokenises and caches, the
        others read the cache. Bad input found on the main process stops every process with it: the
        others learn it from an agreement instead of waiting at a barrier for a process that is gone."""
        error = None
        if self.ranks.is_main_process:
            try:
                result = load()
            except USER_ERRORS as err:
                error = err
        if self.ranks.any(error is not None):
            raise (
                error
                if error is not None
                else StoppedWithMainProcess("the main process stopped on bad input")
            )
        if not self.ranks.is_main_process:
            result = load()
        return result

    def check_data(self, train_set: Any, record: dict | None = None, pipeline_stages: int = 1) -> None:
        """Before any DataLoader exists: `train_set` makes at least one optimizer step on this world size
        (else a DataError that says how many samples it needs). `record`, what the data are made of, goes
        into plan.json."""
        try:
            plan_for_config(
                self.cfg,
                num_samples=len(train_set),
                world_size=self.ranks.num_processes,
                pipeline_stages=pipeline_stages,
            )
        except ValueError as err:
            raise DataError(f"{self.cfg.dataset_name or 'dataset_mixture'}: {err}") from None
        self.data = record

    def plan(self, train_set: Any, loader_length: int, **fields: Any) -> Plan:
        """The run's plan (core/plan/steps.py plan_for_config) for the tokenised `train_set` on all
        processes, with its tokens per sample as the recipe counts them; `fields` as plan_for_config takes
        them. Checked against the length of the prepared train loader; too little data for one optimizer
        step is a data error."""
        try:
            plan = plan_for_config(
                self.cfg,
                num_samples=len(train_set),
                world_size=self.ranks.num_processes,
                tokens_per_sample=self.recipe.tokens_per_sample(train_set),
                **fields,
            )
        except ValueError as err:  # e.g. too few samples for one optimizer step on this world size
            raise DataError(str(err)) from None
        plan.check_loader_length(loader_length)
        return plan

    def training_loop(
        self,
        *,
        plan: Plan,
        io: CheckpointIO,
        scheduler: Any,
        evaluate: Callable[[int], None],
        ranks: Ranks | None = None,
        tracked: dict[str, Any] | None = None,
        plan_record: dict | None = None,
    ) -> TrainingLoop:
        """Load the chosen checkpoint into the prepared objects (through `io`), the scheduler and the
        `tracked` objects; then claim output_dir (an old run there is replaced as a whole now, not before:
        the inputs and the checkpoint are checked), write config.yaml and plan.json (`plan_record`, default the plan, with the
        data record of check_data), and under Accelerate the resolved DeepSpeed config, and start the
        trackers; return the loop, which evaluates with `evaluate(step)` every eval_steps. `ranks`: where
        the loop sums counts and losses, default all processes."""
        cfg, log, ranks = self.cfg, self.log, ranks or self.ranks
        # fp16's loss scaler owns the steps whose gradients overflow (core/train/nonfinite.py).
        loss_scaled = self.accelerator is not None and self.accelerator.mixed_precision == "fp16"
        nonfinite = NonFiniteSteps(cfg, ranks, loss_scaled=loss_scaled, log=log)
        tracked = {"lr_scheduler": scheduler, "nonfinite": nonfinite, **(tracked or {})}
        checkpoints = Checkpointer(
            io, ranks, cfg, total_steps=plan.total_optimizer_steps, tracked=tracked, log=log
        )
        position = self.start.position
        if self.start.checkpoint is not None:
            checkpoints.load(self.start.checkpoint)
            log(
                f"resumed from {self.start.checkpoint}: step {position.step}, epoch {position.epoch}, "
                f"{position.batches_in_epoch} micro-batches of that epoch done"
            )
        # Only now that the checkpoint has loaded does output_dir change (records cut back to its step).
        claim(cfg.output_dir, self.start, self.ranks)
        self.records.open()
        self.records.write_config(cfg)
        record = plan_record or plan.to_dict()
        self.records.write_plan({**record, "data": self.data} if self.data is not None else record)
        if self.accelerator is not None:
            save_resolved_deepspeed_config(self.accelerator, cfg.output_dir)
        self.records.start_tracking(cfg)
        log(plan.summary())
        probes: list[Probe] = [self.census] if self.census is not None else []
        if cfg.torch_compile:  # counts from here on: not the graphs of a reference precomputed before
            probes.append(CompileCounter(log))
        return TrainingLoop(
            Course(plan, position, scheduler, self.recipe.unit),
            ranks,
            LoopOutputs(self.records, checkpoints, log),
            nonfinite,
            Evaluation(evaluate, every=cfg.eval_steps),
            probes,
        )
