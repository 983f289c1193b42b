"""``handseg train``: any smp architecture with any smp/timm encoder, resumable, multi-GPU."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, Device, Seed
from handseg.data.roi import ROI_MARGIN


class Augment(str, Enum):
    none = "none"
    light = "light"
    default = "default"
    strong = "strong"


class Amp(str, Enum):
    auto = "auto"
    bf16 = "bf16"
    fp16 = "fp16"
    off = "off"


class Logger(str, Enum):
    none = "none"
    tensorboard = "tensorboard"
    wandb = "wandb"


def complete_arch(incomplete: str) -> list[str]:
    """Tab completion of --arch from smp's registry."""
    from handseg.models.plan import architectures

    return [a for a in architectures() if a.startswith(incomplete.lower())]


def complete_encoder(incomplete: str) -> list[str]:
    """Tab completion of --encoder from smp's encoders and timm's models (``tu-`` names too)."""
    import segmentation_models_pytorch as smp
    import timm

    if incomplete.startswith("tu-"):
        return [f"tu-{m}" for m in timm.list_models(f"{incomplete[3:]}*")]
    names = [n for n in smp.encoders.encoders if n.startswith(incomplete)]
    return list(dict.fromkeys(names + timm.list_models(f"{incomplete}*")))


def train(
    ctx: typer.Context,
    data: DataDir = Path("data/train"),
    splits: Annotated[Path | None, typer.Option("--splits", help="splits.json from `handseg kfold` "
                                                "(default: 5 patient-grouped folds, seeded).")] = None,
    fold: Annotated[int, typer.Option("--fold", min=-1, help="Validation fold; -1 trains on everything.")] = 0,
    arch: Annotated[str, typer.Option("--arch", help="smp architecture: unet, unetplusplus, manet, linknet, fpn, "
                                      "pspnet, deeplabv3, deeplabv3plus, pan, upernet, segformer, dpt.",
                                      metavar="ARCH", autocompletion=complete_arch)] = "unetplusplus",
    encoder: Annotated[str, typer.Option("--encoder", help="smp encoder or any timm model (hrnet_w48, "
                                         "efficientnet_b4, convnext_small, mit_b3, ...).", metavar="ENCODER",
                                         autocompletion=complete_encoder)] = "resnet34",
    encoder_weights: Annotated[str, typer.Option("--encoder-weights", help="imagenet | none | PATH to a local "
                                                 ".pth/.safetensors (machines without network).")] = "imagenet",
    size: Annotated[int, typer.Option("--size", min=1, help="Train on images resized to SIZE x SIZE.")] = 1024,
    crop: Annotated[int | None, typer.Option("--crop", min=1, help="Instead of resizing, train on random CROP px "
                                             "crops at full resolution (predict uses a sliding window).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1, help="Passes over the training images (the "
                                        "learning-rate schedule: warm-up, then cosine over all of them).")] = 30,
    batch_size: Annotated[str, typer.Option("--batch-size", help="Network inputs per forward pass, per GPU "
                                            "(resized images, or crops), or auto: the largest that fits the GPU "
                                            "(trial steps, with a margin; on CPU a small batch).")] = "4",
    lr: Annotated[float, typer.Option("--lr", help="Peak learning rate (AdamW, warm-up then cosine).")] = 1e-3,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay.")] = 1e-4,
    loss: Annotated[str, typer.Option("--loss", help="bce, dice, focal, jaccard (iou), tversky, lovasz, boundary, "
                                      "or a weighted sum like bce:0.5,dice:0.5.")] = "bce:0.5,dice:0.5",
    class_weights: Annotated[str | None, typer.Option("--class-weights", help="29 comma-separated weights.")] = None,
    augment: Annotated[Augment, typer.Option("--augment", help="Augmentation preset.")] = Augment.default,
    unify_hands: Annotated[bool, typer.Option("--unify-hands", help="Mirror left hands (and labels) to the "
                                              "right-hand orientation.")] = False,
    val_every: Annotated[int, typer.Option("--val-every", min=1, help="Validate every N epochs.")] = 1,
    amp: Annotated[Amp, typer.Option("--amp", help="Mixed precision: auto is bf16 where supported, else fp16; "
                                     "off on CPU.")] = Amp.auto,
    channels_last: Annotated[bool, typer.Option("--channels-last/--no-channels-last", help="channels_last memory "
                                                "format on CUDA.")] = True,
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    accum: Annotated[int, typer.Option("--accum", min=1, help="Gradient accumulation steps.")] = 1,
    workers: Annotated[int | None, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes "
                                                "(default: fitted to the CPUs this process may use, or to "
                                                "`handseg --threads N`; 0 loads in the main process).",
                                                show_default=False)] = None,
    device: Device = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/run"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped "
                                        "(--lr, --batch-size, --accum and --epochs not given are the run's).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run folder as a whole (kept "
                                            "until the new run's first checkpoint).")] = False,
    extra: Annotated[list[Path] | None, typer.Option("--extra", help="More labelled data (e.g. pseudo labels) "
                                                     "added to training; several: --extra A B.",
                                                     metavar="DIR")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Prep cache (default: DATA/cache if present).")] = None,
    seed: Seed = 0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Stop after this many optimizer "
                                                  "steps.")] = None,
    logger: Annotated[Logger, typer.Option("--logger", help="Metrics logger (tensorboard, wandb: when "
                                           "installed).")] = Logger.none,
    context: Annotated[list[Path] | None, typer.Option("--context", help="A cascade's stage 1: whole-image run "
                                                       "folders (e.g. each fold of a --size 512 model) whose maps "
                                                       "become extra input channels of this --crop model; "
                                                       "several: --context A B C.", metavar="RUN")] = None,
    oof_tta: Annotated[str, typer.Option("--oof-tta", help="Test-time transforms of the fold's out-of-fold maps "
                                         "(RUN/oof/, for `handseg select`), e.g. hflip.")] = "",
    keep_resume: Annotated[bool, typer.Option("--keep-resume/--no-keep-resume", help="Keep the resume state "
                                              "(resume-<epoch>.safetensors, about twice the weights' size) when "
                                              "the run finishes; best and last stay either way. Without it the "
                                              "run cannot be continued with --resume (`handseg prune RUN` drops "
                                              "it later).")] = True,
    preprocess: Annotated[str | None, typer.Option("--preprocess", help="Fixed pre-processing of every input image, "
                                                   "in training and wherever the model predicts (recorded in its "
                                                   "card): clahe[:CLIP[:TILE]], default clip 2, 8x8 tiles.")] = None,
    init: Annotated[Path | None, typer.Option("--init", help="Start every layer from a trained model (a run "
                                              "folder: its best; or a checkpoint) with a fresh optimizer and "
                                              "schedule, e.g. to fine-tune on pseudo labels at a low --lr; the "
                                              "card records the parent's SHA-256. Not --resume (same run, same "
                                              "schedule), not --encoder-weights (encoder only).")] = None,
    patience: Annotated[int | None, typer.Option("--patience", min=1, help="Stop when the validation Dice has not "
                                                 "improved for N validations (the learning-rate schedule is not "
                                                 "re-planned).")] = None,
    ema: Annotated[float | None, typer.Option("--ema", help="Keep an exponential moving average of the weights "
                                              "with this decay (e.g. 0.999): validation, best, last and the "
                                              "out-of-fold maps use it; --resume continues it.")] = None,
    roi: Annotated[str | None, typer.Option("--roi", help="Train a model for a group of bones on a box around them "
                                            "at full resolution (resized to --size): carpals, or class names "
                                            "(Scaphoid,Lunate). The box comes from the labels in training and from "
                                            "the --context runs' masks at prediction; predict takes only these "
                                            "classes from it, and select can choose them per class.",
                                            metavar="CLASSES")] = None,
    roi_margin: Annotated[float, typer.Option("--roi-margin", min=0.0, max=2.0, help="The ROI box's margin on each "
                                              "side, as a share of the classes' extent.")] = ROI_MARGIN,
    config: Annotated[Path | None, typer.Option("--config", help="YAML of training options, or a run's "
                                                "manifest.json to replay it (flags given on the command line win; "
                                                "--out, --overwrite and --resume come from the command line only). "
                                                "Relative paths in it are taken from the YAML file's folder, or "
                                                "from the folder a replayed run was started in.",
                                                dir_okay=False)] = None,
) -> None:
    """Train a 29-class multi-label segmentation model; checkpoints are self-describing.

    Examples:
      handseg train --data data/train --splits splits.json --fold 0 --encoder hrnet_w48 --size 1024
      handseg train --config runs/hr48_f0/manifest.json --fold 1 --out runs/hr48_f1      (replay a run)
      handseg train --crop 1024 --context runs/low_f0 runs/low_f1 --fold 0 --out runs/cascade_f0   (a cascade)
      handseg train --init runs/hr48_f0 --extra pseudo --lr 5e-5 --epochs 20 --out runs/hr48_ft_f0   (fine-tune)
      handseg train --roi carpals --size 768 --context runs/low_f0 runs/low_f1 --fold 0 --out runs/wrist_f0   (ROI)
      torchrun --nproc_per_node 4 -m handseg train --encoder hrnet_w48 --size 2048 --out runs/hr48
    """
    from handseg.console import is_main_process, log, make_progress, stdout
    from handseg.training.config import TrainConfig
    from handseg.training.loop import train as run_training

    params = {k: (v.value if isinstance(v, Enum) else v) for k, v in ctx.params.items()}
    params.pop("config")
    params["compile"] = params.pop("compile_model")
    params["extra"] = list(params["extra"] or [])
    params["context"] = list(params["context"] or [])
    if resume:
        from handseg.training.state import saved_schedule

        # the run's own values where none is given: its optimizer and schedule state were made with them
        params.update({k: v for k, v in saved_schedule(out).items() if not _given(ctx, k)})
    if config is not None:
        params = _apply_config(ctx, params, config)
    cfg = TrainConfig(**params).validated()  # one check for flags and config alike
    def quiet_print(*args, **kwargs):
        return None

    # torchrun: rank 0 speaks; epoch lines are messages (--quiet hides them), the summary a result
    say = log.print if is_main_process() else quiet_print
    result_line = stdout.print if is_main_process() else quiet_print

    progress_cm = make_progress()

    def progress_factory(description: str, total: int):
        progress_cm.start()
        task = progress_cm.add_task(description, total=total, info="")

        def update(info):
            if info is None:
                progress_cm.remove_task(task)
                progress_cm.stop()
            else:
                progress_cm.update(task, advance=1, **({"info": info} if info else {}))  # "": advance only

        return update

    try:
        result = run_training(cfg, log=say, progress_factory=progress_factory)
    except BaseException:
        progress_cm.live.transient = True  # a failed run says one line, without a half-drawn bar above it
        raise
    finally:
        progress_cm.stop()
    if not cfg.keep_resume and is_main_process():
        _drop_resume(result["out"], say)
    if result.get("finished"):
        return
    best = result["best_dice"]
    summary = (f"done: {result['epochs']} epoch{'s' if result['epochs'] != 1 else ''}, {result['steps']} "
               f"step{'s' if result['steps'] != 1 else ''} in all")
    result_line(f"{summary}; best val dice {best:.4f}" if best is not None else summary, f"-> {result['out']}")


