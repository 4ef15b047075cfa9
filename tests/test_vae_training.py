"""VAE training (latentdit.vae.training, tools/train_vae.py): image folders, export, exact resume (also
after SIGKILL), discriminator warm-up, the adaptive GAN weight, the hinge loss, config errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from latentdit.vae.config import load_vae_config
from latentdit.errors import LatentDiTError
from latentdit.io import load_safetensors, read_json, torch_load
from script_helpers import load_tool

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "train_vae.py"

TINY = ["data.image_size=16", "data.crop_size=8", "data.val_fraction=0.25", "model.block_out_channels=[8,16]",
        "model.norm_num_groups=4", "train.batch_size=4", "train.warmup_steps=0", "train.min_lr_ratio=1",
        "train.stats_images=8", "train.eval_images=4", "train.eval_check_images=2", "train.sample_every=2",
        "train.ckpt_every=2", "loss.disc_weight=0.5", "loss.disc_start=2", "loss.disc_layers=1",
        "loss.disc_channels=8", "loss.fft_weight=0.1"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two class folders of RGBA / palette / grey PNGs of mixed sizes (flat shapes on transparency)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("clipart")
    rng = np.random.default_rng(0)
    for c, cls in enumerate(("animals", "tools")):
        (root / cls).mkdir()
        for i in range(8):
            h, w = 20 + 4 * i, 28 + 2 * i
            a = np.zeros((h, w, 4), np.uint8)
            y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
            a[y:y + h // 2, x:x + w // 2, :3] = rng.integers(0, 256, 3)
            a[y:y + h // 2, x:x + w // 2, 3] = 255
            image = Image.fromarray(a, "RGBA")
            if i % 3 == 1:
                image = image.convert("RGB").convert("P")
            elif i % 3 == 2:
                image = image.convert("LA")
            image.save(root / cls / f"{cls}_{i}.png")
    return root


def tiny_cfg(folder: Path, *extra: str):
    return load_vae_config(None, TINY + [f"data.source={folder}", *extra])


def random_images(n: int = 12, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# ------------------------------------------------------------------------------------------ a run on a folder


def test_folder_run_exports_a_vae_for_from_pretrained_and_extract(image_folder, tmp_path):
    from diffusers import AutoencoderKL

    tool = load_tool("train_vae")
    run = tmp_path / "run"
    assert tool.main(["--data", str(image_folder), "--out", str(run), "--intended-use", "flat shapes",
                      *TINY, "train.steps=4"]) == 0
    vae_dir = run / "vae"
    model = AutoencoderKL.from_pretrained(str(vae_dir))
    card = read_json(vae_dir / "model_card.json")
    # 16 images, a quarter held out by the seeded permutation; the held-out names are recorded
    assert card["train_images"] == 12 and card["val_images"] == 4 and len(card["held_out_names"]) == 4
    assert all(name.split("/")[0] in ("animals", "tools") for name in card["held_out_names"])
    assert model.config.scaling_factor == pytest.approx(1 / card["latent_std"], rel=1e-9)
    assert len(model.config.latents_mean) == len(model.config.latents_std) == 4
    assert card["steps_done"] == 4 and "flat shapes" in (vae_dir / "MODEL_CARD.md").read_text()
    # held-out colour difference, on the same images as the PSNR, in the card and its text
    assert 0 < card["delta_e2000"] < 100
    assert f"ΔE **{card['delta_e2000']:.2f}**" in (vae_dir / "MODEL_CARD.md").read_text()
    assert (run / "samples" / "step-0000004.png").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]

    latents = tmp_path / "latents"
    assert load_tool("extract").main(["--data", str(image_folder), "--vae", str(vae_dir), "--image-size", "16",
                                      "--out", str(latents), "--num-workers", "0", "--no-progress"]) == 0
    manifest = read_json(latents / "manifest.json")
    assert manifest["num_items"] == 16 and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["scaling_factor"] == pytest.approx(model.config.scaling_factor)
    assert manifest["latent_norm"] is None  # the default: x scaling_factor, as before

    # per-channel normalisation: recorded in the manifest, applied by the training data, inverted by decode
    from latentdit.vae import VAE
    from latentdit.data.latents import LatentDataset

    per_channel = tmp_path / "latents-pc"
    assert load_tool("extract").main(["--data", str(image_folder), "--vae", str(vae_dir), "--image-size", "16",
                                      "--out", str(per_channel), "--num-workers", "0", "--no-progress",
                                      "--latent-norm", "per-channel"]) == 0
    assert read_json(per_channel / "manifest.json")["latent_norm"]["kind"] == "per-channel"
    scalar_item, _ = LatentDataset(latents, seed=3)[5]
    pc_item, _ = LatentDataset(per_channel, seed=3)[5]
    raw = scalar_item / model.config.scaling_factor
    mean = torch.tensor(model.config.latents_mean).view(4, 1, 1)
    std = torch.tensor(model.config.latents_std).view(4, 1, 1)
    torch.testing.assert_close(pc_item, (raw - mean) / std, rtol=1e-4, atol=1e-4)
    vae = VAE.load(vae_dir)
    torch.testing.assert_close(vae.decode(pc_item[None], vae.latent_norm("per-channel")),
                               vae.decode(scalar_item[None]), rtol=1e-4, atol=1e-4)
    with pytest.raises(LatentDiTError, match="different latent_norm"):
        load_tool("extract").main(["--data", str(image_folder), "--vae", str(vae_dir), "--image-size", "16",
                                   "--out", str(latents), "--num-workers", "0", "--no-progress",
                                   "--latent-norm", "per-channel"])


def test_held_out_split_comes_from_a_val_folder(image_folder, tmp_path):
    import shutil

    from latentdit.vae.training.data import load_splits

    root = tmp_path / "data"
    shutil.copytree(image_folder, root / "train")
    (root / "val" / "animals").mkdir(parents=True)
    shutil.copy(image_folder / "animals" / "animals_0.png", root / "val" / "animals" / "held.png")
    splits = load_splits(tiny_cfg(root))
    assert splits.train.shape == (16, 3, 16, 16) and splits.val.shape == (1, 3, 16, 16)
    assert splits.val_names == ["animals/held.png"] and "val/" in splits.facts["holdout"]


def check_same_checkpoints(a: Path, b: Path) -> None:
    for name in ("vae.safetensors", "discriminator.safetensors"):
        x, _ = load_safetensors(a / name)
        y, _ = load_safetensors(b / name)
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    oa, ob = torch_load(a / "optimizer.pt"), torch_load(b / "optimizer.pt")
    for key in ("vae", "disc"):
        for i, state in oa[key]["state"].items():
            assert all(torch.equal(state[k], ob[key]["state"][i][k]) for k in state), key


def test_resume_in_process_is_the_uninterrupted_run(image_folder, tmp_path):
    tool = load_tool("train_vae")
    common = ["--data", str(image_folder), *TINY, "loss.disc_start=1"]  # both optimizers have state at step 2
    assert tool.main(common + ["--out", str(tmp_path / "straight"), "train.steps=4"]) == 0
    split = tmp_path / "split"
    assert tool.main(common + ["--out", str(split), "train.steps=2"]) == 0
    with pytest.raises(LatentDiTError, match="already holds a training run"):
        tool.main(common + ["--out", str(split), "train.steps=4"])
    with pytest.raises(LatentDiTError, match=r"config differs .* \['train.lr'\]"):
        tool.main(common + ["--out", str(split), "--resume", "train.steps=4", "train.lr=0.5"])
    assert tool.main(common + ["--out", str(split), "--resume", "train.steps=4"]) == 0
    check_same_checkpoints(tmp_path / "straight" / "checkpoints" / "step-0000004", split / "checkpoints" / "step-0000004")
    card = read_json(split / "vae" / "model_card.json")
    assert card["psnr_db"] == pytest.approx(read_json(tmp_path / "straight" / "vae" / "model_card.json")["psnr_db"])


def test_resumed_run_continues_its_time_budget(image_folder, tmp_path):
    tool = load_tool("train_vae")
    common = ["--data", str(image_folder), *TINY, "--out", str(tmp_path / "run")]
    assert tool.main(common + ["train.steps=2"]) == 0
    # the checkpoint says 10 minutes of training were spent: a 12-minute budget has 2 left, which the next
    # step does not use up; a 9-minute one is spent, so the run stops after the step that noticed it
    ckpt = tmp_path / "run" / "checkpoints" / "step-0000002"
    state = read_json(ckpt / "state.json")
    (ckpt / "state.json").write_text(json.dumps({**state, "train_wall_s": 600.0}))
    assert tool.main(common + ["--resume", "train.steps=3", "--max-minutes", "12"]) == 0
    card = read_json(tmp_path / "run" / "vae" / "model_card.json")
    assert card["steps_done"] == 3 and not card["stopped_early"] and card["train_wall_s"] >= 600
    assert tool.main(common + ["--resume", "train.steps=6", "--max-minutes", "9"]) == 0
    card = read_json(tmp_path / "run" / "vae" / "model_card.json")
    assert card["steps_done"] == 4 and card["stopped_early"]


def test_resume_needs_a_checkpoint(image_folder, tmp_path):
    with pytest.raises(LatentDiTError, match="--resume: no checkpoint"):
        load_tool("train_vae").main(["--data", str(image_folder), *TINY, "--out", str(tmp_path / "none"), "--resume"])


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    env.pop("LATENTDIT_FASHION_MNIST", None)
    return env


@pytest.mark.slow
def test_sigkill_then_resume_is_the_uninterrupted_run(image_folder, tmp_path):
    args = [sys.executable, str(TOOL), "--data", str(image_folder), "--threads", "1", *TINY,
            "train.steps=8", "train.ckpt_every=1", "train.sample_every=0"]
    straight = tmp_path / "straight"
    subprocess.run(args + ["--out", str(straight)], env=_subprocess_env(), check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(args + ["--out", str(killed)], env=_subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    try:  # kill it between checkpoints, after the discriminator has started (step 2)
        while not (killed / "checkpoints" / "step-0000003").is_dir():
            assert proc.poll() is None and time.time() < deadline, "the run ended before it could be killed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "checkpoints" / "step-0000008").exists()
    subprocess.run(args + ["--out", str(killed), "--resume"], env=_subprocess_env(), check=True, capture_output=True,
                   timeout=300)
    check_same_checkpoints(straight / "checkpoints" / "step-0000008", killed / "checkpoints" / "step-0000008")


# ------------------------------------------------------------------------------------------ the GAN term


def test_no_gan_term_or_discriminator_update_before_disc_start(image_folder):
    from latentdit.vae.training.trainer import Trainer

    images = random_images()
    with_gan = Trainer.create(tiny_cfg(image_folder, "loss.disc_start=3"))
    without = Trainer.create(tiny_cfg(image_folder, "loss.disc_weight=0"))
    assert without.disc is None
    disc_init = {k: v.clone() for k, v in with_gan.disc.state_dict().items()}
    for step in range(3):
        parts = with_gan.step(images, step)
        without.step(images, step)
        assert "gan" not in parts and "d" not in parts
    for (name, a), b in zip(with_gan.model.state_dict().items(), without.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(v, disc_init[k]) for k, v in with_gan.disc.state_dict().items())
    parts = with_gan.step(images, 3)
    without.step(images, 3)
    assert parts["gan_w"] > 0 and "d" in parts
    assert not torch.equal(with_gan.model.decoder.conv_out.weight, without.model.decoder.conv_out.weight)
    assert not all(torch.equal(v, disc_init[k]) for k, v in with_gan.disc.state_dict().items())


def test_adaptive_weight_against_a_hand_computation():
    from latentdit.vae.training.losses import ADAPTIVE_EPS, adaptive_gan_weight

    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]], requires_grad=True)
    a = torch.tensor([[3.0, 0.0], [4.0, 0.0]])
    b = torch.tensor([[0.25, 0.5], [1.0, -0.5]])
    rec = (w * a).sum()            # d rec / dw = a             -> norm 5
    gan = (w.pow(2) * b).sum()     # d gan / dw = 2 w b = [[0.5, -2], [1, -3]] -> norm sqrt(14.25)
    expected = 5.0 / (14.25 ** 0.5 + ADAPTIVE_EPS)
    assert adaptive_gan_weight(rec, gan, w, 1e4).item() == pytest.approx(expected, rel=1e-6)
    assert adaptive_gan_weight(rec, gan, w, 0.5).item() == 0.5  # clamped
    assert adaptive_gan_weight(rec, gan * 0, w, 1e6).item() == pytest.approx(5.0 / ADAPTIVE_EPS, rel=1e-6)


def test_trainer_applies_disc_weight_times_the_adaptive_weight(image_folder):
    from latentdit.vae.training.data import batch_for_step, step_generator
    from latentdit.vae.training.losses import adaptive_gan_weight, generator_loss
    from latentdit.vae.training.trainer import Trainer, posterior_noise

    cfg = tiny_cfg(image_folder, "loss.disc_start=0", "loss.disc_weight=0.3", "loss.fft_weight=0")
    trainer = Trainer.create(cfg)
    images = random_images()
    g = step_generator(cfg, 0)
    x = batch_for_step(images, cfg, g)
    _, _, parts = generator_loss(trainer.model, trainer.disc, x, posterior_noise(cfg, g), cfg, 0)
    # by hand, with the same batch and noise: L1 and the generator's hinge term
    g = step_generator(cfg, 0)
    x = batch_for_step(images, cfg, g)
    post = trainer.model.encode(x).latent_dist
    recon = trainer.model.decode(post.mean + post.std * torch.randn(post.mean.shape, generator=g)).sample
    rec, gan = (recon - x).abs().mean(), -trainer.disc(recon).mean()
    weight = 0.3 * adaptive_gan_weight(rec, gan, trainer.model.decoder.conv_out.weight, 1e4)
    assert float(parts["rec"]) == pytest.approx(rec.item(), rel=1e-5)
    assert float(parts["gan"]) == pytest.approx(gan.item(), rel=1e-5)
    assert float(parts["gan_w"]) == pytest.approx(weight.item(), rel=1e-4)


def test_hinge_loss_values():
    from latentdit.vae.training.losses import hinge_d_loss

    real = torch.tensor([2.0, 0.5, -1.0])   # relu(1 - D): 0, 0.5, 2    -> mean 5/6
    fake = torch.tensor([-3.0, 0.0, 1.0])   # relu(1 + D): 0, 1, 2      -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))


def test_spectrum_l1_is_zero_only_for_equal_images():
    from latentdit.vae.training.losses import spectrum_l1

    x = torch.randn(2, 3, 8, 8)
    assert spectrum_l1(x, x).item() == 0
    # orthonormal FFT: a constant offset c moves only the DC coefficient, by c * 8
    assert spectrum_l1(x + 0.5, x).item() == pytest.approx(0.5 * 8 / 64, rel=1e-5)


def test_lab_l1_against_scikit_image_and_in_the_loss(image_folder):
    from skimage.color import rgb2lab

    from latentdit.vae.training.data import batch_for_step, step_generator
    from latentdit.vae.training.losses import generator_loss, lab_l1
    from latentdit.vae.training.trainer import Trainer, posterior_noise

    g = torch.Generator().manual_seed(3)
    a, b = (torch.rand(2, 3, 4, 4, generator=g) * 2 - 1 for _ in range(2))
    lab = [rgb2lab(((t.double() + 1) / 2).permute(0, 2, 3, 1).numpy()) for t in (a, b)]
    assert lab_l1(a, b).item() == pytest.approx(np.abs(lab[0] - lab[1]).mean() / 100, rel=1e-4)
    assert lab_l1(a, a).item() == 0

    # the term adds lab_weight x lab_l1 to the loss, with the same batch, noise and weights
    cfgs = [tiny_cfg(image_folder, "loss.disc_weight=0", f"loss.lab_weight={w}") for w in (0, 2.5)]
    trainer = Trainer.create(cfgs[0])
    images, results = random_images(), []
    for cfg in cfgs:
        gen = step_generator(cfg, 0)
        x = batch_for_step(images, cfg, gen)
        results.append((x, *generator_loss(trainer.model, None, x, posterior_noise(cfg, gen), cfg, 0)))
    (x, plain, _, parts0), (_, with_lab, recon, parts) = results
    assert "lab" not in parts0
    assert float(parts["lab"]) == pytest.approx(lab_l1(recon, x).item(), rel=1e-6)
    assert with_lab.item() == pytest.approx(plain.item() + 2.5 * float(parts["lab"]), rel=1e-5)


# ------------------------------------------------------------------------------------------ config errors


def test_config_errors_name_the_field(image_folder, tmp_path):
    with pytest.raises(LatentDiTError, match="field 'data.crop_size': expected 0 or a multiple of 8"):
        load_vae_config(None, ["data.crop_size=12"])
    with pytest.raises(LatentDiTError, match="field 'loss.recon': expected one of l1, l2"):
        load_vae_config(None, ["loss.recon=l3"])
    with pytest.raises(LatentDiTError, match="field 'loss.lab_weight': expected a finite number >= 0"):
        load_vae_config(None, ["loss.lab_weight=-1"])
    with pytest.raises(LatentDiTError, match="unknown field 'loss.perceptual'"):
        load_vae_config(None, ["loss.perceptual=1"])
    from latentdit.vae.training.trainer import Trainer

    with pytest.raises(LatentDiTError, match="loss.disc_layers=3 is too deep for 8-pixel training crops"):
        Trainer.create(tiny_cfg(image_folder, "loss.disc_layers=3"))
    with pytest.raises(LatentDiTError, match="data.val_fraction=0.01 of 16 images leaves no held-out"):
        from latentdit.vae.training.data import load_splits

        load_splits(tiny_cfg(image_folder, "data.val_fraction=0.01"))
    proc = subprocess.run([sys.executable, str(TOOL), "--out", str(tmp_path / "r"), "--data", str(tmp_path / "nope")],
                          env=_subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "nope" in proc.stderr


def test_shipped_configs_load():
    for name in ("vae_fashion_mnist", "vae_clipart"):
        cfg = load_vae_config(REPO / "configs" / f"{name}.yaml")
        assert cfg.model.latent_channels == 4 and len(cfg.model.block_out_channels) == 4  # KL-f8, 4 channels


@pytest.mark.parametrize("name", [None, "vae_fashion_mnist", "vae_clipart"])
def test_default_and_shipped_norms_keep_several_channels_per_group(name):
    # one channel per group turns every GroupNorm into an instance norm: flat colour and the image's
    # level are normalised away (the bundled VAEs lost colour and 5 dB that way)
    cfg = load_vae_config(None if name is None else REPO / "configs" / f"{name}.yaml")
    assert min(cfg.model.block_out_channels) // cfg.model.norm_num_groups >= 4


# ------------------------------------------------------------------------------------------ checks and reports


def test_bad_init_from_is_refused_before_the_images_are_decoded(image_folder, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(LatentDiTError, match=r"model.init_from: VAE folder /missing does not exist"):
        load_tool("train_vae").main(["--data", str(image_folder), "--out", str(run), *TINY, "model.init_from=/missing"])
    assert not run.exists()  # no image cache, no config: nothing written


def test_unreadable_images_are_named_on_the_console(image_folder, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_folder, data)
    (data / "tools" / "broken.png").write_bytes(b"not a png")
    run = tmp_path / "run"
    assert load_tool("train_vae").main(["--data", str(data), "--out", str(run), *TINY, "train.steps=2"]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 unreadable image file(s):" in out and "tools/broken.png" in out
    card = read_json(run / "vae" / "model_card.json")
    assert card["unreadable"] == 1 and card["unreadable_files"][0].startswith("tools/broken.png")
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == [2]  # train.log_every=10: the last step's row
    assert all({"loss", "rec", "kl", "lr", "img_per_sec", "threads"} <= set(r) for r in metrics)


def _launch_two(args: list[str]) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "latentdit.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port), str(TOOL),
           "--threads", "1", *args]
    env = _subprocess_env()
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_two_processes_complete_and_resume_identically(image_folder, tmp_path):
    """Two CPU processes (gloo), each training on half of every batch with averaged gradients: the run
    completes, and a run stopped after 2 steps and resumed ends with the checkpoint of the straight run."""
    common = ["--data", str(image_folder), *TINY, "loss.disc_start=1", "train.tensorboard=false"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    _launch_two(common + ["--out", str(straight), "train.steps=4"])
    ck = straight / "checkpoints" / "step-0000004"
    assert (ck / "rng-rank0.pt").is_file() and (ck / "rng-rank1.pt").is_file()
    assert (straight / "vae" / "model_card.json").is_file()
    assert [json.loads(line)["step"] for line in (straight / "metrics.jsonl").read_text().splitlines()] == [4]
    _launch_two(common + ["--out", str(split), "train.steps=2"])
    _launch_two(common + ["--out", str(split), "--resume", "train.steps=4"])
    check_same_checkpoints(ck, split / "checkpoints" / "step-0000004")
