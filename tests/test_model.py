import pytest
import torch

import bhvit
from bhvit import binary_layers, create_model, list_models
from bhvit.blocks import MSMHA, QuantSpec

# The paper's parameter counts (Gao et al., CVPR 2025), counted from the authors' release (BatchNorm, shifts k=1,2, QD).
RELEASE_PARAMS = [
    ("bhvit_tiny", 1000, False, 13_783_096),
    ("bhvit_tiny", 10, False, 13_275_226),
    ("bhvit_small", 1000, False, 22_646_056),
    ("bhvit_small", 10, False, 22_138_186),
    ("bhvit_tiny", 1000, True, 13_779_960),
    ("bhvit_tiny", 10, True, 13_272_090),
    ("bhvit_small", 1000, True, 22_642_920),
    ("bhvit_small", 10, True, 22_135_050),
]


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("name,classes,fpd,expected", RELEASE_PARAMS)
def test_parameter_counts_match_release(name, classes, fpd, expected):
    m = create_model(name, num_classes=classes, fp_downsample=fpd)
    assert n_params(m) == expected


@pytest.mark.parametrize("name,expected", [("bhvit_tiny", 12_630_016), ("bhvit_small", 21_332_992)])
def test_binary_weight_counts_match_release(name, expected):
    assert sum(l.weight.numel() for l in binary_layers(create_model(name))) == expected


def test_registry_lists_named_models():
    names = list_models()
    for n in [
        "bhvit_tiny",
        "bhvit_small",
        "bhvit_tiny_c32",
        "bhvit_small_c32",
        "bhvit_micro_c32",
        "bhvit_tiny_c28",
        "bhvit_micro_c28",
    ]:
        assert n in names
    with pytest.raises(ValueError, match="unknown model 'bhvit_huge'"):
        create_model("bhvit_huge")


@pytest.mark.parametrize("name", list_models())
def test_every_named_model_output_shape(name):
    m = create_model(name, num_classes=7).eval()
    c = m.cfg
    x = torch.randn(2, c.in_chans, c.img_size, c.img_size)
    with torch.no_grad():
        y = m(x)
        f = m.forward_features(x)
    assert y.shape == (2, 7)
    side = c.map_sizes()[-1]
    assert f.shape == (2, side, side, c.dims[-1])
    assert torch.isfinite(y).all()


def test_stage_map_sizes():
    assert create_model("bhvit_tiny").cfg.map_sizes() == [56, 28, 14, 7]
    assert create_model("bhvit_tiny_c32").cfg.map_sizes() == [16, 8, 4, 2]
    assert create_model("bhvit_micro_c28").cfg.map_sizes() == [16, 8, 4, 2]


@pytest.mark.parametrize("name", ["bhvit_micro_c32", "bhvit_tiny_c28"])
def test_gradients_reach_every_parameter(name):
    m = create_model(name, num_classes=10).train()
    c = m.cfg
    m(torch.randn(4, c.in_chans, c.img_size, c.img_size)).logsumexp(-1).sum().backward()
    missing = [n for n, p in m.named_parameters() if p.grad is None]
    assert missing == []
    for layer in binary_layers(m):  # every latent binary weight gets a nonzero gradient
        assert layer.weight.grad.abs().sum() > 0


def test_binary_layers_see_exactly_binary_inputs_in_eval():
    m = create_model("bhvit_micro_c32", num_classes=10).eval()
    seen = []

    def hook(mod, inputs, output):
        x = inputs[0]
        if mod.input_bias is not None:
            conv = isinstance(mod, torch.nn.Conv2d)
            x = x + mod.input_bias.view(-1, *([1] * (x.dim() - 2))) if conv else x + mod.input_bias
        q = mod.input_quantizer(x) if mod.input_quantizer is not None else x
        seen.append(set(q.unique().tolist()))
        w = mod.effective_weight().reshape(mod.weight.shape[0], -1)
        for row in w:
            assert len(row.unique()) == 2

    for l in binary_layers(m):
        l.register_forward_hook(hook)
    with torch.no_grad():
        m(torch.randn(2, 3, 32, 32))
    assert len(seen) == 31 and all(s <= {-1.0, 1.0} for s in seen)


def test_full_precision_twin_has_same_modules_without_quantizers():
    b = create_model("bhvit_tiny")
    f = create_model("bhvit_tiny", binary=False)
    assert list(binary_layers(f)) == []
    # the only parameters the twin lacks are QD step and zero point (2 per head, 8 layers)
    assert n_params(b) - n_params(f) == 2 * (4 * 6 + 8 * 2)
    names_b = {n for n, _ in b.named_parameters() if ".qd." not in n}
    assert names_b == {n for n, _ in f.named_parameters()}


def test_two_step_binarization_switches():
    m = create_model("bhvit_micro_c32", binary_weights=True, binary_acts=False)
    layers = list(binary_layers(m))
    assert layers and all(l.weights_binary and not l.acts_binary for l in layers)
    assert all(mod.core.qd is None for mod in m.modules() if isinstance(mod, MSMHA))


