"""Every encoder family the winning teams used trains, saves, reloads and predicts at any valid size;
impossible combinations stop before training with one line; weights made at 224 load at other sizes."""

from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch

from handseg.common.errors import HandsegError
from handseg.data.images import resize_image
from handseg.formats.tta import Transform
from handseg.inference.predictor import Predictor
from handseg.models.build import build_model
from handseg.models.checkpoint import ModelCard, load_checkpoint, read_card, save_checkpoint
from handseg.models.losses import build_loss
from handseg.models.plan import ModelPlan, model_plan, plan_model
from tests.conftest import run_cli

# (family, arch, encoder): the smallest member of each family, with an architecture a team used it in
FAMILIES = [
    ("swin", "upernet", "swin_tiny_patch4_window7_224"),
    ("vit", "dpt", "vit_tiny_patch16_224"),
    ("hiera", "unet", "hiera_tiny_224"),
    ("sam2", "unet", "sam2_hiera_tiny"),
    ("mit", "segformer", "mit_b0"),
    ("convnext", "upernet", "convnext_atto"),
    ("hrnet", "unetplusplus", "hrnet_w18_small"),
    ("efficientnet", "deeplabv3plus", "efficientnet-b0"),
    ("resnet", "unet", "resnet18"),
    ("resnext", "fpn", "resnext26ts"),
    ("regnet", "unetplusplus", "regnetx_002"),
]
HEAVY = {"swin", "sam2", "hrnet"}  # a few seconds each on two cores
SIZED = {"swin", "vit", "hiera", "sam2"}  # transformers: their crop model is built and run at another size
SIZE, CROP = 64, 96


def _params(fams):
    return [pytest.param(f, a, e, id=f, marks=[pytest.mark.slow] if f in HEAVY else []) for f, a, e in fams]


