"""Hostile model files end in our own error, never a crash, hang, runaway allocation or a silently
different model; nothing in the package unpickles. The mutants and the guarded worker are in
fuzz_models.py; ZO2_FUZZ_N sets the size of the slow run (python3 tests/fuzz_models.py N runs
it from the shell)."""

import ast
import collections
import os
import pathlib
import struct

import pytest

import fuzz_models as fm
import zo2_jax.models as zm
from zo2_jax.models.gguf import GGUFError, read_gguf

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "zo2_jax"


def _check(result, n):
    assert len(result["cases"]) == n
    bad = fm.findings(result)
    assert not bad, "\n".join(f"{c['case']} {c['format']} {c['label']}: {c['outcome']} "
                              f"{c['detail']}" for c in bad[:20])
    outcomes = collections.Counter(c["outcome"] for c in result["cases"])
    formats = collections.Counter(c["format"] for c in result["cases"])
    # the mutants reach every reader, and most of them must be refused: a fuzzer whose
    # mutants all load (or all fail the same way) tests nothing
    assert outcomes["rejected"] > n // 2, outcomes
    assert {"gguf", "safetensors", "config"} <= set(formats), formats


def test_fixed_seed_subset(tmp_path):
    """120 mutants of the tiny seeds and one of the shipped SmolLM2 header, fixed seed."""
    _check(fm.fuzz(121, seed=0, n_shipped=1, workdir=str(tmp_path)), 121)


