"""Training MokA: only adapters and projectors move and hold optimizer state (spec invariant 3), the loss falls,
a resumed run is bit-identical to a straight one, and exported adapters load back exactly (invariant 14)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kvzip_jax.models.llava import AUDIO, IMAGE
from kvzip_jax.models.projector import ProjectorConfig
from moka_jax import checkpoint
from moka_jax.config import MokAConfig
from moka_jax.context import make_context
from moka_jax.model import apply_moka
from moka_jax.train import TRAINABLE, AdaptedMultimodalLM, TrainConfig, make_train_step, optimizer, split_trainable
from tests.moka_jax.moka_testutil import layout, tiny_config, tiny_params

CONFIG = tiny_config()
MOKA = MokAConfig(dropout=0.1)
FEATURES = {"image": 12, "audio": 10}
STEPS = 6


def build(moka: MokAConfig = MOKA):
    projectors = {m: ProjectorConfig(in_features=d, out_features=CONFIG.hidden_size) for m, d in FEATURES.items()}
    model = AdaptedMultimodalLM(CONFIG, moka, apply_moka(tiny_params(CONFIG), CONFIG, moka), projectors, seed=1)
    return split_trainable(model)


def batch_and_context(moka: MokAConfig = MOKA):
    ids, keys, answers = layout()
    rng = np.random.default_rng(0)
    n = {"image": int((ids == IMAGE).sum(1).max()), "audio": max(1, int((ids == AUDIO).sum(1).max()))}
    batch = dict(
        tokens=jnp.asarray(rng.integers(5, CONFIG.vocab_size, ids.shape), jnp.int32),
        modality_ids=jnp.asarray(ids), loss_weights=jnp.asarray(answers, jnp.float32),
        features={m: jnp.asarray(rng.normal(size=(ids.shape[0], n[m], d)), jnp.float32) for m, d in FEATURES.items()},
    )
    return batch, make_context(moka, ids, keys)


def run(steps, trainable, opt_state, frozen, step_fn, batch, ctx, start=0):
    losses = []
    for i in range(start, steps):
        trainable, opt_state, loss, _ = step_fn(trainable, opt_state, frozen, batch, ctx, jnp.int32(i))
        losses.append(float(loss))
    return trainable, opt_state, losses


@pytest.fixture(scope="module")
def straight_run():
    graphdef, trainable, frozen = build()
    cfg = TrainConfig(steps=STEPS, learning_rate=3e-2, warmup_ratio=0.2)
    tx = optimizer(cfg)
    step_fn = make_train_step(graphdef, tx, cfg)
    batch, ctx = batch_and_context()
    opt_state = tx.init(trainable)
    out, final_opt, losses = run(STEPS, trainable, opt_state, frozen, step_fn, batch, ctx)
    return dict(graphdef=graphdef, initial=trainable, frozen=frozen, cfg=cfg, tx=tx, step_fn=step_fn, batch=batch,
                ctx=ctx, final=out, final_opt=final_opt, losses=losses)


def leaves(state):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def count(state):
    return sum(x.size for x in leaves(state))


def test_only_adapters_and_projectors_train_and_hold_optimizer_state(straight_run):
    r = straight_run
    names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(r["initial"])]
    assert all("lora_" in n or "projectors" in n for n in names)
    assert any("projectors" in n for n in names) and any("lora_a" in n for n in names)
    frozen_names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(r["frozen"])]
    assert not any("lora_" in n or "projectors" in n for n in frozen_names)
    # Adam's two moments for every trainable weight; a handful of step counters besides.
    assert 2 * count(r["initial"]) <= count(r["final_opt"]) <= 2 * count(r["initial"]) + 16
    # The trained model's frozen part is byte-for-byte a fresh build's; every trainable weight moved.
    trained = nnx.merge(r["graphdef"], r["final"], r["frozen"])
    fresh_frozen = build()[2]
    assert [x.tobytes() for x in leaves(nnx.state(trained, nnx.Not(TRAINABLE)))] == \
        [x.tobytes() for x in leaves(fresh_frozen)]
    moved = [not np.array_equal(a, b) for a, b in zip(leaves(r["initial"]), leaves(r["final"]), strict=True)]
    assert all(moved)
    assert r["losses"][-1] < r["losses"][0]


def test_a_resumed_run_is_bit_identical(straight_run, tmp_path):
    r = straight_run
    opt_state = r["tx"].init(r["initial"])
    half, half_opt, _ = run(STEPS // 2, r["initial"], opt_state, r["frozen"], r["step_fn"], r["batch"], r["ctx"])
    checkpoint.save_training(str(tmp_path), STEPS // 2, half, half_opt, {"next_index": 7})
    step, trainable, opt_restored, data_state = checkpoint.restore_training(str(tmp_path), r["initial"],
                                                                            r["tx"].init(r["initial"]))
    assert step == STEPS // 2 and data_state == {"next_index": 7}
    resumed, _, _ = run(STEPS, trainable, opt_restored, r["frozen"], r["step_fn"], r["batch"], r["ctx"],
                        start=STEPS // 2)
    assert [x.tobytes() for x in leaves(resumed)] == [x.tobytes() for x in leaves(r["final"])]


def test_exported_adapter_loads_back_exactly_and_refuses_another_model(straight_run, tmp_path):
    r = straight_run
    checkpoint.save_adapter(str(tmp_path), r["final"], MOKA, base_model="tiny")
    loaded = checkpoint.load_adapter(str(tmp_path), r["initial"], MOKA)
    assert [x.tobytes() for x in leaves(loaded)] == [x.tobytes() for x in leaves(r["final"])]
    assert checkpoint.load_adapter_config(str(tmp_path)) == MOKA

    model = nnx.merge(r["graphdef"], loaded, r["frozen"])
    want = nnx.merge(r["graphdef"], r["final"], r["frozen"])
    b, ctx = r["batch"], r["ctx"]
    np.testing.assert_array_equal(np.asarray(model(b["tokens"], b["modality_ids"], b["features"], ctx)),
                                  np.asarray(want(b["tokens"], b["modality_ids"], b["features"], ctx)))

    with pytest.raises(ValueError, match=r"modalities=\('text', 'image', 'audio'\); the model is adapted with "
                                         r"modalities=\('text', 'image'\)"):
        checkpoint.load_adapter(str(tmp_path), r["initial"], MOKA.replace(modalities=("text", "image")))
    _, other, _ = build(MOKA.replace(rank=2))
    with pytest.raises(ValueError, match="rank=4"):
        checkpoint.load_adapter(str(tmp_path), other, MOKA.replace(rank=2))
    smaller = jax.tree_util.tree_map(lambda x: x[..., :1] if x.ndim > 1 else x, r["initial"])
    with pytest.raises(ValueError, match=r"has shape .* but the config expects"):
        checkpoint.load_adapter(str(tmp_path), smaller, MOKA)


# Orbax abandons its shard readers when a restore fails; their coroutines report that when collected
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("target, says", [
    ({"a": jnp.ones((4, 16))}, r"Requested shape: \(4, 16\) is not compatible with the stored shape: \(4, 8\)"),
    ({"b": jnp.ones((4, 8))}, r"tree structures do not match"),
])
def test_a_checkpoint_that_does_not_fit_the_run_is_refused_by_name(tmp_path, target, says):
    """Another rank or another method: the error names the checkpoint, its step and the mismatch."""
    checkpoint.save_training(str(tmp_path), 4, {"a": jnp.ones((4, 8))}, {"m": jnp.zeros(3)}, {"next_index": 1})
    with pytest.raises(ValueError, match=rf"the training checkpoint {tmp_path} \(step 4\) does not fit this run's "
                                         rf"state: .*{says}.*another model, method or adapter size"):
        checkpoint.restore_training(str(tmp_path), target, {"m": jnp.zeros(3)})
