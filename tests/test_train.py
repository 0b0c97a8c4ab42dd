import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bhvit.checkpoint import CheckpointError, load_matching_weights, load_model
from bhvit.cli import main
from bhvit.model import create_model
from bhvit.train import TrainConfig, TrainingDiverged, kd_loss, read_metrics, train
from synth import micro_config, make_fashion_mnist


COMMON = [
    "train",
    "--model",
    "bhvit_micro_c28",
    "--data",
    "fashion-mnist",
    "--batch-size",
    "32",
    "--threads",
    "1",
    "--no-progress",
    "--lr",
    "2e-3",
]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=320, n_test=64)


def _run(args, **kw):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "bhvit.cli"] + args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def test_kd_loss_formula():
    s, t = torch.randn(4, 5), torch.randn(4, 5)
    ref = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    assert torch.allclose(kd_loss(s, t), ref)
    assert kd_loss(t, t) > 0  # soft CE is the teacher's entropy at the optimum, not 0


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(fmnist, tmp_path):
    args = COMMON + ["--data-dir", str(fmnist), "--epochs", "3"]
    ref = _run(args + ["--out", str(tmp_path / "ref")])
    out_ref = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, out_ref

    run = tmp_path / "killed"
    p = _run(args + ["--out", str(run)])
    deadline = time.time() + 300
    while not (run / "last.json").exists():  # the first epoch's checkpoint: kill at that event
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.005)
    p.send_signal(signal.SIGKILL)  # a whole epoch of work lies between two checkpoints
    p.wait()
    killed_at = json.loads((run / "last.json").read_text())["epoch"]
    assert killed_at < 2, "the kill should land before the last epoch finished"
    assert not (run / "final.json").exists()

    r = _run(args + ["--out", str(run), "--resume"])
    out = r.communicate(timeout=300)[0]
    assert r.returncode == 0, out
    assert f"resumed {run} at epoch {killed_at + 1}" in out

    a = json.loads((tmp_path / "ref" / "final.json").read_text())
    b = json.loads((run / "final.json").read_text())
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "test_top5", "best_top1"):
        assert a[k] == b[k], k
    wa = load_file(str(tmp_path / "ref" / "epoch0002.safetensors"))
    wb = load_file(str(run / "epoch0002.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    hist = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in hist] == [1, 2, 3]
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # L_re is on only in the last epoch (10% of 3 epochs, at least one)
    assert [h["beta"] for h in hist] == [0.0, 0.0, 0.1]


def test_existing_run_needs_resume(fmnist, tmp_path):
    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=64, test_subset=32)
    train(cfg)
    with pytest.raises(ValueError, match="already holds a run"):
        train(cfg)


class NaNAfter(torch.nn.Module):
    """A teacher that returns NaN logits from its n-th call in training on (tests the NaN stop);
    ``calls`` counts training's calls: the start-up check's forward (bhvit.train._check_teacher)
    is call 0."""

    def __init__(self, n):
        super().__init__()
        self.n, self.calls = n, -1
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        self.calls += 1
        out = torch.zeros(x.shape[0], 10)
        return out + float("nan") if self.calls >= self.n else out


def test_nan_loss_stops_and_keeps_last_good_checkpoint(fmnist, tmp_path):
    cfg = micro_config(fmnist, tmp_path / "r", epochs=3, batch_size=64, subset=128, test_subset=32)
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 1.*epoch 1\)"):
        train(cfg, teacher=NaNAfter(3))  # 2 steps per epoch: the 3rd call is epoch 2, step 1
    doc = json.loads((tmp_path / "r" / "last.json").read_text())
    assert doc["epoch"] == 0
    model, _ = load_model(tmp_path / "r")
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nan_check_deferred_still_names_the_first_bad_step(fmnist, tmp_path, monkeypatch):
    # On an accelerator the host reads the NaN flag every few steps; the error must still
    # name the step where the loss first went bad, and training stops at the next check.
    monkeypatch.setattr("bhvit.train._nonfinite_check_steps", lambda device: 3)
    cfg = micro_config(fmnist, tmp_path / "r", epochs=3, batch_size=32, subset=256, test_subset=32)
    teacher = NaNAfter(10)  # 8 steps per epoch: call 10 is epoch 2, step 2
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 2, step 2;.*epoch 1\)"):
        train(cfg, teacher=teacher)
    assert teacher.calls == 11  # checked after step 3, not after every step
    assert json.loads((tmp_path / "r" / "last.json").read_text())["epoch"] == 0


@pytest.mark.parametrize("check, nan_call, restored", [(3, 10, True), (3, 2, False), (1, 10, True)])
def test_nan_stop_restores_the_model_object(fmnist, tmp_path, monkeypatch, check, nan_call, restored):
    # With the check every 3 steps, steps 2 and 3 ran the optimizer on a NaN loss before it
    # stopped; the model passed in must get the last checkpoint's weights back (also when the
    # check runs every step, as on the CPU), or the error must say it cannot.
    monkeypatch.setattr("bhvit.train._nonfinite_check_steps", lambda device: check)
    cfg = micro_config(fmnist, tmp_path / "r", epochs=3, batch_size=32, subset=256, test_subset=32)
    model = create_model("bhvit_micro_c28", num_classes=10)
    msg = "holds that checkpoint's weights again" if restored else "non-finite values .no checkpoint yet"
    with pytest.raises(TrainingDiverged, match=msg):
        train(cfg, teacher=NaNAfter(nan_call), model=model)
    finite = all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert finite == (restored or check == 1)
    if restored:
        saved, _ = load_model(tmp_path / "r")
        for k, v in saved.state_dict().items():
            assert torch.equal(model.state_dict()[k], v), k