def _drop_resume(out, say) -> None:
    """``--no-keep-resume``: the finished run's resume state goes (best and last stay)."""
    from handseg.training.state import prune_resume

    removed = prune_resume(Path(out))
    if removed:
        say(f"--no-keep-resume: removed {', '.join(p.name for p, _ in removed)} "
            f"({sum(n for _, n in removed) / 2**20:.1f} MiB)")


def _apply_config(ctx: typer.Context, params: dict, path: Path) -> dict:
    """defaults < config file < flags given on the command line. The file is a YAML mapping of options,
    or a run's ``manifest.json`` (its ``options`` are replayed, but for its ``out``, ``overwrite`` and
    ``resume``). Relative paths in the file (``data``, ``splits``, ``cache``, ``extra``, ``context``,
    ``encoder_weights``) are taken from the YAML file's folder, or from the folder the run was started in
    (:func:`_run_started_in`), so a config replays from any working folder.

    Raises:
        HandsegError: the file is unreadable, sets an unknown option, or sets ``out``, ``overwrite`` or
            ``resume`` (the command line alone decides where a run goes and what happens to a folder there).
    """
    import yaml

    from handseg.common.errors import HandsegError
    from handseg.training.config import RUN_FOLDER_OPTIONS

    if not path.is_file():
        raise HandsegError("config file not found", path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except RecursionError:
        raise HandsegError("the configuration is nested too deeply", path) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise HandsegError(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if not isinstance(doc, dict):
        raise HandsegError("config must be a mapping of option: value", path)
    base = path.parent
    if doc.get("stage") == "train" and isinstance(doc.get("options"), dict):
        base = _run_started_in(path, doc["options"].get("out"))
        # replay a run: its manifest records where it went and how, which the new run does not inherit
        doc = {k: v for k, v in doc["options"].items() if str(k).replace("-", "_") not in RUN_FOLDER_OPTIONS}
    doc = {k: _relative_to(base, str(k).replace("-", "_"), v) for k, v in doc.items()}
    for key, value in doc.items():
        name = str(key).replace("-", "_")
        if name in RUN_FOLDER_OPTIONS:
            raise HandsegError(f"{key!r} cannot be set in a config file (it sets training options only); pass "
                               f"--{name} on the command line", path)
        if name not in params:
            raise HandsegError(f"unknown option {key!r} in config; valid: {', '.join(sorted(params))}", path)
        if not _given(ctx, name):
            params[name] = value
    return params


PATH_OPTIONS = ("data", "splits", "cache", "extra", "context", "encoder_weights")
"""Options whose values are paths: in a config file they are relative to the file, as in recipes and vote maps."""


def _relative_to(base: Path, name: str, value):
    """A config file's relative path taken from ``base`` (``--encoder-weights`` only where it names a file
    there: else it is a name such as ``imagenet``)."""
    import os

    if name not in PATH_OPTIONS or value is None:
        return value
    if isinstance(value, list):
        return [_relative_to(base, name, v) for v in value]
    if not isinstance(value, str) or value == "" or Path(value).is_absolute():
        return value
    if name == "encoder_weights" and not (base / value).exists():
        return value
    return os.path.normpath(base / value)


def _run_started_in(manifest: Path, out) -> Path:
    """The folder a run was started in, found from its manifest: the manifest lies in ``out``, so a
    relative ``out`` of N parts puts that folder N levels above the manifest's (where the run's relative
    ``--data``, ``--splits`` ... point from). With an absolute ``out``, the manifest's own folder."""
    parts = Path(str(out)).parts if isinstance(out, str) and out else ()
    if not parts or Path(out).is_absolute() or ".." in parts:
        return manifest.parent
    base = manifest.parent
    for _ in parts:
        base = base / ".."
    return base


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    # --compile is the parameter compile_model (compile is a builtin)
    source = ctx.get_parameter_source("compile_model" if name == "compile" else name)
    # by name: Typer carries its own copy of click, whose ParameterSource is not click's
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


LIST_OPTIONS = ("--context", "--extra", "--pred")
"""Options of train (and eda's --pred) that take several values, typed the way people type lists
(``--context A B C``)."""


def expand_list_options(argv: list[str]) -> list[str]:
    """``train --context A B`` -> ``train --context A --context B`` (train and eda take no arguments, so a
    bare word after such an option can only be another of its values)."""
    words = [str(a) for a in argv]
    command = next((i for i, w in enumerate(words) if not w.startswith("-")), None)
    if command is None or words[command] not in ("train", "eda"):
        return words
    out, listing = words[: command + 1], False
    for w in words[command + 1 :]:
        if w.startswith("-"):
            listing = w in LIST_OPTIONS
            out.append(w)
            last_flag = w
        elif listing and out[-1] != last_flag:
            out += [last_flag, w]
        else:
            out.append(w)
    return out