ABLATIONS = {
    "msgdc_off": dict(msgdc=False),
    "msmha_off": dict(msmha=False),
    "qd_off": dict(qd=False),
    "shift_off": dict(shift=False),
    "all_msgdc": dict(hybrid="msgdc"),
    "all_msmha": dict(hybrid="msmha"),
    "ln": dict(norm="ln"),
    "fp_downsample": dict(fp_downsample=True),
}


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_every_ablation_builds_and_runs(ablation):
    m = create_model("bhvit_micro_c32", num_classes=10, **ABLATIONS[ablation]).train()
    y = m(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10)
    y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())


def test_ablation_structure():
    base = create_model("bhvit_tiny")
    assert base.cfg.stage_mixers() == ["msgdc", "msgdc", "msmha", "msmha"]
    # single plain 3x3 conv mixer: one dense branch instead of three grouped ones
    conv = create_model("bhvit_tiny", msgdc=False)
    assert len(conv.stages[0].blocks[0].mixer.convs) == 1
    assert conv.stages[0].blocks[0].mixer.convs[0].groups == 1
    glob = create_model("bhvit_tiny", msmha=False)
    att = glob.stages[2].blocks[0].mixer
    assert att.window is None and not hasattr(att, "pool_mix")
    assert create_model("bhvit_tiny", qd=False).stages[2].blocks[0].mixer.core.qd.levels == 1
    assert base.stages[2].blocks[0].mixer.core.qd.levels == 3
    assert create_model("bhvit_tiny", shift=False).stages[0].blocks[0].shift is None
    # shifts cost 12 * C params per block: 2 LayerScales x 3 branches x 2 sizes
    assert n_params(base) - n_params(create_model("bhvit_tiny", shift=False)) == 12 * (
        64 * 2 + 128 * 2 + 256 * 6 + 512 * 2
    )
    assert create_model("bhvit_tiny", hybrid="msmha").cfg.stage_mixers() == ["msmha"] * 4
    assert create_model("bhvit_tiny", hybrid="msgdc").cfg.stage_mixers() == ["msgdc"] * 4


def test_msmha_global_token_counts():
    q = QuantSpec()
    for size, expected in [(14, 4), (7, 1)]:
        att = MSMHA(64, 2, q, window=7)
        assert att.global_tokens(torch.randn(1, size, size, 64)).shape == (1, expected, 64)
    att = MSMHA(64, 2, q, window=4)  # even windows: one pooled token per window too
    assert att.global_tokens(torch.randn(1, 8, 8, 64)).shape == (1, 4, 64)


BAD_CONFIGS = [
    (dict(img_size=100), "img_size 100 is not supported"),
    (dict(windows=(7, 7, 5, 7)), r"windows\[2\]=5 must divide the stage-3 map size 14x14"),
    (dict(dims=(64, 128, 256, 500)), r"dims\[3\]=500 must be a multiple of dims\[2\]=256"),
    (dict(dims=(62, 124, 248, 496)), r"dims\[0\]=62 must be divisible by 4"),
    (dict(heads=(1, 2, 3, 8)), r"dims\[2\]=256 must be divisible by heads\[2\]=3"),
    (dict(depths=(2, 2, 6)), "depths must be 4 positive integers"),
    (dict(hybrid="both"), "hybrid must be one of"),
    (dict(norm="gn"), "norm must be 'bn' or 'ln'"),
    (dict(in_chans=0), "in_chans must be >= 1"),
    (dict(qd_levels=0), "qd_levels must be >= 1"),
    (dict(msgdc_groups=0), "msgdc_groups must be >= 1, got 0"),
    (dict(msgdc_dilations=()), "msgdc_dilations must name at least one dilation"),
    (dict(msgdc_dilations=(1, 0)), r"msgdc_dilations must be a list of positive integers, got \(1, 0\)"),
    (dict(shift_sizes=(-1,)), r"shift_sizes must be a list of positive integers, got \(-1,\)"),
    (dict(wat=1), r"unknown override\(s\) \['wat'\]"),
]


@pytest.mark.parametrize("overrides,msg", BAD_CONFIGS)
def test_bad_configs_raise_clear_errors(overrides, msg):
    with pytest.raises(ValueError, match=msg):
        create_model("bhvit_tiny", **overrides)


def test_num_classes_must_be_positive():
    with pytest.raises(ValueError, match="num_classes must be >= 1, got 0"):
        create_model("bhvit_tiny", num_classes=0)


def test_bad_input_raises():
    m = create_model("bhvit_micro_c32", num_classes=10)
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\), got \(2, 3, 28, 28\)"):
        m(torch.randn(2, 3, 28, 28))
    with pytest.raises(ValueError, match="float tensor"):
        m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_img_size_override_supports_other_sizes():
    m = create_model("bhvit_tiny", img_size=448, windows=(7, 7, 7, 7))
    assert m.cfg.map_sizes() == [112, 56, 28, 14]
    with pytest.raises(ValueError, match="img_size 112 is not supported"):
        create_model("bhvit_tiny", img_size=112)


def test_config_roundtrip():
    cfg = create_model("bhvit_micro_c28", num_classes=10).cfg
    again = bhvit.BHViTConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown BHViT config keys"):
        bhvit.BHViTConfig.from_dict({"nope": 1})


def test_empty_batch_is_refused():
    m = create_model("bhvit_micro_c28", num_classes=10)
    with pytest.raises(ValueError, match=r"empty batch \(B = 0\)"):
        m(torch.zeros(0, 1, 28, 28))
