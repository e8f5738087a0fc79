"""two_heads: two distinct Q heads, uniform over ordered pairs, as the official randperm(num_q)[:2]."""

import collections

import jax
import numpy as np
import pytest

from mtdistill_jax.nn import two_heads


@pytest.mark.parametrize("num_q", [2, 3, 5])
def test_two_heads_are_distinct_and_uniform_over_ordered_pairs(num_q):
    n = 12000
    heads = np.asarray(jax.vmap(lambda k: two_heads(k, num_q))(jax.random.split(jax.random.key(0), n)))
    assert heads.shape == (n, 2) and heads.dtype == np.int32
    assert np.all(heads[:, 0] != heads[:, 1]) and heads.min() >= 0 and heads.max() < num_q
    counts = collections.Counter(map(tuple, heads.tolist()))
    pairs = num_q * (num_q - 1)
    assert len(counts) == pairs  # every ordered pair occurs
    expected = n / pairs
    for pair, c in counts.items():  # each within 5 standard deviations of a uniform count
        assert abs(c - expected) < 5 * np.sqrt(expected * (1 - 1 / pairs)), (pair, c, expected)


def test_two_heads_needs_two_heads():
    with pytest.raises(ValueError, match="at least 2 Q heads"):
        two_heads(jax.random.key(0), 1)
