"""Data: local files to padded numpy batches, for causal-LM text and MeZO prompt classification.

A batch is a dict of int32 numpy arrays of shape [B, T] (see `zo2_jax.models.seam`):

    input_ids       token ids, padded with `Padding.pad_id`
    attention_mask  1 for real tokens, 0 for padding
    loss_mask       1 where token t is a target, predicted from position t-1

Classification batches add `labels` [B], `candidate_ids` [C] (the one token of each class's label
word) and `score_pos` [B] (the last prompt token, whose next-token logits score the classes).

Pipeline: `load_texts` / `load_examples` read files; `pack` or `ClassificationTask.encode` turn them
into `Encoded` sequences; a `Loader` (training: endless, shuffled, resumable) or `batches` (one
ordered pass, for evaluation) pads them into batches. The padded length T of a batch depends only on
the sequences in it, rounded up to `Padding.multiple`, so few shapes reach `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import pathlib
import string
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import numpy as np

Batch = dict[str, np.ndarray]
Side = Literal["left", "right"]
PathLike = str | pathlib.Path


@dataclasses.dataclass(frozen=True)
class Example:
    """One classification example: a text and its class index."""

    text: str
    label: int


@dataclasses.dataclass(frozen=True, eq=False)
class Encoded:
    """One tokenized sequence before padding.

    Attributes:
      ids: int32 token ids.
      num_targets: the last `num_targets` tokens are loss targets (the first token never is one).
      label: class index, or -1 for plain text.
      truncated: prompt tokens dropped to fit `max_len` (0 when none).
    """

    ids: np.ndarray
    num_targets: int
    label: int = -1
    truncated: int = 0

    def __post_init__(self):
        object.__setattr__(self, "ids", np.asarray(self.ids, dtype=np.int32).reshape(-1))
        if not 0 <= self.num_targets < len(self.ids):
            raise ValueError(f"need 0 <= num_targets < len(ids), got {self.num_targets} targets "
                             f"for {len(self.ids)} tokens")

    @property
    def score_pos(self) -> int:
        """Index of the last prompt token (the one before the targets)."""
        return len(self.ids) - 1 - self.num_targets


@dataclasses.dataclass(frozen=True)
class Padding:
    """How sequences are padded into a batch.

    Attributes:
      side: "left" (default; the last prompt token of every row sits at T-1) or "right".
      multiple: T is the longest sequence of the batch rounded up to this multiple.
      pad_id: the id written at padded positions (masked out; None writes 0).
      length: if set, every batch has exactly this T (packed LM windows).
    """

    side: Side = "left"
    multiple: int = 8
    pad_id: int | None = None
    length: int | None = None

    def __post_init__(self):
        if self.side not in ("left", "right"):
            raise ValueError(f"Padding.side must be 'left' or 'right', got {self.side!r}")
        if self.multiple < 1:
            raise ValueError(f"Padding.multiple must be >= 1, got {self.multiple}")
        if self.length is not None and self.length < 1:
            raise ValueError(f"Padding.length must be >= 1, got {self.length}")


def _open(path: PathLike) -> pathlib.Path:
    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def _records(path: pathlib.Path) -> Iterator[tuple[str, Any]]:
    """Yields ("file:line N" or "dir row N", record) from a JSONL file or a saved `datasets` dir."""
    if path.is_dir():
        try:
            import datasets  # optional; load_from_disk never touches the hub
        except ImportError:
            raise ValueError(f"{path} is a directory; reading a saved `datasets` folder needs "
                             "the `datasets` package") from None
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            raise ValueError(f"{path} holds splits {sorted(ds)}; pass the folder of one split")
        for n, row in enumerate(ds, 1):
            yield f"{path} row {n}", row
        return
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"{path}: expected a .jsonl file (one JSON object per line)")
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno}); "
                                 "expected one JSON object per line") from None


def _field(where: str, record: Any, name: str, kind: type) -> Any:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise ValueError(f"{where}: missing field {name!r} (has {sorted(record)})")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{where}: field {name!r} must be {kind.__name__}, got {value!r}")
    return value


def load_texts(path: PathLike, field: str = "text") -> list[str]:
    """Reads documents: .txt (separated by blank lines), .jsonl (`field` of each line), or a
    saved `datasets` folder. Raises FileNotFoundError or ValueError (naming file and line)."""
    path = _open(path)
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        docs, lines = [], []
        for line in text.splitlines() + [""]:
            if line.strip():
                lines.append(line)
            elif lines:
                docs.append("\n".join(lines))
                lines = []
    else:
        docs = [_field(w, r, field, str) for w, r in _records(path)]
    if not docs:
        raise ValueError(f"{path}: no documents found (empty file)")
    return docs


def load_examples(path: PathLike, num_classes: int | None = None, text_field: str = "text",
                  label_field: str = "label") -> list[Example]:
    """Reads examples {"text": str, "label": int} from JSONL or a saved `datasets` folder.

    Labels must lie in [0, num_classes) when `num_classes` is given, else be >= 0. Raises
    FileNotFoundError for a missing file; ValueError, naming the file and line, for bad JSON, a
    missing or mistyped field, a label out of range, or an empty file.
    """
    path = _open(path)
    examples = []
    for where, record in _records(path):
        text = _field(where, record, text_field, str)
        label = _field(where, record, label_field, int)
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{where}: label {label} out of range; expected an integer {bound}")
        examples.append(Example(text, label))
    if not examples:
        raise ValueError(f"{path}: no examples found (empty file)")
    return examples


def shipped_path(name: str) -> pathlib.Path:
    """Path of a data file shipped in `zo2_jax/data`, e.g. "sentiment_train.jsonl"."""
    root = importlib.resources.files("zo2_jax") / "data"
    if not (root / name).is_file():
        names = sorted(p.name for p in root.iterdir() if p.name.endswith(".jsonl"))
        raise FileNotFoundError(f"no shipped data file {name!r}; available: {names}")
    return pathlib.Path(str(root / name))


def kshot(examples: Sequence[Example], k: int, seed: int,
          num_classes: int | None = None) -> list[Example]:
    """Picks k examples of each class, deterministically from `seed` (MeZO's k-shot sampling).

    Each class draws from its own generator (seed, class), so one class's pick does not depend on
    the others; examples keep their order. Raises ValueError if a class (0..num_classes-1, default
    0..max label) has fewer than k examples.
    """
    labels = np.array([e.label for e in examples], dtype=np.int64)
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    chosen = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        if len(idx) < k:
            raise ValueError(f"kshot: class {c} has {len(idx)} examples, fewer than k={k}")
        chosen.append(np.random.default_rng((seed, c)).choice(idx, size=k, replace=False))
    return [examples[i] for i in np.sort(np.concatenate(chosen))]


def encode_texts(tokenizer: Any, texts: Sequence[str], special: bool = True) -> list[list[int]]:
    """Token ids of each text, from any tokenizer.

    Accepts a Hugging Face tokenizer (`tokenizer(texts)["input_ids"]`), a `tokenizers.Tokenizer`
    (`encode_batch`), an object with `encode(text)`, or a callable text -> ids / {"input_ids": ids}.
    `special` asks for the tokenizer's special tokens (e.g. BOS) where it can be controlled.
    """
    texts = list(texts)
    if hasattr(tokenizer, "convert_ids_to_tokens") and callable(tokenizer):  # Hugging Face
        return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=special)]
    fn = tokenizer if callable(tokenizer) else tokenizer.encode
    out = [fn(t) for t in texts]
    return [list(getattr(o, "ids", o["input_ids"] if isinstance(o, Mapping) else o)) for o in out]


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's pad id, else its eos id, else 0 (padding is masked, so any id works)."""
    for attr in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, attr, None) is not None:
            return int(getattr(tokenizer, attr))
    return 0