def test_eval_cli_matches_training_metrics(fmnist, tmp_path, capsys):
    # eval --subset N takes the run's seed: the same images as training's --test-subset N
    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=128, test_subset=40, seed=1)
    res = train(cfg)
    assert main(["eval", str(tmp_path / "r"), "--data-dir", str(fmnist), "--no-progress", "--subset", "40"]) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ev["top1"] == pytest.approx(res["test_top1"]) and ev["count"] == 40
    assert ev["loss"] == pytest.approx(res["test_loss"], rel=1e-5)
    assert 0 <= ev["top1"] <= ev["top5"] <= 100
    assert ev["epoch"] == res["epoch"] == 1  # counted as in the log and metrics.jsonl
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path / "r"), "--data-dir", str(fmnist), "--batch-size", "0"])
    assert "--batch-size: must be >= 1, got 0" in capsys.readouterr().err


def test_eval_of_an_export_scores_it_through_the_runtime(fmnist, tmp_path, capsys):
    # what is deployed, scored on the same images as the checkpoint it came from
    train(micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=128, seed=1))
    assert main(["export", str(tmp_path / "r"), str(tmp_path / "e")]) == 0
    capsys.readouterr()
    results = []
    for path in (tmp_path / "r", tmp_path / "e", tmp_path / "e" / "manifest.json"):
        assert main(["eval", str(path), "--data-dir", str(fmnist), "--no-progress", "--threads", "1"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    ckpt, export, by_file = results
    assert ckpt["count"] == export["count"] == 64 and export["export"] == str(tmp_path / "e")
    assert export["kernels"].startswith("c-") and export["images_per_s"] > 0
    assert abs(export["top1"] - ckpt["top1"]) <= 100 / 64 and export["loss"] == pytest.approx(ckpt["loss"], rel=1e-3)
    assert by_file["top1"] == export["top1"]
    import bhvit.runtime

    assert bhvit.runtime.load(tmp_path / "e").pretrained_cfg == load_model(tmp_path / "r")[0].pretrained_cfg
    assert main(["eval", str(tmp_path / "e"), "--data-dir", str(fmnist), "--device", "cuda"]) == 2
    assert "an export runs on the CPU" in capsys.readouterr().err


def test_eval_save_logits(fmnist, tmp_path, capsys):
    import numpy as np

    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=64)
    train(cfg)

    def save_logits(path):
        return main(
            ["eval", str(tmp_path / "r"), "--data-dir", str(fmnist), "--no-progress", "--save-logits", str(path)]
        )

    f = tmp_path / "logits.npz"
    assert save_logits(f) == 0
    ev = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    z = np.load(f)
    assert z["logits"].shape == (64, 10) and z["logits"].dtype == np.float32
    assert z["labels"].shape == (64,)
    assert ev["top1"] == pytest.approx(100 * (z["logits"].argmax(1) == z["labels"]).mean())
    # numpy appends .npz; the report names the file that exists
    assert save_logits(tmp_path / "plain") == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["logits_file"] == str(tmp_path / "plain.npz")
    assert (tmp_path / "plain.npz").is_file()
    assert save_logits(tmp_path / "nodir" / "x.npz") == 2
    assert "does not exist" in capsys.readouterr().err


def test_init_from_copies_matching_weights(fmnist, tmp_path, capsys):
    from bhvit.checkpoint import load_matching_weights

    train(
        micro_config(
            fmnist, tmp_path / "fp", epochs=1, batch_size=64, subset=64, test_subset=32, overrides={"binary": False}
        )
    )
    fp, _ = load_model(tmp_path / "fp")
    # a binary student built from the same names: the float twin's tensors land in it
    student = type(fp)(fp.cfg.__class__.from_dict(dict(fp.cfg.to_dict(), binary=True)))
    n, total = load_matching_weights(student, tmp_path / "fp")
    fp_state, st_state = fp.state_dict(), student.state_dict()
    assert 0 < n <= total and n >= 0.9 * total
    keys = [k for k in fp_state if k in st_state and fp_state[k].shape == st_state[k].shape]
    assert len(keys) == n and "stem.proj.weight" in keys
    assert all(torch.equal(fp_state[k], st_state[k]) for k in keys)
    # a dagger student (float downsampling) takes the twin's downsampling conv and norm too,
    # and a twin with float downsampling initialises a binary-downsampling model
    dagger = type(fp)(fp.cfg.__class__.from_dict(dict(fp.cfg.to_dict(), binary=True, fp_downsample=True)))
    n_dagger, total_dagger = load_matching_weights(dagger, tmp_path / "fp")
    d_state = dagger.state_dict()
    conv = "stages.1.downsample.conv.conv.weight"
    assert torch.equal(d_state[conv], fp_state["stages.1.downsample.reduce.op.conv.weight"])
    assert torch.equal(
        d_state["stages.3.downsample.norm.running_var"], fp_state["stages.3.downsample.reduce.norm.running_var"]
    )
    # the dagger model lacks only what the binary student lacks (binary-only tensors)
    assert total_dagger - n_dagger == total - n
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in d_state.items()}, str(tmp_path / "dagger.safetensors"))
    back = type(fp)(fp.cfg)
    n_back, _ = load_matching_weights(back, tmp_path / "dagger.safetensors")
    assert torch.equal(back.state_dict()["stages.1.downsample.reduce.op.conv.weight"], d_state[conv])
    assert n_back == n_dagger
    # through the CLI: the first epoch starts from the twin's weights
    assert (
        main(
            COMMON
            + [
                "--data-dir",
                str(fmnist),
                "--epochs",
                "1",
                "--subset",
                "64",
                "--test-subset",
                "32",
                "--init-from",
                str(tmp_path / "fp"),
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert f"initialised {n} of {total} tensors" in capsys.readouterr().out
    # resuming that run needs (and reloads) nothing from --init-from
    assert (
        main(
            COMMON
            + [
                "--data-dir",
                str(fmnist),
                "--epochs",
                "2",
                "--subset",
                "64",
                "--test-subset",
                "32",
                "--resume",
                "--out",
                str(tmp_path / "s"),
            ]
        )
        == 0
    )
    assert "initialised" not in capsys.readouterr().out
    assert json.loads((tmp_path / "s" / "final.json").read_text())["epoch"] == 2
    # nothing matching: a clear error
    save_file({"other.weight": torch.zeros(3, 3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="no tensor matches"):
        load_matching_weights(student, tmp_path / "other.safetensors")


def test_checkpoint_errors(fmnist, tmp_path, capsys):
    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=64, test_subset=32)
    train(cfg)
    w = tmp_path / "r" / "epoch0000.safetensors"
    blob = bytearray(w.read_bytes())
    blob[-100] ^= 1  # one bit of a weight
    w.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="epoch0000.safetensors: SHA-256 does not match"):
        load_model(tmp_path / "r")
    w.write_bytes(blob[:1000])
    with pytest.raises(CheckpointError, match="epoch0000.safetensors: 1,000 bytes, too few for the"):
        load_model(tmp_path / "r")
    with pytest.raises(CheckpointError, match="epoch0000.safetensors: cannot read safetensors"):
        load_matching_weights(create_model("bhvit_micro_c28", num_classes=10), w)  # no record: parsed
    assert main(["eval", str(tmp_path / "nothing")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "r" / "best.json").write_text("{")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(tmp_path / "r")


def test_train_cli_rejects_mismatched_model(fmnist, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--model",
            "bhvit_micro_c32",
            "--data-dir",
            str(fmnist),
            "--out",
            str(tmp_path / "r"),
            "--epochs",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 2
    assert "dataset images are 1x28x28 but bhvit_micro_c32 expects 3x32x32" in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_ddp_ranks_end_identical(fmnist, tmp_path):
    out = tmp_path / "ddp"
    cmd = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone", "-m", "bhvit.cli"]
        + COMMON
        + ["--data-dir", str(fmnist), "--epochs", "2", "--subset", "128", "--out", str(out)]
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    final = json.loads((out / "final.json").read_text())
    assert final["world_size"] == 2
    assert final["ranks_identical"] is True and len(final["rank_checksums"]) == 2
    hist = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(hist) == 2 and hist[-1]["epoch"] == 2
    # metrics are reduced over both ranks: the test accuracy is over all 64 test images
    assert (hist[-1]["test_top1"] * 64 / 100) == pytest.approx(round(hist[-1]["test_top1"] * 64 / 100))


@pytest.mark.slow
def test_ddp_nan_on_one_rank_stops_every_rank(fmnist, tmp_path):
    out = tmp_path / "ddp_nan"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--standalone",
        str(Path(__file__).with_name("ddp_nan.py")),
        str(fmnist),
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    msgs = [(out / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert all("at epoch 2, step 1;" in m for m in msgs), msgs
    assert "loss became nan" in msgs[1] and "non-finite on another rank" in msgs[0]


def test_resume_with_changed_settings_is_refused(fmnist, tmp_path):
    from dataclasses import replace

    cfg = micro_config(fmnist, tmp_path / "r", epochs=2, batch_size=64, subset=64, test_subset=32)
    with pytest.raises(TrainingDiverged):
        train(cfg, teacher=NaNAfter(2))  # stop after epoch 1 so that a resume has work to do
    with pytest.raises(CheckpointError, match=r"training settings differ .*lr: None -> 0.01"):
        train(replace(cfg, resume=True, lr=0.01))
    with pytest.raises(CheckpointError, match=r"training settings differ .*test_subset: 32 -> 64"):
        train(replace(cfg, resume=True, test_subset=None))  # best epoch chosen on two test sets
    with pytest.raises(CheckpointError, match=r"model config differs .*\['qd'\]"):
        train(replace(cfg, resume=True, overrides={"qd": False}))


def test_resume_check_compares_teacher_checkpoints_not_spellings(tmp_path):
    from dataclasses import asdict

    from bhvit.train import _check_resume

    for run in ("t", "u"):
        (tmp_path / run).mkdir()
        (tmp_path / run / "best.json").write_text("{}")
    cfg = TrainConfig(model="bhvit_micro_c28", out=str(tmp_path / "s"), teacher=str(tmp_path / "t"))
    doc = {"train_config": dict(asdict(cfg), teacher=str(tmp_path / "t" / "best.json"))}
    _check_resume(doc, torch.nn.Identity(), cfg, tmp_path / "s")  # the run dir and its best.json: one teacher
    doc["train_config"]["teacher"] = str(tmp_path / "u")
    with pytest.raises(CheckpointError, match=r"settings differ .*\(teacher: .*/u' -> .*/t'\)"):
        _check_resume(doc, torch.nn.Identity(), cfg, tmp_path / "s")
    doc["train_config"]["teacher"] = None
    with pytest.raises(CheckpointError, match=r"teacher: None -> "):
        _check_resume(doc, torch.nn.Identity(), cfg, tmp_path / "s")


def test_exact_float32_restores_tf32_settings():
    from bhvit.train import _tf32_switches, exact_float32

    switches = _tf32_switches()
    before = [getattr(o, a) for o, a, _ in switches]
    try:
        # a user who chose TF32 (through torch's newer precision settings where they exist)
        for o, a, exact in switches:
            setattr(o, a, "tf32" if a == "fp32_precision" else True)
        chosen = [getattr(o, a) for o, a, _ in switches]
        with exact_float32():
            assert [getattr(o, a) for o, a, _ in switches] == [v for _, _, v in switches]
        assert [getattr(o, a) for o, a, _ in switches] == chosen
        with pytest.raises(RuntimeError, match="boom"):
            with exact_float32():
                raise RuntimeError("boom")
        assert [getattr(o, a) for o, a, _ in switches] == chosen
        with exact_float32(enabled=False):
            assert [getattr(o, a) for o, a, _ in switches] == chosen
    finally:
        for (o, a, _), v in zip(switches, before):
            setattr(o, a, v)


def test_step_flips_count_every_step(fmnist, tmp_path):
    base = dict(epochs=1, subset=64, test_subset=32)
    # one step per epoch: the per-step count is the net count
    one = train(micro_config(fmnist, tmp_path / "one", batch_size=64, **base))
    assert one["step_flip_frac"] == one["flip_frac"] > 0
    # four steps: every net flip is also a step flip, and oscillations add more
    four = train(micro_config(fmnist, tmp_path / "four", batch_size=16, **base))
    assert four["step_flip_frac"] >= four["flip_frac"] > 0
    off = train(micro_config(fmnist, tmp_path / "off", batch_size=16, step_flips=False, **base))
    assert off["step_flip_frac"] is None and off["flip_frac"] == four["flip_frac"]


@pytest.mark.slow
def test_deterministic_flag_runs_and_matches_default_on_cpu(fmnist, tmp_path):
    args = COMMON + ["--data-dir", str(fmnist), "--epochs", "1", "--subset", "64", "--test-subset", "32"]
    finals = []
    for extra, name in (([], "a"), (["--deterministic"], "b")):
        p = _run(args + extra + ["--out", str(tmp_path / name)])
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out
        assert "deterministic implementation" not in out
        finals.append(json.loads((tmp_path / name / "final.json").read_text()))
    keys = ("train_loss", "test_loss", "test_top1", "flip_frac")
    assert {k: finals[0][k] for k in keys} == {k: finals[1][k] for k in keys}


def test_strip_checkpoint_half_precision(fmnist, tmp_path, capsys):
    from bhvit import create_model
    from bhvit.checkpoint import load_matching_weights, load_training_state, read_checkpoint_json

    cfg = micro_config(
        fmnist, tmp_path / "t", epochs=1, batch_size=64, subset=64, test_subset=32, overrides={"binary": False}
    )
    train(cfg)
    capsys.readouterr()
    assert main(["strip", str(tmp_path / "t"), str(tmp_path / "h"), "--dtype", "float16"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dtype"] == "float16" and rep["kept_float32"] == []
    assert rep["sign_kept_by_nudging"] == 0  # a full-precision model has no binary layers
    assert 0.45 < rep["bytes"] / rep["source_bytes"] < 0.55  # no optimizer state, 16-bit floats
    assert main(["strip", str(tmp_path / "t"), str(tmp_path / "f")]) == 0
    capsys.readouterr()

    x = torch.randn(8, 1, 28, 28)
    ref, doc = load_model(tmp_path / "t")
    half, hdoc = load_model(tmp_path / "h")
    full, _ = load_model(tmp_path / "f")
    assert all(p.dtype == torch.float32 for p in half.parameters())  # widened on loading
    with torch.no_grad():
        r, h, f = ref(x), half(x), full(x)
    assert torch.equal(r, f)  # a float32 copy is exact
    assert 0 < (h - r).abs().max() < 2e-2 * r.abs().max()
    assert hdoc["model_config"] == doc["model_config"] and hdoc["data"] == doc["data"]
    assert "optimizer" not in hdoc and hdoc["weights_only"]

    student = create_model("bhvit_micro_c28", num_classes=10)
    n, total = load_matching_weights(student, tmp_path / "h")  # --init-from accepts it
    assert n > 0.9 * total
    opt = torch.optim.AdamW(student.parameters())
    hd, hp = read_checkpoint_json(tmp_path / "h")
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        load_training_state(hd, hp.parent, student, opt)
    assert main(["strip", str(tmp_path / "t"), str(tmp_path / "h")]) == 2  # will not overwrite
    assert "already holds" in capsys.readouterr().err


@pytest.mark.slow
def test_compile_eager_backend_matches_and_keeps_one_graph(fmnist, tmp_path, capsys):
    # backend "eager" runs dynamo's captured graphs with the same kernels: a compiled run
    # must match the plain one bit for bit, in one graph per module (no graph breaks).
    import torch._dynamo as dynamo

    from bhvit import create_model

    def run(name, **kw):
        torch.manual_seed(1)
        teacher = create_model("bhvit_micro_c28", num_classes=10, binary=False)
        kw = dict(dict(subset=128), **kw)
        cfg = micro_config(fmnist, tmp_path / name, epochs=2, batch_size=32, test_subset=32, **kw)
        return train(cfg, teacher=teacher)

    plain = run("plain")
    dynamo.reset()
    dynamo.utils.counters.clear()
    compiled = run("compiled", compile="eager")
    assert dynamo.utils.counters["stats"]["unique_graphs"] == 2  # student and teacher
    assert not dynamo.utils.counters["graph_break"]
    for k in ("train_loss", "test_loss", "test_top1", "step_flip_frac"):
        assert compiled[k] == plain[k], k

    capsys.readouterr()
    run("partial", compile="eager", subset=144)  # 4 full batches of 32 and one of 16
    assert "4 steps/epoch" in capsys.readouterr().out  # the partial batch is dropped


def test_strip_half_keeps_binary_signs(tmp_path):
    # The binarizer takes sign(W - mean(W)) per output channel. A weight just above its
    # channel's mean can fall below it once the weights (and so the mean) are rounded to 16
    # bits: the copy must move it back, so that it is the same binary network.
    from bhvit import create_model
    from bhvit.checkpoint import save_checkpoint, strip_checkpoint
    from bhvit.layers import binary_layers

    model = create_model("bhvit_micro_c28", num_classes=10)
    layers = list(binary_layers(model))
    w = layers[0].weight.data.view(layers[0].weight.shape[0], -1)
    n = w.shape[1]

    def centred_signs(m):
        return [layer.kernel_quantizer.scale_and_sign(layer.weight)[1] for layer in binary_layers(m)]

    def naive_flips(row, dtype):
        r = row.to(dtype).float()
        return int(((row - row.mean()) >= 0).ne((r - r.mean()) >= 0).sum())

    # weight 0 of row 0 sits delta above the row mean, with delta shrunk until rounding flips it
    for dtype in (torch.float16, torch.bfloat16):
        for delta in (1e-4 * 0.5**i for i in range(30)):
            row = w[0].clone()
            row[0] = (row[1:].sum() + n * delta) / (n - 1)  # row[0] - mean(row) = delta
            if naive_flips(row, dtype):
                break
        else:
            pytest.fail(f"no test row flips in {dtype}")
        w[0] = row
        save_checkpoint(tmp_path / f"run_{dtype}", 0, model, {})
        name = str(dtype).split(".")[1]
        rep = strip_checkpoint(tmp_path / f"run_{dtype}", tmp_path / name, name)
        assert rep["kept_float32"] == [] and rep["sign_kept_by_nudging"] >= 1
        half, _ = load_model(tmp_path / name)
        for a, b in zip(centred_signs(model), centred_signs(half)):
            assert torch.equal(a, b)
        assert 0.45 < rep["bytes"] / rep["source_bytes"] < 0.55


def test_out_holding_a_stripped_copy_is_refused(fmnist, tmp_path):
    from bhvit import create_model
    from bhvit.checkpoint import save_checkpoint, strip_checkpoint

    save_checkpoint(tmp_path / "run", 0, create_model("bhvit_micro_c28", num_classes=10), {})
    strip_checkpoint(tmp_path / "run", tmp_path / "half", "float16")
    cfg = micro_config(fmnist, tmp_path / "half", epochs=1, batch_size=64, subset=64)
    with pytest.raises(ValueError, match="holds a checkpoint"):
        train(cfg)
    assert sorted(p.name for p in (tmp_path / "half").iterdir()) == ["best.json", "epoch0000.safetensors"]


def test_resume_compile_setting_must_match(fmnist, tmp_path):
    from bhvit.train import _check_resume

    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=64, test_subset=32)
    train(cfg)
    doc = json.loads((tmp_path / "r" / "last.json").read_text())
    model, _ = load_model(tmp_path / "r")
    cfg.resume = True
    _check_resume(doc, model, cfg, tmp_path / "r")  # same setting: fine
    cfg.compile = "inductor"
    with pytest.raises(CheckpointError, match="without --compile"):
        _check_resume(doc, model, cfg, tmp_path / "r")
    doc["train_config"]["compile"] = "aot_eager"  # another backend: the batches are the same
    _check_resume(doc, model, cfg, tmp_path / "r")
    assert doc["world_size"] == 1
    with pytest.raises(CheckpointError, match="trained with 1 process.*this is 2"):
        _check_resume(doc, model, cfg, tmp_path / "r", world=2)  # the global batch would change


def test_teacher_for_other_data_is_refused(fmnist, tmp_path):
    from bhvit import create_model
    from bhvit.checkpoint import save_checkpoint

    for name, kw in (("c100", dict(num_classes=100)), ("rgb", dict(num_classes=10, in_chans=3))):
        save_checkpoint(tmp_path / name, 0, create_model("bhvit_micro_c28", binary=False, **kw), {})
        cfg = micro_config(
            fmnist, tmp_path / f"s_{name}", epochs=1, batch_size=32, subset=32, teacher=str(tmp_path / name)
        )
        with pytest.raises(
            ValueError, match=f"--teacher .*{name}: it takes .* but this run has 1x28x28 images and 10 classes"
        ):
            train(cfg)
    cfg.teacher = None  # a user module predicting other classes: stopped at start-up, before any epoch
    with pytest.raises(ValueError, match=r"teacher returned logits of shape \(32, 7\), the student \(32, 10\)"):
        train(cfg, teacher=torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 7)))


# with an activation-binary stage (act_epochs=1) it is an end-to-end run: in the slow suite
@pytest.mark.parametrize("act_epochs", [0, pytest.param(1, marks=pytest.mark.slow)])
def test_recipe_runs_every_stage(fmnist, tmp_path, capsys, act_epochs):
    run = tmp_path / "rec"
    args = [
        "recipe",
        "--model",
        "bhvit_micro_c28",
        "--data-dir",
        str(fmnist),
        "--batch-size",
        "64",
        "--threads",
        "1",
        "--no-progress",
        "--epochs",
        "1",
        "--teacher-epochs",
        "1",
        "--test-subset",
        "32",
        "--out",
        str(run),
    ]
    assert main(args + ["--act-epochs", str(act_epochs)]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    student = json.loads((run / "student" / "final.json").read_text())
    assert summary["student_top1"] == student["test_top1"]
    assert [h["epoch"] for h in read_metrics(run / "student")] == [1]
    assert read_metrics(run / "student")[-1]["test_top1"] == student["test_top1"]
    assert read_metrics(tmp_path / "no_run") == []
    teacher_doc = json.loads((run / "teacher" / "best.json").read_text())
    assert teacher_doc["model_config"]["binary"] is False
    s_doc = json.loads((run / "student" / "last.json").read_text())
    assert s_doc["model_config"]["binary"] is True and s_doc["train_config"]["teacher"].endswith("best.json")
    if act_epochs:
        a_doc = json.loads((run / "student_acts" / "last.json").read_text())
        assert a_doc["model_config"]["binary_weights"] is False
        assert a_doc["metrics"]["flip_frac"] is None  # no binary weights in step 1
        assert s_doc["train_config"]["init_from"] == str(run / "student_acts" / "last.json")
        assert "stage 3/3" in out and f"from {run / 'student_acts' / 'last.json'}" in out
        assert summary["acts_step_top1"] == a_doc["metrics"]["test_top1"]
    else:
        assert not (run / "student_acts").exists() and s_doc["train_config"]["init_from"] is None
        # A student on a subset normalises its inputs the way its teacher was trained.
        sub = COMMON + [
            "--data-dir",
            str(fmnist),
            "--epochs",
            "1",
            "--subset",
            "40",
            "--test-subset",
            "32",
            "--teacher",
            str(run / "teacher"),
            "--out",
            str(tmp_path / "sub"),
        ]
        assert main(sub) == 0
        assert "normalising with the teacher's statistics" in capsys.readouterr().out
        sub_doc = json.loads((tmp_path / "sub" / "last.json").read_text())
        assert sub_doc["data"]["mean"] == teacher_doc["data"]["mean"]
        assert sub_doc["data"]["std"] == teacher_doc["data"]["std"]
    assert main(args + ["--act-epochs", str(act_epochs), "--resume"]) == 0  # finished stages are kept
    out = capsys.readouterr().out
    assert "teacher already trained" in out


def test_killed_between_checkpoint_pointers_resumes(fmnist, tmp_path, monkeypatch):
    # The first epoch is the best: a run killed after writing one of last.json and best.json
    # must still resume (last.json is written first), and keep epoch 1 as its best checkpoint
    # although epoch 2 scores lower.
    import bhvit.checkpoint as ck
    import bhvit.train as tr

    real_eval, scores = tr.evaluate, iter([50.0, 40.0])

    def scripted_eval(*a, **k):
        return dict(real_eval(*a, **k), top1=next(scores))

    monkeypatch.setattr(tr, "evaluate", scripted_eval)
    real, writes = ck.atomic_write_json, []

    def killed_at_second_pointer(obj, path):
        if Path(path).name in ("last.json", "best.json"):
            writes.append(Path(path).name)
            if len(writes) == 2:
                raise KeyboardInterrupt
        real(obj, path)

    monkeypatch.setattr(ck, "atomic_write_json", killed_at_second_pointer)
    cfg = micro_config(fmnist, tmp_path / "r", epochs=2, batch_size=64, subset=64, test_subset=32)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert writes == ["last.json", "best.json"]
    monkeypatch.setattr(ck, "atomic_write_json", real)
    cfg.resume = True
    res = train(cfg)
    assert res["epoch"] == 2 and res["best_top1"] == 50.0
    assert [h["epoch"] for h in read_metrics(tmp_path / "r")] == [1, 2]
    best = json.loads((tmp_path / "r" / "best.json").read_text())
    assert best["epoch"] == 0 and best["metrics"]["test_top1"] == 50.0
    assert (tmp_path / "r" / best["weights"]).is_file()


def test_killed_before_metrics_written_resumes_complete(fmnist, tmp_path, monkeypatch):
    # Killed after the last epoch's checkpoint but before metrics.jsonl: the resumed run has
    # no epoch left to train and must still leave the full metrics.jsonl.
    import bhvit.train as tr

    real = tr._write_metrics

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tr, "_write_metrics", killed)
    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=64, subset=64, test_subset=32)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert read_metrics(tmp_path / "r") == []
    monkeypatch.setattr(tr, "_write_metrics", real)
    cfg.resume = True
    assert train(cfg)["epoch"] == 1
    assert [h["epoch"] for h in read_metrics(tmp_path / "r")] == [1]


def test_make_optimizer_is_fused_adamw_matching_the_reference():
    from bhvit.train import make_optimizer

    torch.manual_seed(0)
    a = torch.nn.Linear(8, 4)
    b = torch.nn.Linear(8, 4)
    b.load_state_dict(a.state_dict())
    w0 = a.weight.detach().clone()
    opt_a = make_optimizer(a.parameters(), 1e-2, 0.05, "cpu")
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.05, foreach=False)
    assert opt_a.defaults["fused"] is True and opt_b.defaults["fused"] is None
    x = torch.randn(16, 8)
    for _ in range(5):
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert (a.weight - w0).abs().max() > 0.02  # five steps of about lr each
    torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.bias, b.bias, rtol=0, atol=1e-6)
    assert make_optimizer(a.parameters(), 1e-3, 0.0, "meta").defaults["fused"] is None


@pytest.mark.parametrize("n,world", [(7, 3), (10, 4), (9, 3), (2, 4), (1, 1)])
def test_unpadded_part_of_each_shard_covers_the_data_once(n, world):
    from bhvit.train import _batches, _n_unpadded

    kept = []
    for rank in range(world):
        shard = torch.cat(_batches(n, 2, epoch=3, seed=5, rank=rank, world=world, shuffle=True)).tolist()
        assert len(shard) == -(-n // world)
        kept += shard[: _n_unpadded(n, rank, world)]
    assert sorted(kept) == list(range(n))  # each sample once, the repeats left out


def test_resume_from_an_unfused_optimizer_state_runs_fused(tmp_path):
    """A checkpoint written by the per-parameter AdamW resumes into the fused one: the file's
    group settings would otherwise switch it back (and GradScaler would then crash)."""
    from bhvit.checkpoint import load_training_state, read_checkpoint_json, save_checkpoint
    from bhvit.train import make_optimizer

    torch.manual_seed(0)
    m = torch.nn.Linear(4, 2)
    old = torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False)
    m(torch.randn(3, 4)).sum().backward()
    old.step()
    save_checkpoint(tmp_path, 0, m, {}, old)
    opt = make_optimizer(m.parameters(), 1e-2, 0.0, "cpu")
    doc, _ = read_checkpoint_json(tmp_path / "last.json")
    load_training_state(doc, tmp_path, m, opt)
    g = opt.param_groups[0]
    assert g["fused"] is True and g["foreach"] is None
    step = opt.state[m.weight]["step"]
    assert float(step) == 1.0 and step.dtype == torch.float32 and step.device == m.weight.device
    torch.testing.assert_close(opt.state[m.weight]["exp_avg"], old.state[m.weight]["exp_avg"])
    # GradScaler's protocol for fused optimizers (what a CUDA --amp run does each step)
    opt.grad_scale, opt.found_inf = torch.ones(()), torch.zeros(())
    opt.step()
    assert float(opt.state[m.weight]["step"]) == 2.0


def test_buffer_averaging_leaves_constant_buffers_alone(tmp_path):
    # Across ranks only state is averaged (BatchNorm statistics); the shift taps are constants.
    import torch.distributed as dist
    from bhvit.train import _average_buffers

    m = create_model("bhvit_micro_c28", num_classes=10)
    before = {k: b.clone() for k, b in m.named_buffers()}
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        _average_buffers(m, 4)  # one process: the all-reduce is the identity, then / 4
    finally:
        dist.destroy_process_group()
    after = dict(m.named_buffers())
    taps = [k for k in before if k.endswith((".taps_h", ".taps_w", ".divisors"))]
    assert len(taps) == 3 * 5  # 5 blocks
    assert all(torch.equal(before[k], after[k]) for k in taps)
    var = "stages.0.blocks.0.norm2.running_var"
    assert torch.equal(after[var], before[var] / 4)


def test_cuda_device_names_resolve_to_an_explicit_index(monkeypatch):
    """'cuda' becomes 'cuda:<current>' (torch.cuda.set_device and CUDA graphs need an index);
    an index past the devices present and a malformed name are refused with the choices."""
    from bhvit.errors import ConfigError
    from bhvit.train import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert _resolve_device("cuda", 0, 1) == "cuda:1"
    assert _resolve_device("auto", 0, 1) == "cuda:1"
    assert _resolve_device("cuda:0", 0, 1) == "cuda:0"
    with pytest.raises(ConfigError, match=r"2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        _resolve_device("cuda:2", 0, 1)
    with pytest.raises(ConfigError, match="'cuda:x'"):
        _resolve_device("cuda:x", 0, 1)


class _HFStyleTeacher(torch.nn.Module):
    """A teacher that answers as Hugging Face image classifiers do: an object with .logits."""

    def __init__(self, out="object"):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 10))
        self.out = out

    def forward(self, x):
        from types import SimpleNamespace

        logits = self.net(x)
        return {
            "object": lambda: SimpleNamespace(loss=None, logits=logits),
            "tuple": lambda: (logits, None),
            "hidden": lambda: SimpleNamespace(last_hidden_state=logits),
        }[self.out]()


def test_teacher_outputs_with_logits_are_accepted():
    from bhvit.errors import ConfigError
    from bhvit.train import teacher_logits

    hf = pytest.importorskip("transformers.modeling_outputs")
    t = torch.randn(2, 10)
    assert teacher_logits(hf.ImageClassifierOutput(logits=t)) is t
    assert teacher_logits(hf.ImageClassifierOutput(logits=t).to_tuple()) is t
    assert teacher_logits({"logits": t}) is t and teacher_logits([t]) is t and teacher_logits(t) is t
    with pytest.raises(ConfigError, match="the teacher returned a str; it must return the logits"):
        teacher_logits("logits")


def test_a_hugging_face_style_teacher_distils(fmnist, tmp_path):
    for out in ("object", "tuple"):
        res = train(
            micro_config(fmnist, tmp_path / out, epochs=1, batch_size=32, subset=32), teacher=_HFStyleTeacher(out)
        )
        assert res["epoch"] == 1 and read_metrics(tmp_path / out)[0]["kd_lambda"] == 0.8


def test_a_teacher_without_logits_is_refused_at_start_up(fmnist, tmp_path):
    from bhvit.errors import ConfigError

    cfg = micro_config(fmnist, tmp_path / "r", epochs=1, batch_size=32, subset=32)
    with pytest.raises(ConfigError) as e:
        train(cfg, teacher=_HFStyleTeacher("hidden"))
    msg = str(e.value)
    assert msg.startswith("the teacher (_HFStyleTeacher): the teacher returned a SimpleNamespace") and "\n" not in msg
    assert not (tmp_path / "r").exists()  # before any epoch: nothing written, no lock file left

    class Broken(torch.nn.Module):
        def forward(self, x):
            return x.view(len(x), 3, -1)  # a shape error inside the user's module

    with pytest.raises(ConfigError, match=r"the teacher \(Broken\): its forward on a batch of 32x1x28x28 images"):
        train(cfg, teacher=Broken())


def test_teacher_module_is_found_in_the_working_directory(tmp_path, monkeypatch):
    """The `bhvit` console script does not put the working directory on sys.path (`python
    -m` does): a my_teachers.py beside the run is found all the same."""
    from safetensors.torch import save_file

    from bhvit.train import load_external_teacher

    (tmp_path / "cwd_teachers.py").write_text(
        "from torch import nn\n\ndef small():\n    return nn.Sequential(nn.Flatten(), nn.Linear(4, 2))\n"
    )
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    monkeypatch.chdir(tmp_path)
    # sys.path as the console script has it: the script's directory, not the working one
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p and os.path.abspath(p) != str(tmp_path)])
    monkeypatch.delitem(sys.modules, "cwd_teachers", raising=False)
    try:
        t = load_external_teacher("cwd_teachers:small", "w.safetensors")
    finally:
        sys.modules.pop("cwd_teachers", None)
    x = torch.randn(3, 4)
    assert torch.equal(t(x), net(x))


