"""ClustViT merging: pseudo targets, the merge rule, exactness of reduce/restore."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clustvit_ros.tools.bench import timm_reference_forward
from clustvit_ros.model import ClusterMerging, NoReduction, assign_clusters, pseudo_cluster_targets
from clustvit_ros.model.heads import upsample_bilinear

from conftest import normalise

VOID = 11


def _patch_mask(layout: list[list[object]], patch: int = 16) -> torch.Tensor:
    """Mask from a grid of patch fills: an int fills the patch, 'mixed' splits it."""
    rows = []
    for row in layout:
        blocks = []
        for fill in row:
            block = np.full((patch, patch), 0, dtype=np.int64)
            if fill == "mixed":
                block[:, : patch // 2] = 1
                block[:, patch // 2:] = 2
            else:
                block[:] = fill
            blocks.append(block)
        rows.append(np.concatenate(blocks, axis=1))
    return torch.from_numpy(np.concatenate(rows, axis=0))[None]


def test_pseudo_targets_rank_homogeneous_patches_by_frequency():
    mask = _patch_mask([[3, 3, "mixed", 3],
                        [5, VOID, 7, 5],
                        [7, 9, 3, 5]])
    # Homogeneous non-void patches: class 3 x4, class 5 x3, class 7 x2, class 9 x1.
    targets = pseudo_cluster_targets(mask, clusters=3, ignore_index=VOID)
    assert targets.tolist() == [[1, 1, 0, 1,
                                 2, 0, 3, 2,
                                 3, 0, 1, 2]]
    # k = 1 keeps only the most frequent class.
    assert pseudo_cluster_targets(mask, clusters=1, ignore_index=VOID).tolist() == [[
        1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0]]


def test_pseudo_targets_ties_void_and_padding():
    # Classes 4 and 2 tie (2 patches each): the lower id ranks first.
    mask = _patch_mask([[4, 2, 4, 2]])
    assert pseudo_cluster_targets(mask, clusters=1, ignore_index=VOID).tolist() == [[0, 1, 0, 1]]
    # An all-void image forms no cluster at all.
    assert pseudo_cluster_targets(torch.full((1, 32, 32), VOID), 3, ignore_index=VOID).sum() == 0
    # 20x20 pads to 32x32 with void: only the top-left patch is whole and homogeneous.
    targets = pseudo_cluster_targets(torch.full((1, 20, 20), 6), 3, ignore_index=VOID)
    assert targets.tolist() == [[1, 0, 0, 0]]


def test_pseudo_targets_fixed_classes_ignore_image_frequency():
    mask = _patch_mask([[3, 3, "mixed", 3],
                        [5, VOID, 7, 5],
                        [7, 9, 3, 5]])
    # Clusters are classes 9, 5, 7 in that order, whatever their share of this image:
    # class 3 (the image's most frequent) keeps its tokens, the lone 9 is cluster 1.
    targets = pseudo_cluster_targets(mask, clusters=3, ignore_index=VOID, fixed_classes=(9, 5, 7))
    assert targets.tolist() == [[0, 0, 0, 0,
                                 2, 0, 3, 2,
                                 3, 1, 0, 2]]
    # A class the image lacks leaves its cluster empty, not taken by the next class.
    assert pseudo_cluster_targets(_patch_mask([[3, 5]]), 2, ignore_index=VOID, fixed_classes=(8, 5)).tolist() == [
        [0, 2]]
    with pytest.raises(ValueError, match="2 classes for 3 clusters"):
        pseudo_cluster_targets(mask, 3, ignore_index=VOID, fixed_classes=(9, 5))
    with pytest.raises(ValueError, match="distinct class ids"):
        pseudo_cluster_targets(mask, 2, ignore_index=VOID, fixed_classes=(5, 5))


def test_assign_clusters_threshold_rule():
    probabilities = torch.tensor([[0.10, 0.60, 0.20, 0.10],   # cluster 1 at p=0.6
                                  [0.50, 0.40, 0.05, 0.05],   # keep is most likely
                                  [0.05, 0.30, 0.30, 0.35]])  # cluster 3, but unsure
    assert assign_clusters(probabilities, 0.5).tolist() == [1, 0, 0]
    assert assign_clusters(probabilities, 0.35).tolist() == [1, 1, 3]
    assert assign_clusters(probabilities, 0.0).tolist() == [1, 1, 3]   # 0 merges every token
    assert assign_clusters(probabilities, 1.0).tolist() == [0, 0, 0]   # 1 merges none
    assert assign_clusters(probabilities, None).tolist() == [1, 0, 3]  # the paper's argmax


def test_cluster_floors_raise_the_threshold_per_cluster():
    probabilities = torch.tensor([[0.10, 0.60, 0.20, 0.10],   # cluster 1 at p=0.6
                                  [0.05, 0.92, 0.02, 0.01],   # cluster 1, sure
                                  [0.05, 0.30, 0.30, 0.35],   # cluster 3, unsure
                                  [0.30, 0.05, 0.60, 0.05]])  # cluster 2 at p=0.6
    floors = torch.tensor([0.9, 0.0, 0.0])  # cluster 1 (road, say) needs 0.9 whatever the knob
    assert assign_clusters(probabilities, 0.5, floors).tolist() == [0, 1, 0, 2]
    assert assign_clusters(probabilities, 0.0, floors).tolist() == [0, 1, 3, 2]  # the floor holds at 0
    assert assign_clusters(probabilities, 0.95, floors).tolist() == [0, 0, 0, 0]  # a higher knob wins
    assert assign_clusters(probabilities, 1.0, floors).tolist() == [0, 0, 0, 0]
    assert assign_clusters(probabilities, None, floors).tolist() == [1, 1, 3, 2]  # argmax: no threshold
    # Zero floors are no floors, at any knob.
    for threshold in (0.0, 0.35, 0.5, 0.7):
        assert (assign_clusters(probabilities, threshold, torch.zeros(3)).tolist()
                == assign_clusters(probabilities, threshold).tolist())


def test_model_floors_merge_less_and_stay_monotonic(untrained_model, val_samples):
    """The model's own floors are what ClusterMerging applies, on real frames, and the knob stays monotone."""
    image = normalise(val_samples[1][0])
    thresholds = [round(float(t), 2) for t in np.linspace(0.0, 1.0, 11)]
    floors = [0.6, 0.0, 0.6]
    try:
        with torch.inference_mode():
            plain = [untrained_model(image, ClusterMerging(t)).stats.merged_tokens[0] for t in thresholds]
            untrained_model.config.set_cluster_floors(floors)
            strategy = ClusterMerging(0.0)
            floored = []
            for threshold in thresholds:
                strategy.threshold = threshold  # one strategy object, as the node's runtime knob does
                output = untrained_model(image, strategy)
                floored.append(output.stats.merged_tokens[0])
    finally:
        untrained_model.config.set_cluster_floors([])
    assert all(a >= b for a, b in zip(floored, floored[1:])), floored
    assert all(f <= p for f, p in zip(floored, plain)), (floored, plain)
    assert floored[0] < plain[0] == untrained_model(image, NoReduction()).stats.tokens_in
    # Above every floor the floors change nothing.
    assert floored[thresholds.index(0.7):] == plain[thresholds.index(0.7):]


