"""The demo-model training package (`kvzip_jax.train`): synthetic tasks whose answers are in their contexts, the
BPE tokenizer (Llama-3 special tokens, digit splitting, chat template), training examples in KVzip's prompt format
with exact loss weights, and the trainer (exact resume, config guard, HF export equal to transformers, loss).

Everything expensive is built once per module: one tokenizer, and one micro training run (straight 3 steps vs.
2 steps + resume to 3) shared by the resume and export tests."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kvzip_jax.kvzip import prompts
from kvzip_jax.train import data, tasks
from kvzip_jax.train.tokenizer import BOS, EOT, PAD, SPECIAL_TOKENS, build_tokenizer, corpus

transformers = pytest.importorskip("transformers")

SEQ_LEN = 512


# --------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(corpus(0, 50), 512)


@pytest.fixture(scope="module")
def prompt(tok):
    return prompts.build_prompt(tok, "llama")


def micro_cfg(**overrides):
    from kvzip_jax.train.trainer import TrainConfig

    base = dict(
        hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
        vocab_size=512, tokenizer_samples=50, tokens_per_step=512, seq_len_stages="0:512", long_seq_len=512,
        checkpoint_every=1, warmup_steps=2, cooldown_steps=0,
        induction_warmup_steps=1,  # both kinds of batch in a few steps
    )
    return TrainConfig(**{**base, **overrides})


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _losses(run_dir: str) -> list[tuple]:
    with open(os.path.join(run_dir, "loss.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [(r["step"], r["loss"], r["answer_token_acc"], r["seq_len"]) for r in rows]


@pytest.fixture(scope="module")
def micro_runs(tmp_path_factory):
    """A straight 3-step run (dir_a) and a 2-step run resumed to 3 steps (dir_b)."""
    from kvzip_jax.train.trainer import train

    dir_a, dir_b = str(tmp_path_factory.mktemp("run_a")), str(tmp_path_factory.mktemp("run_b"))
    model_a = train(dir_a, micro_cfg(steps=3), log_every=1)
    model_b2 = train(dir_b, micro_cfg(steps=2), log_every=1)
    weights_after_2 = _read(os.path.join(model_b2, "model.safetensors"))
    model_b = train(dir_b, micro_cfg(steps=3), log_every=1)
    return dict(dir_a=dir_a, model_a=model_a, dir_b=dir_b, model_b=model_b, weights_after_2=weights_after_2)


# ------------------------------------------------------------------------------------------------------ tasks


def test_make_sample_is_deterministic_and_varies_with_index_and_seed():
    for task in tasks.TASKS:
        assert tasks.make_sample(3, 7, task, 10) == tasks.make_sample(3, 7, task, 10)
        assert tasks.make_sample(3, 7, task) == tasks.make_sample(3, 7, task)
        contexts = {tasks.make_sample(3, i, task, 10).context for i in range(8)}
        assert len(contexts) == 8, f"{task}: samples repeat across indices"
        assert tasks.make_sample(3, 0, task, 10) != tasks.make_sample(4, 0, task, 10)
        # n_filler changes the sample (more sentences), task changes it too.
        assert tasks.make_sample(3, 0, task, 10).context != tasks.make_sample(3, 0, task, 20).context
    assert tasks.make_sample(3, 0, "needle", 10) != tasks.make_sample(3, 0, "passage", 10)
    # task None picks the task from the index.
    for i in range(8):
        assert tasks.make_sample(1, i).task == tasks.TASKS[i % len(tasks.TASKS)]


def _check_needle(s: tasks.Sample):
    facts = [p for p in s.context_parts if "special magic number" in p]
    assert 2 <= len(facts) <= 6
    for qa in s.qa:
        name = re.fullmatch(r"What is the special magic number for (\w+)\?", qa.question).group(1)
        assert re.fullmatch(r"\d{7}", qa.value)
        assert qa.answer == f"The special magic number for {name} is {qa.value}."
        assert qa.answer in s.context_parts
        assert sum(f"magic number for {name} is" in p for p in s.context_parts) == 1
    return len(facts)


def _check_kv(s: tasks.Sample):
    lines = s.context.split("\n")
    assert lines[0] == "JSON data:"
    keys = [re.fullmatch(r'"(\w+)": "(\w+)",', line).group(1) for line in lines[1:]]
    assert len(keys) == len(set(keys)), "duplicate keys make the lookup ambiguous"
    assert len(s.qa) == 3
    for qa in s.qa:
        key = re.fullmatch(r'What is the value of the key "(\w+)"\?', qa.question).group(1)
        assert qa.answer == f'"{key}": "{qa.value}"'
        assert f"{qa.answer}," in lines


def _check_vartrack(s: tasks.Sample):
    assign: dict[str, tuple[int, str]] = {}
    for i, part in enumerate(s.context_parts):
        m = re.fullmatch(r"VAR ([A-Z]{3}) = (VAR [A-Z]{3}|\d{5})\.", part)
        if m:
            assert m.group(1) not in assign, f"{m.group(1)} assigned twice"
            assign[m.group(1)] = (i, m.group(2))
    for qa in s.qa:
        var = re.fullmatch(r"What is the value of VAR ([A-Z]{3})\?", qa.question).group(1)
        walk, hops = [f"VAR {var}"], 0
        while assign[var][1].startswith("VAR "):
            src = assign[var][1][4:]
            assert assign[src][0] < assign[var][0], f"VAR {var} copies VAR {src} before it is assigned"
            var, hops = src, hops + 1
            walk.append(f"VAR {var}")
        assert 1 <= hops <= 2
        assert assign[var][1] == qa.value
        assert qa.answer == " = ".join([*walk, qa.value]) + "."
    return len(assign)


def _check_passage(s: tasks.Sample):
    patterns = {
        r"Where does (\w+) live\?": "{} lives in {}.",
        r"What does (\w+) work as\?": "{} works as {}.",
        r"What pet does (\w+) have\?": "{} has {}.",
    }
    assert len(s.qa) == 3
    for qa in s.qa:
        matches = [(m.group(1), fmt) for pat, fmt in patterns.items() if (m := re.fullmatch(pat, qa.question))]
        assert len(matches) == 1, qa.question
        name, fmt = matches[0]
        assert qa.answer == fmt.format(name, qa.value)
        assert qa.answer in s.context_parts
    return sum(bool(re.fullmatch(r"\w+ (lives in|works as|has) .+\.", p)) for p in s.context_parts)


@pytest.mark.parametrize("task", tasks.TASKS)
def test_every_answer_is_in_the_context(task):
    check = {"needle": _check_needle, "kv": _check_kv, "vartrack": _check_vartrack, "passage": _check_passage}[task]
    for index in range(30):
        n_filler = index % 13
        s = tasks.make_sample(5, index, task, n_filler)
        assert s.task == task and s.qa
        assert s.context.isascii()
        n_facts = check(s)
        if task == "kv":
            assert len(s.context_parts) == 1 + max(4, n_filler)
        else:  # every other part is one filler sentence
            assert len(s.context_parts) == n_facts + n_filler
        check(tasks.make_sample(5, index, task))  # default filler budget too


def test_make_sample_errors_name_the_value():
    with pytest.raises(ValueError, match="'bogus'"):
        tasks.make_sample(0, 0, "bogus")
    with pytest.raises(ValueError, match="-3"):
        tasks.make_sample(0, 0, "needle", -3)


# -------------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_saves_and_loads_with_autotokenizer(tok, tmp_path):
    assert len(tok) <= 512
    tok.save_pretrained(tmp_path)
    loaded = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == (BOS, EOT, PAD)
    sample = tasks.make_sample(9, 2, "needle", 12)
    text = sample.context + "".join(f"\n\n{qa.question}" for qa in sample.qa)
    for t in (tok, loaded):
        ids = t.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False)
        assert t.decode(ids) == text
        specials = [t.encode(s, add_special_tokens=False) for s in SPECIAL_TOKENS]
        assert all(len(ids) == 1 for ids in specials), specials
        assert len({ids[0] for ids in specials}) == len(SPECIAL_TOKENS)
        assert t.convert_tokens_to_ids(EOT) == t.eos_token_id == specials[SPECIAL_TOKENS.index(EOT)][0]
        assert t.pad_token_id == specials[SPECIAL_TOKENS.index(PAD)][0]
        assert t.bos_token_id == specials[SPECIAL_TOKENS.index(BOS)][0]


def test_digits_are_single_tokens(tok):
    assert len(tok.encode("4821", add_special_tokens=False)) == 4
    assert tok.tokenize("4821") == ["4", "8", "2", "1"]
    for index in range(4):
        for qa in tasks.make_sample(2, index, "needle", 5).qa:
            ids = tok.encode(qa.value, add_special_tokens=False)
            assert len(ids) == len(qa.value) == 7
            # the same number tokenizes the same way in its context (no merges across digit boundaries)
            in_ctx = tok.encode(f"is {qa.value}.", add_special_tokens=False)
            assert any(in_ctx[i:i + 7] == ids for i in range(len(in_ctx) - 6))


@pytest.mark.parametrize("task", tasks.TASKS)
def test_decode_encode_roundtrip(tok, task):
    ctx = tasks.make_sample(11, 1, task, 20).context
    assert tok.decode(tok.encode(ctx, add_special_tokens=False)) == ctx


def test_chat_template_and_kvzip_prompt(tok):
    msgs = [{"role": "system", "content": "You are a helpful assistant"}, {"role": "user", "content": " Hi there "}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    ids = tok.apply_chat_template(msgs[1:], tokenize=True, add_generation_prompt=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert ids.count(tok.bos_token_id) == 1  # the template writes BOS once; encode must not add another

    p = prompts.build_prompt(tok, "llama", strict=True)
    llama3 = prompts.TEMPLATES["llama3"]
    assert tok.decode(p.prefix_ids) == llama3.prefix + prompts.INSTRUCTION_DEFAULT
    assert tok.decode(p.postfix_ids) == llama3.postfix
    assert p.prefix_ids[0] == tok.bos_token_id
    assert tok.decode(p.first_repeat_ids) == prompts.FIRST_REPEAT
    assert tok.decode(p.later_repeat_ids) == prompts.LATER_REPEAT


# ------------------------------------------------------------------------------------------------------- data


def _content_end(ex: data.Encoded, pad_id: int) -> int:
    nonpad = np.flatnonzero(ex.ids != pad_id)
    return int(nonpad[-1]) + 1


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist(), strict=True))


def _examples(tok, prompt, n=16):
    """(index, example, decoded text after the prefix, is_repeat) for examples 0..n-1 of seed 0."""
    out = []
    for i in range(n):
        ex = data.make_example(tok, prompt, 0, i, SEQ_LEN)
        body = tok.decode(ex.ids[len(prompt.prefix_ids):_content_end(ex, tok.pad_token_id)].tolist())
        out.append((i, ex, body, "Repeat the" in body))
    return out


@pytest.fixture(scope="module")
def examples(tok, prompt):
    return _examples(tok, prompt)


def test_make_example_is_deterministic_with_exact_shape_and_weight_values(tok, prompt, examples):
    kinds = {rep for *_, rep in examples}
    assert kinds == {True, False}, "expected both qa and repeat examples among the first 16"
    for i, ex, _, _ in examples:
        again = data.make_example(tok, prompt, 0, i, SEQ_LEN)
        np.testing.assert_array_equal(ex.ids, again.ids)
        np.testing.assert_array_equal(ex.weights, again.weights)
        assert ex.ids.shape == ex.weights.shape == (SEQ_LEN,)
        assert ex.ids.dtype == np.int32 and ex.weights.dtype == np.float32
        assert set(np.unique(ex.weights).tolist()) <= {0.0, float(np.float32(data.CONTEXT_WEIGHT)), 1.0}
        n = len(prompt.prefix_ids)
        assert ex.ids[:n].tolist() == list(prompt.prefix_ids)
        assert not ex.weights[:n].any(), "prompt prefix must have weight 0"
        end = _content_end(ex, tok.pad_token_id)
        assert end < SEQ_LEN, "examples are expected to carry some padding at 512"
        assert (ex.ids[end:] == tok.pad_token_id).all() and not ex.weights[end:].any()
        assert (ex.ids[:end] != tok.pad_token_id).all()
        # the context follows the prefix at weight CONTEXT_WEIGHT, as one run
        ctx_runs = _runs(np.isclose(ex.weights, data.CONTEXT_WEIGHT))
        assert len(ctx_runs) == 1 and ctx_runs[0][0] == n
    assert len({ex.ids.tobytes() for _, ex, _, _ in examples}) == len(examples)
    other = data.make_example(tok, prompt, 1, 0, SEQ_LEN)
    assert not np.array_equal(other.ids, examples[0][1].ids), "the seed must change the example"


def test_qa_examples_supervise_exactly_the_answers(tok, prompt, examples):
    checked = 0
    for index, ex, body, is_repeat in examples:
        if is_repeat:
            continue
        n = len(prompt.prefix_ids)
        # The task as make_example draws it; the filler budget is found by search (independent of fit_sample).
        task = tasks.TASKS[int(np.random.default_rng([0, index, 1]).integers(len(tasks.TASKS)))]
        sample = next(
            (s for k in range(60)
             if body.startswith((s := tasks.make_sample(0, index, task, k)).context + "\n\n" + s.qa[0].question)),
            None,
        )
        assert sample is not None, f"example {index}: body does not start with a sample context + question"
        ctx_len = len(data.encode_text(tok, sample.context))
        np.testing.assert_allclose(ex.weights[n:n + ctx_len], data.CONTEXT_WEIGHT)
        runs = _runs(ex.weights == 1.0)
        assert 1 <= len(runs) <= len(sample.qa)
        answers = [tok.decode(ex.ids[a:b].tolist()) for a, b in runs]
        assert answers == [sample.separator + qa.answer + EOT for qa in sample.qa[:len(runs)]]
        # everything between the context and the answers is the question turns, at weight 0
        pos = n + ctx_len
        for qa, (a, b) in zip(sample.qa, runs, strict=False):
            question = prompts.encode_question(tok, prompt, qa.question)
            assert ex.ids[pos:a].tolist() == question
            assert not ex.weights[pos:a].any()
            pos = b
        assert pos == _content_end(ex, tok.pad_token_id)
        checked += 1
    assert checked >= 3


def test_repeat_examples_supervise_exactly_a_context_chunk_copy(tok, prompt, examples):
    checked = 0
    for index, ex, _, is_repeat in examples:
        if is_repeat:
            _check_repeat_example(tok, prompt, index, ex)
            checked += 1
    assert checked >= 3


def test_induction_warmup_examples_copy_what_followed_the_anchor(tok, prompt):
    special = {tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert special == set(range(len(SPECIAL_TOKENS)))
    anchor, copy = data.INDUCTION_ANCHOR, data.INDUCTION_COPY
    for seq_len in (90, 138, 200):
        for index in range(4):
            ex = data.make_induction_example(tok, 0, index, seq_len)
            np.testing.assert_array_equal(ex.ids, data.make_induction_example(tok, 0, index, seq_len).ids)
            assert ex.ids.shape == ex.weights.shape == (seq_len,)
            ids = ex.ids.tolist()
            n_ctx = seq_len - 2 - anchor - copy
            assert ids[0] == tok.bos_token_id and ids[n_ctx + 1] == tok.eos_token_id
            ctx, tail = ids[1 : n_ctx + 1], ids[n_ctx + 2 :]
            assert min(ctx) >= len(SPECIAL_TOKENS) and max(ctx) < len(tok)
            # the tail is a contiguous slice of the random ids: an anchor, then what followed it
            assert any(ctx[i : i + anchor + copy] == tail for i in range(n_ctx - anchor - copy + 1))
            assert ex.weights.tolist() == [0.0] * (seq_len - copy) + [1.0] * copy
        assert data.make_induction_example(tok, 0, 0, seq_len).ids.tolist() != \
            data.make_induction_example(tok, 0, 1, seq_len).ids.tolist()
    with pytest.raises(ValueError, match="seq_len 64"):
        data.make_induction_example(tok, 0, 0, 64)
    ds = data.batches(tok, prompt, 0, lambda s: 2, lambda s: 512, warmup_steps=1)
    warm, regular = ds[0], ds[1]
    np.testing.assert_array_equal(warm["ids"][0], data.make_induction_example(tok, 0, 0, 512).ids)
    np.testing.assert_array_equal(regular["ids"][0], data.make_example(tok, prompt, 0, 1 << 8, 512).ids)


def _check_repeat_example(tok, prompt, index, ex):
    """A reconstruction example: one weight-1 run that copies a contiguous context slice, after KVzip's exact
    repeat header (first-chunk form, or later-chunk form with the 8 anchor ids that precede the slice)."""
    n = len(prompt.prefix_ids)
    (c0, c1), = _runs(np.isclose(ex.weights, data.CONTEXT_WEIGHT))
    ctx = ex.ids[c0:c1].tolist()
    runs = _runs(ex.weights == 1.0)
    assert len(runs) == 1, f"example {index}: the chunk copy must be one run"
    a, b = runs[0]
    assert b == _content_end(ex, tok.pad_token_id), "the copy ends the example"
    copy = ex.ids[a:b].tolist()
    starts = [s for s in range(len(ctx) - len(copy) + 1) if ctx[s:s + len(copy)] == copy]
    assert starts, f"example {index}: weight-1 ids are not a contiguous slice of the context"
    # the repeat header between context and copy is at weight 0 and has KVzip's exact form
    header = ex.ids[c1:a].tolist()
    assert not ex.weights[c1:a].any()
    post = list(prompt.postfix_ids)
    assert header[-len(post):] == post
    head = header[:-len(post)]
    if head == list(prompt.first_repeat_ids):
        assert 0 in starts, "the first chunk's copy starts the context"
    else:
        later = list(prompt.later_repeat_ids)
        assert head[:len(later)] == later
        anchor = head[len(later):]
        assert len(anchor) == prompts.DEFAULT_ANCHOR
        assert any(s >= len(anchor) and ctx[s - len(anchor):s] == anchor for s in starts)
    assert c0 == n


def test_fit_sample_respects_the_budget(tok):
    for task in tasks.TASKS:
        for budget in (220, 320, 450):
            rng = np.random.default_rng(budget)
            sample, ids = data.fit_sample(tok, 0, 3, task, budget, rng)
            assert len(ids) <= budget
            assert ids == data.encode_text(tok, sample.context)
            assert sample.task == task
        with pytest.raises(ValueError, match="budget 5"):
            data.fit_sample(tok, 0, 3, task, 5, np.random.default_rng(0))


def test_batches_follow_the_curriculum_and_are_deterministic(tok, prompt):
    cfg = micro_cfg(tokens_per_step=1024, seq_len_stages="0:512", long_seq_len=1024, long_after=1, long_every=2)
    assert (cfg.batch_size_at(0), cfg.seq_len_at(0), cfg.batch_size_at(1), cfg.seq_len_at(1)) == (2, 512, 1, 1024)
    # long steps only from long_after on, every long_every-th step
    assert [cfg.seq_len_at(s) for s in range(2, 6)] == [512, 1024, 512, 1024]
    late = micro_cfg(seq_len_stages="0:256,5:512", long_seq_len=1024, long_after=8, long_every=4)
    assert [late.seq_len_at(s) for s in (3, 4, 5, 7, 11, 15)] == [256, 256, 512, 512, 1024, 1024]
    for bad in ("5:256", "0:256,0:512", "0:2048", "0-256"):
        with pytest.raises(ValueError, match="seq_len_stages"):
            micro_cfg(seq_len_stages=bad, long_seq_len=1024)
    ds = data.batches(tok, prompt, 0, cfg.batch_size_at, cfg.seq_len_at)
    ds2 = data.batches(tok, prompt, 0, cfg.batch_size_at, cfg.seq_len_at)
    seen = set()
    for step in (1, 0):  # random access, any order
        batch = ds[step]
        b, s = cfg.batch_size_at(step), cfg.seq_len_at(step)
        assert batch["ids"].shape == batch["weights"].shape == (b, s)
        assert batch["ids"].dtype == np.int32 and batch["weights"].dtype == np.float32
        again = ds2[step]
        np.testing.assert_array_equal(batch["ids"], again["ids"])
        np.testing.assert_array_equal(batch["weights"], again["weights"])
        for row in batch["ids"]:
            seen.add(row[row != tok.pad_token_id].tobytes())
        assert (batch["weights"] == 1.0).any(axis=1).all(), "every row supervises something"
    assert len(seen) == 3, "rows of different steps/rows must be different examples"
    other_seed = data.batches(tok, prompt, 1, cfg.batch_size_at, cfg.seq_len_at)[0]
    assert not np.array_equal(other_seed["ids"], ds[0]["ids"])


# ---------------------------------------------------------------------------------------------------- trainer


def test_resumed_run_equals_straight_run_bitwise(micro_runs):
    a = _read(os.path.join(micro_runs["model_a"], "model.safetensors"))
    b = _read(os.path.join(micro_runs["model_b"], "model.safetensors"))
    assert a == b
    assert micro_runs["weights_after_2"] != b, "step 3 did not change the weights (the test would be vacuous)"
    assert _losses(micro_runs["dir_a"]) == _losses(micro_runs["dir_b"])
    assert [r[0] for r in _losses(micro_runs["dir_a"])] == [1, 2, 3]
    with open(os.path.join(micro_runs["dir_b"], "train_config.json")) as f:
        assert json.load(f)["steps"] == 3


def test_run_dir_with_a_different_config_is_refused(micro_runs, tmp_path):
    from kvzip_jax.train.trainer import train

    with open(os.path.join(micro_runs["dir_a"], "train_config.json")) as f:
        saved = f.read()
    (tmp_path / "train_config.json").write_text(saved)
    with pytest.raises(ValueError, match="learning_rate"):
        train(str(tmp_path), micro_cfg(steps=3, learning_rate=1e-3))
    assert (tmp_path / "train_config.json").read_text() == saved, "a refused run must not overwrite the config"
    assert not (tmp_path / "checkpoints").exists()


def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    from kvzip_jax.train.trainer import learning_rate

    lr = learning_rate(micro_cfg(steps=100, warmup_steps=10, cooldown_steps=40, learning_rate=1e-3))
    assert [float(lr(t)) for t in (0, 5, 10, 35, 60)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3, 1e-3])
    assert [float(lr(t)) for t in (70, 80, 100)] == pytest.approx([7.5e-4, 5e-4, 0.0])
    constant = learning_rate(micro_cfg(steps=100, warmup_steps=10, cooldown_steps=0, learning_rate=1e-3))
    assert float(constant(100)) == pytest.approx(1e-3)
    # Before the cool-down the schedule does not depend on the total: a run may be extended exactly.
    longer = learning_rate(micro_cfg(steps=200, warmup_steps=10, cooldown_steps=40, learning_rate=1e-3))
    assert [float(longer(t)) for t in range(61)] == [float(lr(t)) for t in range(61)]
    with pytest.raises(ValueError, match="cooldown_steps 95"):
        micro_cfg(steps=100, warmup_steps=10, cooldown_steps=95)


def test_extending_a_run_inside_its_cooldown_is_refused(micro_runs, tmp_path):
    """dir_a finished 3 steps; had its schedule cooled down over its last step, neither a 5-step nor a 2-step run
    would have taken the same steps."""
    import dataclasses

    from kvzip_jax.train.trainer import train

    shutil.copytree(os.path.join(micro_runs["dir_a"], "checkpoints"), tmp_path / "checkpoints")
    cooled = micro_cfg(steps=3, warmup_steps=1, cooldown_steps=1)
    (tmp_path / "train_config.json").write_text(json.dumps(dataclasses.asdict(cooled)))
    with pytest.raises(ValueError, match="step 3 of a 3-step schedule; a 5-step run"):
        train(str(tmp_path), dataclasses.replace(cooled, steps=5))
    # Shortening is refused too: a 2-step run would have cooled down at step 1 and ended before step 3.
    with pytest.raises(ValueError, match="step 3 of a 3-step schedule; a 2-step run"):
        train(str(tmp_path), dataclasses.replace(cooled, steps=2))
    assert json.loads((tmp_path / "train_config.json").read_text()) == dataclasses.asdict(cooled)


def test_warmup_sequences_too_short_for_an_induction_example_are_refused():
    with pytest.raises(ValueError, match=r"induction warm-up .* >= 82 tokens"):
        micro_cfg(seq_len_stages="0:64,10:512", induction_warmup_steps=5)
    micro_cfg(seq_len_stages="0:82,10:512", induction_warmup_steps=10)  # just long enough
    micro_cfg(seq_len_stages="0:82,10:64", induction_warmup_steps=10)  # short only after the warm-up


def test_qa_turns_fit_their_reserve_and_the_generation_budget():
    """With the shipped tokenizer, make_example's QA_TURN_TOKENS per question turn and the 32 tokens evaluation
    generates are enough."""
    from kvzip_jax.kvzip_demo import DEMO_MODEL_DIR

    tok = transformers.AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    prompt = prompts.build_prompt(tok, "llama")
    for task in tasks.TASKS:
        for index in range(40):
            sample = tasks.make_sample(7, index, task, 3)
            for question, answer in data.qa_turns(tok, prompt, sample):
                assert len(question) + len(answer) <= data.QA_TURN_TOKENS, (task, index)
                assert len(answer) <= 32, (task, index)


def test_exported_model_matches_transformers_and_loads_in_language_model(micro_runs):
    import torch

    from kvzip_jax.lm import LanguageModel
    from kvzip_jax.models import forward, load_params

    model_dir = micro_runs["model_a"]
    with open(os.path.join(model_dir, "config.json")) as f:
        hf_cfg = json.load(f)
    assert hf_cfg["num_key_value_heads"] < hf_cfg["num_attention_heads"]
    assert (hf_cfg["num_attention_heads"], hf_cfg["num_key_value_heads"], hf_cfg["hidden_size"]) == (2, 1, 32)

    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32,
                                                       attn_implementation="eager").eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == hf.config.vocab_size
    text = tasks.make_sample(0, 1, "needle", 3).context
    ids = np.asarray([tokenizer.encode(text, add_special_tokens=False)[:48]])
    with torch.no_grad():
        ref = hf(input_ids=torch.as_tensor(ids)).logits.float().numpy()

    config, params = load_params(model_dir, dtype=jnp.float32)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
    ours, _ = jax.jit(forward, static_argnames=("config",))(params, jnp.asarray(ids, jnp.int32), positions, None,
                                                            config=config)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=1e-4)
    assert np.abs(ref).max() > 1e-3  # not trivially zero

    lm = LanguageModel.from_pretrained(model_dir)
    assert lm.tokenizer is not None
    assert lm.config.num_kv_heads < lm.config.num_heads
    assert lm.tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    prompts.build_prompt(lm.tokenizer, lm.config.family)  # strict: the exported tokenizer fits the KVzip prompt


def test_weighted_loss_equals_numpy_cross_entropy():
    from kvzip_jax.config import ModelConfig
    from kvzip_jax.models import forward, init_params
    from kvzip_jax.train.trainer import weighted_loss

    config = ModelConfig(family="llama", vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=1,
                         num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=64)
    params = init_params(config, seed=3)
    positions = jnp.broadcast_to(jnp.arange(7, dtype=jnp.int32), (2, 7))

    @jax.jit
    def logits_and_loss(ids, weights):
        logits = forward(params, ids, positions, None, config=config)[0]
        return logits, weighted_loss(params, ids, weights, config=config)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 40, (2, 7)).astype(np.int32)
    weights = np.array([[0, 0, 0.1, 0.1, 1, 1, 0], [0, 1, 1, 0, 0.1, 0, 0]], np.float32)
    logits = np.asarray(logits_and_loss(ids, weights)[0], np.float64)
    # make the argmax hit the target at two weight-1 positions (causal: earlier logits do not change), so the
    # accuracy is neither 0 nor 1
    ids[0, 5] = int(logits[0, 4].argmax())
    ids[1, 2] = int(logits[1, 1].argmax())
    logits, (loss, acc) = logits_and_loss(ids, weights)
    logits = np.asarray(logits, np.float64)

    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll, w, hits = 0.0, 0.0, []
    for b in range(2):
        for t in range(1, 7):
            nll -= weights[b, t] * logp[b, t - 1, ids[b, t]]
            w += weights[b, t]
            if weights[b, t] >= 1.0:
                hits.append(logits[b, t - 1].argmax() == ids[b, t])
    np.testing.assert_allclose(float(loss), nll / w, rtol=1e-5)
    assert len(hits) == 4 and 2 <= sum(hits) < 4
    np.testing.assert_allclose(float(acc), np.mean(hits), rtol=1e-6)
    # weight at position 0 is ignored (nothing predicts the first token)
    shifted = weights.copy()
    shifted[:, 0] = 5.0
    np.testing.assert_allclose(float(logits_and_loss(ids, shifted)[1][0]), nll / w, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_no_cache_forward_equals_dense_cache_forward(family):
    from kvzip_testutil import GEMMA, LLAMA, perturbed_params

    from kvzip_jax.cache import DenseKVCache
    from kvzip_jax.models import forward

    config = {"llama": LLAMA, "gemma3": GEMMA}[family]  # gemma3: sliding window 8 < T exercises the window mask
    params = perturbed_params(config)
    b, t = 2, 21
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (b, t)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    fwd = jax.jit(forward, static_argnames=("config",))
    dense, cache = fwd(params, ids, positions, DenseKVCache.zeros(config, b, t), config=config)
    plain, none = fwd(params, ids, positions, None, config=config)
    assert none is None and cache is not None
    np.testing.assert_allclose(np.asarray(plain), np.asarray(dense), atol=2e-5, rtol=2e-5)
