"""ToMe and ALGM strategies: bipartite matching, exact restore, no-op ends, knobs, host syncs, batches."""
from __future__ import annotations

import copy

import pytest
import torch

from clustvit_ros.tools.bench import count_gflops
from clustvit_ros.model import NoReduction
from clustvit_ros.model.reduction import make_strategy, strategy_spec
from clustvit_ros.model.reduction import algm, tome
from clustvit_ros.model.reduction.bipartite import (compose, match_alternate, merge_plan, merge_wavg,
                                                     unmerge)

from conftest import normalise
from sync_helpers import HostReads, OpRecorder

MERGING = {"tome": 0.1, "algm": 0.7}  # mid knob settings that merge on real frames


@pytest.fixture(scope="module")
def frame(val_samples):
    return normalise(val_samples[0][0])


@pytest.fixture(scope="module")
def plain(untrained_model, frame):
    with torch.inference_mode():
        return untrained_model(frame, NoReduction())


def _metric() -> torch.Tensor:
    """Six tokens, A = 0, 2, 4 and B = 1, 3, 5: 0 equals 3, 2 is close to 5, 4 resembles nothing."""
    e = torch.eye(4)
    return torch.stack([e[0], e[1], e[2] + 0.2 * e[3], e[0], e[3] - e[1], e[2]]).unsqueeze(0)


def test_bipartite_merges_the_most_similar_edges():
    index, length = merge_plan(match_alternate(_metric()), 2)
    # Unmerged A (token 4) first, then B (1, 3, 5); 0 joins 3 and 2 joins 5.
    assert index.tolist() == [[2, 1, 3, 2, 0, 3]] and length == 4
    x = torch.arange(7 * 2, dtype=torch.float32).reshape(1, 7, 2)  # class token + 6 patches
    merged, size = merge_wavg(x, torch.ones(1, 7), index, length)
    assert size.tolist() == [[1, 1, 1, 2, 2]]
    assert torch.equal(merged[0, :3], x[0, [0, 5, 2]])  # class token, token 4, token 1 untouched
    torch.testing.assert_close(merged[0, 3], (x[0, 1] + x[0, 4]) / 2)
    torch.testing.assert_close(merged[0, 4], (x[0, 3] + x[0, 6]) / 2)
    restored = unmerge(merged, index)
    assert torch.equal(restored[0, [0, 2, 5]], x[0, [0, 2, 5]])
    assert torch.equal(restored[0, 1], restored[0, 4])


def test_padded_matching_merges_each_image_as_alone():
    """Padding slots (size 0) anywhere in the sequence change nothing for the real tokens."""
    torch.manual_seed(0)
    metric = torch.randn(1, 9, 8)
    x = torch.randn(1, 10, 8)
    index, length = merge_plan(match_alternate(metric), 3)
    alone = unmerge(merge_wavg(x, torch.ones(1, 10), index, length)[0], index)

    real = torch.tensor([0, 2, 3, 4, 6, 7, 9, 10, 11])  # 9 real tokens among 12 patch slots
    valid = torch.zeros(1, 12, dtype=torch.bool)
    valid[0, real] = True
    padded_metric = torch.randn(1, 12, 8)
    padded_metric[0, real] = metric[0]
    padded_x = torch.zeros(1, 13, 8)
    padded_x[0, 0] = x[0, 0]
    padded_x[0, 1 + real] = x[0, 1:]
    size = torch.cat([torch.ones(1, 1), valid.float()], dim=1)
    matching = match_alternate(padded_metric, valid)
    padded_index, padded_length = merge_plan(matching, torch.tensor([3]), 3)
    merged, _ = merge_wavg(padded_x, size, padded_index, padded_length)
    source = compose(real.unsqueeze(0), padded_index)
    torch.testing.assert_close(unmerge(merged, source), alone, rtol=0, atol=1e-6)


def test_local_windows_similarity_and_layout():
    # Grid 4x5: windows {0,1,5,6} {2,3,7,8} {10,11,15,16} {12,13,17,18}; column 4 is in none.
    grid = (4, 5)
    patches = torch.randn(1, 20, 4)
    patches[0, [0, 1, 5, 6]] = torch.eye(4)  # orthogonal: similarity 0
    patches[0, [2, 3, 7, 8]] = patches[0, 2] * torch.tensor([[1.0], [2.0], [0.5], [3.0]])  # parallel: 1
    similarity = algm.window_similarity(patches, grid)
    assert similarity.shape == (1, 4)
    torch.testing.assert_close(similarity[0, :2], torch.tensor([0.0, 1.0]))

    flags = torch.tensor([[False, True, False, True], [False, False, True, False]])
    index, length = algm.window_plan(flags, [2, 1], grid)
    assert length == 2 + 20 - 4 * 1  # room for 2 window tokens and the 16 kept tokens of image 2
    assert index[0].tolist() == [2, 3, 0, 0, 4, 5, 6, 0, 0, 7, 8, 9, 1, 1, 10, 11, 12, 1, 1, 13]
    assert index[1].tolist() == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 0, 0, 12, 13, 14, 0, 0, 15, 16, 17]
    merged, size = merge_wavg(torch.randn(2, 21, 4), torch.ones(2, 21), index, length)
    assert size[0, 1:].tolist() == [4, 4] + [1] * 12 + [0] * 4  # image 1: 4 empty slots at the end
    assert size[1, 1:].tolist() == [4, 0] + [1] * 16  # image 2: one empty window slot


