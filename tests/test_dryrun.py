"""`osp train --dry-run`: the real Trainer on `meta` under a fake process group, at real size.

Real width: osp12-93x480p at TP=2+SP, DP=2 (ranks 0 and 3) with ZeRO-1, and osp12-93x720p at TP=8+SP.
Negative control: a CPU tensor passed to a collective inside the train step fails the dry run.
Accuracy: the dry run's figures for the tiny preset against a real CPU run of the same Trainer (<= 10 %), and
the per-rank peak of a real 2-process run (DDP at DP=2, ZeRO-1, sharded EMA, asynchronous save) within 3 %,
with a negative control (DDP's gradients left out of the prediction).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import free_port, make_shards  # noqa: E402

from osp.stage2_train import dryrun as DR  # noqa: E402
from osp.stage2_train import trainer as R  # noqa: E402
from osp.stage2_train.config import TrainConfig  # noqa: E402

GIB = 2**30


def _dry(preset, tp, sp, world, rank, checkpointing="none", card_gb=80.0, overrides=(), shards=None, cp=None):
    cfg = DR.build_config(None, list(overrides), preset, tp, sp, checkpointing, cp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return DR.dry_run(cfg, world, rank, card_gb, shards)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("dryrun") / "tiny", 4)


def _check_parts(r, zero1: bool):
    assert r.params > 0 and r.grads == r.params  # fp32 grads of every parameter
    if r.layout["dp"] == 1:
        assert r.ema == r.params  # fp32 EMA of the local TP shard
    else:
        assert 0 < r.ema < r.params  # the EMA is sharded over DP too (this rank's owner share)
    if zero1:
        assert 0 < r.optimizer < 2 * r.params  # AdamW m, v of this DP rank's share only
    else:
        assert r.optimizer == 2 * r.params
    assert 0 < r.activations["full"] < r.activations["none"]
    static = r.params + r.optimizer + r.ema
    assert static < r.peak < static + r.grads + r.activations[r.checkpointing] + 8 * GIB
    assert r.step_flops > 0
    assert r.checkpoint_state >= r.params + r.ema


def test_480p_tp2_sp_dp2_zero1_ranks_0_and_3():
    # rank 3 is judged against a 40 GiB card: the same work, another verdict
    reports = {
        rank: _dry(
            "osp12-93x480p", 2, True, 4, rank, overrides=["parallel.zero1=true"], card_gb=80.0 if rank == 0 else 40.0
        )
        for rank in (0, 3)
    }
    for rank, r in reports.items():
        assert (r.layout["tp"], r.layout["dp"], r.layout["sp"]) == (2, 2, True)
        assert (r.layout["tp_rank"], r.layout["dp_rank"]) == ((0, 0) if rank == 0 else (1, 1))
        assert r.tokens == 24 * 30 * 40
        _check_parts(r, zero1=True)
    # both TP ranks hold the same shard sizes and run the same work
    assert reports[0].params == reports[3].params
    assert reports[0].activations == reports[3].activations
    assert reports[0].step_flops == reports[3].step_flops
    # bf16 activations: 93x480p at TP=2+SP fits 80 GiB without checkpointing (about 59 GiB), not 40 GiB;
    # then the first suggestion is checkpointing
    assert reports[0].fits and reports[0].precision == "bfloat16"
    assert not reports[3].fits and "--checkpointing" in reports[3].suggestions[0]


def test_720p_tp8_sp_full_checkpointing_fits_80gb():
    r = _dry("osp12-93x720p", 8, True, 16, 5, checkpointing="full")
    assert (r.layout["tp_rank"], r.layout["dp_rank"]) == (5, 0)
    assert r.tokens == 24 * 45 * 80
    _check_parts(r, zero1=False)
    assert r.fits and "FITS" in r.table()


def test_verdict_and_cli():
    from typer.testing import CliRunner

    from osp.common.cli import app

    def dry(*args: str):
        return CliRunner().invoke(app, ["train", "--dry-run", "--preset", "tiny", *args])

    res = dry("--card-gb", "1e-6", "--nproc", "2", "--tp", "1", "--checkpointing", "none")
    assert res.exit_code == 2 and "DOES NOT FIT" in res.output and "--checkpointing full" in res.output
    assert "parameters" in res.output and "world 2 = tp 1 x cp 1 x dp 2" in res.output
    res = dry("--tp", "2", "--sp", "--rank", "1")  # launch.nproc 0: tp x cp ranks
    assert res.exit_code == 0 and "verdict: FITS" in res.output and "world 2" in res.output, res.output
    res = dry("--tp", "2", "--sp", "--nnodes", "2", "--nproc", "2", "--rank", "3", "--json")
    assert res.exit_code == 0 and json.loads(res.output)["layout"]["world"] == 4, res.output
    res = dry("--tp", "3")  # 3 does not divide the heads
    assert res.exit_code == 1 and "parallel.tp=3" in res.output
    res = dry("--tp", "2", "--sp", "--rank", "2")  # outside the job's 2 ranks
    assert res.exit_code == 1 and "dryrun.rank=2" in res.output and res.output.count("\n") == 1, res.output


def test_cpu_tensor_in_a_collective_fails_the_dry_run(monkeypatch):
    """Negative control: the bug class nccl/hccl would hit at step 1 (a CPU tensor reaching a collective
    inside the train step) fails the dry run; the same layout passes with the trainer's own code."""
    _dry("tiny", 2, True, 2, 1)  # the control: passes

    def norm_on_cpu(params, sharded, layout):
        sq = torch.zeros(())  # the bug: accumulated on the host
        for p in params:
            if p.grad is not None:
                sq = sq + 0.0
        dist.all_reduce(sq, group=layout.tp_group)
        return sq.sqrt()

    monkeypatch.setattr(R, "global_grad_norm", norm_on_cpu)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        _dry("tiny", 2, True, 2, 1)
    assert not dist.is_initialized()  # the dry run cleans up after a failure


