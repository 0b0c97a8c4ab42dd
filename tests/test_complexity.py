import functools

import pytest

from bhvit import complexity, create_model


@functools.lru_cache(maxsize=None)
def _cx(name, binary=True):
    """Complexity of a named 224 model, computed once per test session."""
    return complexity(create_model(name, binary=binary))


def _tiny_binary_macs():
    """Binary conv/linear MACs of bhvit_tiny at 224 by hand, per stage."""

    def msgdc(c, n):  # three grouped (g=4) 3x3 convs over n positions
        return 3 * n * c * (c // 4) * 9

    def mlp(c, r, n):
        return 2 * n * c * r * c

    def msmha(c, n, n_tok):  # Q, K, V over windows + global tokens, output over the map
        return 3 * n_tok * c * c + n * c * c

    s1 = 2 * (msgdc(64, 3136) + mlp(64, 8, 3136))
    s2 = 2 * (msgdc(128, 784) + mlp(128, 8, 784))
    s3 = 6 * (msmha(256, 196, 4 * (49 + 4)) + mlp(256, 4, 196))
    s4 = 2 * (msmha(512, 49, 49 + 1) + mlp(512, 4, 49))
    down = 784 * 128 * 64 * 4 + 196 * 256 * 128 * 4 + 49 * 512 * 256 * 4
    return s1 + s2 + s3 + s4 + down


def test_tiny_counts_exact():
    c = _cx("bhvit_tiny")
    assert c["params"] == 13_783_096
    assert c["binary_params"] == 12_630_016
    assert c["binary_macs"] == _tiny_binary_macs() == 2_499_543_040
    # stem conv 3->64 4x4 at 56x56 plus classifier: the paper's 0.010 G
    assert c["flops"] == 3 * 64 * 16 * 56 * 56 + 512 * 1000
    # attention matmuls (QK^T and AV): the paper's 0.040 G
    attn = 6 * 2 * 4 * 53 * 53 * 256 + 2 * 2 * 50 * 50 * 512
    assert c["attn_macs"] == attn
    assert round(attn / 1e9, 3) == 0.040
    # BOPs: binary layers + sign(Q)sign(K)^T (1 per MAC) + QD context (3 planes per MAC)
    assert c["bops"] == c["binary_macs"] + attn // 2 + 3 * attn // 2
    assert c["ops"] == pytest.approx(c["bops"] / 64 + c["flops"])
    assert c["size_bytes"] == 12_630_016 / 8 + (13_783_096 - 12_630_016) * 4


@pytest.mark.parametrize("name,layers3,spec", [("bhvit_tiny", 6, 2.312e9), ("bhvit_small", 8, 3.751e9)])
def test_binary_macs_vs_release_count(name, layers3, spec):
    """The release's 2.312 G / 3.751 G count Q, K, V of stage 3 over one window's 53
    tokens instead of all four windows (212): exactly 3 * 159 * 256^2 MACs per layer."""
    c = _cx(name)
    undercount = layers3 * 3 * (4 * 53 - 53) * 256 * 256
    assert abs((c["binary_macs"] - undercount) - spec) / spec < 1e-3


def test_full_precision_model_has_no_bops():
    c = _cx("bhvit_tiny", binary=False)
    assert c["bops"] == 0 and c["binary_params"] == 0
    b = _cx("bhvit_tiny")
    assert c["flops"] == b["flops"] + b["binary_macs"] + b["attn_macs"]
    assert c["ops"] / b["ops"] > 40


def test_small_c32_and_input_size_argument():
    m = create_model("bhvit_micro_c32", num_classes=10)
    a = complexity(m)
    assert a["input_size"] == (1, 3, 32, 32)
    assert complexity(m, (3, 32, 32))["bops"] == a["bops"]
    assert complexity(m, (2, 3, 32, 32))["bops"] == 2 * a["bops"]
    with pytest.raises(ValueError, match="input_size must be"):
        complexity(m, (32, 32))
    with pytest.raises(
        ValueError, match=r"takes 3x32x32 images, got input_size \(1, 3, 64, 64\); build it with img_size=64"
    ):
        complexity(m, 64)


def test_summary_rows_add_up_to_complexity():
    from bhvit.costs import summary

    m = create_model("bhvit_micro_c32", num_classes=10)
    c = complexity(m)
    rows = summary(m)
    total = rows[-1]
    assert total["part"] == "total"
    assert total["binary_params"] == c["binary_params"] and total["fp_params"] == c["fp_params"]
    assert total["bops"] == c["bops"] and total["flops"] == c["flops"]
    assert total["memory_bits"] == c["binary_params"] + 32 * c["fp_params"]
    parts = [r["part"] for r in rows]
    assert parts[0] == "stem" and "stages.1.downsample" in parts and parts[-2] == "head"
    assert len(parts) == 1 + 5 + 3 + 2 + 1  # stem, 5 blocks, 3 downsamplings, norm, head, total


def test_package_complexity_stays_the_function(tmp_path):
    # Importing the module that defines it must not shadow bhvit.complexity (a fresh process:
    # this one has imported everything already).
    import subprocess
    import sys

    code = (
        "import bhvit; from bhvit.costs import summary; "
        "print(bhvit.complexity(bhvit.create_model('bhvit_micro_c28', num_classes=10))['bops'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == complexity(create_model("bhvit_micro_c28", num_classes=10))["bops"]
