"""AiluRus and ClusTR strategies on the real backbone and real CamVid frames."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from clustvit_ros.tools.bench import count_gflops, flop_counter

from clustvit_ros.model import NoReduction
from clustvit_ros.model.reduction import ailurus, clustr, make_strategy, strategy_spec
from clustvit_ros.model.reduction.ailurus import AiluRus, spatial_dpc_knn
from clustvit_ros.model.reduction.clustr import ClusTR, clustered_block

from conftest import normalise


def _tokens_at_injection(model, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """Real tokens (1, 1+N, D) entering block ``injection_point``, and the patch grid."""
    height, width = model.padded_size(*image.shape[-2:])
    image = F.pad(image, (0, width - image.shape[-1], 0, height - image.shape[-2]))
    x, grid = model.embed(image)
    for block in model.backbone.blocks[:model.config.injection_point]:
        x = block(x)
    return x, grid


@pytest.fixture(scope="module")
def plain_gflops(untrained_model, val_samples) -> float:
    with torch.inference_mode():
        return _gflops(untrained_model, normalise(val_samples[1][0]), NoReduction())[0]


def _gflops(model, image, strategy):
    """(GFLOPs of one forward, its output)."""
    with flop_counter() as counter:  # counts fused CPU attention on every torch version
        output = model(image, strategy)
    return counter.get_total_flops() / 1e9, output


def test_fused_attention_counts_on_every_torch():
    """2 FLOPs per multiply-add for both attention matmuls, also for the fused CPU kernel."""
    query = torch.randn(1, 3, 690, 64)
    flops = count_gflops(lambda: F.scaled_dot_product_attention(query, query, query)) * 1e9
    assert flops == pytest.approx(2 * 2 * 3 * 690 * 690 * 64)


# -- no-op ends ---------------------------------------------------------------------------

def test_as_many_clusters_as_tokens_is_exact_attention(untrained_model, val_samples):
    """ClusTR's registry no-op (1024) is checked by the contract test; M = N (690) is exact as well."""
    image = normalise(val_samples[0][0])
    with torch.inference_mode():
        plain = untrained_model(image, NoReduction()).logits
        output = untrained_model(image, ClusTR(690))
    assert torch.equal(output.logits, plain)
    assert output.stats.merged_tokens == [0] and output.stats.tokens_after == [690]
    assert make_strategy("ailurus", strategy_spec("ailurus").knob.noop).ratio == 1.0
    assert make_strategy("clustr", strategy_spec("clustr").knob.noop).clusters == 1024


# -- AiluRus ------------------------------------------------------------------------------