@pytest.mark.parametrize("batched", [False, True])
def test_reduce_restore_puts_every_token_back_exactly(untrained_model, batched):
    model = untrained_model
    torch.manual_seed(1)
    num_tokens, dim = 12, model.embed_dim
    x = torch.randn(2, 1 + num_tokens, dim)
    assignment = torch.tensor([[0, 1, 1, 0, 3, 0, 1, 3, 0, 0, 3, 1],    # cluster 2 empty
                               [2, 2, 0, 2, 0, 0, 1, 2, 2, 3, 0, 0]])
    if not batched:
        x, assignment = x[:1], assignment[:1]
    strategy = ClusterMerging(0.5, assignment=assignment)
    with torch.no_grad():
        reduced, state = strategy.reduce(model, x, (3, 4))
        if not batched:  # class token + kept tokens + one representative per non-empty cluster
            assert reduced.shape[1] == 1 + 5 + 2
        restored = strategy.restore(model, reduced, state)  # as if every block were the identity
        assert restored.shape == x.shape
        for b in range(x.shape[0]):
            assert torch.equal(restored[b, 0], x[b, 0])
            kept = assignment[b] == 0
            assert torch.equal(restored[b, 1:][kept], x[b, 1:][kept])
            for cluster in range(1, 4):
                members = assignment[b] == cluster
                if not members.any():
                    continue
                mean = x[b, 1:][members].mean(0, keepdim=True)
                expected = model.regenerator.fc2(model.regenerator.act(model.regenerator.fc1(
                    torch.cat([x[b, 1:][members], mean.expand(int(members.sum()), -1)], -1))))
                torch.testing.assert_close(restored[b, 1:][members], expected, rtol=1e-5, atol=1e-5)
    assert state.stats.merged_tokens == [int((a > 0).sum()) for a in assignment]


