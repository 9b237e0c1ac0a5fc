"""The contract every registered strategy keeps, checked for each one on the real backbone and real frames.

- its no-op knob value runs exactly the plain ViT;
- at a merging setting the head still gets the full token grid (full-size, finite logits);
- batch 1 reads back to the host only what it declares (``host_reads``), and no op syncs;
- a batch gives what each frame gives alone;
- it runs in every precision: bf16 weights, and fp32 weights under bf16 autocast.
"""
from __future__ import annotations

import pytest
import torch

from clustvit_ros.model import NoReduction
from clustvit_ros.model.reduction import STRATEGIES, make_strategy, strategy_spec

from conftest import normalise
from sync_helpers import HostReads, OpRecorder

# A setting of each knob that reduces tokens on real frames with the untrained model.
REDUCING = {"clustvit": 0.3, "tome": 0.1, "algm": 0.7, "ailurus": 0.3, "clustr": 64}
NAMES = list(STRATEGIES)


def test_every_registered_strategy_is_covered():
    assert set(REDUCING) | {"none"} == set(NAMES)
    for name in NAMES:
        spec = strategy_spec(name)
        assert spec.name == name and spec.summary
        if spec.knob is not None:
            knob = spec.knob
            assert knob.low <= knob.noop <= knob.high and knob.low <= knob.default <= knob.high
            assert knob.faster in ("lower", "higher") and knob.description
            assert knob.value_at(knob.position(knob.default)) == pytest.approx(knob.default, abs=0.5)
            assert abs(knob.position(knob.noop) - 1.0) < 1e-9 or name == "clustr"  # no-op = least reduction


def _strategy(name: str, noop: bool = False):
    spec = strategy_spec(name)
    if spec.knob is None:
        return make_strategy(name)
    return make_strategy(name, spec.knob.noop if noop else REDUCING[name])


@pytest.fixture(scope="module")
def frames(val_samples):
    return torch.cat([normalise(rgb) for rgb, _ in val_samples[:2]])


@pytest.fixture(scope="module")
def plain(untrained_model, frames):
    with torch.inference_mode():
        return untrained_model(frames[:1], NoReduction())


@pytest.mark.parametrize("name", NAMES)
def test_noop_knob_is_the_plain_vit(untrained_model, frames, plain, name):
    with torch.inference_mode():
        output = untrained_model(frames[:1], _strategy(name, noop=True))
    assert torch.equal(output.logits, plain.logits)
    assert output.stats.merged_tokens == [0] and output.stats.tokens_after == [output.stats.tokens_in]


@pytest.mark.parametrize("name", NAMES)
def test_reducing_setting_restores_the_full_grid(untrained_model, frames, plain, name):
    with torch.inference_mode():
        output = untrained_model(frames[:1], _strategy(name))
    assert output.logits.shape == plain.logits.shape == (1, 11, 360, 480)
    assert torch.isfinite(output.logits).all()
    stats = output.stats
    assert stats.tokens_in == 23 * 30 and 0 < stats.tokens_after[0] <= stats.tokens_in
    if name not in ("none", "clustr"):  # ClusTR shrinks keys and values, never the token set
        assert stats.tokens_after[0] < stats.tokens_in
        assert stats.merged_tokens == [stats.tokens_in - (stats.tokens_after[0] if name != "clustvit"
                                                          else stats.tokens_in - stats.merged_tokens[0])]


@pytest.mark.parametrize("name", NAMES)
def test_batch_one_reads_back_only_what_it_declares(untrained_model, frames, name):
    strategy = _strategy(name)
    with torch.inference_mode():
        untrained_model(frames[:1], strategy)  # warm the position-embedding and window caches
        with HostReads() as reads, OpRecorder() as recorder:
            untrained_model(frames[:1], strategy)
    assert len(reads.shapes) == strategy.host_reads, reads.shapes
    assert recorder.syncing_ops() == []


@pytest.mark.parametrize("name", NAMES)
def test_a_batch_gives_what_each_frame_gives_alone(untrained_model, frames, name):
    strategy = _strategy(name)
    with torch.inference_mode():
        batched = untrained_model(frames, strategy)
        singles = [untrained_model(frames[i:i + 1], strategy) for i in range(len(frames))]
    for index, single in enumerate(singles):
        assert batched.stats.tokens_after[index] == single.stats.tokens_after[0]
        assert batched.stats.merged_tokens[index] == single.stats.merged_tokens[0]
        torch.testing.assert_close(batched.logits[index], single.logits[0], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def trained(default_model_file):
    """The packaged model: a trained head has few near-ties, so precision shows as label changes."""
    from clustvit_ros.model import load_checkpoint
    return load_checkpoint(default_model_file), load_checkpoint(default_model_file).to(torch.bfloat16)


def _agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(1) == b.argmax(1)).float().mean())


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 2])
def test_every_precision(trained, frames, name, batch):
    fp32, bf16 = trained
    images = frames[:batch]
    with torch.inference_mode():
        reference = fp32(images, _strategy(name)).logits
        in_bf16 = bf16(images.to(torch.bfloat16), _strategy(name)).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = fp32(images, _strategy(name)).logits
    for output in (in_bf16, autocast):
        assert output.shape == reference.shape and torch.isfinite(output.float()).all()
        assert _agreement(output.float(), reference) > 0.95
