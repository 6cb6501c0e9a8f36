"""Where logged steps go besides metrics.jsonl: TensorBoard and Weights & Biases, on rank 0 only.

Both are reached through the libraries themselves (`torch.utils.tensorboard.SummaryWriter`; `wandb`),
imported lazily and only when the recipe asks for them, so a missing package is a ConfigError at
start (before any work), not a crash at the first logged step. They log exactly what metrics.jsonl
logs: `train/<key>` for every number of a step record and `eval/loss` for eval losses.

Resume: TensorBoard events at or after the resumed step are purged (`purge_step`), as metrics.jsonl is
truncated; a W&B run keeps its id in `<output_dir>/wandb_run_id` and is resumed under it.
"""

from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path
from typing import Protocol

from qtrain.config.schema import LoggingConfig
from qtrain.errors import ConfigError
from qtrain.train.metrics import MetricsLog

TB_DIR = "tensorboard"
WANDB_ID_FILE = "wandb_run_id"
SKIP_KEYS = ("step", "skipped")


class Sink(Protocol):
    def write(self, record: dict) -> None: ...

    def close(self) -> None: ...


def scalars(record: dict) -> dict[str, float]:
    """`train/<key>` for every number in a step record, `eval/loss` for its eval loss."""
    out = {}
    for key, value in record.items():
        if key in SKIP_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out["eval/loss" if key == "eval_loss" else f"train/{key}"] = float(value)
    return out


def check_available(cfg: LoggingConfig) -> None:
    """ConfigError naming the key and the install command when an asked-for logger is not installed."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("logging.tensorboard: true needs the `tensorboard` package; `pip install tensorboard` "
                          "or set logging.tensorboard: false")
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError("logging.wandb: true needs the `wandb` package; `pip install wandb` "
                          "or set logging.wandb: false")


class TensorBoardSink:
    def __init__(self, out: Path, resume_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.dir = out / TB_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Offline unless the user configured online (logging.wandb_mode, or WANDB_MODE in the environment)."""

    def __init__(self, cfg: LoggingConfig, out: Path, run_config: dict) -> None:
        import wandb

        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id + "\n")
        mode = os.environ.get("WANDB_MODE") or cfg.wandb_mode
        self.run = wandb.init(project=cfg.wandb_project, name=out.name, id=run_id, resume="allow", dir=str(out),
                              mode=mode, config=run_config)

    def write(self, record: dict) -> None:
        self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


class Sinks:
    """Fans a step record out to metrics.jsonl and the recipe's optional loggers."""

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def write(self, record: dict) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def write_final_eval(self, step: int, loss: float | None) -> None:
        """The end-of-run eval loss, to the loggers (metrics.jsonl keeps one record per step; it is in summary.json)."""
        if loss is None:
            return
        for sink in self.sinks:
            if not isinstance(sink, MetricsLog):
                sink.write({"step": step, "eval_loss": loss})

    def paths(self) -> dict[str, Path]:
        """What each file-writing sink wrote to, for the closing summary."""
        out = {}
        for sink in self.sinks:
            if isinstance(sink, MetricsLog):
                out["metrics"] = sink.path
            elif isinstance(sink, TensorBoardSink):
                out["tensorboard"] = sink.dir
        return out


def open_sinks(cfg: LoggingConfig, out: Path, metrics: Path, resume_step: int, run_config: dict) -> Sinks:
    sinks: list[Sink] = [MetricsLog(metrics)]
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(out, resume_step))
    if cfg.wandb:
        sinks.append(WandbSink(cfg, out, run_config))
    return Sinks(sinks)