def test_threshold_one_is_the_plain_vit(untrained_model, val_samples):
    image = normalise(val_samples[0][0])
    model = untrained_model
    with torch.inference_mode():
        plain = model(image, NoReduction()).logits
        at_one = model(image, ClusterMerging(1.0))
        padded = torch.nn.functional.pad(image, (0, 0, 0, 8))  # 360 -> 368, as forward pads
        timm_path = timm_reference_forward(model, padded)[..., :360, :]
    assert torch.equal(at_one.logits, plain)
    assert at_one.stats.merged_tokens == [0] and at_one.stats.tokens_after == [at_one.stats.tokens_in]
    torch.testing.assert_close(plain, timm_path, rtol=1e-4, atol=1e-4)


def test_threshold_is_monotonic_in_merged_tokens(untrained_model, val_samples):
    image = normalise(val_samples[1][0])
    merged = []
    with torch.inference_mode():
        for threshold in np.linspace(0.0, 1.0, 11):
            merged.append(untrained_model(image, ClusterMerging(float(threshold))).stats.merged_tokens[0])
    tokens = untrained_model(image, NoReduction()).stats.tokens_in
    assert merged[0] == tokens  # 0 merges every token
    assert merged[-1] == 0  # 1 merges none
    assert all(a >= b for a, b in zip(merged, merged[1:])), merged


def test_uniform_mask_oracle_merges_everything(untrained_model):
    image = torch.zeros(1, 3, 224, 320)
    targets = pseudo_cluster_targets(torch.full((1, 224, 320), 3), 3, ignore_index=VOID)
    with torch.inference_mode():
        output = untrained_model(image, ClusterMerging(0.5, assignment=targets))
    assert output.stats.merged_fraction == [1.0]
    assert output.stats.tokens_after == [1]  # a single representative carries the whole image