def test_ailurus_merges_into_spatial_dpc_anchors(untrained_model, val_samples):
    model = untrained_model
    image = normalise(val_samples[1][0])
    strategy = AiluRus(0.3)
    with torch.inference_mode():
        output = model(image, strategy)
        assert output.logits.shape == (1, 11, 360, 480) and torch.isfinite(output.logits).all()
        assert output.stats.tokens_in == 690
        assert output.stats.tokens_after == [207] and output.stats.merged_tokens == [690 - 207]
        assert output.stats.merged_fraction == [pytest.approx(483 / 690)]

        x, grid = _tokens_at_injection(model, image)
        reduced, state = strategy.reduce(model, x, grid)
        restored = strategy.restore(model, reduced, state)  # as if every block were the identity
    assert reduced.shape == (1, 1 + 207, model.embed_dim)
    assert restored.shape == x.shape
    patches, anchors, assignment = x[0, 1:], state.anchors[0], state.assignment[0]
    assert len(set(anchors.tolist())) == 207
    assert torch.equal(assignment[anchors], torch.arange(207))  # representatives keep themselves
    assert torch.equal(restored[0, 0], x[0, 0])  # class token untouched
    assert state.sizes.sum().item() == 690
    for slot in range(207):
        members = assignment == slot
        mean = patches[members].mean(0)  # every member has size 1 at the single merge point
        torch.testing.assert_close(reduced[0, 1 + slot], mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(restored[0, 1:][members], mean.expand(int(members.sum()), -1),
                                   rtol=1e-5, atol=1e-5)
    # Proportional attention: the class key has bias 0, a representative log(its size).
    expected_bias = torch.cat([torch.zeros(1), state.sizes[0].log()])
    assert torch.equal(state.attn_mask.reshape(-1), expected_bias)

    # Every token joins its nearest anchor in feature space (distance ties allowed).
    dist = torch.cdist(patches, patches[anchors])
    chosen = dist.gather(1, assignment[:, None])[:, 0]
    torch.testing.assert_close(chosen, dist.min(1).values, rtol=1e-4, atol=1e-3)


def test_dpc_scores_pick_a_peak_in_every_region():
    """Hand-made grid: four flat regions (plus tiny noise); 4 anchors land one per region."""
    torch.manual_seed(0)
    h, w, dim = 8, 8, 16
    centres = torch.randn(4, dim) * 5
    region = (torch.arange(h)[:, None] // 4) * 2 + (torch.arange(w)[None] // 4)  # 2x2 quadrants
    tokens = centres[region.reshape(-1)] + 0.01 * torch.randn(h * w, dim)
    anchors, assignment = spatial_dpc_knn(tokens[None], (h, w), 4)
    assert sorted(region.reshape(-1)[anchors[0]].tolist()) == [0, 1, 2, 3]
    # Everyone joins the anchor of its own region.
    assert torch.equal(region.reshape(-1)[anchors[0]][assignment[0]], region.reshape(-1))


def test_ailurus_fewer_representatives_and_flops_as_ratio_falls(untrained_model, val_samples,
                                                                 plain_gflops):
    image = normalise(val_samples[1][0])
    kept, gflops = [], []
    with torch.inference_mode():
        for ratio in (0.1, 0.3, 0.9):
            flops, output = _gflops(untrained_model, image, AiluRus(ratio))
            kept.append(output.stats.tokens_after[0])
            gflops.append(flops)
    assert kept == [69, 207, 621]
    assert gflops == sorted(gflops) and gflops[-1] < plain_gflops, (gflops, plain_gflops)


# -- ClusTR -------------------------------------------------------------------------------

def test_clustered_attention_is_exact_for_singletons_and_duplicates(untrained_model, val_samples):
    model = untrained_model
    with torch.inference_mode():
        x, _ = _tokens_at_injection(model, normalise(val_samples[0][0]))
        block = model.backbone.blocks[model.config.injection_point]
        num_tokens = x.shape[1] - 1
        # Singletons: M = N clusters of one token each is exact attention.
        singletons = torch.arange(num_tokens)[None]
        torch.testing.assert_close(clustered_block(block, x, num_tokens, assignment=singletons),
                                   block(x), rtol=1e-5, atol=1e-5)
        # Duplicates: 60 real tokens, each present 3 times; one cluster per copy group of size 3
        # is exact, because the log(3) bias makes the cluster count as its three members.
        base = x[:, 1:61]
        dup = torch.cat([x[:, :1], base.repeat_interleave(3, dim=1)], dim=1)
        groups = torch.arange(60).repeat_interleave(3)[None]
        torch.testing.assert_close(clustered_block(block, dup, 60, assignment=groups), block(dup),
                                   rtol=1e-5, atol=1e-5)
        # And k-means finds those groups itself (strided init hits each group once).
        torch.testing.assert_close(clustered_block(block, dup, 60), block(dup),
                                   rtol=1e-5, atol=1e-5)
        # A block with a real key norm takes the general pooling path: still exact.
        normed = copy.deepcopy(block)
        normed.attn.k_norm = torch.nn.LayerNorm(normed.attn.head_dim)
        torch.nn.init.normal_(normed.attn.k_norm.weight, 1.0, 0.2)
        torch.testing.assert_close(clustered_block(normed, dup, 60, assignment=groups), normed(dup),
                                   rtol=1e-5, atol=1e-5)


def test_clustr_merging_setting_and_flops_fall_with_clusters(untrained_model, val_samples,
                                                             plain_gflops):
    image = normalise(val_samples[1][0])
    with torch.inference_mode():
        runs = [_gflops(untrained_model, image, ClusTR(m)) for m in (256, 64, 16)]
        exact = untrained_model(image, ClusTR(1024)).logits
    gflops = [flops for flops, _ in runs]
    output = runs[1][1]
    assert output.logits.shape == (1, 11, 360, 480) and torch.isfinite(output.logits).all()
    assert not torch.equal(output.logits, exact)  # attention really was approximated
    stats = output.stats
    assert stats.tokens_in == 690 and stats.tokens_after == [690] and stats.merged_tokens == [0]
    assert stats.key_clusters == [64] and stats.as_dict()["key_clusters"] == 64
    assert all(a > b for a, b in zip([plain_gflops] + gflops, gflops)), (plain_gflops, gflops)


# -- both ---------------------------------------------------------------------------------

def test_registry():
    strategy = make_strategy("ailurus", 0.3)
    assert isinstance(strategy, ailurus.AiluRus) and strategy.ratio == 0.3
    assert strategy.describe() == {"strategy": "ailurus", "ratio": 0.3}
    strategy = make_strategy("clustr", 64)
    assert isinstance(strategy, clustr.ClusTR)
    assert strategy.clusters == 64 and isinstance(strategy.clusters, int)
    assert strategy.describe() == {"strategy": "clustr", "clusters": 64}
    assert isinstance(make_strategy("ailurus"), AiluRus)
    assert isinstance(make_strategy("clustr"), ClusTR)
    for name, bad in (("ailurus", 0.0), ("ailurus", -0.1), ("ailurus", 1.5),
                      ("ailurus", float("nan")), ("clustr", 0), ("clustr", -4), ("clustr", 4096)):
        with pytest.raises(ValueError):
            make_strategy(name, bad)
