"""KVzip contexts for the server: compress an uploaded text once (KVzip, query-agnostic), serve it by id through
the engine, keep it on disk with Orbax so that it survives a restart.

A context request's prompt is KVzip's question turn (`prompts.encode_question`: "\\n\\n" + question + the chat
template's postfix) appended after the compressed [system prefix | context]; its answer equals
`CompressedContext.ask` for the same question (tests/serving/test_contexts.py).
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import threading
import time
import uuid

from kvzip_jax.kvzip import compressor
from kvzip_jax.kvzip.select import check_ratio
from kvzip_jax.kvzip.text import encode_context, encode_questions, prompt_for
from kvzip_jax.store import load_compressed, read_metadata, save_compressed
from serving.engine import Engine

LEVELS = ("pair", "pair-uniform", "head")
_ID = re.compile(r"^ctx-[0-9a-f]{32}$")


@dataclasses.dataclass(frozen=True)
class ContextInfo:
    id: str
    created: int
    context_tokens: int
    ratio: float
    level: str
    kept_ratio: float
    kv_bytes: int  # the compressed pool
    dense_kv_bytes: int  # what the full cache of [system | context] would hold
    compress_seconds: float

    def as_dict(self, model: str) -> dict:
        return {"object": "context", "model": model, **dataclasses.asdict(self)}


class ContextStore:
    def __init__(self, engine: Engine, lm, directory: str | os.PathLike | None = None, *, progress: bool = False):
        if lm.tokenizer is None:
            raise ValueError("serving KVzip contexts needs the model's tokenizer (its chat template)")
        self.engine, self.lm, self.progress = engine, lm, progress
        self.directory = None if directory is None else os.fspath(directory)
        self.prompt = prompt_for(lm)
        self.infos: dict[str, ContextInfo] = {}
        self._compress_lock = threading.Lock()  # one compression at a time: it is the memory-hungry step
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            self._load_saved()

    def _fingerprint(self) -> dict:
        c = self.lm.config
        return {"model": self.engine.model_name, "layers": c.num_layers, "kv_heads": c.num_kv_heads,
                "head_dim": c.head_dim, "vocab": c.vocab_size}

    def _load_saved(self) -> None:
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if not _ID.match(name) or not os.path.isdir(path):
                continue
            meta = read_metadata(path)
            saved = meta.get("model_fingerprint") or {}
            mine = self._fingerprint()
            if {k: saved.get(k) for k in mine} != mine:
                raise ValueError(f"{path} was compressed for another model ({saved}); this server runs {mine}")
            compressed = load_compressed(path, self.lm.config)
            self._serve(name, compressed, int(saved["context_tokens"]), float(saved["compress_seconds"]),
                        int(saved["created"]))

    def _serve(self, cid: str, compressed, context_tokens: int, seconds: float, created: int) -> ContextInfo:
        self.engine.add_context(cid, compressed, context_tokens)
        r = compressed.report
        info = ContextInfo(cid, created, context_tokens, float(compressed.ratio), compressed.level,
                           float(r.kept_ratio), int(r.compressed_kv_bytes), int(r.dense_kv_bytes), seconds)
        self.infos[cid] = info
        return info

    def create(self, *, text: str | None = None, token_ids: list[int] | None = None, ratio: float = 0.3,
               level: str = "pair") -> ContextInfo:
        """Compress and serve a context (blocking: prefill, KVzip scoring and compaction)."""
        if (text is None) == (token_ids is None):
            raise ValueError("give the context as exactly one of text or token_ids")
        check_ratio(ratio)
        if level not in LEVELS:
            raise ValueError(f"level {level!r} is not one of {', '.join(LEVELS)}")
        ids = encode_context(self.lm, text) if text is not None else [int(t) for t in token_ids]
        if not ids:
            raise ValueError("the context is empty (0 tokens)")
        bad = [t for t in ids if not 0 <= t < self.lm.config.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.lm.config.vocab_size})")
        cid = f"ctx-{uuid.uuid4().hex}"
        with self._compress_lock:
            t0 = time.perf_counter()
            compressed = compressor.compress(self.lm.params, self.lm.config, self.prompt, [ids], ratio=ratio,
                                             level=level, page_size=self.engine.engine_config.page_size,
                                             progress=self.progress)
            seconds = time.perf_counter() - t0
        created = int(time.time())
        if self.directory is not None:
            save_compressed(os.path.join(self.directory, cid), compressed,
                            model_fingerprint={**self._fingerprint(), "context_tokens": len(ids),
                                               "compress_seconds": seconds, "created": created})
        return self._serve(cid, compressed, len(ids), seconds, created)

    def delete(self, cid: str) -> None:
        self.engine.remove_context(cid)  # KeyError for an unknown id
        del self.infos[cid]
        if self.directory is not None:
            shutil.rmtree(os.path.join(self.directory, cid), ignore_errors=True)

    def question_ids(self, question: str) -> list[int]:
        return encode_questions(self.lm, self.prompt, question)[0]