def _train_step(model, side: int) -> float:
    """One AdamW step on a (2, 1, side, side) batch; asserts the encoder learnt something."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, side, side, generator=gen)
    y = (torch.rand(2, 29, side, side, generator=gen) > 0.9).float()
    first = next(p for p in model.encoder.parameters() if p.requires_grad)
    before = first.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    logits = model(x)
    assert logits.shape == (2, 29, side, side)
    loss = build_loss("bce:0.5,dice:0.5")(logits, y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(first.detach(), before)
    return loss.item()


def _image(h: int = 100, w: int = 120) -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (h, w), dtype=np.uint8)


def _reload_identical(model, card: ModelCard, path):
    save_checkpoint(path, model, card)
    loaded, card2 = load_checkpoint(path)
    assert card2.plan == model_plan(model).to_dict()
    own = model.state_dict()
    assert all(torch.equal(v, own[k]) for k, v in loaded.state_dict().items())
    return loaded, card2


@pytest.mark.parametrize("family,arch,encoder", _params(FAMILIES))
def test_family_trains_reloads_and_predicts_resized_and_cropped(family, arch, encoder, tmp_path):
    image = _image()
    # --size: trained on whole images resized to SIZE; predict resizes a 100 x 120 image there and back
    model = build_model(arch, encoder, "none", size=SIZE)
    assert model_plan(model).size == SIZE
    _train_step(model, SIZE)
    loaded, card = _reload_identical(model, ModelCard(arch=arch, encoder=encoder, size=SIZE), tmp_path / "r.st")
    probs = Predictor([loaded], [card], "cpu").probs(image).numpy()
    # the definition of the resize path, computed here with the original model: training's resize
    # (cv2 INTER_AREA on the uint8 image) in, bilinear out
    small_image = resize_image(image, (SIZE, SIZE))
    x = torch.from_numpy(small_image).float().div(255).sub(card.norm["mean"]).div(card.norm["std"])[None, None]
    model.eval()
    with torch.no_grad():
        small = model(x)
        want = torch.nn.functional.interpolate(small, size=image.shape, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(probs, want.sigmoid()[0].numpy(), atol=1e-5)
    # a test-time scale runs the model at 1.5 x its size, except where timm built it for one size only
    if model_plan(loaded).fixed:
        with pytest.raises(HandsegError, match=f"runs only at {SIZE} px.*{SIZE * 3 // 2} px"):
            Predictor([loaded], [card], "cpu").probs(image, Transform("scale1.5", scale=1.5))
    else:
        assert Predictor([loaded], [card], "cpu").probs(image, Transform("scale1.5", scale=1.5)).shape == (29, 100, 120)

    # --crop: trained on crops; predict slides a crop-sized window over the image (stride crop/2). A CNN
    # is the same model at any size, so the one above serves; transformers are built for the crop.
    crop = CROP if family in SIZED else SIZE
    if family in SIZED:
        model = build_model(arch, encoder, "none", size=crop, size_flag="--crop")
        assert model_plan(model).encoder_kwargs.get("img_size", crop) == crop
        _train_step(model, crop)
    card = ModelCard(arch=arch, encoder=encoder, size=SIZE, crop=crop)
    loaded, card = _reload_identical(model, card, tmp_path / "c.st")
    got = Predictor([loaded], [card], "cpu").probs(image)
    same = Predictor([model.eval()], [card], "cpu").probs(image)
    assert got.shape == (29, 100, 120) and torch.allclose(got, same, atol=1e-6)


def test_transformers_are_built_for_the_size_and_say_what_else_they_take():
    swin = plan_model("upernet", "swin_tiny_patch4_window7_224", 64)
    assert swin.encoder_kwargs == {"img_size": 64, "dynamic_img_size": True} and not swin.fixed
    assert swin.run_side(64 * 1.5) == 96  # a test-time scale runs at the nearest multiple of 32
    vit = plan_model("dpt", "vit_tiny_patch16_224", 128)
    assert vit.encoder_kwargs == {"img_size": 128, "dynamic_img_size": True}
    hiera = plan_model("unet", "hiera_tiny_224", 128)
    assert hiera.fixed and hiera.encoder_kwargs == {"img_size": 128} and hiera.run_side(128.0) == 128
    with pytest.raises(HandsegError, match="runs only at 128 px"):
        hiera.run_side(128 * 1.25)
    assert plan_model("unet", "sam2_hiera_tiny", 96).encoder_kwargs == {}  # takes any size as it is
    assert plan_model("unet", "resnet18", 96) == ModelPlan(size=96)  # CNNs: nothing to add
    # pan dilates to stride 16; an encoder that cannot (hrnet) runs it at stride 32
    assert plan_model("pan", "hrnet_w18_small", 256).arch_kwargs == {"encoder_output_stride": 32}
    assert plan_model("pan", "resnet18", 128).arch_kwargs == {}


@pytest.mark.parametrize("arch,encoder,size,message", [
    ("dpt", "resnet18", 64, r"^dpt \+ resnet18: dpt takes timm encoders only .* use tu-resnet18$"),
    ("unet", "vit_tiny_patch16_224", 64, r"^unet \+ tu-vit_tiny_patch16_224: .*one scale \(stride 16\).*only --arch "
                                         r"dpt can use it$"),
    ("deeplabv3plus", "swin_tiny_patch4_window7_224", 64, r"tu-swin_tiny_patch4_window7_224 cannot be dilated; "
                                                          r"use unet, unetplusplus"),
    ("upernet", "swin_tiny_patch4_window7_224", 250, r"^--size 250: upernet \+ tu-swin_tiny_patch4_window7_224 "
                                                     r"needs a multiple of 32; use 224 or 256$"),
    ("pan", "resnet18", 64, r"^--size 64: pan \+ resnet18 cannot run at 64 px \(.*too small\); the smallest size it "
                            r"runs at is 128$"),
    ("linknet", "mit_b0", 64, r"^linknet \+ mit_b0 cannot be built: ValueError: .*not supported for Linknet$"),
])
def test_impossible_combinations_are_one_line_errors(arch, encoder, size, message):
    with pytest.raises(HandsegError, match=message) as info:
        build_model(arch, encoder, "none", size=size)
    assert "\n" not in str(info.value)


def test_planning_leaves_the_random_stream_alone():
    """A seeded run starts from the same weights whether or not the plan's trial builds ran first."""
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    plan_model("upernet", "swin_tiny_patch4_window7_224", 64)
    assert torch.equal(torch.rand(3), want)


