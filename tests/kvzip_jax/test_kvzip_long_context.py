"""Long contexts just work: the reconstruction chunk shrinks so that [system | context | repeat input] fits the
model's positions (`prompts.fit_chunk_size`); only a context that cannot fit with the minimal chunk is an error."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
from kvzip_testutil import LLAMA, PROMPT, contexts, perturbed_params

from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip import prompts as P


@pytest.mark.parametrize("anchor", [0, 3, 8])
def test_repeat_width_is_the_longest_repeat_input(anchor):
    for n_ctx, chunk in itertools.product([1, 5, 16, 17, 40, 129], [1, 2, 8, 16, 40, 128, 500]):
        ctx = list(range(12, 12 + n_ctx))
        widest = max(len(c.ids) for c in P.repeat_inputs(PROMPT, ctx, chunk, anchor))
        assert P.repeat_width(PROMPT, n_ctx, chunk, anchor) == widest, (n_ctx, chunk)


def _fits(n_ctx, max_pos, chunk):
    return PROMPT.n_sys + n_ctx + P.repeat_width(PROMPT, n_ctx, chunk) <= max_pos


@pytest.mark.parametrize("n_ctx", [100, 300, 1000, 3000])
def test_fit_chunk_size_keeps_a_fitting_chunk_and_otherwise_takes_the_largest_multiple_that_fits(n_ctx):
    for max_pos in range(n_ctx + 100, n_ctx + 2200, 37):
        try:
            chunk = P.fit_chunk_size(PROMPT, n_ctx, max_pos, 2000)
        except ValueError:  # not even the minimal chunk fits, and the arithmetic agrees
            assert not _fits(n_ctx, max_pos, P.MIN_CHUNK_SIZE)
            continue
        assert _fits(n_ctx, max_pos, chunk)
        if chunk != 2000:  # shrunk: a multiple of the minimum, and the next multiple does not fit
            assert chunk % P.MIN_CHUNK_SIZE == 0 and chunk < n_ctx
            assert not _fits(n_ctx, max_pos, chunk + P.MIN_CHUNK_SIZE)
        else:
            assert _fits(n_ctx, max_pos, 2000)


def test_fit_chunk_size_never_grows_a_small_chunk():
    assert P.fit_chunk_size(PROMPT, 1000, 1400, 64) == 64
    assert P.fit_chunk_size(PROMPT, 1000, 1200, 300) == 128  # room 196 - head 12 = 184: one multiple of 128


def test_a_context_too_long_for_even_the_minimal_chunk_names_its_length_the_limit_and_what_fits():
    # 4 prompt tokens + context + (2 + 8 anchor + 2 postfix) head + 128 chunk: 140 positions beyond the context.
    with pytest.raises(ValueError, match=r"a context of 300 tokens does not fit this model's 440 positions.*"
                                         r"needs 444; contexts of up to 296 tokens fit: split or shorten the "
                                         r"context by at least 4 tokens"):
        P.fit_chunk_size(PROMPT, 300, 440)
    assert P.fit_chunk_size(PROMPT, 296, 440) == 128  # the limit it named fits exactly
    with pytest.raises(ValueError, match="empty context"):
        P.fit_chunk_size(PROMPT, 0, 440)


def test_score_shrinks_the_chunk_for_a_long_context_and_scores_as_with_that_chunk_given():
    """A 300-token context on a 512-position model: the default 2000-token chunk would need positions up to 608,
    so scoring takes 128-token chunks, with exactly the scores of asking for them."""
    config = dataclasses.replace(LLAMA, max_position_embeddings=512)
    params = perturbed_params(config)
    ctxs = contexts(seed=3, lengths=(300, 120))
    auto = compressor.score(params, config, PROMPT, ctxs, progress=False)
    assert auto.chunk_size == 128
    given = compressor.score(params, config, PROMPT, ctxs, chunk_size=128, progress=False)
    np.testing.assert_array_equal(auto.scores, given.scores)
    assert np.all(auto.scores[:, 0, :, :300] > 0) and np.all(auto.scores[:, 1, :, 120:] == 0)
    fits = compressor.score(params, config, PROMPT, [ctxs[1]], progress=False)
    assert fits.chunk_size == P.DEFAULT_CHUNK_SIZE  # a context that fits keeps the default
    short = dataclasses.replace(config, max_position_embeddings=440)
    with pytest.raises(ValueError, match="a context of 300 tokens does not fit this model's 440 positions"):
        compressor.score(perturbed_params(short), short, PROMPT, ctxs, progress=False)


def test_contexts_of_nearby_lengths_share_one_cache_shape():
    """Dense working caches come in whole multiples of CAPACITY_MULTIPLE slots, capped at the model's positions
    (never below what is needed): a new context length rarely means a new compiled prefill and scoring."""
    big = dataclasses.replace(LLAMA, max_position_embeddings=4096)
    assert compressor.bucketed_capacity(1, big) == compressor.CAPACITY_MULTIPLE
    assert compressor.bucketed_capacity(300, big) == compressor.bucketed_capacity(500, big) == 512
    assert compressor.bucketed_capacity(4000, big) == 4096
    assert compressor.bucketed_capacity(250, LLAMA) == 256  # the 256-position model: capped at its limit
    assert compressor.bucketed_capacity(300, LLAMA) == 300  # needed is never cut (the position check refuses it)
    params = perturbed_params(big)
    shapes = {compressor.prefill_contexts(params, big, PROMPT, contexts(seed=1, lengths=(n,)), extra_slots=0)[0]
              .k.shape for n in (300, 420)}
    assert len(shapes) == 1
