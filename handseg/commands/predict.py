"""``handseg predict`` and ``handseg tta``: checkpoints to a submission CSV (and probability maps)."""

from __future__ import annotations

import contextlib
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import Device, Merge, OutFile, Overwrite, TestData
from handseg.formats.probs import PROBS_FORMATS  # the one list of choices (formats/ imports no torch)

Checkpoints = Annotated[list[Path] | None, typer.Argument(help="Run folders or .safetensors checkpoints (several "
                                                          "are averaged, e.g. five folds), or a model zip from "
                                                          "`handseg export`; none with --recipe.",
                                                          metavar="RUN", show_default=False)]
KeepLargest = Annotated[str | None, typer.Option("--keep-largest", help="Keep only the largest connected component "
                                                 "(8-connected) of these classes: 'all' or CLASS,CLASS,...")]
Probs = Annotated[Path | None, typer.Option("--probs", help="Also save per-image probability maps in this folder "
                                            "(uint8, memory-mappable) for `vote soft`, `pseudo` and `select`.")]


ProbsFormat = Enum("ProbsFormat", {f: f for f in PROBS_FORMATS}, type=str)


ProbsFormatOpt = Annotated[ProbsFormat, typer.Option("--probs-format", help="packed: per-class crops (small, "
                                                     "what handseg reads fastest); dense: one (29, H, W) uint8 array "
                                                     "per image (p x 255) that numpy.load reads without handseg.")]
Thresholds = Annotated[Path | None, typer.Option("--thresholds", help="JSON {class: threshold} or a list of 29, each "
                                                 "in (0, 1) (default: the checkpoints' own).")]
TuneThresholds = Annotated[bool, typer.Option("--tune-thresholds", help="Search per-class thresholds on labelled "
                                              "--data; writes OUT.thresholds.json.")]
BatchSize = Annotated[int, typer.Option("--batch-size", min=1, help="Network inputs per forward pass, as in train: "
                                        "whole resized images, or windows of --crop models.")]
NoAmp = Annotated[bool, typer.Option("--no-amp", help="Run in fp32 on GPU.")]
Splits = Annotated[Path | None, typer.Option("--splits", help="splits.json: predict the held-out images of "
                                             "--fold with runs that held it out (e.g. to compare or vote a fold; "
                                             "`train --fold K` writes the RUN/oof/ maps `select` reads).")]
Fold = Annotated[int | None, typer.Option("--fold", min=0, help="With --splits: the fold whose images to predict.")]


def predict(
    checkpoints: Checkpoints = None,
    data: TestData = None,
    out: OutFile = Path("pred.csv"),
    probs: Probs = None,
    probs_format: ProbsFormatOpt = ProbsFormat.packed,
    batch_size: BatchSize = 4,
    thresholds: Thresholds = None,
    tune_thresholds: TuneThresholds = False,
    splits: Splits = None,
    fold: Fold = None,
    keep_largest: KeepLargest = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="recipe.json from `handseg select`: its "
                                                "configurations (folds averaged, their TTA), ensemble, class-wise "
                                                "picks, thresholds and keep-largest; --probs keeps each "
                                                "configuration's maps in a subfolder.")] = None,
    oof: Annotated[bool, typer.Option("--oof", help="With --recipe and labelled --data (the training folder): "
                                      "predict each image with the fold models that did not see it, as select "
                                      "scored them.")] = False,
    masks: Annotated[Path | None, typer.Option("--masks", help="Also write each image's masks as PNGs in this "
                                               "folder: DIR/<stem>/<class>.png, 0 or 255, at the image's size (for "
                                               "tools outside the competition format).")] = None,
    device: Device = "auto",
    no_amp: NoAmp = False,
    overwrite: Overwrite = False,
) -> None:
    """Predict every image of --data and write the competition CSV (default --data: data/test).

    Examples:
      handseg predict runs/fold0 runs/fold1 runs/fold2 --data data/test -o pred.csv --probs probs/
      handseg predict runs/fold0 --splits splits.json --fold 0 --probs oof/fold0 -o oof0.csv
      handseg predict runs/fold0 --data my_xrays/ -o pred.csv       (any folder of PNG/JPEG/DICOM files)
      handseg predict --recipe recipe.json --data data/test -o submission.csv
      handseg predict model.zip --data my_xrays/ -o pred.csv --masks masks/      (PNG masks too)
    """
    if masks is not None:
        from handseg.formats.files import check_output

        check_output(masks, overwrite, "dir", [*(checkpoints or []), data, recipe])  # before any work
    with _model_zip(checkpoints, out, overwrite) as bundle:
        where = "--recipe"
        if bundle is not None:  # a model zip from `handseg export`: its checkpoints, or its recipe
            if recipe is not None:
                from handseg.common.errors import HandsegError

                raise HandsegError("give a model zip or --recipe, not both (a zip holds its own models and recipe)")
            checkpoints, recipe = bundle.checkpoints, bundle.recipe
            where = "this model zip's recipe"
        if recipe is not None:
            _run_recipe(checkpoints, recipe, oof, data, out, probs, batch_size, device, not no_amp, overwrite,
                        [thresholds, tune_thresholds, splits, fold, keep_largest], where, bundle)
        else:
            _run(checkpoints, data, out, probs, "", Merge.mean, thresholds, tune_thresholds, device, not no_amp,
                 "predict", batch_size, overwrite, splits, fold, probs_format, keep_largest, bundle)
    if masks is not None:
        _write_masks(out, masks, overwrite)


