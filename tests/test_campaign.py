"""The campaign example of README.md, run as written (tiny sizes, a few steps per stage): three
caches with one text cache (mT5 runs for the first only), then three training stages, each started
from the previous stage's EMA, the second mixing two caches."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from osp.common import shards as S

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
OSP = str(Path(sys.executable).with_name("osp"))
ENV = {
    **{k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")},
    "PYTHONUNBUFFERED": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
    "OSP_DEVICE": "cpu",
}
STEPS = 3


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### A training campaign") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block is not None
    return [line.strip() for line in block.group(1).splitlines() if line.strip().startswith("osp ")]


def test_campaign_example_runs_end_to_end(tmp_path):
    commands = readme_commands()
    assert [c.split()[1] for c in commands] == ["demo-data", "encode", "encode", "encode", "train", "train", "train"]
    previous = None
    for cmd in commands:
        args = cmd.split()[1:]
        if args[0] == "encode":
            args += ["--no-progress", "--workers", "0"]
        if args[0] == "train":
            args = [a if not a.endswith(".toml") else str(ROOT / a) for a in args]
            args += [f"run.steps={STEPS}", f"run.ckpt_every={STEPS}", "data.num_workers=0", "run.tensorboard=false"]
            if previous is not None:  # the config names step-0000020 of the previous stage; here it ran STEPS
                args.append(f"model.init=runs/{previous}/checkpoints/step-{STEPS:07d}")
        p = subprocess.run([OSP, *args], cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{cmd}\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}"
        if args[0] == "encode":
            result = json.loads(p.stdout.splitlines()[0])
            first = "images" in cmd
            assert (result["text_encoded"] > 0) == first and (result["text_reused"] > 0) != first, (cmd, result)
        if args[0] == "train":
            cfg = __import__("tomllib").loads((ROOT / args[2]).read_text())
            name = cfg["run"]["name"]
            if previous is not None:
                assert f"runs/{previous}/checkpoints/step-" in cfg["model"]["init"]
            metrics = [json.loads(x) for x in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
            assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
            drawn = {k: sum(m["source_samples"].get(k, 0) for m in metrics) for k in metrics[0]["source_samples"]}
            assert set(drawn) == {Path(s["shards"]).name for s in cfg["data"]["sources"]} and sum(drawn.values())
            previous = name
    shards = tmp_path / "shards" / "campaign"
    for name, t in (("images", 1), ("29x", 2), ("93x", 3)):
        assert S.verify(shards / name) == []
        assert S.inspect(shards / name)["text_refs"][0]["ok"]
        assert {int(x) for x in S.ShardIndex.open(shards / name).latent_t} <= {1, t}
    assert S.verify(shards / "text") == []
