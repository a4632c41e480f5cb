"""Block-wise top-k: the fast two-level selection is exact, ties included."""

from __future__ import annotations

import pytest
import torch

from dpmicroadam.optim.topk import keep_count, make_layout, rows_topk


def _check_rows(x: torch.Tensor, k: int, sel: torch.Tensor) -> None:
    assert sel.shape == (x.shape[0], k)
    for row, chosen in zip(x, sel):
        assert len(set(chosen.tolist())) == k
        got = row.abs()[chosen].sort(descending=True).values
        want = row.abs().topk(k).values
        assert torch.equal(got, want)


@pytest.mark.parametrize(
    ("rows", "n", "k"), [(3, 32768, 328), (5, 4096, 41), (2, 1000, 10), (4, 64, 64), (1, 7, 1)]
)
def test_rows_topk_is_exact_on_random_data(rows, n, k):
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(n))
    _check_rows(x, k, rows_topk(x, k))


@pytest.mark.parametrize("kind", ["zeros", "few_values", "one_big"])
def test_rows_topk_is_exact_with_ties(kind):
    gen = torch.Generator().manual_seed(0)
    n, k = 16384, 164
    if kind == "zeros":
        x = torch.zeros(2, n)
    elif kind == "few_values":
        x = torch.randint(-3, 4, (2, n), generator=gen).float()
    else:
        x = torch.full((2, n), 0.5)
        x[:, 123] = -9.0
    _check_rows(x, k, rows_topk(x, k))


def test_layout_counts():
    layout = make_layout(100_000, 0.01, 32768)
    assert (layout.n_full, layout.k_full, layout.tail, layout.k_tail) == (3, 328, 1696, 17)
    assert layout.index_dtype == torch.int16
    assert make_layout(100_000, 0.01, None).index_dtype == torch.int32
    assert keep_count(0.07, 100) == 7
    assert keep_count(0.01, 16) == 1
    offsets = layout.column_offsets()
    assert offsets[0] == 0 and offsets[328] == 32768 and offsets[-1] == 3 * 32768