def test_figures_match_a_real_cpu_run_of_the_tiny_preset(shards, tmp_path):
    """Same measurement code, meta (dry run) vs real CPU tensors (a real step): within 10 %."""
    dry = _dry(
        "tiny", 1, None, 1, 0, checkpointing="none", shards=str(shards), overrides=["run.precision=fp32"]
    )  # as on CPU

    cfg = TrainConfig.load(
        None,
        [
            f"data.shards={shards}",
            "model.preset=tiny",
            "run.device=cpu",
            f"run.dir={tmp_path / 'run'}",
            "data.num_workers=0",
            "run.tensorboard=false",
        ],
    )
    trainer = R.build_trainer(cfg)
    try:
        batch = next(trainer.loader)
        act = {m: DR.saved_activation_bytes(trainer, batch, m) for m in ("none", "selective", "full")}
        trainer.train_step()  # creates the optimizer state
        peak = DR.PeakMemory("cpu")
        state = (
            list(trainer.model.parameters()) + list(trainer.model.buffers()) + DR.optimizer_tensors(trainer.optimizer)
        )
        peak.track(state + list(trainer.ema.shadow.values()))
        with peak:
            trainer.train_step()
        real = {
            "params": DR.tensor_bytes(trainer.model.parameters()),
            "optimizer": DR.tensor_bytes(DR.optimizer_tensors(trainer.optimizer)),
            "ema": DR.tensor_bytes(trainer.ema.shadow.values()),
            "peak": peak.peak,
            **{f"act_{k}": v for k, v in act.items()},
        }
    finally:
        trainer.close()
        from osp.stage2_train import dist as D

        D.shutdown()
    predicted = {
        "params": dry.params,
        "optimizer": dry.optimizer,
        "ema": dry.ema,
        "peak": dry.peak,
        "act_none": dry.activations["none"],
        "act_selective": dry.activations["selective"],
        "act_full": dry.activations["full"],
    }
    for k, v in real.items():
        assert abs(predicted[k] - v) <= 0.10 * v, (k, predicted[k], v)


def test_sampling_dit_collectives_run_under_the_fake_group():
    """`osp sample` under torchrun: the TP(+SP) DiT's collectives take the model's device (stage 1 has
    no collectives: its ranks coordinate through the output folder)."""
    from osp.common.models.dit import build_dit
    from osp.common.sampling import guided_eps
    from osp.stage2_train import dist as D
    from osp.stage2_train.parallel import parallelize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with DR.fake_world(2, 1):
            dit = build_dit("tiny", device="meta", dtype=torch.float32).eval()
            layout = D.init_parallel(2, True, dit.config.num_attention_heads, None)
            with torch.device("meta"):
                dit = parallelize(dit, layout)
            c = dit.config
            x = torch.zeros(1, c.in_channels, c.sample_size_t, *c.sample_size, device="meta")
            text = torch.zeros(2, 8, c.caption_channels, device="meta")
            mask = torch.ones(2, 8, dtype=torch.long, device="meta")
            with torch.no_grad():
                eps = guided_eps(dit, x, torch.tensor(999, device="meta"), text, mask, 7.5, torch.float32)
    assert eps.device.type == "meta" and eps.shape == x.shape