def test_adaptive_global_threshold():
    best = torch.tensor([[0.9, 0.8, 0.7, 0.6, float("-inf")]])  # the last A slot is padding
    mean, std = 0.75, (sum((v - 0.75) ** 2 for v in (0.9, 0.8, 0.7, 0.6)) / 3) ** 0.5
    threshold = algm.adaptive_threshold(best, 5)
    torch.testing.assert_close(threshold, torch.tensor([[mean + std / 5]]))
    assert int((best >= threshold).sum()) == 2


def _inert(block: torch.nn.Module) -> torch.nn.Module:
    """A real block whose attention and MLP add exactly zero: the residual stream passes through."""
    block = copy.deepcopy(block)
    for layer in (block.attn.proj, block.mlp.fc2):
        layer.weight.data.zero_()
        layer.bias.data.zero_()
    return block


@pytest.mark.parametrize("strategy", [tome.ToMe(0.1), algm.ALGM(0.6)], ids=["tome", "algm"])
def test_restore_gives_every_position_its_group_mean(untrained_model, frame, strategy):
    model = untrained_model
    image = torch.nn.functional.pad(frame, (0, 0, 0, 8))  # 360 -> 368, as forward pads
    blocks = [_inert(block) for block in model.backbone.blocks]
    with torch.inference_mode():
        x, grid = model.embed(image)
        start = strategy.start_block(model)
        reduced, state = strategy.reduce(model, x, grid)
        for index in range(start, model.depth):
            reduced = strategy.run_block(index, blocks[index], reduced, state)
        restored = strategy.restore(model, reduced, state)
    assert restored.shape == x.shape
    assert torch.equal(restored[:, 0], x[:, 0])
    source, patches = state.source[0], x[0, 1:]
    slots = int(source.max()) + 1
    members = torch.zeros(slots).index_add_(0, source, torch.ones_like(source, dtype=torch.float32))
    means = torch.zeros(slots, x.shape[-1]).index_add_(0, source, patches) / members.unsqueeze(1)
    torch.testing.assert_close(restored[0, 1:], means[source], rtol=1e-5, atol=1e-5)
    alone = members[source] == 1  # never merged: bit-exact
    assert 0 < int(alone.sum()) < patches.shape[0]
    assert torch.equal(restored[0, 1:][alone], patches[alone])
    stats = state.stats
    assert stats.tokens_after == [int((members > 0).sum())] < [stats.tokens_in]
    assert stats.merged_tokens == [stats.tokens_in - stats.tokens_after[0]]


@pytest.fixture(scope="module")
def merged(untrained_model, frame, plain):
    """One batch-1 forward per strategy at its mid setting, watched for host syncs (cache warm)."""
    runs = {}

    def run(name: str):
        if name not in runs:
            with torch.inference_mode(), HostReads() as host, OpRecorder() as recorder:
                output = untrained_model(frame, make_strategy(name, MERGING[name]))
            runs[name] = output, host.shapes, recorder.syncing_ops()
        return runs[name]
    return run


@pytest.fixture(scope="module")
def plain_gflops(untrained_model, frame):
    with torch.inference_mode():
        return count_gflops(lambda: untrained_model(frame, NoReduction()))


@pytest.mark.parametrize("name", ["tome", "algm"])
def test_merging_setting_full_size_output_and_fewer_flops(untrained_model, frame, plain, merged,
                                                          plain_gflops, name):
    output = merged(name)[0]
    stats = output.stats
    assert output.logits.shape == plain.logits.shape == (1, 11, 360, 480)
    assert torch.isfinite(output.logits).all()
    assert stats.tokens_in == 23 * 30 and 0 < stats.tokens_after[0] < stats.tokens_in
    assert stats.merged_tokens == [stats.tokens_in - stats.tokens_after[0]]
    with torch.inference_mode():
        gflops = count_gflops(lambda: untrained_model(frame, make_strategy(name, MERGING[name])))
    assert gflops < 0.9 * plain_gflops  # the counter sees the reduced matmuls


@pytest.mark.parametrize("name, knobs", [("tome", (0.05, 0.1, 0.2)), ("algm", (0.95, 0.85, 0.7))])
def test_more_aggressive_knob_keeps_fewer_tokens(untrained_model, frame, name, knobs):
    """From the no-op end (all 23 x 30 tokens: test_noop_knob_is_the_plain_vit) on."""
    image = torch.nn.functional.pad(frame, (0, 0, 0, 8))
    with torch.inference_mode():
        after = [untrained_model.forward_features(image, make_strategy(name, k)).stats.tokens_after[0]
                 for k in knobs]
    after = [23 * 30] + after
    assert all(a > b for a, b in zip(after, after[1:])), after


def test_algm_batch_pads_images_that_merge_differently(untrained_model, val_samples):
    """Adaptive counts differ per image, so a batch takes the padded path (equal to alone: the contract test)."""
    images = torch.cat([normalise(rgb) for rgb, _ in val_samples[:2]])
    with torch.inference_mode():
        batched = untrained_model(images, make_strategy("algm", MERGING["algm"]))
    assert len(set(batched.stats.tokens_after)) > 1


def test_registry_knobs():
    assert isinstance(make_strategy("tome", 0.1), tome.ToMe) and make_strategy("tome", 0.1).ratio == 0.1
    assert isinstance(make_strategy("algm", 0.8), algm.ALGM) and make_strategy("algm", 0.8).tau == 0.8
    assert make_strategy("algm").tau == strategy_spec("algm").knob.default
    assert make_strategy("tome", 0.2).describe() == {"strategy": "tome", "ratio": 0.2}
    for name, bad in (("tome", 0.6), ("tome", -0.1), ("algm", 1.5), ("algm", float("nan"))):
        with pytest.raises(ValueError):
            make_strategy(name, bad)
