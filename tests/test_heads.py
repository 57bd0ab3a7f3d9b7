"""Exit heads: masked pooling, padding invariance, cacheable split, config errors."""

from __future__ import annotations

import pytest
import torch

from fedsd.model.backbone import ConfigError
from fedsd.model.heads import GRUHead, StatsHead, build_head, stats_pool

H, C = 16, 5


def padded(lengths: list[int], seed: int = 0, garbage: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A [B, F, H] batch; padded frames hold ``garbage`` so leaks would show."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(lengths), max(lengths), H), garbage)
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.bool)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn(n, H, generator=g)
        mask[i, :n] = True
    return x, mask


def test_stats_pool_is_masked_mean_and_std():
    x, mask = padded([7, 3], garbage=100.0)
    pooled = stats_pool(x, mask)
    assert pooled.shape == (2, 2 * H)
    for i, n in enumerate([7, 3]):
        clip = x[i, :n]
        mean, std = clip.mean(0), clip.var(0, unbiased=False).add(1e-5).sqrt()
        torch.testing.assert_close(pooled[i], torch.cat([mean, std]))
    torch.testing.assert_close(stats_pool(x[:1, :7]), pooled[:1])  # no mask = all frames


@pytest.mark.parametrize("kind", ["stats", "gru"])
def test_padded_batch_equals_each_clip_alone(kind):
    torch.manual_seed(0)
    head = build_head(kind, H, C).eval()
    lengths = [9, 4, 6]
    x, mask = padded(lengths, garbage=7.0)
    with torch.no_grad():
        batch_out = head(x, mask)
        for i, n in enumerate(lengths):
            alone = head(x[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(batch_out.logits[i : i + 1], alone.logits, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(batch_out.embedding[i : i + 1], alone.embedding, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["stats", "gru"])
def test_forward_equals_precompute_then_forward_precomputed(kind):
    torch.manual_seed(1)
    head = build_head(kind, H, C).eval()
    x, mask = padded([5, 8])
    cached = head.precompute(x, mask)
    assert not cached.requires_grad
    if kind == "stats":
        assert head.pooled and cached.shape == (2, 2 * H)
    else:
        assert not head.pooled and cached.shape == x.shape and cached[0, 5:].abs().sum() == 0
    a, b = head(x, mask), head.forward_precomputed(cached, mask)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.embedding, b.embedding)
    assert a.logits.shape == (2, C) and a.embedding.shape == (2, 256)


@pytest.mark.parametrize("kind", ["stats", "gru"])
def test_embedding_carries_gradient_to_head_parameters(kind):
    torch.manual_seed(2)
    head = build_head(kind, H, C)
    x, mask = padded([5, 8])
    out = head.forward_precomputed(head.precompute(x, mask), mask)
    out.embedding.pow(2).sum().backward()
    assert head.proj.weight.grad is not None and head.proj.weight.grad.abs().sum() > 0


def test_gru_inference_is_deterministic_and_uses_zero_initial_state():
    torch.manual_seed(3)
    head = GRUHead(H, C).eval()
    x, mask = padded([6, 6])
    with torch.no_grad():
        assert torch.equal(head(x, mask).logits, head(x, mask).logits)


def test_build_head_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"^head: .*'lstm'.*stats, gru"):
        build_head("lstm", H, C)
    with pytest.raises(ConfigError, match=r"^head_kwargs: .*bogus"):
        build_head("stats", H, C, bogus=1)
    head = build_head("stats", H, C, embed_dim=32, dropout=0.0)
    assert isinstance(head, StatsHead) and head.config() == {"embed_dim": 32, "dropout": 0.0}
