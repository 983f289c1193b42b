"""``handseg train``: any smp architecture with any smp/timm encoder, resumable, multi-GPU."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from handseg.commands.options import DataDir, Device, Seed


def train(
    ctx: typer.Context,
    data: DataDir = Path("data/train"),
    splits: Annotated[Path | None, typer.Option("--splits", help="splits.json from `handseg kfold` "
                                                "(default: 5 patient-grouped folds, seeded).")] = None,
    fold: Annotated[int, typer.Option("--fold", help="Validation fold; -1 trains on everything.")] = 0,
    arch: Annotated[str, typer.Option("--arch", help="smp architecture: unet, unetplusplus, manet, linknet, fpn, "
                                      "pspnet, deeplabv3, deeplabv3plus, pan, upernet, segformer, dpt."
                                      )] = "unetplusplus",
    encoder: Annotated[str, typer.Option("--encoder", help="smp encoder or any timm model (hrnet_w48, "
                                         "efficientnet_b4, convnext_small, mit_b3, ...).")] = "resnet34",
    encoder_weights: Annotated[str, typer.Option("--encoder-weights", help="imagenet | none | PATH to a local "
                                                 ".pth/.safetensors (machines without network).")] = "imagenet",
    size: Annotated[int, typer.Option("--size", help="Train on images resized to SIZE x SIZE.")] = 1024,
    crop: Annotated[int | None, typer.Option("--crop", help="Instead of resizing, train on random CROP px "
                                             "crops at full resolution (predict uses a sliding window).")] = None,
    epochs: Annotated[int, typer.Option("--epochs", min=1)] = 30,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Per GPU.")] = 4,
    lr: Annotated[float, typer.Option("--lr")] = 1e-3,
    loss: Annotated[str, typer.Option("--loss", help="bce, dice, focal, jaccard (iou), boundary, or a weighted "
                                      "sum like bce:0.5,dice:0.5.")] = "bce:0.5,dice:0.5",
    class_weights: Annotated[str | None, typer.Option("--class-weights", help="29 comma-separated weights.")] = None,
    augment: Annotated[str, typer.Option("--augment", help="none | light | default | strong.")] = "default",
    unify_hands: Annotated[bool, typer.Option("--unify-hands", help="Mirror left hands (and labels) to the "
                                              "right-hand orientation.")] = False,
    val_every: Annotated[int, typer.Option("--val-every", min=1, help="Validate every N epochs.")] = 1,
    amp: Annotated[str, typer.Option("--amp", help="auto (bf16 if supported, else fp16; off on CPU) | bf16 | "
                                     "fp16 | off.")] = "auto",
    compile_model: Annotated[bool, typer.Option("--compile", help="torch.compile the model.")] = False,
    accum: Annotated[int, typer.Option("--accum", min=1, help="Gradient accumulation steps.")] = 1,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="Data loader processes.")] = 4,
    device: Device = "auto",
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/run"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out where it stopped.")] = False,
    extra: Annotated[list[Path] | None, typer.Option("--extra", help="More labelled data (e.g. pseudo labels) "
                                                     "added to training; repeatable.")] = None,
    cache: Annotated[Path | None, typer.Option("--cache", help="Prep cache (default: DATA/cache if present).")] = None,
    seed: Seed = 0,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Stop after this many optimizer steps.")] = None,
    logger: Annotated[str, typer.Option("--logger", help="none | tensorboard | wandb (when installed).")] = "none",
    config: Annotated[Path | None, typer.Option("--config", help="YAML of options (flags given on the command "
                                                "line win).", exists=True, dir_okay=False)] = None,
) -> None:
    """Train a 29-class multi-label segmentation model; checkpoints are self-describing.

    Examples:
      handseg train --data data/train --splits splits.json --fold 0 --encoder hrnet_w48 --size 1024
      torchrun --nproc_per_node 4 -m handseg train --encoder hrnet_w48 --size 2048 --out runs/hr48
    """
    from handseg.console import is_main_process, make_progress, stdout
    from handseg.core.training import TrainConfig
    from handseg.core.training import train as run_training

    params = dict(ctx.params)
    params.pop("config")
    params["compile"] = params.pop("compile_model")
    params["extra"] = list(params["extra"] or [])
    if config is not None:
        params = _apply_config(ctx, params, config)
    if isinstance(params.get("class_weights"), str):
        params["class_weights"] = _parse_weights(params["class_weights"])
    for key in ("data", "splits", "out", "cache"):
        if params.get(key) is not None:
            params[key] = Path(params[key])
    params["extra"] = [Path(p) for p in params["extra"]]
    cfg = TrainConfig(**params)
    say = stdout.print if is_main_process() else (lambda *args, **kwargs: None)  # torchrun: rank 0 speaks
    say("[bold]handseg train[/bold] " + " ".join(f"{k}={v}" for k, v in cfg.to_json().items()))

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

    result = run_training(cfg, log=say, progress_factory=progress_factory)
    best = result["best_dice"]
    say(f"done: {result['epochs']} epochs, {result['steps']} steps; best val dice "
                 f"{best:.4f}" if best is not None else f"done: {result['steps']} steps", f"-> {result['out']}")


def _parse_weights(text: str) -> list[float]:
    from handseg.core.errors import HandsegError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise HandsegError(f"--class-weights {text!r} is not a comma-separated list of numbers") from None


def _apply_config(ctx: typer.Context, params: dict, path: Path) -> dict:
    """defaults < config file < flags given on the command line."""
    import yaml

    from handseg.core.errors import HandsegError

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise HandsegError(f"not valid YAML ({str(e).splitlines()[0]})", path) from None
    if not isinstance(doc, dict):
        raise HandsegError("config must be a mapping of option: value", path)
    for key, value in doc.items():
        name = key.replace("-", "_")
        if name not in params:
            raise HandsegError(f"unknown option {key!r} in config; valid: {', '.join(sorted(params))}", path)
        # --compile is the parameter compile_model (compile is a builtin)
        source = "compile_model" if name == "compile" else name
        # by name: Typer carries its own copy of click, whose ParameterSource is not click's
        given = ctx.get_parameter_source(source)
        if given is None or given.name in ("DEFAULT", "DEFAULT_MAP"):
            params[name] = value
    return params
