"""Check in a real browser that the MLflow UI shows gdml's runs as users browse them.

Starts ``mlflow ui`` on a finished store (loopback, a free port), then loads with headless Chromium (Playwright
driving the system's ``chromium``; Playwright's own browser downloads are not needed):

1. the experiment's runs table, at the link gdml prints (the model-training view): every run by name, with its
   data set (Dataset column) and source (Source column);
2. each run's page: its model metrics (``loss_dml``) and its System metrics tab (CPU utilisation);
3. an artifact image of the run (a plot), which must load (a decoded image, not a broken one).

Exits 1 naming what is missing, 0 when everything showed; ``--screenshots DIR`` keeps a screenshot of each page.

    .venv/bin/python benchmarks/check_mlflow_ui.py sqlite:///$PWD/mlflow.db --experiment gdml-demo
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

TIMEOUT_MS = 60_000


def chromium() -> str | None:
    """The Chromium to drive: $GDML_CHROMIUM, else ``chromium`` or ``chromium-browser`` on the PATH."""
    return os.environ.get("GDML_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(store: str, port: int) -> subprocess.Popen:
    """``mlflow ui`` on the store, answering on the loopback (waited for up to 60 s)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    process = subprocess.Popen([str(mlflow), "ui", "--backend-store-uri", store, "--host", "127.0.0.1",
                                "--port", str(port), "--workers", "1"], start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return process
        except OSError:
            if process.poll() is not None:
                raise SystemExit(f"check_mlflow_ui: mlflow ui exited with {process.returncode}") from None
            time.sleep(0.5)
    stop(process)
    raise SystemExit("check_mlflow_ui: mlflow ui did not answer within 60 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def check(store: str, experiment: str, screenshots: Path | None = None, run_ids: list[str] | None = None
          ) -> list[str]:
    """What is missing from the UI (empty: everything showed). ``store``: a local store (served here with
    ``mlflow ui``) or the URL of a running tracking server (its UI is used); ``run_ids``: only these runs."""
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    from pipeline.tracking import VIEW  # MLflow 3's model-training view, as gdml's printed links open it

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return [f"no experiment {experiment!r} in {store}"]
    runs = [r for r in client.search_runs([exp.experiment_id]) if not run_ids or r.info.run_id in run_ids]
    if not runs:
        return [f"experiment {experiment!r} has no runs"]
    missing: list[str] = []
    if store.startswith(("http://", "https://")):
        url, server = store.rstrip("/"), None
    else:
        port = _free_port()
        url, server = f"http://127.0.0.1:{port}", serve(store, port)
    base = f"{url}/#/experiments/{exp.experiment_id}"

    def shot(page, name: str) -> None:
        if screenshots is not None:
            screenshots.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)

    def curves(page, what: str, samples: int) -> None:
        """A chart drew its data: a curve (Plotly's ``.js-line``) where the run has two samples or more, else the
        one sample's bar (some chart's: a bar of value 0, as a first CPU sample often is, has no width); not a
        spinner."""
        selector, drawn = ("path.js-line", "a curve") if samples >= 2 else (".main-svg .trace path", "its sample")
        try:
            page.locator(f"{selector} >> visible=true").first.wait_for(state="visible", timeout=TIMEOUT_MS)
        except Exception:  # noqa: BLE001
            missing.append(f"{what}: no chart drew {drawn}")

    def shows(page, text: str, what: str) -> bool:
        try:
            page.get_by_text(text, exact=False).first.wait_for(state="visible", timeout=TIMEOUT_MS)
            return True
        except Exception:  # noqa: BLE001 - Playwright's timeout: the text is not on the page
            missing.append(f"{what}: {text!r} not shown")
            return False

    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(f"{base}/runs?{VIEW}")
            for run in runs:
                shows(page, run.info.run_name, "runs table")
            table = page.inner_text("body")
            for run in runs:  # the Dataset column (the first data set of each run; the others behind "+1")
                names = [d.dataset.name for d in run.inputs.dataset_inputs]
                if not any(name in table for name in names):
                    missing.append(f"runs table, Dataset column: none of {names} shown for {run.info.run_name}")
            shows(page, runs[0].data.tags.get("mlflow.source.name", "(no mlflow.source.name tag)"),
                  "runs table, Source column")
            shot(page, "runs-table")

            run = runs[0]
            page.goto(f"{base}/runs/{run.info.run_id}/model-metrics?{VIEW}")
            page.get_by_placeholder("Search metric charts").fill("loss_dml")  # the charts are drawn as they scroll in
            if shows(page, "loss_dml", f"run {run.info.run_name}, model metrics"):
                curves(page, f"run {run.info.run_name}, model metrics",
                       len(client.get_metric_history(run.info.run_id, "loss_dml")))
            shot(page, "run-metrics")
            page.goto(f"{base}/runs/{run.info.run_id}/system-metrics?{VIEW}")
            if shows(page, "cpu_utilization_percentage", f"run {run.info.run_name}, system metrics"):
                curves(page, f"run {run.info.run_name}, system metrics",
                       len(client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")))
            shot(page, "run-system-metrics")

            plots = [a.path for a in client.list_artifacts(run.info.run_id, "plots") if a.path.endswith(".png")]
            if not plots:
                missing.append(f"run {run.info.run_name}: no plot artifacts")
            else:
                page.goto(f"{base}/runs/{run.info.run_id}/artifacts/{plots[0]}?{VIEW}")
                try:
                    image = page.locator("img[src*='get-artifact'], img[src^='blob:'], img[src^='data:image']").first
                    image.wait_for(state="visible", timeout=TIMEOUT_MS)
                    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle(),
                                           timeout=TIMEOUT_MS)
                except Exception:  # noqa: BLE001
                    missing.append(f"run {run.info.run_name}: artifact image {plots[0]} did not load")
                shot(page, "run-artifact")
            browser.close()
    finally:
        if server is not None:
            stop(server)
    return missing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("store", help="the tracking store, e.g. sqlite:///$PWD/mlflow.db, or a server's URL")
    parser.add_argument("--experiment", default="gdml-demo")
    parser.add_argument("--screenshots", type=Path, help="keep a screenshot of each page here")
    parser.add_argument("--run", action="append", help="check only this run (repeatable; default: every run)")
    args = parser.parse_args()
    if chromium() is None:
        print("check_mlflow_ui: no Chromium found (apt-get install chromium, or set GDML_CHROMIUM)", file=sys.stderr)
        return 2
    missing = check(args.store, args.experiment, args.screenshots, args.run)
    for line in missing:
        print(f"MISSING {line}")
    print("the MLflow UI shows the runs table, the metrics, the system metrics and an artifact image"
          if not missing else f"{len(missing)} thing(s) missing from the MLflow UI")
    return 1 if missing else 0


if __name__ == "__main__":
    raise SystemExit(main())