def test_timm_encoders_refuse_smp_weight_names():
    """smp's own encoders have weights named ssl, swsl...; for a timm encoder any such name would
    quietly have meant timm's default weights."""
    with pytest.raises(HandsegError, match=r"--encoder-weights 'ssl': timm encoders take imagenet, none or a file"):
        build_model("unet", "convnext_atto", "ssl", size=64)


def test_cli_refuses_an_impossible_combination_before_training(synth_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", synth_data / "train", "--arch", "dpt", "--encoder", "resnet18",
                            "--size", 64, "--epochs", 1, "--workers", 0, "--device", "cpu", "--encoder-weights", "none",
                            "--out", out], capsys)
    assert code == 2 and "Traceback" not in err
    assert "dpt takes timm encoders only" in err and "tu-resnet18" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.slow
def test_cli_trains_a_swin_upernet_and_predicts_from_the_run_alone(synth_data, tmp_path, capsys):
    run = tmp_path / "swin"
    code, _, err = run_cli(["train", "--data", synth_data / "train", "--arch", "upernet", "--encoder",
                            "swin_tiny_patch4_window7_224", "--size", 64, "--epochs", 1, "--batch-size", 2,
                            "--max-steps", 2, "--augment", "none", "--workers", 0, "--device", "cpu",
                            "--encoder-weights", "none", "--out", run], capsys)
    assert code == 0, err
    card = read_card(run)
    assert card.plan["size"] == 64 and card.plan["encoder_kwargs"] == {"img_size": 64, "dynamic_img_size": True}
    pred = tmp_path / "pred.csv"
    code, _, err = run_cli(["predict", run, "--data", synth_data / "test", "-o", pred, "--device", "cpu"], capsys)
    assert code == 0, err
    rows = list(csv.DictReader(open(pred)))
    images = {p.name for p in (synth_data / "test").rglob("*.png")}
    assert {r["image_name"] for r in rows} == images and len(rows) == 29 * len(images)


def test_a_card_without_a_plan_rebuilds_from_arch_encoder_and_size(tmp_path):
    """Checkpoints written before plans existed: the plan is worked out again from the card."""
    model = build_model("unet", "resnet18", "none", size=64)
    delattr(model, "handseg_plan")
    save_checkpoint(tmp_path / "old.st", model, ModelCard(arch="unet", encoder="resnet18", size=64))
    assert read_card(tmp_path / "old.st").plan is None
    loaded, _ = load_checkpoint(tmp_path / "old.st")
    assert model_plan(loaded) == ModelPlan(size=64)
    # a card whose plan was cut short (edited by hand, written by a broken tool)
    save_checkpoint(tmp_path / "bad.st", model, ModelCard(arch="unet", encoder="resnet18", size=64, plan={"size": 64}))
    with pytest.raises(HandsegError, match="bad.st: cannot rebuild the checkpoint's model: malformed model plan"):
        load_checkpoint(tmp_path / "bad.st")


# ----------------------------------------------------------------------------------------------
# weights made at 224 into models built for other sizes


def _ramp_pos_embed(grid: int, prefix: int, dim: int) -> torch.Tensor:
    """A ``(1, prefix + grid*grid, dim)`` table whose value is the token's column centre in [0, 1]:
    resampled to any grid it must stay the column centre there."""
    cols = ((torch.arange(grid) + 0.5) / grid).view(1, grid, 1).expand(grid, grid, dim).reshape(1, grid * grid, dim)
    return torch.cat([torch.full((1, prefix, dim), 7.0), cols], dim=1)


def _check_ramp(table: torch.Tensor, grid: int, prefix: int) -> None:
    assert table.shape[1] == prefix + grid * grid
    assert torch.all(table[0, :prefix] == 7.0)  # class token: no position, copied as it is
    want = ((torch.arange(grid) + 0.5) / grid).view(1, grid, 1)
    got = table[0, prefix:, 0].view(grid, grid, 1)
    assert torch.allclose(got, want.expand(grid, grid, 1), atol=0.02)


