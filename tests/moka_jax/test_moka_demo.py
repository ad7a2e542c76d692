"""The shipped MokA demo model (`moka_jax/assets/avqa_demo`): it loads from the package, scores on the held-out
split what its manifest says it scored when it was built, beats chance by a wide margin, and takes a user's own
picture, sound and question through the same prompt layout as the task's."""

from __future__ import annotations

import numpy as np
import pytest


@pytest.fixture(scope="module")
def shipped():
    from moka_jax import demo

    return demo.load_demo()


def _chance(samples) -> float:
    """Expected exact match of guessing uniformly among each question's possible answers."""
    from moka_jax import avqa

    return float(np.mean([1.0 / len(avqa.TEMPLATES_BY_NAME[s.template].answers) for s in samples]))


def test_shipped_demo_scores_what_its_manifest_records(shipped):
    from moka_jax import experiment

    cfg = experiment.ExperimentConfig()
    prompts, samples = experiment.test_prompts(cfg)
    held_out = shipped.manifest["held_out"]
    assert held_out["samples"] == len(samples)
    scores = experiment.evaluate(shipped.model, shipped.moka, shipped.encoders, prompts, samples)
    # Another CPU may round a few logits differently; a greedy answer or two may flip, not more.
    assert abs(scores["accuracy"] - held_out["accuracy"]) <= 2 / len(samples), (scores, held_out)
    assert scores["accuracy"] >= 2 * _chance(samples), (scores, _chance(samples))
    assert shipped.moka.method == shipped.manifest["training"]["method"] == "moka"


def test_user_inputs_take_the_task_prompt_layout(shipped):
    from moka_jax import avqa_model, data, demo

    tokenizer = data.load_demo_tokenizer()
    samples = demo.held_out_samples(6, start=30)
    seq_len = data.max_example_length(tokenizer, n_image_tokens=avqa_model.N_IMAGE_TOKENS,
                                      n_audio_tokens=avqa_model.N_AUDIO_TOKENS)
    kw = dict(seq_len=seq_len, n_image_tokens=avqa_model.N_IMAGE_TOKENS, n_audio_tokens=avqa_model.N_AUDIO_TOKENS)
    for s in samples:
        task = data.encode_example(tokenizer, s, include_answer=False, **kw)
        user = data.encode_question(tokenizer, s.image / 255.0, s.audio, s.question, **kw)
        for key in ("tokens", "modality_ids", "key_mask", "length", "image", "audio"):
            np.testing.assert_array_equal(user[key], task[key], err_msg=key)
    # uint8 and [0, 1] float pictures give the same answers; rows are independent of their batch.
    together = shipped.answer([s.image for s in samples], [s.audio for s in samples], [s.question for s in samples])
    alone = shipped.answer([samples[2].image / 255.0], [samples[2].audio], [samples[2].question])
    assert alone == [together[2]]


def test_demo_rejects_bad_inputs(shipped, tmp_path):
    from moka_jax import demo

    s = demo.held_out_samples(1)[0]
    cases = [
        (([s.image[:16]], [s.audio], [s.question]), r"picture #1 has shape \(16, 32, 3\).*\(32, 32, 3\)"),
        (([s.image], [s.audio[:8000]], [s.question]), r"sound #1 has shape \(8000,\).*\(16000,\)"),
        (([s.image], [s.audio], [s.question, s.question]), "1 pictures, 1 sounds and 2 questions"),
        (([s.image * 2.0], [s.audio], [s.question]), r"floats in \[0, 1\]"),
        (([s.image], [s.audio], ["  "]), "the question is empty"),
        (([], [], []), "no questions"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            shipped.answer(*args)
    with pytest.raises(FileNotFoundError, match="not a MokA demo directory"):
        demo.load_demo(tmp_path)


def test_cli_demo_prints_answers(capsys):
    from moka_jax import cli

    assert cli.main(["demo", "--samples", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("reference") == 3 and "/3 right" in out
    assert cli.main(["demo", "--samples", "0"]) == 2