def test_gpu_smoke_pieces_on_cpu(tmp_path):
    """bench/gpu/smoke.py's helpers (the GPU run itself needs a CUDA card)."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench" / "gpu"))
    import smoke

    from osp.common.demo_data import probe_video

    assert smoke.sdpa_backend(torch.device("cpu")) == "_scaled_dot_product_flash_attention_for_cpu"
    root = smoke.write_clips(tmp_path / "data", 2, 9, 64, 96)
    info = probe_video(root / "clips" / "clip001.mp4")
    assert (info["num_frames"], info["height"], info["width"]) == (9, 64, 96)
    warm = [{"step": 4, "step_time_s": 1.5, "peak_mem_gb": 29.0}, {"step": 5, "step_time_s": 2.5, "peak_mem_gb": 30.0}]
    s = smoke.summary(warm, 40.0, 4e14, 5e14, 1000.0, 800.0)  # model / hardware FLOPs per step
    assert (s["model_tflops"], s["mfu_nominal"], s["hfu_nominal"], s["mfu_matmul"]) == (200.0, 0.2, 0.25, 0.25)
    assert s["peak_vs_prediction"] == 0.75 and s["warm_steps"] == [4, 5]
    # the output folder: a user's non-empty folder is refused and left alone; the smoke's own is reused
    user = tmp_path / "user"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    with pytest.raises(smoke.SmokeError, match="not made by the smoke"):
        smoke.claim_output(user)
    assert (user / "keep.txt").read_text() == "mine"
    own = tmp_path / "own"
    smoke.claim_output(own)
    (own / "run").mkdir()
    (own / "notes.txt").write_text("x")
    smoke.claim_output(own)
    assert not (own / "run").exists() and (own / "notes.txt").exists()
    ck = own / "r" / "checkpoints"
    for name in ("step_00000002", "step_00000005"):
        (ck / name).mkdir(parents=True)
    (ck / "latest").write_text("step_00000005\n")
    smoke.keep_newest_checkpoint(own / "r")
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step_00000005"]
    with pytest.raises(smoke.SmokeError, match="train: no checkpoint"):
        smoke.check(False, "train", "no checkpoint")


def test_context_parallel_layout_splits_the_work():
    """--cp: rank 3 of TP=1 x CP=2 x DP=2 is (cp rank 1, dp rank 1); the step FLOPs per rank fall to about
    1/CP (at real size 0.502 for 29x480p TP=4+SP; the tiny preset's replicated text, embedding and final layer
    weigh more, so its bound is looser)."""
    one = _dry("tiny", 1, False, 2, 1, cp=1)
    two = _dry("tiny", 1, False, 4, 3, cp=2)
    assert (two.layout["cp"], two.layout["cp_rank"], two.layout["dp"], two.layout["dp_rank"]) == (2, 1, 2, 1)
    assert "cp 2" in two.table()
    assert two.params == one.params  # parameters are replicated over CP
    assert 0.45 < two.step_flops / one.step_flops < 0.8
    assert two.activations["none"] < one.activations["none"]


def test_ddp_buckets_hold_the_gradients_on_meta():
    """DP x CP > 1: torch DDP builds on meta and its buckets keep every gradient alive between steps, so the
    peak holds them; the negative control (DP = 1, no DDP) frees them at zero_grad."""
    with_ddp = _dry("tiny", 1, False, 2, 0)
    without = _dry("tiny", 1, False, 1, 0)
    assert with_ddp.ddp_buckets and not without.ddp_buckets
    assert with_ddp.grads == with_ddp.params == without.grads
    static = with_ddp.params + with_ddp.optimizer + with_ddp.ema + with_ddp.grads
    assert with_ddp.peak >= static + with_ddp.activations["none"]
    assert "gradients (DDP buckets)" in with_ddp.table()
    # host staging: one host copy of this rank's checkpoint pieces (model, EMA share, AdamW state)
    assert with_ddp.host_staging >= with_ddp.params + with_ddp.ema
    # FLOPs labelled: model (MFU) < hardware (HFU); counted beside them
    assert 0 < with_ddp.model_flops < with_ddp.hardware_flops and with_ddp.step_flops > 0
    assert "model " in with_ddp.table() and "hardware counted" in with_ddp.table()


def _one_line(capsys, preset, tp, sp, world, overrides=()) -> str:
    """`osp train --dry-run`'s entry point (dryrun.run) on a failing run: exit code 1 and one line."""
    cfg = DR.build_config(None, [f"launch.nproc={world}", *overrides], preset, tp, sp, None)
    rc = DR.run(cfg)
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    return err