def pack(docs: Sequence[str], tokenizer: Any, seq_len: int,
         eos_id: int | None = None) -> list[Encoded]:
    """Tokenizes documents, appends eos to each, and packs the stream into windows of seq_len.

    Consecutive windows overlap by one token, so every token but the very first is a target
    exactly once; nothing is dropped: the tail becomes a shorter window, padded at batching.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    eos_id = getattr(tokenizer, "eos_token_id", None) if eos_id is None else eos_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token_id; pass eos_id")
    if not docs:
        raise ValueError("pack: no documents")
    stream = np.concatenate([np.asarray(ids + [eos_id], dtype=np.int32)
                             for ids in encode_texts(tokenizer, docs)])
    starts = range(0, max(len(stream) - 1, 1), seq_len - 1)
    return [Encoded(w, num_targets=len(w) - 1)
            for w in (stream[s:s + seq_len] for s in starts)]


def collate(items: Sequence[Encoded], padding: Padding = Padding(),
            candidate_ids: np.ndarray | None = None) -> Batch:
    """Pads sequences into one batch; with `candidate_ids`, adds labels, candidate_ids, score_pos.

    T is `padding.length` if set, else the longest sequence rounded up to `padding.multiple`.
    """
    lengths = [len(e.ids) for e in items]
    t = padding.length or -(-max(lengths) // padding.multiple) * padding.multiple
    if max(lengths) > t:
        raise ValueError(f"a sequence of {max(lengths)} tokens exceeds Padding.length={t}")
    b = len(items)
    input_ids = np.full((b, t), padding.pad_id or 0, dtype=np.int32)
    attention_mask = np.zeros((b, t), dtype=np.int32)
    loss_mask = np.zeros((b, t), dtype=np.int32)
    score_pos = np.zeros((b,), dtype=np.int32)
    for i, (e, n) in enumerate(zip(items, lengths)):
        start = t - n if padding.side == "left" else 0
        input_ids[i, start:start + n] = e.ids
        attention_mask[i, start:start + n] = 1
        loss_mask[i, start + n - e.num_targets:start + n] = 1
        score_pos[i] = start + e.score_pos
    batch = dict(input_ids=input_ids, attention_mask=attention_mask, loss_mask=loss_mask)
    if candidate_ids is not None:
        batch.update(labels=np.array([e.label for e in items], dtype=np.int32),
                     candidate_ids=np.asarray(candidate_ids, dtype=np.int32), score_pos=score_pos)
    return batch


def batches(items: Sequence[Encoded], batch_size: int, padding: Padding = Padding(),
            candidate_ids: np.ndarray | None = None, sort_by_length: bool = True) -> list[Batch]:
    """One ordered pass for evaluation; the last batch may be smaller. Sorting by length (stable)
    cuts padding and changes no per-example result."""
    order = np.argsort([len(e.ids) for e in items], kind="stable") if sort_by_length else \
        np.arange(len(items))
    return [collate([items[i] for i in order[s:s + batch_size]], padding, candidate_ids)
            for s in range(0, len(items), batch_size)]


class Loader:
    """An endless, resumable iterator of training batches.

    Epoch e visits the items in a permutation drawn from (seed, e). With `bucket_window` > 1, each
    run of that many permuted items is sorted by length and the epoch's batches are then shuffled,
    so batches hold similar lengths. `state()` after n batches, passed to `restore` on a fresh
    Loader over the same items, continues with exactly the batches the first one would give.

    Example:
      loader = Loader(items, batch_size=16, seed=0)
      batch = next(loader); saved = loader.state()   # checkpoint it with the model
      Loader(items, batch_size=16, seed=0).restore(saved)   # continues identically
    """

    def __init__(self, items: Sequence[Encoded], batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, padding: Padding = Padding(), bucket_window: int = 0,
                 drop_last: bool = True, candidate_ids: np.ndarray | None = None):
        if batch_size < 1 or seed < 0 or bucket_window < 0:
            raise ValueError(f"need batch_size >= 1, seed >= 0, bucket_window >= 0; got "
                             f"{batch_size}, {seed}, {bucket_window}")
        if len(items) < (batch_size if drop_last else 1):
            raise ValueError(f"{len(items)} items cannot fill a batch of {batch_size}")
        self.items, self.batch_size, self.seed = list(items), batch_size, seed
        self.shuffle, self.padding, self.bucket_window = shuffle, padding, bucket_window
        self.drop_last, self.candidate_ids = drop_last, candidate_ids
        self._lengths = np.array([len(e.ids) for e in self.items])
        self._epoch, self._index, self._plan = 0, 0, self._make_plan(0)

    @property
    def num_truncated(self) -> int:
        """How many items lost prompt tokens to `max_len`."""
        return sum(e.truncated > 0 for e in self.items)

    @property
    def batches_per_epoch(self) -> int:
        return len(self._plan)

    def _make_plan(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng((self.seed, epoch))
        n, bs = len(self.items), self.batch_size
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.bucket_window > 1:
            order = np.concatenate([
                chunk[np.argsort(self._lengths[chunk], kind="stable")]
                for chunk in np.split(order, np.arange(self.bucket_window, n, self.bucket_window))])
        plan = [order[s:s + bs] for s in range(0, n, bs)]
        if self.drop_last and len(plan[-1]) < bs:
            plan.pop()
        if self.bucket_window > 1 and self.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        return plan

    def state(self) -> dict[str, int]:
        """The position: the epoch and the number of its batches already yielded."""
        return dict(epoch=self._epoch, index=self._index)

    def restore(self, state: Mapping[str, int]) -> Loader:
        """Moves to a position from `state()`; returns self."""
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index <= self.batches_per_epoch:
            raise ValueError(f"bad loader state {dict(state)} ({self.batches_per_epoch} per epoch)")
        self._epoch, self._index, self._plan = epoch, index, self._make_plan(epoch)
        return self

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> Batch:
        if self._index >= len(self._plan):
            self._epoch, self._index = self._epoch + 1, 0
            self._plan = self._make_plan(self._epoch)
        idx = self._plan[self._index]
        self._index += 1
        return collate([self.items[i] for i in idx], self.padding, self.candidate_ids)


def lm_loader(docs: Sequence[str], tokenizer: Any, seq_len: int, batch_size: int, *,
              seed: int = 0, shuffle: bool = True, padding: Padding | None = None,
              drop_last: bool = True) -> Loader:
    """A `Loader` of packed causal-LM windows; every batch has T = seq_len."""
    padding = padding or Padding(pad_id=pad_id_of(tokenizer))
    return Loader(pack(docs, tokenizer, seq_len), batch_size, seed=seed, shuffle=shuffle,
                  padding=dataclasses.replace(padding, length=seq_len), drop_last=drop_last)


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
    """A prompt template and one label word per class, scored by the next-token logits.

    Training sequences are prompt + the true class's label word, with the loss on that one token;
    evaluation sequences are the prompt alone, and `accuracy` compares the label words' logits at
    the last prompt token.

    Attributes:
      template: the prompt, with one "{text}" field.
      label_words: class i's word, which must be a single token (mind the leading space).
    """

    template: str = "{text} It was"
    label_words: tuple[str, ...] = (" terrible", " great")

    def __post_init__(self):
        object.__setattr__(self, "label_words", tuple(self.label_words))
        fields = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        if fields != ["text"]:
            raise ValueError(f"template must have exactly one {{text}} field, got {fields}")
        if len(self.label_words) < 2 or len(set(self.label_words)) != len(self.label_words):
            raise ValueError(f"need at least two distinct label words, got {self.label_words}")

    @property
    def num_classes(self) -> int:
        return len(self.label_words)

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)

    def candidate_ids(self, tokenizer: Any) -> np.ndarray:
        """The token id of each label word [C]. Raises ValueError if a word is not one token."""
        ids = encode_texts(tokenizer, self.label_words, special=False)
        for word, toks in zip(self.label_words, ids):
            if len(toks) != 1:
                shown = getattr(tokenizer, "convert_ids_to_tokens", lambda t: t)(toks)
                raise ValueError(f"label word {word!r} is {len(toks)} tokens {shown} (ids {toks}) "
                                 "for this tokenizer; each label word must be exactly one token")
        return np.array([t[0] for t in ids], dtype=np.int32)

    def encode(self, examples: Sequence[Example], tokenizer: Any, train: bool,
               max_len: int | None = None) -> list[Encoded]:
        """Tokenizes examples; `train` appends the true label word as the only target.

        With `max_len`, a longer prompt loses tokens from the left of its text (leading special
        tokens such as BOS are kept); each item records how many, and one warning gives the count.
        """
        cand = self.candidate_ids(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", ()))
        prompts = encode_texts(tokenizer, [self.prompt(e.text) for e in examples])
        items = []
        for e, ids in zip(examples, prompts):
            if not 0 <= e.label < self.num_classes:
                raise ValueError(f"label {e.label} of {e.text!r} out of range for "
                                 f"{self.num_classes} classes")
            drop = 0 if max_len is None else max(len(ids) + train - max_len, 0)
            if drop:
                keep = next((i for i, t in enumerate(ids) if t not in special), len(ids))
                if keep + drop >= len(ids):
                    raise ValueError(f"max_len={max_len} leaves nothing of the prompt {e.text!r}")
                ids = ids[:keep] + ids[keep + drop:]
            ids = ids + [int(cand[e.label])] if train else ids
            items.append(Encoded(ids, num_targets=int(train), label=e.label, truncated=drop))
        count = sum(i.truncated > 0 for i in items)
        if count:
            warnings.warn(f"truncated {count} of {len(items)} prompts to max_len={max_len} "
                          "(tokens dropped from the left of the text)", stacklevel=2)
        return items

    def loader(self, examples: Sequence[Example], tokenizer: Any, batch_size: int, *,
               seed: int = 0, shuffle: bool = True, max_len: int | None = None,
               padding: Padding | None = None, bucket_window: int = 0) -> Loader:
        """An endless training `Loader` (prompt + label word batches, with labels for accuracy)."""
        return Loader(self.encode(examples, tokenizer, True, max_len), batch_size, seed=seed,
                      shuffle=shuffle, padding=padding or Padding(pad_id=pad_id_of(tokenizer)),
                      bucket_window=bucket_window, candidate_ids=self.candidate_ids(tokenizer))

    def eval_batches(self, examples: Sequence[Example], tokenizer: Any, batch_size: int, *,
                     max_len: int | None = None, padding: Padding | None = None) -> list[Batch]:
        """Prompt-only batches, one pass sorted by length, for `accuracy`."""
        return batches(self.encode(examples, tokenizer, False, max_len), batch_size,
                       padding or Padding(pad_id=pad_id_of(tokenizer)),
                       self.candidate_ids(tokenizer))


def predictions(logits_BxTxV: Any, batch: Mapping[str, Any]) -> np.ndarray:
    """The predicted class of each row [B]: argmax over the label words' logits at score_pos.

    Gathers before copying, so a jax array stays on its device until it is [B, C].
    """
    score_pos = np.asarray(batch["score_pos"])
    scores_BxC = logits_BxTxV[np.arange(len(score_pos)), score_pos][:, np.asarray(
        batch["candidate_ids"])]
    return np.asarray(scores_BxC).argmax(-1)


def accuracy(logits_BxTxV: Any, batch: Mapping[str, Any]) -> tuple[int, int]:
    """(number correct, number of rows) for a classification batch; logits numpy or jax."""
    correct = predictions(logits_BxTxV, batch) == np.asarray(batch["labels"])
    return int(correct.sum()), int(correct.size)


def default_task() -> ClassificationTask:
    """The task for the shipped sentiment data (label 0 negative, 1 positive); both label words are
    single tokens for SmolLM2's tokenizer."""
    return ClassificationTask(template="{text} It was", label_words=(" terrible", " great"))
