"""Cost of the model-directory commands (``duallora learn`` / ``predict``) against ``duallora run``, and their size.

Every figure is a whole process timed from outside (``time.perf_counter`` around the child, and the
child's own CPU time from ``os.wait4``), so process start, imports, backbone load and the folder checks
are included. Three measurements, each against a target of the model-directory issue:

1. **learn vs run, per task** (target: learn <= 1.1x run). An image folder of Fashion-MNIST
   (``--tasks`` tasks of ``--classes-per-task`` classes, ``--train-per-class`` training images per class)
   is learned (a) by one ``duallora run`` process (``data.dataset=imagefolder`` on the folder, the classes
   in sorted-name order, ``data.class_order=[0, 1, ...]``) and (b) by one ``duallora learn`` process per
   task folder (copies of that task's class folders) into a new model directory; both with the default
   config (DualLoRA on the shipped MNIST backbone), ``train.threads=--threads`` and ``--no-progress``.
   Repeated ``--repeats`` times, run and learns alternating in order; medians are reported. The run also
   evaluates on the test split after each task and writes plots (``duallora learn`` does neither), so
   its in-process per-task training time (``history.json``) is reported beside its wall time.
2. **cold-start predict** (target: <= 3 s). ``duallora predict MODEL_DIR one.png`` as a new process, on the
   model of (1), median over ``--predict-repeats`` runs (one warm-up first), interleaved with
   ``python -c "import torch"`` / ``torchvision`` / ``timm`` (and ``python -c pass``) for the breakdown.
3. **model directory size per task**: bytes of every ``versions/NNNN/model.safetensors`` and of the whole
   directory after each version, for the default model of (1) and for the Tiny-ImageNet preset
   (``configs/tiny_imagenet_10tasks.yaml``, 10 classes per task; a small image folder of its continual
   classes, ``--ti-tasks`` tasks learned with ``train.epochs=1``).

Prints a table and writes every figure to JSON atomically (default
``docs/results/model-dir-performance.json``).

Usage::

    python benchmarks/model_dir.py                  # 20-25 minutes on 2 CPU cores with one other job
    python benchmarks/model_dir.py --repeats 1 --predict-repeats 3 --skip-tiny-imagenet \\
        --set train.min_steps=0 --output /tmp/model-dir.json          # a quick check of the script, ~2 min

Image folders are built with ``scripts/make_image_folder.py`` into ``--workdir`` (default: a temporary
folder, removed at the end unless ``--keep``); a ``--workdir`` that already holds them is reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
MAKE_FOLDER = ROOT / "scripts" / "make_image_folder.py"
TI_CONFIG = ROOT / "configs" / "tiny_imagenet_10tasks.yaml"
LEARN_TARGET = 1.10
PREDICT_TARGET_S = 3.0


# ------------------------------------------------------------------------------------------ helpers


def duallora_exe() -> str:
    """The ``duallora`` console script of this interpreter's environment (what a user runs)."""
    beside = Path(sys.executable).parent / "duallora"
    found = str(beside) if beside.is_file() else shutil.which("duallora")
    if not found:
        raise SystemExit("error: no `duallora` command beside this Python or on PATH; install the package first")
    return found


