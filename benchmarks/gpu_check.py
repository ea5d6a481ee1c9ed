"""The GPU check (``make gpu-check``): one command, one line per check, then RESULT lines.

On a machine with a CUDA GPU (and the project's environment, ``make setup``):

1. installs the ``gpu`` extra (faiss-gpu) where it is missing, and says whether faiss-gpu runs beside torch;
2. runs the GPU tests (``pytest -m gpu``);
3. training throughput of ResNet-50 at 224 px (bf16 autocast, channels_last, attention over layer2+layer3 and
   the class adversary, batch 64) through gdml's own worker function with 1 Ray Train worker, on batches held
   in GPU memory, against a model-only loop on the same batches (goal: at least 0.9x its images/s);
4. the same with the real stream feeding it (shards built here from generated 500 x 375 JPEGs), for several
   numbers of loader workers: does decoding starve the GPU, and how many loader workers does it need;
5. exact metrics (Recall@1/10/100/1000, MAP@R, R-Precision, P@1) on 1,000,000 x 512 random embeddings on the
   GPU: seconds and peak GPU memory, and equality with the CPU engine on a 20,000-row subset.

Without a CUDA device it prints the versions, says "no CUDA device" and exits 0; on a machine with NVIDIA GPUs
that torch cannot use (a driver older than torch's CUDA build) it says so and exits 1. Any failed check (the GPU
tests, a metric that differs from the CPU engine's, a check that raised or timed out) makes it exit 1.

    .venv/bin/python benchmarks/gpu_check.py [--skip-install] [--quick]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from synthetic import photo_folder  # noqa: E402

FAILED: list[str] = []
"""The checks that failed: any makes the command exit 1."""


def line(check: str, outcome: str, failed: bool = False) -> None:
    print(f"{check:<28} {outcome}", flush=True)
    if failed:
        FAILED.append(check)


def install_gpu_extra() -> None:
    from pipeline.evaluation.index import faiss_distribution

    found = faiss_distribution()
    if found and found[0].startswith("faiss-gpu"):
        line("gpu extra", f"installed ({found[0]} {found[1]})")
        return
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--retries", "1",
           "--timeout", "20"]
    proc = subprocess.run([*pip, "faiss-gpu==1.15.1"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or ["pip failed"])[-1][:150]
        line("gpu extra", f"NOT installed ({reason}); searches use torch on the GPU")
        return
    if found and found[0] == "faiss-cpu":  # both ship the module 'faiss': keep the GPU build's files
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", "faiss-cpu"], check=False)
        subprocess.run([*pip, "--force-reinstall", "--no-deps", "faiss-gpu==1.15.1"], check=False)
    line("gpu extra", "installed faiss-gpu 1.15.1")


def environment() -> bool:
    """Versions and the device; False where there is no GPU to check (an error where torch cannot use one)."""
    import torch

    from pipeline.runtime import nvidia_devices, unusable_gpu

    cuda = torch.cuda.is_available()
    line("torch", f"{torch.__version__} (CUDA build {torch.version.cuda})")
    problem = unusable_gpu("auto", cuda, 0, nvidia_devices())
    line("device", torch.cuda.get_device_name() if cuda else problem or "no CUDA device", failed=bool(problem))
    return cuda


def faiss_beside_torch() -> None:
    """Which FAISS is installed, and whether faiss-gpu runs beside torch: asked in a fresh process, after the
    install (a module imported before it would be the old one)."""
    code = ("from pipeline.evaluation.index import faiss_distribution, faiss_gpu_problem; "
            "found = faiss_distribution(); print(f'{found[0]} {found[1]}' if found else 'not installed'); "
            "print(faiss_gpu_problem())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if proc.returncode != 0:
        line("faiss", f"FAILED: {(proc.stderr.strip().splitlines() or ['?'])[-1][:200]}", failed=True)
        return
    found, problem = proc.stdout.strip().splitlines()[-2:]
    line("faiss", found)
    line("faiss-gpu beside torch", "runs" if problem == "None" else f"does not run: {problem} (torch search)")


def gpu_tests() -> None:
    proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_gpu.py"], capture_output=True, text=True, cwd=ROOT, timeout=900)
    summary = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    # the only skip allowed: the 2-GPU test on a machine with one; any other is a GPU check that did not run
    skips = [s for s in proc.stdout.splitlines() if s.startswith("SKIPPED")]
    skipped = [s for s in skips if "needs 2 CUDA GPUs" not in s]
    line("pytest -m gpu", f"{'ok' if proc.returncode == 0 and not skipped else 'FAILED'}: {summary}",
         failed=proc.returncode != 0 or bool(skipped))
    if len(skips) > len(skipped):
        line("nccl DDP (2 GPUs)", "not run: this machine has one GPU")
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-2000:], sep="\n")


def throughput_config(data_root: Path, tmp: Path, loader_workers: int, steps: int):
    from pipeline import config as config_mod
    from pipeline.preflight import resolve_paths

    return resolve_paths(config_mod.load(None, [
        "data.source=folder", f"data.path={tmp / 'photos'}", f"data.root={data_root}", "data.image_size=224",
        "data.train_fraction=0.8", "model.backbone=resnet50", "model.embedding_size=512",
        "model.attention.taps=[layer2,layer3]", "sampler.classes_per_batch=16", "sampler.images_per_class=4",
        "sampler.batch_size=64", "sampler.epoch=images", f"sampler.loader_workers={loader_workers}", "train.workers=1",
        f"train.cpus_per_worker={max(1, min(os.cpu_count() or 1, loader_workers + 2))}", "train.epochs=2",
        f"train.max_steps_per_epoch={steps}", f"train.storage_path={tmp / 'ray'}", "tracking.required=false",
        "model.adversary.schedule=constant"]))


def model_only_images_per_second(cfg, num_classes: int, steps: int) -> float:
    """A plain loop on the same model and the same kind of in-memory batches: no gdml worker around it."""
    import torch

    from pipeline.data.transforms import normalize
    from pipeline.model.embedder import Embedder
    from pipeline.objectives import MetricLoss, TrainModule
    from pipeline.runtime import Capabilities, choose, decide_device
    from pipeline.train import build_optimizer, synthetic_batches

    caps = Capabilities.detect()
    run = choose(decide_device("auto", caps), caps)
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    module = TrainModule(Embedder(cfg.model, num_classes, cfg.data.image_size),
                         MetricLoss(cfg.loss, num_classes, cfg.model.embedding_size))
    module = module.to(run.device, memory_format=torch.channels_last).train()
    opt = build_optimizer(module, cfg)
    batches = iter(synthetic_batches(8, cfg, num_classes, run.device))

    def step() -> None:
        images, labels = next(batches)
        images = normalize(images).contiguous(memory_format=torch.channels_last)
        with run.autocast():
            loss_dml, loss_adv, _ = module(images, labels, 0.1)
        opt.zero_grad(set_to_none=True)
        (loss_dml.float() + loss_adv.float()).backward()
        opt.step()

    for _ in range(10):
        step()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return steps * cfg.sampler.batch_size / (time.perf_counter() - started)


def gdml_images_per_second(cfg, name: str, synthetic: int | None) -> float:
    from pipeline.launch import fit
    from pipeline.tracking import Tracker
    from pipeline.train import Hooks

    _, history = fit(cfg, Tracker(None, None), name, local=False, progress=False,
                     hooks=Hooks(synthetic_batches=synthetic or 0))
    last = history[-1]  # the second epoch: warm (cuDNN autotuning and start-up are in the first)
    return last["steps"] * cfg.sampler.batch_size / last["epoch_seconds"]


def training(tmp: Path, quick: bool) -> float:
    import ray

    from pipeline.data import shards

    classes, per_class = (20, 40) if quick else (60, 70)  # images epochs: 52 steps of 64 (steady state)
    started = time.perf_counter()
    photo_folder(tmp / "photos", classes, per_class, workers=min(16, os.cpu_count() or 1))
    line("photos", f"{classes * per_class} JPEGs of 500x375 in {time.perf_counter() - started:.0f} s")
    data_root = tmp / "shards"
    cfg = throughput_config(data_root, tmp, 0, 30 if quick else 60)
    manifest = shards.build(cfg.data)
    num_classes = len(manifest.class_ids("train"))
    plain = model_only_images_per_second(cfg, num_classes, 30 if quick else 60)
    try:
        ours = gdml_images_per_second(cfg, "gpu-synthetic", synthetic=8)
        ratio = ours / plain
        line("train, batches in memory", f"gdml worker {ours:.0f} images/s vs model-only loop {plain:.0f} "
             f"images/s ({ratio:.2f}x)")
        for workers in ((0, 4) if quick else (0, 4, 8, 14)):
            fed = gdml_images_per_second(throughput_config(data_root, tmp, workers, 30 if quick else 60),
                                         f"gpu-stream-{workers}", synthetic=None)
            line(f"train, stream, {workers} loaders", f"{fed:.0f} images/s ({fed / ours:.2f}x of batches in memory"
                 f"{': decoding starves the GPU' if fed < 0.9 * ours else ''})")
    finally:
        ray.shutdown()
    return ratio


def metrics(quick: bool) -> tuple[float, float]:
    import torch

    from pipeline.evaluation.ranks import metrics_from_ranks, relevant_ranks
    from pipeline.evaluation.ranks_torch import relevant_ranks_torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_metrics import make_data

    n = 200_000 if quick else 1_000_000
    emb, labels = make_data(n, 512)
    ks = (1, 10, 100, 1000)
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.synchronize()
    started = time.perf_counter()
    ranks, r = relevant_ranks_torch(emb, labels, device="cuda")
    out = metrics_from_ranks(ranks, r, ks)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    line(f"metrics {n:,} x 512", f"{seconds:.1f} s on the GPU, peak {peak:.1f} of {total:.0f} GiB; "
         f"R@1 {out['recall_at_1']:.4f}, MAP@R {out['map_at_r']:.4f}")
    sub = slice(0, 20_000)
    cpu, r_cpu = relevant_ranks(emb[sub], labels[sub], max_rank=1000)
    gpu, r_gpu = relevant_ranks_torch(emb[sub], labels[sub], device="cuda")
    same = metrics_from_ranks(cpu, r_cpu, ks) == metrics_from_ranks(gpu, r_gpu, ks)
    line("metrics GPU vs CPU (20,000)", "identical" if same else "DIFFER", failed=not same)
    return seconds, peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-install", action="store_true", help="do not install the gpu extra")
    parser.add_argument("--quick", action="store_true", help="smaller data and fewer steps")
    args = parser.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    if not environment():
        if not FAILED:
            line("gpu checks", "skipped: no CUDA device here (run make gpu-check on a machine with an NVIDIA GPU)")
        print("RESULT gpu_train_vs_model_only=n/a goal=>=0.9")
        sys.exit(1 if FAILED else 0)
    if not args.skip_install:
        install_gpu_extra()
    import gc

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="gdml-gpu-check-"))
    results = {}
    for name, check in (("faiss", faiss_beside_torch), ("gpu tests", gpu_tests),
                        ("metrics", lambda: metrics(args.quick)), ("training", lambda: training(tmp, args.quick))):
        try:
            results[name] = check()
        except Exception as err:  # noqa: BLE001 - one failed check (or its timeout) must not hide the others
            line(name, f"FAILED: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}",
                 failed=True)
        finally:  # the next check gets the GPU's memory back
            gc.collect()
            torch.cuda.empty_cache()
    if results.get("metrics"):
        print(f"RESULT gpu_metrics_seconds={results['metrics'][0]:.1f} goal=<=120")
    ratio = results.get("training")
    print(f"RESULT gpu_train_vs_model_only={'n/a' if ratio is None else f'{ratio:.2f}'} goal=>=0.9")
    if FAILED:
        print(f"gpu-check: {len(FAILED)} check(s) failed: {', '.join(FAILED)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
