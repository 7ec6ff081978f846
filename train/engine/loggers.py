"""Scalars to the loggers people use (`engine.report_to`): TensorBoard, Weights & Biases, MLflow.

Every logger gets the same scalars at the same steps, from rank 0 only. W&B and MLflow are
optional extras (`pip install 'tdg-trainer[wandb]'` / `[mlflow]`) and are configured the way
their users expect, from the environment, never from a config file: WANDB_PROJECT, WANDB_MODE
(offline on compute nodes without internet), WANDB_API_KEY; MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME. A stage resumed after preemption continues the same W&B / MLflow run
(its id is kept in the output directory), so a curve is not split over several runs.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from train.errors import ConfigError

LOGGERS = ("tensorboard", "wandb", "mlflow")
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_available(report_to: list[str], key: str = "engine.report_to") -> None:
    """Refuse, before any work (no model loaded yet), a logger whose package is not installed; settle MLflow's
    store."""
    import importlib.util

    for name in report_to:
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"{key} includes {name}, which is not installed: pip install 'tdg-trainer[{name}]' "
                              f"(or remove it from {key})")
    if "mlflow" in report_to:
        _settle_mlflow_store()


SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")


def _settle_mlflow_store() -> None:
    """MLflow as its users first run it. With no MLFLOW_TRACKING_URI, MLflow 3 writes sqlite:///mlflow.db, which
    needs SQLAlchemy (the `[mlflow]` extra has it); without it, a local ./mlruns file store is used instead. A
    file store needs MLFLOW_ALLOW_FILE_STORE in MLflow 3: set here, since the user chose it. A database URI
    without SQLAlchemy is a named error, not a registry traceback after the model has loaded."""
    import importlib.util

    has_sql = all(importlib.util.find_spec(m) is not None for m in ("sqlalchemy", "alembic"))
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri and not has_sql:
        uri = os.environ["MLFLOW_TRACKING_URI"] = Path("mlruns").resolve().as_uri()
    if uri.startswith("file:") or "://" not in uri and uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if uri.split(":", 1)[0].split("+", 1)[0] in SQL_SCHEMES and not has_sql:
        raise ConfigError(f"MLFLOW_TRACKING_URI {uri} needs SQLAlchemy and Alembic: pip install "
                          "'tdg-trainer[mlflow]' (or use a file:// or http:// URI)")


def _flat(config: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


class ScalarLoggers:
    """The loggers of `report_to` for one stage run; a no-op where `enabled` is False (ranks other than 0)."""

    def __init__(self, out: Path, report_to: list[str], run_name: str, config: dict, enabled: bool = True):
        self.tb = self.wandb_run = self.mlflow = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tb"))
        if "wandb" in report_to:
            import wandb

            run_id = _stable_id(out / ".wandb_run_id", lambda: secrets.token_hex(4))
            self.wandb_run = wandb.init(project=os.environ.get("WANDB_PROJECT", "tdg"), name=run_name, id=run_id,
                                        resume="allow", dir=str(out), config=config)
        if "mlflow" in report_to:
            import mlflow

            mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "tdg"))
            id_file = out / ".mlflow_run_id"
            run = mlflow.start_run(run_id=id_file.read_text().strip() if id_file.is_file() else None,
                                   run_name=run_name)
            if not id_file.is_file():
                id_file.write_text(run.info.run_id)
                # parameter values are capped (6,000 characters); a prompt template or path list rarely is longer
                mlflow.log_params({k: str(v)[:6000] for k, v in _flat(config).items()})
            self.mlflow = mlflow

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(dict(values), step=step)
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: float(v) for k, v in values.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _stable_id(path: Path, new) -> str:
    if path.is_file():
        return path.read_text().strip()
    run_id = new()
    path.write_text(run_id)
    return run_id