def timed(cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` to completion, its output appended to ``log``.

    Returns:
        ``wall_s`` (perf_counter around the process), ``cpu_s`` (its user + system time, children
        included, from ``os.wait4``) and ``rc``.

    Raises:
        SystemExit: the command failed (its output is in ``log``).
    """
    with log.open("ab") as out:
        out.write(("$ " + " ".join(cmd) + "\n").encode())
        out.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; Popen must not wait again
    if proc.returncode != 0:
        raise SystemExit(f"error: exit {proc.returncode} from {' '.join(cmd)} (output in {log})")
    return {"wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "rc": proc.returncode}


def tree_bytes(folder: Path) -> int:
    """Bytes of every regular file below ``folder`` (links not followed)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a fsynced temporary file in the same folder and a rename."""
    text = json.dumps(obj, indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def build_folder(out: Path, log: Path, env: dict[str, str], args: list[str]) -> dict[str, Any]:
    """``scripts/make_image_folder.py out ARGS`` unless ``out`` exists (then reused)."""
    if out.is_dir():
        return {"reused": True}
    run = timed([sys.executable, str(MAKE_FOLDER), str(out), *args], log, env)
    return {"reused": False, "wall_s": run["wall_s"]}


def task_folders(image_root: Path, where: Path, tasks: int, per_task: int) -> list[Path]:
    """Task folders ``where/task_K/<class>`` (copies of ``image_root/train/<class>``): the classes in sorted
    name order (imagefolder's label ids), ``per_task`` per task, the first ``tasks * per_task`` of them."""
    names = sorted(d.name for d in (image_root / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(names) < tasks * per_task:
        raise SystemExit(f"error: {image_root} has {len(names)} classes, fewer than {tasks} x {per_task}")
    folders = []
    for k in range(tasks):
        folder = where / f"task_{k + 1}"
        if not folder.is_dir():
            stage = where / f".task_{k + 1}.partial"
            shutil.rmtree(stage, ignore_errors=True)
            for name in names[k * per_task:(k + 1) * per_task]:
                shutil.copytree(image_root / "train" / name, stage / name)
            os.replace(stage, folder)
        folders.append(folder)
    return folders


def version_sizes(model_dir: Path) -> dict[str, Any]:
    """Bytes of the current version's ``model.safetensors`` and of the whole model directory."""
    data = json.loads((model_dir / "model.json").read_text())
    current = int(data["current"])
    ckpt = model_dir / "versions" / f"{current:04d}" / "model.safetensors"
    return {"version": current, "model_safetensors_bytes": ckpt.stat().st_size,
            "directory_bytes": tree_bytes(model_dir)}


def version_record(model_dir: Path) -> dict[str, Any]:
    data = json.loads((model_dir / "model.json").read_text())
    return json.loads((model_dir / "versions" / f"{int(data['current']):04d}" / "version.json").read_text())


def learn_sequence(exe: str, model_dir: Path, folders: list[Path], overrides: list[str], log: Path,
                   env: dict[str, str], config: Optional[Path] = None) -> list[dict[str, Any]]:
    """One ``duallora learn`` process per task folder into ``model_dir``; per learn its times and sizes."""
    out = []
    for folder in folders:
        cmd = [exe, "learn", str(model_dir), str(folder), "--no-progress", *overrides]
        if config is not None:
            cmd += ["--config", str(config)]
        t = timed(cmd, log, env)
        rec = version_record(model_dir)
        training = rec.get("training") or {}
        out.append({**t, **version_sizes(model_dir), "learn_time_s": rec.get("learn_time_s"),
                    "task_time_s": training.get("task_time_s"), "train_time_s": training.get("train_time_s"),
                    "steps": training.get("steps"), "batch_size": training.get("batch_size"),
                    "final_loss": (training.get("epoch_loss") or [None])[-1], "train_images": rec.get("train_images")})
    return out


def run_history(run_dir: Path) -> list[dict[str, Any]]:
    """Per task of a run folder: its in-process times and final loss (``history.json``)."""
    hist = json.loads((run_dir / "history.json").read_text())
    tasks = hist if isinstance(hist, list) else hist.get("tasks", [])
    out = []
    for rec in tasks:
        ev = rec.get("evaluation") or {}
        out.append({"task_time_s": rec.get("task_time_s"), "train_time_s": rec.get("train_time_s"),
                    "steps": rec.get("steps"), "final_loss": (rec.get("epoch_loss") or [None])[-1],
                    "eval_time_s": ev.get("time_s")})
    return out


# ------------------------------------------------------------------------------------------ benchmarks


def learn_vs_run(exe: str, work: Path, session: Path, log: Path, env: dict[str, str], a: argparse.Namespace
                 ) -> tuple[dict[str, Any], Path]:
    """Benchmark 1: one ``duallora run`` over T tasks against T ``duallora learn`` processes."""
    fm = work / "fashion-mnist"
    n_classes = a.tasks * a.classes_per_task
    built = build_folder(fm, log, env, [
        "--train-per-class", str(a.train_per_class), "--test-per-class", str(a.test_per_class),
        "--image-size", "28", "--channels", "1", "data.dataset=fashion-mnist",
        f"data.classes=[{','.join(str(i) for i in range(n_classes))}]"])
    folders = task_folders(fm, work / "fashion-mnist-tasks", a.tasks, a.classes_per_task)
    common = [f"data.num_tasks={a.tasks}"] + ([f"train.threads={a.threads}"] if a.threads else []) + a.set
    order = "[" + ",".join(str(i) for i in range(n_classes)) + "]"
    run_overrides = ["data.dataset=imagefolder", f"data.root={fm}", f"data.class_order={order}", *common]
    runs, learns = [], []
    model_dir = session / "model-fashion-mnist-1"
    for r in range(a.repeats):
        def do_run(r: int = r) -> None:
            out = session / f"run-{r + 1}"
            t = timed([exe, "run", "--output", str(out), "--no-progress", *run_overrides], log, env)
            metrics = json.loads((out / "metrics.json").read_text())
            runs.append({**t, "per_task_wall_s": t["wall_s"] / a.tasks, "per_task_cpu_s": t["cpu_s"] / a.tasks,
                         "in_process_wall_s": metrics.get("wall_time_s"),
                         "train_time_s": metrics.get("train_time_s"), "eval_time_s": metrics.get("eval_time_s"),
                         "tasks": run_history(out)})
            if r > 0:
                shutil.rmtree(out, ignore_errors=True)

        def do_learns(r: int = r) -> None:
            md = session / f"model-fashion-mnist-{r + 1}"
            learns.append(learn_sequence(exe, md, folders, common, log, env))

        for step in ((do_run, do_learns) if r % 2 == 0 else (do_learns, do_run)):
            step()
        print(f"  repeat {r + 1}/{a.repeats}: run {runs[-1]['wall_s']:.1f} s, learns "
              + ", ".join(f"{x['wall_s']:.1f}" for x in learns[-1]) + " s", flush=True)
    run_wall = median([x["wall_s"] for x in runs])
    run_cpu = median([x["cpu_s"] for x in runs])
    learn_wall_each = [median([seq[k]["wall_s"] for seq in learns]) for k in range(a.tasks)]
    learn_cpu_each = [median([seq[k]["cpu_s"] for seq in learns]) for k in range(a.tasks)]
    learn_wall_mean = statistics.mean(learn_wall_each)
    learn_cpu_mean = statistics.mean(learn_cpu_each)
    # per repeat: (mean learn wall) / (run wall / T), then the median of those paired ratios
    paired = [statistics.mean(x["wall_s"] for x in seq) / (run["wall_s"] / a.tasks) for run, seq in zip(runs, learns)]
    paired_cpu = [statistics.mean(x["cpu_s"] for x in seq) / (run["cpu_s"] / a.tasks) for run, seq in zip(runs, learns)]
    run_task_time = [median([x["tasks"][k]["task_time_s"] for x in runs]) for k in range(a.tasks)]
    learn_task_time = [median([seq[k]["task_time_s"] for seq in learns]) for k in range(a.tasks)]
    losses = [(seq[k]["final_loss"], run["tasks"][k]["final_loss"]) for run, seq in zip(runs, learns)
              for k in range(a.tasks)]
    same_loss = all(x is not None and y is not None and abs(x - y) <= 1e-4 * max(1.0, abs(x)) for x, y in losses)
    # where the time goes besides the task itself (medians over repeats, seconds)
    learn_start = median([statistics.mean(x["wall_s"] - x["learn_time_s"] for x in seq) for seq in learns])
    learn_besides = median([statistics.mean(x["learn_time_s"] - x["task_time_s"] for x in seq) for seq in learns])
    run_start = median([x["wall_s"] - x["in_process_wall_s"] for x in runs])
    run_besides = median([x["in_process_wall_s"] - x["train_time_s"] - x["eval_time_s"] for x in runs])
    result = {
        "breakdown_s": {
            "learn_process_start_and_imports_per_task": learn_start,
            "learn_in_process_besides_task_per_task": learn_besides,
            "learn_task_time_mean": statistics.mean(learn_task_time),
            "run_process_start_and_imports": run_start,
            "run_in_process_besides_tasks_and_evaluation": run_besides,
            "run_evaluation": median([x["eval_time_s"] for x in runs]),
            "run_task_time_mean": statistics.mean(run_task_time),
            "explanation": "learn: start = process wall - version.json learn_time_s (interpreter, imports, CLI); "
                           "besides task = learn_time_s - task_time_s (config, folder checks and hash, backbone, "
                           "checkpoint load, save). run: start = process wall - metrics wall_time_s; besides = "
                           "wall_time_s - train_time_s - eval_time_s (backbone, data, checkpoints, plots, outputs)",
        },
        "image_folder": {"dataset": "fashion-mnist", "classes": n_classes, "train_per_class": a.train_per_class,
                         "test_per_class": a.test_per_class, **built},
        "tasks": a.tasks, "classes_per_task": a.classes_per_task, "repeats": a.repeats,
        "run_command": f"duallora run --output RUN --no-progress {' '.join(run_overrides)}",
        "learn_command": f"duallora learn MODEL_DIR TASK_FOLDER --no-progress {' '.join(common)}",
        "note": "the run also evaluates on the test split after each task (all classes seen so far) and writes "
                "plots and a checkpoint per task; duallora learn trains and saves only (no --eval)",
        "run_wall_s": run_wall, "run_wall_per_task_s": run_wall / a.tasks,
        "run_cpu_s": run_cpu, "run_cpu_per_task_s": run_cpu / a.tasks,
        "run_eval_time_s": median([x["eval_time_s"] for x in runs]),
        "run_task_time_s": run_task_time,
        "learn_wall_s": learn_wall_each, "learn_wall_mean_s": learn_wall_mean,
        "learn_cpu_s": learn_cpu_each, "learn_cpu_mean_s": learn_cpu_mean,
        "learn_task_time_s": learn_task_time,
        "learn_over_run_per_task": learn_wall_mean / (run_wall / a.tasks),
        "learn_over_run_per_task_paired_median": median(paired),
        "learn_over_run_per_task_paired": paired,
        "learn_over_run_per_task_cpu": learn_cpu_mean / (run_cpu / a.tasks),
        "learn_over_run_per_task_cpu_paired": paired_cpu,
        "same_final_loss_per_task": same_loss,
        "target": LEARN_TARGET,
        "met": learn_wall_mean / (run_wall / a.tasks) <= LEARN_TARGET,
        "sizes_default": [{k: x[k] for k in ("version", "model_safetensors_bytes", "directory_bytes")}
                          for x in learns[0]],
        "runs": runs, "learns": learns,
    }
    return result, model_dir


def cold_predict(exe: str, model_dir: Path, image: Path, log: Path, env: dict[str, str], repeats: int
                 ) -> dict[str, Any]:
    """Benchmark 2: ``duallora predict MODEL_DIR one.png`` as a new process, and the imports under it."""
    py = sys.executable
    cmds = {"predict": [exe, "predict", str(model_dir), str(image)],
            "python -c pass": [py, "-c", "pass"],
            "import torch": [py, "-c", "import torch"],
            "import torchvision": [py, "-c", "import torchvision"],
            "import timm": [py, "-c", "import timm"]}
    samples: dict[str, list[dict[str, Any]]] = {k: [] for k in cmds}
    for i in range(repeats + 1):  # the first round is a warm-up (file cache)
        for name, cmd in cmds.items():
            t = timed(cmd, log, env)
            if i > 0:
                samples[name].append(t)
    med = {k: median([x["wall_s"] for x in v]) for k, v in samples.items()}
    cpu = {k: median([x["cpu_s"] for x in v]) for k, v in samples.items()}
    return {"command": f"duallora predict MODEL_DIR {image.name}", "image": str(image), "repeats": repeats,
            "median_wall_s": med, "median_cpu_s": cpu,
            "min_wall_s": {k: min(x["wall_s"] for x in v) for k, v in samples.items()},
            "max_wall_s": {k: max(x["wall_s"] for x in v) for k, v in samples.items()},
            "import_timm_share_of_predict": med["import timm"] / med["predict"],
            "target_s": PREDICT_TARGET_S, "met": med["predict"] <= PREDICT_TARGET_S}


def tiny_imagenet_sizes(exe: str, work: Path, session: Path, log: Path, env: dict[str, str], a: argparse.Namespace
                        ) -> dict[str, Any]:
    """Benchmark 3b: the model directory of the Tiny-ImageNet preset after each of ``--ti-tasks`` learns."""
    ti = work / "tiny-imagenet"
    built = build_folder(ti, log, env, [
        "--train-per-class", str(a.ti_train_per_class), "--test-per-class", "5", "data.dataset=tiny-imagenet",
        f"data.root={a.ti_root}", "data.classes=tiny-imagenet-continual"])
    folders = task_folders(ti, work / "tiny-imagenet-tasks", a.ti_tasks, 10)
    overrides = ["train.epochs=1"] + ([f"train.threads={a.threads}"] if a.threads else []) + a.set
    seq = learn_sequence(exe, session / "model-tiny-imagenet", folders, overrides, log, env, config=TI_CONFIG)
    return {"config": str(TI_CONFIG.relative_to(ROOT)), "backbone": "vit_tiny_patch4_32.duallora_tinyimagenet100",
            "image_folder": {"train_per_class": a.ti_train_per_class, "test_per_class": 5, **built},
            "learn_command": f"duallora learn MODEL_DIR TASK_FOLDER --no-progress {' '.join(overrides)} "
                             f"--config {TI_CONFIG.relative_to(ROOT)}",
            "versions": seq}


def size_summary(versions: list[dict[str, Any]]) -> dict[str, Any]:
    ckpt = [v["model_safetensors_bytes"] for v in versions]
    dirs = [v["directory_bytes"] for v in versions]
    growth = [b - a for a, b in zip(dirs, dirs[1:])]
    return {"model_safetensors_bytes": ckpt, "directory_bytes": dirs,
            "directory_growth_per_version_bytes": growth,
            "checkpoint_growth_per_version_bytes": [b - a for a, b in zip(ckpt, ckpt[1:])],
            "directory_bytes_per_task": dirs[-1] / len(dirs)}


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, help="tasks of the learn-vs-run comparison")
    parser.add_argument("--classes-per-task", type=int, default=2, help="Fashion-MNIST classes per task")
    parser.add_argument("--train-per-class", type=int, default=200, help="Fashion-MNIST training images per class")
    parser.add_argument("--test-per-class", type=int, default=50, help="Fashion-MNIST test images per class")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions of run vs learns (medians reported)")
    parser.add_argument("--predict-repeats", type=int, default=5, help="cold-start predict runs (after a warm-up)")
    parser.add_argument("--threads", type=int, default=1,
                        help="train.threads of run and learn (0: the config's default, torch's choice)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override for every run and learn, e.g. train.min_steps=0 to shrink")
    parser.add_argument("--skip-tiny-imagenet", action="store_true", help="leave out the Tiny-ImageNet size")
    parser.add_argument("--ti-root", default="/work/shared/data/tiny-imagenet-200-32px.zip",
                        help="Tiny-ImageNet zip or folder (data.root)")
    parser.add_argument("--ti-tasks", type=int, default=2, help="Tiny-ImageNet tasks (10 classes each) to learn")
    parser.add_argument("--ti-train-per-class", type=int, default=20, help="Tiny-ImageNet training images per class")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where image folders (reused if present), runs and models go (default: a temporary "
                             "folder, removed at the end)")
    parser.add_argument("--keep", action="store_true", help="keep the runs and model directories of this call")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "results" / "model-dir-performance.json",
                        help="JSON file for every figure (written atomically)")
    a = parser.parse_args(argv)
    if a.repeats < 1 or a.predict_repeats < 1 or a.tasks < 1:
        parser.error("--repeats, --predict-repeats and --tasks must be at least 1")
    t0 = time.perf_counter()
    exe = duallora_exe()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    temporary = a.workdir is None
    work = Path(tempfile.mkdtemp(prefix="duallora-model-dir-bench-")) if temporary else a.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    session = Path(tempfile.mkdtemp(prefix="session-", dir=work))
    log = session / "commands.log"
    print(f"working in {work} (every command's output: {log})", flush=True)
    try:
        print(f"1. learn vs run: {a.tasks} tasks x {a.classes_per_task} classes, {a.repeats} repeats", flush=True)
        lr, model_dir = learn_vs_run(exe, work, session, log, env, a)
        image = sorted(next(d for d in sorted((work / "fashion-mnist" / "test").iterdir()) if d.is_dir()).iterdir())[0]
        print(f"2. cold-start predict of one image, {a.predict_repeats} runs", flush=True)
        pr = cold_predict(exe, model_dir, image, log, env, a.predict_repeats)
        ti = None
        if not a.skip_tiny_imagenet:
            print(f"3. Tiny-ImageNet preset: {a.ti_tasks} learns of 10 classes", flush=True)
            ti = tiny_imagenet_sizes(exe, work, session, log, env, a)
    finally:
        if temporary and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif not a.keep:
            shutil.rmtree(session, ignore_errors=True)
    sizes = {"default": {"backbone": "vit_tiny_patch7_28.duallora_mnist", "classes_per_task": a.classes_per_task,
                         **size_summary(lr["sizes_default"])}}
    if ti is not None:
        sizes["tiny_imagenet"] = {"backbone": ti["backbone"], "classes_per_task": 10, **size_summary(ti["versions"])}
    result = {
        "date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "command": "python benchmarks/model_dir.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                    "cores": os.cpu_count(), "load_average_at_end": list(os.getloadavg())},
        "learn_vs_run": lr, "cold_predict": pr, "sizes": sizes, "tiny_imagenet": ti,
        "wall_time_s": time.perf_counter() - t0,
    }
    write_json_atomic(a.output, result)

    print()
    print(f"{'measure':64s} {'value':>10s}  target")
    rows = [
        ("run: wall of the whole process (s)", f"{lr['run_wall_s']:.1f}", ""),
        (f"run: wall per task (total / {a.tasks}) (s)", f"{lr['run_wall_per_task_s']:.1f}", ""),
        ("run: in-process time per task (statistics + training), each (s)",
         " ".join(f"{x:.1f}" for x in lr["run_task_time_s"]), ""),
        ("run: evaluation after the tasks, total (s)", f"{lr['run_eval_time_s']:.1f}", ""),
        ("learn: wall per process, each task (s)", " ".join(f"{x:.1f}" for x in lr["learn_wall_s"]), ""),
        ("learn: wall per process, mean (s)", f"{lr['learn_wall_mean_s']:.1f}", ""),
        ("learn: in-process time per task (statistics + training), each (s)",
         " ".join(f"{x:.1f}" for x in lr["learn_task_time_s"]), ""),
        ("learn: process start + imports, mean per task (s)",
         f"{lr['breakdown_s']['learn_process_start_and_imports_per_task']:.1f}", ""),
        ("learn: in process besides the task (checks, backbone, load, save) (s)",
         f"{lr['breakdown_s']['learn_in_process_besides_task_per_task']:.1f}", ""),
        ("run: process start + imports (s)", f"{lr['breakdown_s']['run_process_start_and_imports']:.1f}", ""),
        ("run: in process besides tasks and evaluation (s)",
         f"{lr['breakdown_s']['run_in_process_besides_tasks_and_evaluation']:.1f}", ""),
        ("learn / run, wall per task", f"{lr['learn_over_run_per_task']:.3f}", f"<= {LEARN_TARGET}"),
        ("learn / run, wall per task, median of per-repeat ratios",
         f"{lr['learn_over_run_per_task_paired_median']:.3f}", ""),
        ("learn / run, CPU time per task", f"{lr['learn_over_run_per_task_cpu']:.3f}", ""),
        ("cold-start predict of one image, median wall (s)", f"{pr['median_wall_s']['predict']:.2f}",
         f"<= {PREDICT_TARGET_S}"),
    ]
    rows += [(f"  {k}, median wall (s)", f"{v:.2f}", "") for k, v in pr["median_wall_s"].items() if k != "predict"]
    for name, s in sizes.items():
        rows.append((f"{name}: model.safetensors per version (bytes)", " ".join(map(str, s["model_safetensors_bytes"])),
                     ""))
        rows.append((f"{name}: whole directory after each version (bytes)", " ".join(map(str, s["directory_bytes"])),
                     ""))
    for name, value, target in rows:
        print(f"{name:64s} {value:>10s}  {target}")
    print(f"note: {lr['note']}")
    print(f"same final loss per task in run and learn: {lr['same_final_loss_per_task']}")
    print(f"written to {a.output} ({result['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