def test_uniform_image_merges_into_one_cluster(default_model_file):
    from clustvit_ros.model import load_checkpoint
    model = load_checkpoint(default_model_file)
    # Featureless frames (a covered lens, fog, a flat sky), at the camera's size and at the deployed
    # network size. Every token of a flat frame carries the same content, so whatever merges goes to
    # one cluster, and the sequence shrinks by exactly that many tokens less the one representative.
    # How much merges is the model's business and is not asserted: with fixed cluster classes (Road,
    # Sky, Building, Tree) a flat frame merges only where it looks like one of them. The packaged
    # model, at its default threshold (0.3): a bright overcast sky 0.91 at 360x480 and 0.44 at
    # 480x640, white 0.82 and 0.32, a darker one 0.51 and 0.20 (all into the sky cluster), mid-grey
    # and black 2 % or less (they run at about the unmerged cost).
    colours = ((0.8, 0.82, 0.86), (0.45, 0.5, 0.55), (0.5, 0.5, 0.5), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    merged_any = False
    with torch.inference_mode():
        for colour in colours:
            for height, width in ((360, 480), (480, 640)):
                image = (torch.tensor(colour).view(1, 3, 1, 1).expand(1, 3, height, width) - 0.5) / 0.5
                output = model(image)
                stats = output.stats
                sizes = stats.cluster_sizes[0]
                used = [size for size in sizes if size > 0]
                assert len(used) <= 1, (colour, (height, width), stats)
                assert stats.merged_tokens[0] == sum(sizes)
                assert stats.tokens_after[0] == stats.tokens_in - sum(sizes) + len(used)
                assert output.logits.shape == (1, 11, height, width)
                assert torch.isfinite(output.logits).all()
                merged_any |= bool(used)
    assert merged_any  # the sky-coloured frames do merge


def test_any_input_size(untrained_model):
    with torch.inference_mode():
        for height, width in ((100, 150), (224, 224), (17, 300)):
            output = untrained_model(torch.randn(1, 3, height, width), ClusterMerging(0.3))
            assert output.logits.shape == (1, 11, height, width)
            assert output.stats.tokens_in == -(-height // 16) * -(-width // 16)


def test_logit_upsampling_is_torch_bilinear(untrained_model, val_samples):
    """The separable matrix upsample equals F.interpolate(bilinear, align_corners=False)."""
    with torch.inference_mode():
        grid_logits = untrained_model.forward_head(
            untrained_model.forward_features(normalise(val_samples[0][0])[..., :352, :]).tokens, (22, 30))
        for logits, size in ((grid_logits, (352, 480)), (torch.randn(2, 11, 30, 40), (480, 640)),
                             (torch.randn(1, 3, 2, 5), (5, 13)), (torch.randn(1, 1, 7, 1), (112, 16))):
            expected = torch.nn.functional.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            torch.testing.assert_close(upsample_bilinear(logits, size), expected, rtol=0, atol=1e-5)




def test_merged_head_decodes_the_merged_sequence(untrained_model, val_samples):
    """head_on_merged: the decoder sees [kept, representatives]; merging off is still the plain path."""
    import copy
    from clustvit_ros.tools.bench import count_gflops
    model = copy.deepcopy(untrained_model)
    model.config = copy.deepcopy(model.config)
    images = torch.cat([normalise(rgb) for rgb, _ in val_samples[:2]])
    with torch.inference_mode():
        standard = model(images[:1], ClusterMerging(0.3))
        model.config.head_on_merged = True
        merged = model(images[:1], ClusterMerging(0.3))
        batched = model(images, ClusterMerging(0.3))
        assert torch.equal(model(images[:1], ClusterMerging(1.0)).logits, model(images[:1], NoReduction()).logits)
    assert merged.logits.shape == standard.logits.shape and merged.stats.tokens_after == standard.stats.tokens_after
    torch.testing.assert_close(batched.logits[:1], merged.logits, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        merged_gflops = count_gflops(lambda: model(images[:1], ClusterMerging(0.3)))
        model.config.head_on_merged = False
        standard_gflops = count_gflops(lambda: model(images[:1], ClusterMerging(0.3)))
    assert merged_gflops < standard_gflops  # the decoder's work shrinks with the sequence


def test_bucketed_batch_one_gives_the_exact_labels(default_model_file, val_samples):
    """The GPU's fixed-shape path (reduced sequence padded to a bucket, padding masked) = the exact path."""
    from clustvit_ros.model import load_checkpoint
    model = load_checkpoint(default_model_file)
    for rgb, _ in val_samples:
        image = normalise(rgb)
        with torch.inference_mode():
            exact = model(image, ClusterMerging(0.3))
            for bucket in (16, 64, 128):
                padded = model(image, ClusterMerging(0.3, bucket=bucket))
                assert padded.stats.tokens_after == exact.stats.tokens_after
                assert torch.equal(padded.logits.argmax(1), exact.logits.argmax(1))
                torch.testing.assert_close(padded.logits, exact.logits, rtol=1e-4, atol=1e-4)
