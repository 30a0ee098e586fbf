"""The demo's model folders: a seeded tiny CausalVAE and a seeded tiny mT5 text encoder.

`write_demo_models(out)` writes
    out/vae/             config.json + diffusion_pytorch_model.safetensors (osp.common.models.vae.save_vae)
    out/text_encoder/    config.json + model.safetensors + spiece.model + tokenizer files
    out/demo_models.json the seed and the identities of both
Idempotent: a folder that loads and was written with the same seed is kept; anything else is
rebuilt in a temporary folder and renamed into place, so an interrupted run never leaves a half
folder behind. Same seed -> byte-identical weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

RECORD = "demo_models.json"


def _valid_vae(path: Path) -> bool:
    from osp.common.models.vae import load_vae

    try:
        load_vae(path)
    except Exception:  # any failure to load means: rebuild
        return False
    return True


def _valid_text(path: Path) -> bool:
    from osp.common.models.text import TextEncoder

    try:
        TextEncoder.from_pretrained(path, device="cpu")
    except Exception:  # any failure to load means: rebuild
        return False
    return True


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _write_vae(path: Path, seed: int) -> None:
    from osp.common.models.vae import build_vae, save_vae

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_vae("tiny")
    save_vae(model, tmp)
    _replace_dir(tmp, path)


def _write_text(path: Path, seed: int) -> None:
    from osp.common.models.text import write_tiny_text_encoder

    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    write_tiny_text_encoder(tmp, seed=seed)
    _replace_dir(tmp, path)


def write_demo_models(out_dir: str | Path, seed: int = 0) -> dict:
    """Write (or keep) out_dir/vae and out_dir/text_encoder; returns paths, identities and what was done."""
    from osp.common.models.text import TextEncoder
    from osp.common.models.vae import vae_identity

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record_path = out / RECORD
    try:
        previous = json.loads(record_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        previous = {}
    same_seed = previous.get("seed") == seed

    vae_dir, text_dir = out / "vae", out / "text_encoder"
    written, kept = [], []
    for name, path, valid, write in (
        ("vae", vae_dir, _valid_vae, _write_vae),
        ("text_encoder", text_dir, _valid_text, _write_text),
    ):
        if same_seed and previous.get(name) and valid(path):
            kept.append(name)
        else:
            write(path, seed)
            written.append(name)

    record = {
        "seed": seed,
        "vae": str(vae_dir),
        "text_encoder": str(text_dir),
        "vae_identity": vae_identity(vae_dir),
        "text_encoder_identity": TextEncoder.from_pretrained(text_dir, device="cpu").identity(),
    }
    tmp = record_path.with_name(RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n")
    tmp.replace(record_path)
    return {**record, "written": written, "kept": kept}