@pytest.mark.slow
def test_full_run(tmp_path):
    n = int(os.environ.get("ZO2_FUZZ_N", "1500"))
    _check(fm.fuzz(n, seed=1, n_shipped=max(3, n // 100), workdir=str(tmp_path)), n)


# ---- the validations the fuzzer found necessary, one by one --------------------------------

@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("seeds")
    return {"gguf": fm.tiny_gguf(folder / "llama.gguf"),
            "st": fm.tiny_folder(folder / "st", "llama")}


def _patched_gguf(tmp_path, seeds, role, value, index=0):
    data = bytearray(open(seeds["gguf"], "rb").read())
    fields, _ = fm.gguf_fields(bytes(data))
    off, fmt, _ = [f for f in fields if f[2] == role][index]
    struct.pack_into(fmt, data, off, value)
    path = tmp_path / "bad.gguf"
    path.write_bytes(bytes(data))
    return str(path)


@pytest.mark.parametrize("role,value,match", [
    ("alen", 2 ** 62, r"the length of array .* more than the .* remaining bytes"),
    ("kv_count", 2 ** 40, r"the metadata key count is 1,099,511,627,776, more than"),
    ("item.len", 2 ** 63, r"an item of 'tokenizer.ggml.tokens' needs"),
    ("dim", 2 ** 32, r"has dimensions \[4294967296, .*expected each in 1..16,777,216"),
    ("ndims", 7, r"has 7 dimensions, expected 1 to 4"),
    ("ttype", 99, r"has type 99, which is not a GGML type"),
    ("toffset", 32, r"has data offset 32, expected 0"),
    ("itype", 9, r"item type 9"),
])
def test_gguf_header_fields_checked_before_use(tmp_path, seeds, role, value, match):
    """gguf-py trusts these fields: a huge array length looped past the end of the file for
    ever, a huge dimension wrapped around in np.prod."""
    with pytest.raises(GGUFError, match=r"bad\.gguf: .*" + match):
        read_gguf(_patched_gguf(tmp_path, seeds, role, value))


@pytest.mark.parametrize("key,value,match", [
    ("head_count", 0, r"head_count' is 0, expected an int in 1..16,777,216"),
    ("layer_norm_rms_epsilon", float("nan"), r"is nan, expected a finite positive number"),
    ("freq_base", -1.0, r"freq_base' is -1.0"),
])
def test_gguf_metadata_values_checked(tmp_path, seeds, key, value, match):
    data = bytearray(open(seeds["gguf"], "rb").read())
    fields, _ = fm.gguf_fields(bytes(data))
    # the value follows its key: find the key's bytes, then the value is the next number field
    at = bytes(data).index(key.encode())
    off, fmt, _ = next(f for f in fields if f[0] > at and f[2] == "value")
    struct.pack_into(fmt, data, off, value)
    (tmp_path / "bad.gguf").write_bytes(bytes(data))
    with pytest.raises(GGUFError, match=match):
        read_gguf(str(tmp_path / "bad.gguf"))


def _edit_config(folder, **changes):
    import json

    path = os.path.join(folder, "config.json")
    cfg = json.load(open(path))
    cfg.update(changes)
    json.dump(cfg, open(path, "w"))


@pytest.mark.parametrize("changes,match", [
    ({"hidden_size": 10 ** 12}, r"'hidden_size' is 1000000000000, expected an int in "
                                r"1..16,777,216"),
    ({"num_attention_heads": 0}, r"'num_attention_heads' is 0"),
    ({"rms_norm_eps": float("nan")}, r"'rms_norm_eps' is nan, expected a finite positive"),
    ({"tie_word_embeddings": "false"}, r"'tie_word_embeddings' is 'false', expected true or false"),
    ({"hidden_size": 32.0}, r"'hidden_size' is 32.0"),
    ({"vocab_size": None}, r"config has no 'vocab_size'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
     r"config has no 'low_freq_factor'"),
    ({"num_key_value_heads": 3}, r"num_heads 4 must be a multiple of num_kv_heads 3"),
])
def test_config_values_checked(tmp_path, seeds, changes, match):
    import shutil

    folder = shutil.copytree(seeds["st"], tmp_path / "m")
    _edit_config(folder, **changes)
    with pytest.raises(zm.CheckpointError, match=match):
        zm.load(str(folder))


def test_safetensors_header_length_checked_before_reading(tmp_path, seeds):
    """A header length of 2**63 made the reader ask Python for that many bytes."""
    import shutil

    folder = shutil.copytree(seeds["st"], tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2 ** 63) + data[8:])
    with pytest.raises(zm.CheckpointError, match=r"header length 9,223,372,036,854,775,808 "
                                                 r"exceeds the file's"):
        zm.load(str(folder))


def _edit_st(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    n, header, tail = fm._st_parts(open(path, "rb").read())
    header, tail = edit(header, tail)
    open(path, "wb").write(fm._st_pack(header, tail))


def _take_range(h, t):
    """A tensor takes the byte range of another of the same size (a q and an o projection)."""
    names = [k for k in h if k != "__metadata__"]
    size = {k: h[k]["data_offsets"][1] - h[k]["data_offsets"][0] for k in names}
    a, b = next((a, b) for a in names for b in names if a != b and size[a] == size[b])
    h[a]["data_offsets"] = list(h[b]["data_offsets"])
    return h, t


def _retype(h, t):
    name = next(k for k in h if k != "__metadata__" and h[k]["dtype"] == "F32")
    h[name]["dtype"] = "I32"
    return h, t


@pytest.mark.parametrize("edit,match", [
    (_take_range, r"tensors overlap or leave a gap"),
    (lambda h, t: (h, t + bytes(8)), r"its tensors end at byte \d+ of a \d+-byte file"),
    (_retype, r"has dtype I32, expected one of \['F64', 'F32', 'F16', 'BF16'\]"),
    (lambda h, t: ([h], t), r"its header is a list, not a JSON object"),
    (lambda h, t: (dict(h, __metadata__=["pt"]), t), r"__metadata__ is not a JSON object"),
])
def test_safetensors_header_must_describe_its_bytes(tmp_path, seeds, edit, match):
    """Two tensors on the same bytes, or integers read as weights, loaded a different model."""
    import shutil

    folder = shutil.copytree(seeds["st"], tmp_path / "m")
    _edit_st(folder, edit)
    with pytest.raises(zm.CheckpointError, match=r"model\.safetensors: .*" + match):
        zm.load(str(folder))


def test_json_nested_too_deep_is_our_error(tmp_path, seeds):
    import shutil

    folder = shutil.copytree(seeds["st"], tmp_path / "m")
    (folder / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 100000
                                        + "]" * 100000 + "}")
    with pytest.raises(zm.CheckpointError, match=r"config\.json: not valid JSON \(RecursionError"):
        zm.load(str(folder))


@pytest.mark.parametrize("target", ["/etc/passwd", "../m/model.safetensors", 3])
def test_shard_index_names_files_in_the_folder_only(tmp_path, seeds, target):
    import json
    import shutil

    folder = shutil.copytree(seeds["st"], tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": target}}))
    with pytest.raises(zm.CheckpointError, match=r"weight_map should map tensor names to file "
                                                 r"names in this folder"):
        zm.load(str(folder))


# ---- nothing unpickles ----------------------------------------------------------------------

def test_nothing_in_the_package_unpickles():
    """No pickle, torch.load, np.load(allow_pickle=True), joblib or dill anywhere in zo2_jax."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(PACKAGE.parent)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle",
                                           "shelve", "marshal") for n in names):
                    found.append(f"{where} imports {names}")
            if isinstance(node, ast.Call):
                f = node.func
                name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                owner = getattr(f.value, "id", "") if isinstance(f, ast.Attribute) else ""
                kw = {k.arg: k.value for k in node.keywords}
                if owner == "torch" and name == "load":
                    found.append(f"{where} calls torch.load")
                if name == "load" and owner in ("np", "numpy") and not (
                        isinstance(kw.get("allow_pickle"), ast.Constant)
                        and kw["allow_pickle"].value is False):
                    found.append(f"{where} calls np.load without allow_pickle=False")
                if name in ("loads", "load", "Unpickler") and owner in ("pickle", "dill"):
                    found.append(f"{where} unpickles")
    assert not found, found
