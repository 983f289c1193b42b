"""The GPU figures in one call: train and predict pace, --batch-size auto's choice, peak memory.

    python benchmarks/gpu_check.py --json gpu_check.json                     (about 8 minutes on one H100)
    python benchmarks/gpu_check.py --tiny --device cpu                        (what the tests run)

Makes its own synthetic data (``--image-size`` px X-rays, 2048 as in the competition), then:

- train: ``train()`` for ``--steps`` steps of UNet++/HRNet-W48 and UNet/ResNet34 at ``--size``, batch 4
  (the real loop: prep cache, workers, AMP, a checkpoint, fold 0 validated), images/s of the last epoch
  (metrics.csv) and the share of the call's wall time inside the training loop;
- predict: ``run_predictions`` (the code of ``handseg predict``) on ``--images`` test images at their
  full size, images/s for the resize model without TTA and with hflip, and a crop model (``--crop``
  ``--size``) as a sliding window;
- ``--batch-size auto``'s choice for UNet/ResNet34 at ``--size``;
- peak GPU memory of each part.

It prints one table and a JSON and checks the GPU goals of issue 18 (>= 90% of train wall time in
the loop; predict >= 25 img/s, >= 15 with hflip, >= 8 with a crop sliding window); on CPU the goals are
printed as not applicable. Training steps are few: the models are untrained, which costs nothing in
pace.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _memory import peak_gib, reset_peak  # noqa: E402

GOALS = {"train_loop_share": 0.90, "predict_resize_img_s": 25.0, "predict_hflip_img_s": 15.0,
         "predict_crop_img_s": 8.0}
FULL = {"image_size": 2048, "size": 1024, "crop": 1024, "steps": 60, "images": 48, "ids": 24,
        "configs": ["unetplusplus/hrnet_w48", "unet/resnet34"]}
TINY = {"image_size": 128, "size": 64, "crop": 64, "steps": 2, "images": 2, "ids": 6,
        "configs": ["unet/resnet18"]}


def _train(data: Path, out: Path, arch: str, encoder: str, size: int, crop: int | None, steps: int, device: str
           ) -> tuple[dict, Path]:
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train

    cfg = TrainConfig(data=data, arch=arch, encoder=encoder, encoder_weights="none", size=size, crop=crop,
                      epochs=1, batch_size=4, max_steps=steps, device=device, out=out, augment="light")
    reset_peak(device)
    t0 = time.perf_counter()
    train(cfg, log=lambda *a: None)
    wall = time.perf_counter() - t0
    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    loops = sum(float(r["seconds"]) for r in rows)
    return {"img_s": float(rows[-1]["images_per_s"]), "loop_share": loops / wall, "wall_s": wall,
            "peak_gib": peak_gib(device)}, out


def _predict(run: Path, test: Path, out: Path, device: str, transforms: str, n: int) -> dict:
    from handseg.formats.tta import parse_transforms
    from handseg.inference.run import PredictConfig, run_predictions

    cfg = PredictConfig(transforms=parse_transforms(transforms), device=device, batch=4)
    run_predictions([run], test, out / "warm.csv", config=cfg)  # first pass: kernels, allocator
    reset_peak(device)
    t0 = time.perf_counter()
    run_predictions([run], test, out / "pred.csv", config=cfg)
    return {"img_s": n / (time.perf_counter() - t0), "peak_gib": peak_gib(device)}


def run(args) -> dict:
    from handseg.data.synth import make_dataset
    from handseg.inference.runtime import pick_device, resolve_amp
    from handseg.models.build import build_model
    from handseg.models.losses import build_loss
    from handseg.training.batchsize import auto_batch_size, trial_fits

    device = pick_device(args.device)
    p = TINY if args.tiny else FULL
    size, crop = args.size or p["size"], args.crop or p["crop"]
    configs = args.configs.split(",") if args.configs else p["configs"]
    result: dict = {"device": device, "image_size": args.image_size or p["image_size"], "size": size, "crop": crop,
                    "train": {}, "predict": {}}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        test_ids = max(1, (args.images or p["images"]) // 2)
        make_dataset(data, ids=p["ids"], test_ids=test_ids, size=result["image_size"], seed=0)
        n_test = len(list((data / "test" / "DCM").glob("*/*.png")))
        runs = {}
        for spec in configs:
            arch, encoder = spec.split("/")
            result["train"][spec], runs[spec] = _train(data / "train", Path(tmp) / spec.replace("/", "_"), arch,
                                                       encoder, size, None, args.steps or p["steps"], device)
        last = runs[configs[-1]]
        for key, transforms in (("resize", ""), ("hflip", "hflip")):
            result["predict"][key] = _predict(last, data / "test", Path(tmp) / key, device, transforms, n_test)
        arch, encoder = configs[-1].split("/")
        _, crop_run = _train(data / "train", Path(tmp) / "crop", arch, encoder, size, crop, 1, device)
        result["predict"]["crop"] = _predict(crop_run, data / "test", Path(tmp) / "crop_pred", device, "", n_test)

        def make():
            return build_model(arch, encoder, "none", in_channels=1, size=size)

        fits = trial_fits(make, build_loss("bce:0.5,dice:0.5"), size, 1, device, resolve_amp("auto", device))
        result["batch_size_auto"] = auto_batch_size(fits, device, 10_000, log=lambda *a: None)
    result["goals"] = _goals(result)
    return result


def _goals(r: dict) -> dict:
    if not r["device"].startswith("cuda"):
        return {k: "n/a on CPU" for k in GOALS}
    got = {"train_loop_share": min(t["loop_share"] for t in r["train"].values()),
           "predict_resize_img_s": r["predict"]["resize"]["img_s"],
           "predict_hflip_img_s": r["predict"]["hflip"]["img_s"], "predict_crop_img_s": r["predict"]["crop"]["img_s"]}
    return {k: {"goal": GOALS[k], "got": got[k], "met": got[k] >= GOALS[k]} for k in GOALS}


def _print(r: dict) -> None:
    print(f"device {r['device']}, {r['image_size']} px images, --size {r['size']}, --crop {r['crop']}")
    print(f"{'part':<34} {'img/s':>8} {'loop share':>11} {'peak GiB':>9}")
    for spec, t in r["train"].items():
        print(f"{'train ' + spec:<34} {t['img_s']:>8.2f} {t['loop_share']:>11.0%} {t['peak_gib'] or 0:>9.2f}")
    for key, t in r["predict"].items():
        print(f"{'predict ' + key:<34} {t['img_s']:>8.2f} {'':>11} {t['peak_gib'] or 0:>9.2f}")
    auto = r["batch_size_auto"]
    print(f"--batch-size auto: {auto['batch_size']} (largest fit {auto['largest_fit']})")
    for k, g in r["goals"].items():
        said = g if isinstance(g, str) else f"{'met' if g['met'] else 'NOT met'} ({g['got']:.2f} vs {g['goal']})"
        print(f"goal {k}: {said}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (CPU, tests)")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--crop", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--images", type=int)
    parser.add_argument("--configs", help="arch/encoder,... (default: unetplusplus/hrnet_w48,unet/resnet34)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(args)
    _print(result)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text)
    return result


if __name__ == "__main__":
    main()
