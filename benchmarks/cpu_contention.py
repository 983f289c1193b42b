"""The demo's training and prediction steps alone and beside N busy processes, with handseg's threads
and with torch's defaults, in one run.

    python benchmarks/cpu_contention.py                       (N = the usable CPUs; a few minutes on 2 cores)
    python benchmarks/cpu_contention.py --epochs 1 --busy 2 --size 128 --train-size 64   (tiny)

Each of the four cases (quiet / busy x handseg / torch defaults) runs in a fresh Python process: the
demo's ``handseg train`` (UNet/ResNet18, ``--workers 0``, as the demo trains) and ``handseg predict``
of the test images, timed inside that process (imports excluded). "torch defaults" is handseg with its
thread decision switched off: torch's intra-op threads as torch picks them (the physical cores),
OpenCV's own, as before handseg decided them. "busy" runs N spinning Python processes beside it, N the
usable CPUs (:func:`handseg.common.threads.usable_cpus`). The machine's own load average is printed
with each case: on a shared machine the quiet case is only as quiet as the machine was.

The goals (issue 18): busy handseg at most 1.5x quiet handseg, and at least 3x faster than busy torch
defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
mode, data, out, epochs, train_size = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
if mode == "torch":
    import torch
    from handseg.common import threads
    from handseg.inference import runtime
    default = torch.get_num_threads()  # what torch picks before anyone sets it
    def plan(budget, device="cpu", workers=None, source="", cap=None):
        return threads.ThreadPlan(budget, "torch defaults", default, workers if workers is not None else 4, workers)
    threads.plan_threads = plan
    runtime._cv2_threads = lambda n: None
    import handseg.training.dataset as dataset
    dataset.worker_threads = lambda worker_id=0: None
from handseg.cli import main
times = {}
t0 = time.perf_counter()
code = main(["-q", "train", "--data", data + "/train", "--arch", "unet", "--encoder", "resnet18", "--encoder-weights",
             "none", "--size", train_size, "--epochs", epochs, "--batch-size", "4", "--lr", "3e-3", "--workers", "0",
             "--device", "cpu", "--augment", "light", "--fold", "-1", "--out", out + "/run", "--overwrite"])
times["train"] = time.perf_counter() - t0
assert code == 0, code
t0 = time.perf_counter()
code = main(["-q", "predict", out + "/run", "--data", data + "/test", "-o", out + "/pred.csv", "--device", "cpu",
             "--overwrite"])
times["predict"] = time.perf_counter() - t0
assert code == 0, code
import torch
times["intra_op"] = torch.get_num_threads()
print("RESULT " + json.dumps(times))
"""


def _spinners(n: int) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:  # only the processes this script started, by their own handle
        p.kill()
        p.wait()


def run_case(mode: str, busy: int, data: Path, work: Path, epochs: int, train_size: int) -> dict:
    """One case in a fresh process: ``{"train": s, "predict": s, "intra_op": n, "load": before}``."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HANDSEG_NO_PROGRESS": "1"}
    spin = _spinners(busy)
    try:
        time.sleep(1.0 if busy else 0.0)
        load = os.getloadavg()[0]
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(data), str(work), str(epochs), str(train_size)],
                              env=env, capture_output=True, text=True)
    finally:
        _stop(spin)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        raise SystemExit(f"case {mode}/busy={busy} failed:\n{proc.stderr[-3000:]}")
    return {**json.loads(line[7:]), "load": load}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=256, help="synthetic image side (the demo's)")
    parser.add_argument("--train-size", type=int, default=128, help="train --size (the demo's)")
    parser.add_argument("--ids", type=int, default=6, help="training patients (two images each)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--busy", type=int, default=None, help="busy processes (default: the usable CPUs)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from handseg.common.threads import usable_cpus
    from handseg.data.synth import make_dataset

    busy = args.busy if args.busy is not None else usable_cpus()
    results: dict = {"usable_cpus": usable_cpus(), "busy_processes": busy, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        make_dataset(data, ids=args.ids, test_ids=2, size=args.size, seed=0)
        for mode in ("handseg", "torch"):
            for n in (0, busy):
                key = f"{mode}/{'busy' if n else 'quiet'}"
                results["cases"][key] = run_case(mode, n, data, Path(tmp) / key.replace("/", "_"), args.epochs,
                                                 args.train_size)
    _print(results)
    return results


def _print(results: dict) -> None:
    cases = results["cases"]
    print(f"usable CPUs {results['usable_cpus']}, busy processes {results['busy_processes']}")
    print(f"{'case':<16} {'train s':>9} {'predict s':>10} {'total s':>9} {'threads':>8} {'load before':>12}")
    for key, r in cases.items():
        print(f"{key:<16} {r['train']:>9.1f} {r['predict']:>10.1f} {r['train'] + r['predict']:>9.1f} "
              f"{r['intra_op']:>8} {r['load']:>12.1f}")

    def total(key: str) -> float:
        return cases[key]["train"] + cases[key]["predict"]

    slow = total("handseg/busy") / total("handseg/quiet")
    gain = total("torch/busy") / total("handseg/busy")
    print(f"handseg busy / quiet: {slow:.2f}x (goal <= 1.5x); torch defaults busy / handseg busy: {gain:.2f}x "
          "(goal >= 3x)")
    results["handseg_busy_over_quiet"], results["torch_busy_over_handseg_busy"] = slow, gain


if __name__ == "__main__":
    main()
