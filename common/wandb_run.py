"""A Weights & Biases run that a run folder keeps: its id is stored in a file next to the run, so a
resumed training (or a restarted `osp validate`) continues the same wandb run. wandb is optional
(`pip install 'osp[wandb]'`) and imported only when asked for; offline mode is wandb's own
(`WANDB_MODE=offline`, or `mode = "offline"`), the files go under WANDB_DIR when it is set, else
under the run folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from osp.common.errors import ConfigError, UnavailableError

MODES = ("", "online", "offline", "disabled")  # "" = WANDB_MODE, else wandb's default (online)


@dataclass(frozen=True)
class WandbSettings:
    project: str = "osp"
    entity: str = ""
    name: str = ""
    mode: str = ""


def open_run(folder: Path, id_file: Path, s: WandbSettings, *, group: str, job_type: str, config: dict | None):
    """wandb.init with the id stored in `id_file` (written before the first init), resumed when it exists."""
    if s.mode not in MODES:
        raise ConfigError(f"log.mode = {s.mode!r}: use one of {', '.join(repr(m) for m in MODES)}")
    try:
        import wandb
    except ImportError:
        raise UnavailableError(
            "log.wandb = true needs the wandb package: pip install 'osp[wandb]' (or set log.wandb = false)"
        ) from None
    id_file = Path(id_file)
    if id_file.is_file() and id_file.read_text().strip():
        run_id = id_file.read_text().strip()
    else:
        from wandb.sdk.lib.runid import generate_id

        run_id = generate_id()
        id_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = id_file.with_name(id_file.name + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, id_file)
    where = Path(os.environ.get("WANDB_DIR") or folder)
    where.mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=s.project or None,
        entity=s.entity or None,
        name=s.name or None,
        id=run_id,
        resume="allow",
        dir=str(where),
        group=group,
        job_type=job_type,
        config=config,
        mode=s.mode or None,  # pyright: ignore[reportArgumentType]
        settings=wandb.Settings(console="off", silent=True),
    )
