"""The CUDA-graph training step (``--cuda-graph``), its bookkeeping run on the CPU.

A CUDA graph needs a GPU (tests/test_gpu.py compares graphed and eager steps
there). Here the graph is replaced by a stand-in with the same contract: capturing runs
nothing, and each replay runs the step on the static input buffers and writes its results
into the output tensors the capture returned.
"""

import contextlib
import json

import pytest
import torch

import bhvit.train as train_mod
from bhvit.cudagraph import GraphCaptureError, GraphedStep
from bhvit.train import TrainConfig, make_optimizer, set_lr, train
from synth import micro_config, make_fashion_mnist


# Operators that make the host wait for the device (reading a value, or an output whose
# shape depends on the data): a CUDA graph cannot record them.
HOST_SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "nonzero",
    "is_nonzero",
    "equal",
    "masked_select",
    "unique",
    "_unique2",
    "unique_consecutive",
    "repeat_interleave",
}


class HostSyncs:
    """Counts, by name, the host-synchronising operators dispatched inside the block."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = self.seen = {}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                if name in HOST_SYNC_OPS:
                    seen[name] = seen.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


class CpuGraphedStep(GraphedStep):
    instances = []

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.replays = 0
        self.host_syncs = {}  # in the step a capture would record
        CpuGraphedStep.instances.append(self)

    def _on_side_stream(self):
        return contextlib.nullcontext()

    def _capture(self, static):
        self._graph = "captured"
        return None  # the first replay provides the output tensors

    def _replay(self):
        self.replays += 1
        if self._out is None:  # the step the capture records
            with HostSyncs() as syncs:
                self._out = self.fn(*self._static)
            self.host_syncs = syncs.seen
            return
        for o, n in zip(self._out, self.fn(*self._static)):
            o.copy_(n)


def _linear_step():
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    opt = make_optimizer(model.parameters(), 1e-2, 0.0, "cpu", capturable=True)

    def fn(x, y):
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return (loss.detach(),)

    return model, opt, fn


def test_graphed_step_warms_up_captures_once_and_replays_on_new_batches():
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)) for _ in range(7)]
    plain_model, plain_opt, plain_fn = _linear_step()
    graph_model, graph_opt, graph_fn = _linear_step()
    step = CpuGraphedStep(graph_fn, warmup=2)
    outs = []
    lr_tensor = graph_opt.param_groups[0]["lr"]
    for i, (x, y) in enumerate(batches):
        for opt in (plain_opt, graph_opt):
            set_lr(opt, 1e-2 * (1 - i / 10))
        # A graph reads the tensor it recorded: the learning rate is written into it.
        assert graph_opt.param_groups[0]["lr"] is lr_tensor
        want = plain_fn(x, y)[0]
        got = step(x, y)[0]
        outs.append(got)
        assert got.item() == want.item(), i  # read before the next call overwrites it
        assert step.captured == (i >= 2)
    assert step.captures == 1 and step.replays == 5
    assert all(o is outs[2] for o in outs[2:])  # the graph's own output tensor
    assert outs[0] is not outs[1]  # eager warm-up steps return fresh tensors
    for a, b in zip(plain_model.parameters(), graph_model.parameters()):
        assert torch.equal(a, b)
    # The learning rate stays the tensor the optimizer step reads, changed in place.
    assert torch.is_tensor(graph_opt.param_groups[0]["lr"])
    assert graph_opt.param_groups[0]["lr"].item() == pytest.approx(1e-2 * (1 - 6 / 10))


def test_flip_count_updates_its_buffers_in_place():
    from bhvit import create_model
    from bhvit.train import InPlaceFlipCount, sign_snapshot

    torch.manual_seed(0)
    model = create_model("bhvit_micro_c28", num_classes=10)
    flips = InPlaceFlipCount(model, "cpu")
    prev, count = list(flips.prev), flips.count
    ptrs = [t.data_ptr() for t in prev] + [count.data_ptr()]
    want = 0
    for _ in range(3):
        before = sign_snapshot(model)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        want += sum(int((a != b).sum()) for a, b in zip(before, sign_snapshot(model)))
        flips.update(model)
    assert int(flips.count) == want > 0
    assert all(a is b for a, b in zip(flips.prev, prev)) and flips.count is count
    assert [t.data_ptr() for t in flips.prev] + [flips.count.data_ptr()] == ptrs
    assert all(torch.equal(a, b) for a, b in zip(flips.prev, sign_snapshot(model)))


@pytest.mark.parametrize(
    "name, binary, over",
    [("bhvit_micro_c28", True, {}), ("bhvit_tiny_c28", True, {"fp_downsample": True}), ("bhvit_tiny_c28", False, {})],
)
def test_training_step_has_no_host_sync_after_the_first(name, binary, over):
    # What --cuda-graph captures (forward with KD and L_re, backward, AdamW, flip count) must
    # not make the host wait for the device; the detector must see QD's start from data,
    # the one read of the first step, in binary models.
    import torch.nn.functional as F

    from bhvit import create_model
    from bhvit.losses import regularization_loss
    from bhvit.train import InPlaceFlipCount, kd_loss

    torch.manual_seed(0)
    model = create_model(name, num_classes=10, binary=binary, **over).train()
    teacher = create_model(name, num_classes=10, binary=False).eval()
    opt = make_optimizer(model.parameters(), 1e-3, 0.0, "cpu", capturable=True)
    flips = InPlaceFlipCount(model, "cpu") if binary else None

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        logits = model(x)
        with torch.no_grad():
            t_logits = teacher(x)
        loss = 0.2 * F.cross_entropy(logits, y) + 0.8 * kd_loss(logits, t_logits)
        if binary:
            loss = loss + 0.1 * regularization_loss(model)
        loss.backward()
        opt.step()
        if flips is not None:
            flips.update(model)

    x, y = torch.randn(2, 1, 28, 28), torch.randint(0, 10, (2,))
    with HostSyncs() as first:
        step(x, y)
    with HostSyncs() as later:
        step(x, y)
    n_qd = sum(type(m).__name__ == "QuantizationDecomposition" for m in model.modules())
    assert n_qd > 0 or not binary
    assert first.seen == ({"_local_scalar_dense": n_qd} if binary else {})
    assert later.seen == {}


def test_graphed_step_errors():
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda x: (x,), warmup=0)
    _, _, fn = _linear_step()
    step = CpuGraphedStep(fn, warmup=1)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    step(x, y)
    step(x, y)
    with pytest.raises(ValueError, match=r"captured for inputs of shape \(4, 6\).*got \(3, 6\)"):
        step(x[:3], y[:3])

    class Failing(CpuGraphedStep):
        def _capture(self, static):
            raise RuntimeError("operation not permitted when stream is capturing")

    step = Failing(fn, warmup=1)
    step(x, y)
    with pytest.raises(
        GraphCaptureError,
        match="capturing the training step as a CUDA graph failed "
        r"\(RuntimeError: operation not permitted",
    ):
        step(x, y)
    assert not step.captured


def test_cuda_graph_settings_are_checked():
    from bhvit.train import _check_cuda_graph

    with pytest.raises(ValueError, match="--cuda-graph: it needs a CUDA device"):
        train(TrainConfig(cuda_graph=True, device="cpu"))
    _check_cuda_graph(TrainConfig(cuda_graph=True), "cuda", 1)
    for cfg, world, what in (
        (TrainConfig(cuda_graph=True), 2, "single process"),
        (TrainConfig(cuda_graph=True, amp=True), 1, "--amp"),
        (TrainConfig(cuda_graph=True, compile="inductor"), 1, "one of --compile"),
    ):
        with pytest.raises(ValueError, match=what):
            _check_cuda_graph(cfg, "cuda:0", world)


def test_capturable_optimizer_state_round_trips_through_json():
    from bhvit.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    model, opt, fn = _linear_step()
    fn(torch.randn(4, 6), torch.randint(0, 3, (4,)))
    set_lr(opt, 3e-3)
    tensors, meta = optimizer_to_tensors(opt)
    meta = json.loads(json.dumps(meta))  # as written to the checkpoint's JSON
    assert meta["param_groups"][0]["lr"] == pytest.approx(3e-3)
    opt2 = make_optimizer(model.parameters(), 1e-2, 0.0, "cpu", capturable=True)
    opt2.load_state_dict(optimizer_from_tensors(tensors, meta))
    set_lr(opt2, 2e-3)  # a float from the file becomes the device tensor again
    assert torch.is_tensor(opt2.param_groups[0]["lr"]) and opt2.param_groups[0]["capturable"]
    assert opt2.param_groups[0]["lr"].item() == pytest.approx(2e-3)


def _last_weights(run):
    from safetensors.torch import load_file

    return load_file(str(run / json.loads((run / "last.json").read_text())["weights"]))


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory):
    return make_fashion_mnist(tmp_path_factory.mktemp("fm"), n_train=320, n_test=64)


@pytest.mark.slow
def test_train_with_cuda_graph_matches_eager_steps(fmnist, tmp_path, monkeypatch, capsys):
    # The training loop with the stand-in graph against the same loop eager, both with the
    # capturable optimizer (its float32 learning rate rounds differently from a float's).
    # A KD student with L_re in its second epoch: the loss changes, so a second graph.
    from bhvit import create_model

    def run(name, graph):
        torch.manual_seed(1)
        teacher = create_model("bhvit_micro_c28", num_classes=10, binary=False)
        cfg = micro_config(
            fmnist,
            tmp_path / name,
            epochs=2,
            batch_size=32,
            subset=160,
            test_subset=32,
            re_last_frac=0.5,
            cuda_graph=graph,
        )
        return train(cfg, teacher=teacher)

    monkeypatch.setattr(train_mod, "GraphedStep", CpuGraphedStep)
    monkeypatch.setattr(train_mod, "_check_cuda_graph", lambda *a: None)
    CpuGraphedStep.instances = []
    graphed = run("graphed", True)
    steps = CpuGraphedStep.instances
    assert len(steps) == 2  # epoch 1: CE + KD; epoch 2: CE + KD + L_re
    assert [s.captures for s in steps] == [1, 1]
    assert [s.host_syncs for s in steps] == [{}, {}]  # nothing a CUDA graph could not record
    assert [s.replays for s in steps] == [2, 4]  # 5 steps an epoch: 3 warm-up, then 1
    real = train_mod.make_optimizer
    monkeypatch.setattr(train_mod, "make_optimizer", lambda *a, **kw: real(*a, **dict(kw, capturable=True)))
    eager = run("eager", False)
    assert eager["beta"] == graphed["beta"] == 0.1
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "flip_frac", "step_flip_frac"):
        assert graphed[k] == eager[k], k
    wg, we = (_last_weights(tmp_path / name) for name in ("graphed", "eager"))
    assert wg.keys() == we.keys() and all(torch.equal(wg[k], we[k]) for k in wg)

    # A capture that fails: the run warns and goes on eager, with the same result.
    class Failing(CpuGraphedStep):
        def _capture(self, static):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(train_mod, "GraphedStep", Failing)
    CpuGraphedStep.instances = []
    failed = run("failed", True)
    assert len(CpuGraphedStep.instances) == 1 and not CpuGraphedStep.instances[0].captured
    for k in ("train_loss", "train_top1", "test_loss", "test_top1", "flip_frac", "step_flip_frac"):
        assert failed[k] == eager[k], k
    assert "Training goes on without CUDA graphs" in capsys.readouterr().out
    monkeypatch.setattr(train_mod, "GraphedStep", CpuGraphedStep)

    # Both runs resume for a third epoch (the learning rate read back from JSON becomes a
    # tensor again) and still agree.
    def resume(name, graph):
        torch.manual_seed(1)
        cfg = micro_config(
            fmnist,
            tmp_path / name,
            epochs=3,
            batch_size=32,
            subset=160,
            test_subset=32,
            re_last_frac=0.5,
            cuda_graph=graph,
            resume=True,
        )
        return train(cfg, teacher=create_model("bhvit_micro_c28", num_classes=10, binary=False))

    CpuGraphedStep.instances = []
    res_graphed, res_eager = resume("graphed", True), resume("eager", False)
    assert res_graphed["epoch"] == 3 and [s.captures for s in CpuGraphedStep.instances] == [1]
    for k in ("train_loss", "test_top1", "step_flip_frac"):
        assert res_graphed[k] == res_eager[k], k