def test_cpu_tensor_in_the_ddp_bucket_all_reduce_is_named(monkeypatch, capsys):
    from osp.stage2_train import data_parallel as DP

    def reduce_on_cpu(state, bucket):
        buf = torch.zeros(bucket.buffer().shape)  # the bug: the bucket copied to the host
        work = dist.all_reduce(buf, group=state.group, async_op=True)
        return work.get_future().then(lambda f: bucket.buffer())

    monkeypatch.setattr(DP, "_reduce_bucket", reduce_on_cpu)
    err = _one_line(capsys, "tiny", 1, False, 2)
    assert "torch.distributed.all_reduce" in err and "reduce_on_cpu" in err and "cpu tensor" in err


def test_cpu_tensor_in_the_checkpoint_save_is_named(monkeypatch, capsys):
    from osp.stage2_train import checkpoint as ckpt

    tensor_state = ckpt._tensor_state

    def one_on_cpu(model):
        sd = dict(tensor_state(model))
        k = next(iter(sd))
        sd[k] = torch.zeros(sd[k].shape)  # the bug: one piece of the state on the host
        return sd

    monkeypatch.setattr(ckpt, "_tensor_state", one_on_cpu)
    err = _one_line(capsys, "tiny", 2, True, 4)
    assert "checkpoint save" in err and "cpu tensor" in err and "DTensor.from_local" in err


def test_cpu_tensor_in_the_ema_update_fails(monkeypatch):
    """The sharded EMA's shard on the host: the dry run fails in the step, as an accelerator run would."""
    from osp.stage2_train import optim

    init = optim.EMA.__init__

    def on_host(self, model, max_decay, layout=None):
        init(self, model, max_decay, layout)
        self.shadow = {n: torch.zeros(t.shape) for n, t in self.shadow.items()}
        self._shadow_list = [self.shadow[n] for n in self._names]

    monkeypatch.setattr(optim.EMA, "__init__", on_host)
    with pytest.raises(Exception, match="device|meta|cpu"):
        _dry("tiny", 1, False, 2, 0)
    assert not dist.is_initialized()


# ------------------------------------------------------------------------------------------------
# a real 2-process run against the dry run's prediction, rank by rank
# ------------------------------------------------------------------------------------------------
HERE = Path(__file__).parent
PEAK_TOL = 0.03
DP2 = ["run.precision=fp32", "parallel.zero1=true"]  # the worker's layout and CPU precision (tp 1, no SP)


@pytest.fixture(scope="module")
def real_dp2(shards, tmp_path_factory) -> dict:
    """tests/dryrun_real_worker.py under torch.distributed.run: 2 gloo ranks, each measured with the dry run's
    accounting on its real CPU tensors."""
    out = tmp_path_factory.mktemp("dryrun_real")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(HERE / "dryrun_real_worker.py"),
        str(shards),
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {r: json.loads((out / f"result-rank{r}.json").read_text()) for r in range(2)}


def _within(predicted: int, real: int, tol: float) -> bool:
    return abs(predicted - real) <= tol * real