def _write_masks(csv: Path, masks: Path, overwrite: bool) -> None:
    """``predict --masks DIR``: the CSV just written, as PNGs of the images its manifest names."""
    from handseg.common.distributed import dist_env
    from handseg.console import progress_task, stdout
    from handseg.data.layout import discover
    from handseg.data.maskpng import write_mask_pngs
    from handseg.formats.files import atomic_dir, read_json, sidecar_manifest_path, write_manifest
    from handseg.formats.submission import read_predictions

    if not dist_env().main:
        return  # under torchrun, rank 0 writes
    data = Path(read_json(sidecar_manifest_path(csv), "manifest")["inputs"]["data"])
    samples = {s.name: s for s in discover(data, labels="ignore", role="test")}
    pred = read_predictions(csv)
    with atomic_dir(masks, overwrite, inputs=[csv, data]) as tmp, progress_task("masks", transient=True) as tick:
        n = write_mask_pngs(pred, samples, Path(tmp), progress=tick)
        write_manifest(tmp, "masks", {"csv": str(csv)}, inputs={"data": str(data)}, images=n)
    stdout.print(f"{n} images' masks -> {masks}/<image>/<class>.png")


def tta(
    checkpoints: Checkpoints = None,
    data: TestData = None,
    out: OutFile = Path("pred_tta.csv"),
    transforms: Annotated[str, typer.Option("--transforms", help="hflip, vflip, scale:S1,S2,... (the "
                                            "identity is always included; scales apply to sliding-window "
                                            "models too).")] = "hflip",
    merge: Annotated[Merge, typer.Option("--merge", help="How the transforms' maps are merged.")] = Merge.mean,
    probs: Probs = None,
    probs_format: ProbsFormatOpt = ProbsFormat.packed,
    batch_size: BatchSize = 4,
    thresholds: Thresholds = None,
    tune_thresholds: TuneThresholds = False,
    splits: Splits = None,
    fold: Fold = None,
    keep_largest: KeepLargest = None,
    device: Device = "auto",
    no_amp: NoAmp = False,
    overwrite: Overwrite = False,
) -> None:
    """Predict with test-time augmentation (ttach); on labelled data, report each transform's Dice.

    Example: handseg tta runs/fold0 --data data/test -o pred_tta.csv --transforms hflip,scale:0.8,1.2 --merge mean
    """
    with _model_zip(checkpoints, out, overwrite) as bundle:
        if bundle is not None:
            if bundle.recipe is not None:
                from handseg.common.errors import HandsegError

                raise HandsegError("this model zip holds a recipe, which sets its own TTA: use `handseg predict`")
            checkpoints = bundle.checkpoints
        _run(checkpoints, data, out, probs, transforms, merge, thresholds, tune_thresholds, device, not no_amp, "tta",
             batch_size, overwrite, splits, fold, probs_format, keep_largest, bundle)


