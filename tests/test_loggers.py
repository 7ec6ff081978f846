"""engine.report_to: TensorBoard, W&B (offline) and MLflow (local file store) get the same scalars at the same steps,
read back from each logger's own files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import run_stage

from train.engine.loggers import ScalarLoggers, check_available
from train.errors import ConfigError


def wandb_history(run_file: Path) -> list[dict]:
    """The history rows of a W&B offline run (.wandb: a header, then LevelDB-log records of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, pending, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = pb.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
                rows.append({"_step": rec.history.step.num, **row})
    return rows


def test_unknown_and_missing_loggers_are_named(monkeypatch):
    from train.config import NegConfig, load_config

    with pytest.raises(ConfigError, match=r"engine.report_to: \['tensorboard', 'comet'\] must list distinct"):
        load_config(NegConfig, None, ["model.path=m", "engine.output_dir=o", "engine.report_to=[tensorboard, comet]"])
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"wandb, which is not installed: pip install 'tdg-trainer\[wandb\]'"):
        check_available(["tensorboard", "wandb"])


@pytest.mark.slow
def test_every_logger_gets_the_same_scalars(tmp_path, monkeypatch, prepared_dir, base_model_dir):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_PROJECT", "tdg-test")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for opt-in use
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "tdg-test")
    out = tmp_path / "neg"
    r = run_stage("neg", ["--config", "configs/tiny/neg.yaml", f"model.path={base_model_dir}",
                          f"data.path={prepared_dir}", f"engine.output_dir={out}", "optim.max_steps=3",
                          "data.heldout_fraction=0.2", "engine.progress=false",
                          "engine.report_to=[tensorboard, wandb, mlflow]"], nproc=1)
    assert r.returncode == 0, r.stderr[-3000:]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tb = {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}
    assert {"neg/loss", "train/lr", "neg/heldout_loss"} <= {tag for tag, _ in tb}

    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    wb = {(k, row["_step"]): v for row in wandb_history(run_file) for k, v in row.items() if not k.startswith("_")}

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tdg-test").experiment_id])
    assert run.data.params["optim.max_steps"] == "3" and run.info.run_name == f"neg {out}"
    ml = {(k, m.step): m.value for k in run.data.metrics for m in client.get_metric_history(run.info.run_id, k)}

    assert set(tb) == set(wb) == set(ml) and len(tb) > 10
    for key, value in tb.items():  # TensorBoard stores float32
        assert wb[key] == pytest.approx(value, rel=1e-6) and ml[key] == pytest.approx(value, rel=1e-6), key


@pytest.mark.parametrize("store", ["no URI", "no URI, no SQLAlchemy", "file", "sqlite"])
def test_mlflow_logs_to_the_stores_users_start_with(store, tmp_path, monkeypatch):
    """MLflow 3 with no URI writes sqlite:///mlflow.db (SQLAlchemy needed), and refuses a file store unless
    MLFLOW_ALLOW_FILE_STORE is set: both failed after the model had loaded. Settled before any load now."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    if store == "file":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "store").as_uri())
    if store == "sqlite":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'runs.db'}")
    if store in ("no URI", "sqlite"):
        pytest.importorskip("sqlalchemy")
    if store == "no URI, no SQLAlchemy":
        import importlib.util

        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "sqlalchemy" else real(name))
    check_available(["mlflow"])
    (tmp_path / "run").mkdir()
    log = ScalarLoggers(tmp_path / "run", ["mlflow"], "neg run", {"optim": {"lr": 0.5}})
    log.scalars({"neg/loss": 1.25}, step=3)
    log.close()
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tdg").experiment_id])
    assert run.data.metrics == {"neg/loss": 1.25} and run.data.params == {"optim.lr": "0.5"}
    where = {"no URI": tmp_path / "mlflow.db", "no URI, no SQLAlchemy": tmp_path / "mlruns",
             "file": tmp_path / "store", "sqlite": tmp_path / "runs.db"}[store]
    assert where.exists()


def test_a_database_store_without_sqlalchemy_is_named_before_anything_loads(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "alembic" else real(name))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql+psycopg2://db/mlflow")
    with pytest.raises(ConfigError, match="needs SQLAlchemy and Alembic: pip install 'tdg-trainer\\[mlflow\\]'"):
        check_available(["tensorboard", "mlflow"])
