"""The synthetic audio-visual QA task (moka_jax.avqa) and its training batches / Grain pipeline (moka_jax.data)."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest

from kvzip_jax.models.llava import AUDIO, IMAGE, PAD, TEXT
from moka_jax import avqa, data
from moka_jax.config import MokAConfig
from moka_jax.context import make_context

N_IMAGE, N_AUDIO, SEQ_LEN, BATCH = 8, 6, 128, 10


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_demo_tokenizer()


def _dataset(tokenizer, **overrides):
    args = dict(seed=0, num_samples=60, batch_size=BATCH, seq_len=SEQ_LEN, n_image_tokens=N_IMAGE,
                n_audio_tokens=N_AUDIO)
    return data.make_dataset(tokenizer, **{**args, **overrides})


def _ids(tokenizer, text):
    return tokenizer.encode(text, add_special_tokens=False).ids


# ---------------------------------------------------------------------------------------------------- the task


def test_sample_is_a_pure_function_of_seed_and_index():
    a, b, other = avqa.make_sample(3, 17), avqa.make_sample(3, 17), avqa.make_sample(4, 17)
    assert a.image.shape == (32, 32, 3) and a.image.dtype == np.uint8
    assert a.audio.shape == (16_000,) and a.audio.dtype == np.float32
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert (a.question, a.answer, a.scene) == (b.question, b.answer, b.scene)
    assert a.family == other.family and not np.array_equal(a.audio, other.audio)
    small = avqa.make_sample(3, 17, image_size=16, sample_rate=8000, seconds=0.5)
    assert small.image.shape == (16, 16, 3) and small.audio.shape == (4000,)


def test_answers_balanced_within_every_template_and_family():
    samples = [avqa.make_sample(7, i) for i in range(300)]
    by_family = collections.Counter(s.family for s in samples)
    assert set(by_family.values()) == {100}
    answers = collections.defaultdict(collections.Counter)
    for s in samples:
        answers[s.template][s.answer] += 1
        assert s.template in {t.name for t in avqa.TEMPLATES_BY_FAMILY[s.family]}
    assert set(answers) == set(avqa.TEMPLATES_BY_NAME)
    for name, counts in answers.items():
        template = avqa.TEMPLATES_BY_NAME[name]
        full = [counts.get(a, 0) for a in template.answers]
        assert max(full) - min(full) <= 1, (name, counts)  # answers come in seeded blocks of len(answers)
    # yes/no across a whole family: also near even
    for family in avqa.FAMILIES:
        yes_no = collections.Counter(s.answer for s in samples if s.family == family and s.answer in ("yes", "no"))
        if yes_no:
            assert abs(yes_no["yes"] - yes_no["no"]) <= 2, (family, yes_no)


def test_question_words_decide_the_answer():
    for i in range(60):
        sample = avqa.make_sample(1, i)
        qas = avqa.questions_about(sample.scene)
        assert (sample.template, sample.question, sample.answer) in {(q.template, q.question, q.answer) for q in qas}
        for family in avqa.FAMILIES:  # within one family already, different words give different answers
            answers = {q.answer for q in qas if avqa.TEMPLATES_BY_NAME[q.template].family == family}
            assert len(answers) >= 2, (family, qas)
        for qa in qas:
            assert qa.answer in avqa.TEMPLATES_BY_NAME[qa.template].answers


def test_rendered_image_and_sound_show_the_scene():
    for i in range(24):
        sample = avqa.make_sample(2, i)
        scene = sample.scene
        for shape in scene.shapes:  # the shape's centre pixel has its colour
            pixel = sample.image[int(shape.y * 32), int(shape.x * 32)].astype(int)
            assert np.abs(pixel - np.array(avqa._RGB[shape.colour])).max() < 20, (shape, pixel)
        assert np.abs(sample.image[0, 0].astype(int) - scene.background).max() < 20
        # count the beeps on a 5 ms RMS envelope, and find the pitch band from the spectrum's peak
        frames = sample.audio[: len(sample.audio) // 80 * 80].reshape(-1, 80)
        loud = np.sqrt((frames**2).mean(axis=1)) > 0.06
        assert int((loud[1:] & ~loud[:-1]).sum() + loud[0]) == scene.num_beeps
        peak = np.argmax(np.abs(np.fft.rfft(sample.audio))) * sample.sample_rate / len(sample.audio)
        assert (peak > 600) == (scene.pitch == "high"), (peak, scene.pitch)


def test_captions_and_encoder_labels():
    for i in range(30):
        sample = avqa.make_sample(5, i)
        scene = sample.scene
        assert avqa.image_caption(sample) in avqa.possible_image_captions()
        assert avqa.audio_caption(sample) in avqa.possible_audio_captions()
        assert avqa.image_caption(sample).startswith(f"a {scene.shapes[0].colour} {scene.shapes[0].kind}")
        assert avqa.audio_caption(sample).split()[:3] == [avqa.NUMBER_WORDS[scene.num_beeps], scene.pitch,
                                                          scene.timbre]
        for labels, classes in ((avqa.image_labels(sample), avqa.IMAGE_LABEL_CLASSES),
                                (avqa.audio_labels(sample), avqa.AUDIO_LABEL_CLASSES)):
            assert labels.keys() == classes.keys()
            assert all(0 <= labels[k] < classes[k] for k in labels)
        labels = avqa.image_labels(sample)
        assert labels["num_shapes"] == len(scene.shapes) - 1
        assert (labels["second_kind"] == len(avqa.KINDS)) == (len(scene.shapes) == 1)
        assert avqa.audio_labels(sample)["num_beeps"] == scene.num_beeps - 1
    assert avqa.audio_caption(avqa.make_sample(5, 0)).endswith(("beep", "beeps"))


# ----------------------------------------------------------------------------------------- examples and batches


def _check_rows(batch, tokenizer, *, kind):
    eot, pad_id = _ids(tokenizer, "<|eot_id|>")[0], _ids(tokenizer, "<|pad|>")[0]
    for b in range(batch["tokens"].shape[0]):
        tokens, ids, keys, weights = (batch[k][b] for k in ("tokens", "modality_ids", "key_mask", "loss_weights"))
        length, prompt_length = int(batch["length"][b]), int(batch["prompt_length"][b])
        sample = avqa.make_sample(0, int(batch["sample_index"][b]))
        # padding: PAD modality, pad id, no key, no loss
        assert (ids[length:] == PAD).all() and (tokens[length:] == pad_id).all()
        assert not keys[length:].any() and not weights[length:].any()
        assert (ids[:length] != PAD).all()
        # loss: exactly the answer tokens and the closing eos, all after the prompt
        if kind == "qa":
            answer = sample.answer
        else:
            answer = avqa.image_caption(sample) if (ids == IMAGE).any() else avqa.audio_caption(sample)
        np.testing.assert_array_equal(np.flatnonzero(weights), np.arange(prompt_length, length))
        assert tokens[prompt_length:length].tolist() == [*_ids(tokenizer, answer), eot]
        # keys: one contiguous span of text tokens before the answer, decoding to the instruction (+ question)
        where = np.flatnonzero(keys)
        assert where.size and (np.diff(where) == 1).all() and where[-1] < prompt_length
        assert (ids[keys] == TEXT).all() and not (keys & (weights > 0)).any()
        key_text = tokenizer.decode(tokens[keys].tolist())
        if kind == "qa":
            assert key_text == data.QA_INSTRUCTION + sample.question
            assert (ids == IMAGE).sum() == N_IMAGE and (ids == AUDIO).sum() == N_AUDIO
            assert batch["family"][b] == avqa.FAMILIES.index(sample.family)
        else:
            assert key_text in data.CAPTION_INSTRUCTIONS.values()
            assert sorted([(ids == IMAGE).sum(), (ids == AUDIO).sum()]) in ([0, N_IMAGE], [0, N_AUDIO])
            assert batch["family"][b] == -1
        # placeholders: the pad id, in one block per modality, before the keys
        for modality, n in ((IMAGE, N_IMAGE), (AUDIO, N_AUDIO)):
            at = np.flatnonzero(ids == modality)
            if at.size:
                assert at.size == n and (np.diff(at) == 1).all() and at[-1] < where[0]
                assert (tokens[at] == pad_id).all()
        np.testing.assert_array_equal(batch["image"][b], sample.image / np.float32(255))
        np.testing.assert_array_equal(batch["audio"][b], sample.audio)


@pytest.mark.parametrize("kind", ["qa", "caption"])
def test_batches_hold_the_invariants(tokenizer, kind):
    batches = list(_dataset(tokenizer, kind=kind, num_samples=30))
    assert len(batches) == 3
    batch = batches[0]
    expected = {"tokens": np.int32, "modality_ids": np.int8, "key_mask": np.bool_, "loss_weights": np.float32,
                "image": np.float32, "audio": np.float32, "length": np.int32, "prompt_length": np.int32,
                "family": np.int8, "sample_index": np.int64}
    assert {k: v.dtype.type for k, v in batch.items()} == expected
    assert batch["tokens"].shape == (BATCH, SEQ_LEN) and batch["image"].shape == (BATCH, 32, 32, 3)
    assert batch["audio"].shape == (BATCH, 16_000) and batch["length"].shape == (BATCH,)
    assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    for batch in batches:
        _check_rows(batch, tokenizer, kind=kind)
    # the MokA context accepts the batch as is
    context = make_context(MokAConfig(), batch["modality_ids"], batch["key_mask"])
    np.testing.assert_array_equal(np.asarray(context.num_keys), batch["key_mask"].sum(axis=1))


def test_generation_prompt_is_the_training_prefix(tokenizer):
    sample = avqa.make_sample(0, 4)
    full = data.encode_example(tokenizer, sample, seq_len=SEQ_LEN, n_image_tokens=N_IMAGE, n_audio_tokens=N_AUDIO)
    prompt = data.encode_example(tokenizer, sample, seq_len=SEQ_LEN, n_image_tokens=N_IMAGE, n_audio_tokens=N_AUDIO,
                                 include_answer=False)
    n = int(prompt["length"])
    assert n == int(prompt["prompt_length"]) == int(full["prompt_length"])
    for key in ("tokens", "modality_ids", "key_mask"):
        np.testing.assert_array_equal(prompt[key][:n], full[key][:n])
    assert not prompt["loss_weights"].any()


def test_too_long_is_an_error_naming_both_lengths(tokenizer):
    sample = avqa.make_sample(0, 0)
    needed = int(data.encode_example(tokenizer, sample, seq_len=SEQ_LEN, n_image_tokens=N_IMAGE,
                                     n_audio_tokens=N_AUDIO)["length"])
    with pytest.raises(ValueError, match=rf"needs {needed} tokens, more than seq_len={needed - 1}"):
        data.encode_example(tokenizer, sample, seq_len=needed - 1, n_image_tokens=N_IMAGE, n_audio_tokens=N_AUDIO)
    longest = data.max_example_length(tokenizer, n_image_tokens=N_IMAGE, n_audio_tokens=N_AUDIO)
    with pytest.raises(ValueError, match=rf"seq_len={longest - 1} is shorter than the longest qa example \({longest}"):
        _dataset(tokenizer, seq_len=longest - 1)
    _dataset(tokenizer, seq_len=longest)  # the bound is a valid seq_len
    with pytest.raises(ValueError, match="split"):
        _dataset(tokenizer, split="validation")
    with pytest.raises(ValueError, match="no full batch"):
        _dataset(tokenizer, num_samples=BATCH - 1)


def test_max_example_length_bounds_every_example(tokenizer):
    for kind in ("qa", "caption"):
        longest = data.max_example_length(tokenizer, n_image_tokens=N_IMAGE, n_audio_tokens=N_AUDIO, kind=kind)
        lengths = np.concatenate([b["length"] for b in _dataset(tokenizer, kind=kind, num_samples=200,
                                                               seq_len=longest)])
        assert lengths.max() <= longest and lengths.max() >= longest - 12, (kind, lengths.max(), longest)


# ------------------------------------------------------------------------------------------------- the pipeline


def _indices(batches):
    return [b["sample_index"].tolist() for b in batches]


def test_order_is_deterministic_by_seed_and_splits_are_disjoint(tokenizer):
    first, again = list(_dataset(tokenizer, seed=1)), list(_dataset(tokenizer, seed=1))
    assert _indices(first) == _indices(again)
    for a, b in zip(first, again, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other = _indices(_dataset(tokenizer, seed=2))
    assert other != _indices(first)
    assert sorted(itertools.chain(*other)) == sorted(itertools.chain(*_indices(first))) == list(range(60))
    assert _indices(_dataset(tokenizer, shuffle=False))[0] == list(range(BATCH))
    test = set(itertools.chain(*_indices(_dataset(tokenizer, split="test"))))
    assert test.isdisjoint(range(data.SPLIT_SIZE)) and len(test) == 60
    # a different data seed: the same indices, other samples
    moved = next(iter(_dataset(tokenizer, seed=1, data_seed=9)))
    assert moved["sample_index"].tolist() == first[0]["sample_index"].tolist()
    assert not np.array_equal(moved["audio"], first[0]["audio"])


def test_epochs_reshuffle_and_repeat_forever(tokenizer):
    batches = list(itertools.islice(iter(_dataset(tokenizer, num_samples=20, num_epochs=None)), 6))
    epoch_one, epoch_two = _indices(batches[:2]), _indices(batches[2:4])
    assert sorted(itertools.chain(*epoch_one)) == sorted(itertools.chain(*epoch_two)) == list(range(20))
    assert epoch_one != epoch_two


def test_iterator_checkpoint_resumes_exactly(tokenizer):
    dataset = _dataset(tokenizer, num_samples=20, num_epochs=None, seed=3)
    it = iter(dataset)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = iter(_dataset(tokenizer, num_samples=20, num_epochs=None, seed=3))
    resumed.set_state(state)
    for want, got in zip(expected, [next(resumed) for _ in range(3)], strict=True):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
