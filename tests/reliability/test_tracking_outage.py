"""A tracking server that stops answering while a run trains: logging waits and warns, training does not,
and the run's history is complete once the server is back (a real `mlflow server`, stopped and restarted)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mlflow import MlflowClient

from sr_tune.engine import TrainResult
from sr_tune.results import EvalResult
from sr_tune.tracking import MlflowTracker, start_run

from ..services import start_mlflow_server


def evaluation(step: int) -> EvalResult:
    return EvalResult(
        step=step,
        loss=0.01,
        losses={"pixel": 0.01},
        lr=1e-3,
        psnr=28.0 + step / 100,
        ssim=0.8,
        bicubic_psnr=27.0,
        bicubic_ssim=0.75,
        seconds=1.0,
        patches_per_second=100.0,
    )


def test_an_outage_of_the_tracking_server_delays_logging_but_not_training(tmp_path: Path, monkeypatch, caplog):
    # MLflow's client retries a request for minutes by default; a short retry keeps this test short, and lets
    # the tracker's own retry, which outlasts any outage, do the waiting.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    uri, server = start_mlflow_server(tmp_path / "mlflow")
    try:
        client = MlflowClient(uri)
        run_id = start_run(client, "sr_tune", name="outage", tags={}, params={})
        tracker = MlflowTracker(client, run_id, tags={})
        tracker.QUIET_S = 1.0
        tracker.log_eval(evaluation(10))
        tracker.flush()  # the first evaluation is in before the outage
        tracker = MlflowTracker(client, run_id, tags={})  # a new sender: flush ended the last
        tracker.QUIET_S = 1.0
        server.stop()

        with caplog.at_level(logging.WARNING, logger="sr_tune.tracking"):
            for step in (20, 30, 40):
                tracker.log_eval(evaluation(step))  # returns at once: training goes on
                time.sleep(1.5)
            assert tracker.outbox.qsize() == 2  # steps 30 and 40 held while step 20's request is retried
        assert "has not answered for" in caplog.text and "training goes on" in caplog.text

        uri_again, server = start_mlflow_server(tmp_path / "mlflow", port=int(uri.rsplit(":", 1)[1]))
        assert uri_again == uri
        history = [evaluation(step) for step in (10, 20, 30, 40)]
        with caplog.at_level(logging.WARNING, logger="sr_tune.tracking"):
            tracker.finish(TrainResult(history=history, last_checkpoint=None, best_checkpoint=None))
        assert "answers again; the evaluations held are sent" in caplog.text
        assert [m.step for m in client.get_metric_history(run_id, "val_psnr")] == [10, 20, 30, 40]
        assert client.get_run(run_id).info.status == "FINISHED"
    finally:
        server.stop()