def test_a_run_that_fails_at_start_up_leaves_no_lock_or_directory(tmp_path):
    from bhvit.data import DataError

    missing = tmp_path / "no_data"
    with pytest.raises(DataError):  # the dataset is read after the directory is locked
        train(micro_config(missing, tmp_path / "new" / "run", epochs=1))
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("x")
    for out in (tmp_path / "empty", tmp_path / "mine"):
        out.mkdir(exist_ok=True)
        with pytest.raises(DataError):
            train(micro_config(missing, out, epochs=1))
        assert out.is_dir() and not (out / ".bhvit.lock").exists()  # the user's directory stays
    assert [f.name for f in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_recipe_resume_continues_a_teacher_trained_for_fewer_epochs(fmnist, tmp_path, capsys):
    run = tmp_path / "rec"
    args = ["recipe", "--data-dir", str(fmnist), "--batch-size", "32", "--threads", "1", "--no-progress"]
    args += ["--subset", "64", "--test-subset", "32", "--epochs", "1", "--out", str(run)]
    assert main(args + ["--teacher-epochs", "1"]) == 0
    capsys.readouterr()
    assert main(args + ["--teacher-epochs", "2", "--resume"]) == 0
    out = capsys.readouterr().out
    assert f"stage 1/2: teacher in {run / 'teacher'} was trained for 1 epoch(s); continuing it to 2" in out
    assert f"note: {run / 'student'} began distilling from the teacher's earlier weights" in out
    assert [h["epoch"] for h in read_metrics(run / "teacher")] == [1, 2]
    assert json.loads((run / "teacher" / "final.json").read_text())["epoch"] == 2
    assert main(args + ["--teacher-epochs", "1", "--resume"]) == 0  # fewer: kept, and said
    out = capsys.readouterr().out
    assert "was trained for 2 epoch(s), more than the 1 asked now; using it as it is" in out
    assert [h["epoch"] for h in read_metrics(run / "teacher")] == [1, 2]
    assert main(args + ["--teacher-epochs", "2", "--resume"]) == 0
    assert "stage 1/2: teacher already trained in" in capsys.readouterr().out