@contextlib.contextmanager
def _model_zip(checkpoints, out: Path, overwrite: bool):
    """A model zip among the checkpoints is opened (beside the output, once the output is known to be
    writable); ``None`` when there is none."""
    from handseg.selection.export import is_model_zip, open_model_zip

    zips = [c for c in checkpoints or [] if is_model_zip(c)]
    if not zips:
        yield None
        return
    from handseg.common.errors import HandsegError
    from handseg.formats.files import check_output

    if len(checkpoints) != 1:
        raise HandsegError("give a model zip alone (it holds every model it needs)")
    check_output(out, overwrite, inputs=zips)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open_model_zip(zips[0], out.parent, out.name) as bundle:
        yield bundle


def _run(checkpoints, data, out, probs, transforms, merge, thresholds, tune, device, amp, stage, batch_size,
         overwrite, splits=None, fold=None, probs_format=ProbsFormat.packed, keep_largest=None, bundle=None):
    from handseg.commands.options import say_data
    from handseg.common.distributed import dist_env
    from handseg.common.errors import HandsegError
    from handseg.common.notices import notice
    from handseg.console import progress_task, stdout
    from handseg.data.layout import resolve_data
    from handseg.ensemble.masks import format_keep_largest, parse_keep_largest
    from handseg.formats.files import atomic_dir, check_output, sidecar_manifest_path, write_manifest
    from handseg.formats.tta import parse_transforms
    from handseg.inference.predictor import say_roi
    from handseg.inference.run import PredictConfig, read_thresholds, run_predictions, write_thresholds
    from handseg.models.checkpoint import read_card, resolve_checkpoint
    from handseg.models.context import model_inputs

    main = dist_env().main
    merge = Merge(merge).value
    if not checkpoints:
        raise HandsegError("give one or more run folders or checkpoints (or --recipe recipe.json with predict)")
    keep = parse_keep_largest(keep_largest)
    # every output is checked before any work: a bad path fails now, not after predicting everything
    sources = [*model_inputs(checkpoints), data if data is not None else Path("data/test"), splits, thresholds]
    if main:
        check_output(out, overwrite, inputs=sources)
        if tune:
            check_output(out.with_name(f"{out.stem}.thresholds.json"), overwrite, inputs=sources)
        if probs is not None:
            check_output(probs, overwrite, "dir", sources)
    resolved = [resolve_checkpoint(c) for c in checkpoints]
    # a model zip's checkpoints are named in it (ZIP:MEMBER), not in the temporary folder they run from
    label = bundle.label if bundle is not None else str
    roi = say_roi([read_card(c) for c in resolved], [label(c) for c in checkpoints])
    if roi and main:
        notice("roi-models", roi)
    transform_list = parse_transforms(transforms)
    thr = read_thresholds(thresholds) if thresholds else None
    samples, context = None, None
    if (splits is None) != (fold is None):
        raise HandsegError("--splits and --fold go together")
    if splits is not None:
        from handseg.data.kfold import fold_samples
        from handseg.inference.cascade import held_out_context

        data, samples = fold_samples(splits, fold, data, checkpoints)
        context = held_out_context(resolved, samples)  # a cascade's stage 1 out-of-fold too, as training had it
    else:
        source = resolve_data(data if data is not None else Path("data/test"), "test")
        if main:
            say_data(source)
        data = source.root
    probs_folder = (atomic_dir(probs, overwrite, main=main, inputs=sources) if probs is not None
                    else contextlib.nullcontext(None))
    with probs_folder as probs_tmp:
        with progress_task(stage) as tick:
            result = run_predictions(
                resolved, data, out, probs_tmp,
                PredictConfig(transforms=transform_list, merge=merge, thresholds=thr, tune=tune, device=device,
                              amp=amp, batch=batch_size, probs_format=ProbsFormat(probs_format).value,
                              keep_largest=keep),
                samples=samples, progress=tick, context_source=context)
        inputs = {"data": str(data), **(bundle.inputs() if bundle is not None else {})}
        options = {"checkpoints": [label(c) for c in resolved], "transforms": [t.name for t in transform_list],
                   "merge": merge, "thresholds": result.thresholds, "tuned": result.tuned, "device": device,
                   "amp": amp, "batch_size": batch_size, "splits": str(splits) if splits else None, "fold": fold,
                   "probs_format": ProbsFormat(probs_format).value, "keep_largest": format_keep_largest(keep)}
        if probs_tmp is not None and result.main:
            write_manifest(probs_tmp, stage, options, inputs=inputs, images=result.images)
    if not result.main:
        return  # under torchrun, rank 0 writes the manifest and prints
    write_manifest(out.parent, stage, options, inputs=inputs,
                   name=sidecar_manifest_path(out).name, output=str(out), images=result.images, dice=result.dice)
    if tune:
        path = out.with_name(f"{out.stem}.thresholds.json")
        write_thresholds(path, result.thresholds)
        stdout.print(f"tuned thresholds -> {path}")
    _say_result(result, out, probs)