@pytest.mark.dist
def test_real_dp2_zero1_sharded_ema_async_save_peaks_as_the_dry_run_predicts(real_dp2, shards, monkeypatch):
    """Per rank: the peak of a real steady-state step (DDP buckets, ZeRO-1 AdamW share, EMA shard, activations)
    within 3 % of the dry run's, and the host copy the asynchronous save staged equal to the predicted one.
    Negative control: the same prediction with DDP's gradients not held (the dry run before it built DDP on
    meta) misses the real peak by more than 3 %."""
    dry = {r: _dry("tiny", 1, False, 2, r, overrides=DP2, shards=str(shards)) for r in range(2)}
    for r in range(2):
        real, d = real_dp2[r], dry[r]
        assert real["layout"] == {"world": 2, "rank": r, "dp": 2, "dp_rank": r, "tp": 1}
        assert real["ddp"] and real["zero"] and real["ema_sharded"] and real["async_pending"], real
        assert d.ddp_buckets and (d.layout["dp"], d.layout["dp_rank"], d.layout["zero1"]) == (2, r, True)
        # the held parts: the same bytes (AdamW's step counters are host tensors: on CPU they sit beside the
        # parameters, on an accelerator they do not, hence the tolerance on the optimizer share)
        assert (d.params, d.grads, d.ema) == (real["params"], real["grads"], real["ema"])
        assert 0 < d.ema < d.params and 0 < d.optimizer < 2 * d.params  # sharded over DP
        assert _within(d.optimizer, real["optimizer"], 0.01), (d.optimizer, real["optimizer"])
        for m, v in real["activations"].items():
            assert _within(d.activations[m], v, PEAK_TOL), (m, d.activations[m], v)
        assert _within(d.peak, real["peak"], PEAK_TOL), (r, d.peak, real["peak"])
        # one staged host copy per save; the same bytes the dry run reports beside the device peak
        assert len(real["host_staging"]) == 1 and _within(d.host_staging, real["host_staging"][0], 0.01), (
            d.host_staging,
            real["host_staging"],
        )
        assert d.host_staging >= d.params + d.ema + d.optimizer

    from osp.stage2_train import data_parallel as DP

    init = DP.DataParallel.__init__

    def bare_module_on_meta(self, model, layout, **kw):  # the dry run as it was: no DDP on meta
        on_meta = any(p.is_meta for p in model.parameters())
        init(self, model, dataclasses.replace(layout, dp_cp_group=None) if on_meta else layout, **kw)

    monkeypatch.setattr(DP.DataParallel, "__init__", bare_module_on_meta)
    for r in range(2):
        blind = _dry("tiny", 1, False, 2, r, overrides=DP2, shards=str(shards))
        assert not blind.ddp_buckets and blind.grads == dry[r].grads  # the gradients exist, freed at zero_grad
        assert not _within(blind.peak, real_dp2[r]["peak"], PEAK_TOL), (r, blind.peak, real_dp2[r]["peak"])


# ------------------------------------------------------------------------------------------------
# the sharded EMA's collectives
# ------------------------------------------------------------------------------------------------
VALIDATE = ["validate.every=100", "validate.prompts=unused-by-the-dry-run"]


def test_cpu_tensor_in_the_ema_collectives_is_named(monkeypatch, capsys):
    """DP=2: the EMA is sharded, so a validation step swaps it in by a broadcast from each owner over DP, and a
    full EMA is gathered onto DP rank 0 point to point (`EMA.gathered`). A shard staged on the host for either
    fails the dry run with one line naming the collective; the trainer's own code passes."""
    from osp.stage2_train import dist as D
    from osp.stage2_train import optim

    cfg = DR.build_config(None, ["launch.nproc=2", *VALIDATE], "tiny", 1, False, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert DR.run(cfg) == 0  # the control: the EMA swap runs on meta over the fake DP group
    capsys.readouterr()

    @contextlib.contextmanager
    def swapped_in_from_host(self, model):
        params = dict(model.named_parameters())
        with torch.no_grad():
            for n in self.all_names:
                host = torch.empty(params[n].shape)  # the bug: the owner's shard staged on the host
                dist.broadcast(host, src=dist.get_global_rank(self.group, self.owner[n]), group=self.group)
                params[n].copy_(host)
        yield

    monkeypatch.setattr(optim.EMA, "swapped_in", swapped_in_from_host)
    err = _one_line(capsys, "tiny", 1, False, 2, VALIDATE)
    assert "torch.distributed.broadcast" in err and "swapped_in_from_host" in err and "cpu tensor" in err, err
    assert not dist.is_initialized()

    # the gather of a full EMA onto DP rank 0: rank 1 sends the shards it owns
    with pytest.raises(DR.CollectiveDeviceError) as e, DR.fake_world(2, 1):
        layout = D.init_parallel(1, False, 2, None)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)).to("meta")
        ema = optim.EMA(model, 0.9, layout)
        assert ema.dp_size == 2 and ema.shadow and len(ema.shadow) < len(ema.all_names)
        assert ema.gathered(model) is None  # the control: every shard on meta, rank 1 only sends
        ema.shadow = {n: torch.zeros(t.shape) for n, t in ema.shadow.items()}  # the bug: the shards on the host
        ema.gathered(model)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "cpu tensor" in msg, msg
    assert "torch.distributed.isend" in msg and "gathered in optim.py" in msg, msg
    assert not dist.is_initialized()