def _save(state: dict, path) -> str:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return str(path)


def test_vit_weights_at_224_load_into_a_model_built_for_64(tmp_path):
    import timm

    src = timm.create_model("vit_tiny_patch16_224")
    state = src.state_dict()
    state["pos_embed"] = _ramp_pos_embed(14, 1, state["pos_embed"].shape[2])
    model = build_model("dpt", "vit_tiny_patch16_224", _save(state, tmp_path / "vit.safetensors"), size=64)
    vit = model.encoder.model
    _check_ramp(vit.pos_embed.detach(), 4, 1)
    assert torch.equal(vit.patch_embed.proj.weight, state["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert torch.equal(vit.blocks[5].mlp.fc2.weight, state["blocks.5.mlp.fc2.weight"])
    # a tensor of the wrong shape that is no position table: refused by name, nothing loaded in silence
    broken = dict(state, **{"blocks.5.mlp.fc2.weight": state["blocks.5.mlp.fc2.weight"][:10]})
    with pytest.raises(HandsegError, match=r"vit.safetensors: weights: blocks.5.mlp.fc2.weight has shape \(10, 768\) "
                                           r"but this encoder needs \(192, 768\)"):
        build_model("dpt", "vit_tiny_patch16_224", _save(broken, tmp_path / "vit.safetensors"), size=64)


@pytest.mark.slow
def test_swin_and_hiera_weights_at_224_load_at_64_and_imagenet_goes_the_same_way(tmp_path, monkeypatch):
    import timm

    import handseg.models.build as models  # where build_model looks the pretrained state up

    state = timm.create_model("swin_tiny_patch4_window7_224").state_dict()
    # saved in the original repository's layout (each stage ends with the next one's downsampling),
    # which timm's Swin filter converts
    original = {re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
                for k, v in state.items()}
    assert "layers.0.downsample.reduction.weight" in original
    model = build_model("upernet", "swin_tiny_patch4_window7_224", _save(original, tmp_path / "swin.safetensors"),
                        size=64)
    swin = model.encoder.model
    assert torch.equal(swin.layers_1.downsample.reduction.weight, state["layers.1.downsample.reduction.weight"])
    # at 64 px the last stages' maps are 4 x 4 and 2 x 2: their windows shrink from 7 and with them the
    # relative position tables (13 x 13 offsets -> 7 x 7 and 3 x 3); offset (0, 0) keeps its bias
    first, last = "layers.0.blocks.0.attn.", "layers.3.blocks.1.attn."
    assert torch.equal(swin.layers_0.blocks[0].attn.relative_position_bias_table,
                       state[first + "relative_position_bias_table"])
    table = swin.layers_3.blocks[1].attn.relative_position_bias_table
    assert table.shape == (9, state[last + "relative_position_bias_table"].shape[1])
    assert torch.allclose(table[4], state[last + "relative_position_bias_table"][84], atol=1e-5)
    assert torch.equal(swin.layers_3.blocks[1].attn.qkv.weight, state[last + "qkv.weight"])

    hiera_state = timm.create_model("hiera_tiny_224").state_dict()
    hiera_state["pos_embed"] = _ramp_pos_embed(56, 0, hiera_state["pos_embed"].shape[2])
    hiera = build_model("unet", "hiera_tiny_224", _save(hiera_state, tmp_path / "h.safetensors"), size=64)
    hiera = hiera.encoder.model
    _check_ramp(hiera.model.pos_embed.detach(), 16, 0)
    # --encoder-weights imagenet at another size: timm's 224 weights, resized by the same loader
    monkeypatch.setattr(models, "_timm_pretrained_state", lambda name: dict(hiera_state))
    hiera = build_model("unet", "hiera_tiny_224", "imagenet", size=64).encoder.model
    _check_ramp(hiera.model.pos_embed.detach(), 16, 0)