def _say_result(result, out: Path, probs: Path | None) -> None:
    """The Dice table on labelled data, and where the predictions went."""
    from rich.table import Table

    from handseg.console import print_table, stdout

    if result.dice:
        table = Table(title="Dice on labelled data" + (" (thresholds tuned on these same images: optimistic)"
                                                       if result.tuned else ""))
        table.add_column("transform")
        table.add_column("mean Dice", justify="right")
        for name, value in result.dice.items():
            table.add_row(name, f"{value:.4f}")
        print_table(stdout, table)
    stdout.print(f"{result.images} images -> {out}" + (f" (probabilities in {probs})" if probs else ""))


def _run_recipe(checkpoints, recipe, oof, data, out, probs, batch_size, device, amp, overwrite, not_with,
                where="--recipe", bundle=None):
    import tempfile

    from handseg.commands.options import say_data
    from handseg.common.distributed import dist_env
    from handseg.common.errors import HandsegError
    from handseg.console import progress_task, stdout
    from handseg.data.layout import resolve_data
    from handseg.formats.files import atomic_dir, check_output, sidecar_manifest_path, write_manifest
    from handseg.selection.apply import recipe_inputs, run_recipe

    if checkpoints:
        raise HandsegError("give run folders or --recipe, not both (the recipe names its runs)")
    if any(v not in (None, False) for v in not_with):
        raise HandsegError(f"{where} sets thresholds, folds and keep-largest itself; drop --thresholds, "
                           "--tune-thresholds, --splits, --fold and --keep-largest")
    if dist_env().world > 1:
        raise HandsegError("--recipe runs in one process; run it without torchrun")
    sources = [recipe, data if data is not None else Path("data/test"), *recipe_inputs(recipe)]
    check_output(out, overwrite, inputs=sources)
    if probs is not None:
        check_output(probs, overwrite, "dir", sources)
    if data is None and oof:
        from handseg.formats.recipe import read_recipe

        data = read_recipe(recipe).data
        if data is None:
            raise HandsegError("the recipe does not name its training data; pass --data", recipe)
    source = resolve_data(Path(data) if data is not None else Path("data/test"), "train" if oof else "test")
    say_data(source)
    if probs is not None:
        maps = atomic_dir(probs, overwrite, inputs=[*sources, source.root])
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        maps = tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.maps-")
    named = bundle.label(recipe) if bundle is not None else str(recipe)  # ZIP:recipe.json, not a temporary path
    inputs = {"data": str(source.root), **(bundle.inputs() if bundle is not None else {})}
    with maps as folder, progress_task("predict --recipe") as tick:
        result = run_recipe(recipe, source.root, out, Path(folder), device, amp, batch_size, progress=tick, oof=oof)
        if probs is not None:
            write_manifest(folder, "predict-recipe", {"recipe": named, "oof": oof},
                           inputs=inputs, members={m: p.name for m, p in result.members.items()})
    write_manifest(out.parent, "predict-recipe", {"recipe": named, "oof": oof, "device": device, "amp": amp,
                   "batch_size": batch_size}, inputs=inputs, name=sidecar_manifest_path(out).name,
                   output=str(out), images=result.images, dice=result.dice)
    if result.dice is not None:
        stdout.print(f"mean Dice on labelled --data: {result.dice:.4f}")
    stdout.print(f"{result.images} images -> {out}" + (f" (maps in {probs})" if probs else ""))
