"""Hostile model files: mutated GGUF, safetensors and config.json, each loaded in a guarded worker.

Seeds are tiny valid checkpoints (a llama GGUF in Q4_1 with a byte-level BPE tokenizer, a qwen2
GGUF in F16 with biases, llama / GPT-2 / sharded OPT safetensors folders) and the shipped SmolLM2
GGUF, whose header is mutated and written in front of a sparse copy of its size (never its 98 MB
of data). Each mutant is loaded by a worker process (jax on CPU) with an address-space limit,
under a per-file timeout; the worker reports one outcome per file:

  rejected  one of our errors (CheckpointError, GGUFError, UnsupportedModelError) naming the file
  same      loaded, every parameter equal to the seed's (a harmless edit: whitespace, metadata)
  loaded    a shipped-GGUF mutant that opened (its tensors are a sparse stand-in, not compared)
  changed   loaded with other values: fine when only tensor bytes were edited ("data" mutants);
            a header edit that loads a different model is a finding
  unclear   our error type, but the message does not name the file
  error     any other exception; crash (the worker died), hang (timeout), memory (MemoryError or
            the worker's peak RSS grew by more than MEMORY_GROWTH)

Run: python3 tests/fuzz_models.py N [SEED [N_SHIPPED]]; it prints the counts per format and
outcome, and the findings.
"""

from __future__ import annotations

import collections
import copy
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import numpy as np

TIMEOUT_S = 20.0
MEMORY_GROWTH = 1 << 30  # peak RSS a single file may add to the worker's
AS_LIMIT_EXTRA = 6 << 30  # address space the worker may grow by before allocations fail

# ---------------------------------------------------------------------------------------------
# Seeds


def _bytes_to_unicode():
    """GPT-2's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_gguf(path, arch="llama", qtype="Q4_1", seed=0):
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = ["Ġ t", "h e", "Ġt he", "i s", "Ġ is", "a t", "c at", "Ġ cat"]
    tokens = specials + _bytes_to_unicode() + [m.replace(" ", "") for m in merges]
    vocab, d, f, layers, heads, kv = len(tokens), 64, 128, 2, 4, 2
    hd = d // heads
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    meta = {f"{arch}.block_count": layers, f"{arch}.context_length": 256,
            f"{arch}.embedding_length": d, f"{arch}.feed_forward_length": f,
            f"{arch}.attention.head_count": heads, f"{arch}.attention.head_count_kv": kv}
    for k, v in meta.items():
        w.add_key_value(k, v, gguf.GGUFValueType.UINT32)
    w.add_key_value(f"{arch}.rope.freq_base", 10000.0, gguf.GGUFValueType.FLOAT32)
    w.add_key_value(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, gguf.GGUFValueType.FLOAT32)
    if arch == "llama":
        w.add_key_value(f"{arch}.rope.dimension_count", hd, gguf.GGUFValueType.UINT32)
    for k, v in {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm"}.items():
        w.add_key_value(k, v, gguf.GGUFValueType.STRING)
    w.add_array("tokenizer.ggml.tokens", tokens)
    w.add_array("tokenizer.ggml.token_type", [3] * 3 + [1] * (vocab - 3))
    w.add_array("tokenizer.ggml.merges", merges)
    for k, v in {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2}.items():
        w.add_key_value(k, v, gguf.GGUFValueType.UINT32)
    w.add_key_value("tokenizer.ggml.add_bos_token", False, gguf.GGUFValueType.BOOL)
    qt = gguf.GGMLQuantizationType[qtype]

    def add(name, shape):
        x = rng.standard_normal(shape).astype(np.float32) * 0.5
        if len(shape) == 2 and qtype not in ("F32", "F16"):
            w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, x.astype(np.float16) if qtype == "F16" and len(shape) == 2 else x)

    add("token_embd.weight", (vocab, d))
    add("output_norm.weight", (d,))
    for i in range(layers):
        b = f"blk.{i}."
        for name, shape in (("attn_norm.weight", (d,)), ("ffn_norm.weight", (d,)),
                            ("attn_q.weight", (d, d)), ("attn_k.weight", (kv * hd, d)),
                            ("attn_v.weight", (kv * hd, d)), ("attn_output.weight", (d, d)),
                            ("ffn_gate.weight", (f, d)), ("ffn_up.weight", (f, d)),
                            ("ffn_down.weight", (d, f))):
            add(b + name, shape)
        if arch == "qwen2":
            add(b + "attn_q.bias", (d,))
            add(b + "attn_k.bias", (kv * hd,))
            add(b + "attn_v.bias", (kv * hd,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def tiny_folder(path, model_type="llama", shard_bytes=None):
    import jax

    import zo2_jax.models as zm

    if model_type == "llama":
        cfg = zm.DecoderConfig(model_type="llama", vocab_size=40, hidden_size=32, num_layers=2,
                               num_heads=4, num_kv_heads=2, intermediate_size=64,
                               max_positions=128, norm="rmsnorm", norm_bias=False,
                               positions="rope", activation="silu", gated_mlp=True,
                               qkv_bias=False, out_bias=False, mlp_bias=False,
                               tie_embeddings=True)
    elif model_type == "gpt2":
        cfg = zm.preset("gpt2", num_layers=2, hidden_size=32, num_heads=2, intermediate_size=64,
                        vocab_size=40, max_positions=64)
    else:
        cfg = zm.preset("opt_125m", num_layers=2, hidden_size=32, num_heads=2,
                        intermediate_size=64, vocab_size=40, max_positions=64)
    model = zm.Model(cfg)
    params = model.init(jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
        zm.save_pretrained(model, params, str(path), **kw)
    return str(path)


def make_seeds(folder) -> dict[str, str]:
    """Seed checkpoints by name: *.gguf files and safetensors folders."""
    os.makedirs(folder, exist_ok=True)
    return {"gguf-llama": tiny_gguf(os.path.join(folder, "llama.gguf")),
            "gguf-qwen2": tiny_gguf(os.path.join(folder, "qwen2.gguf"), "qwen2", "F16"),
            "st-llama": tiny_folder(os.path.join(folder, "st-llama"), "llama"),
            "st-gpt2": tiny_folder(os.path.join(folder, "st-gpt2"), "gpt2"),
            "st-opt-sharded": tiny_folder(os.path.join(folder, "st-opt"), "opt", 20_000)}


# ---------------------------------------------------------------------------------------------
# GGUF structure (of valid seeds only), for targeted mutations

_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q",
        11: "<q", 12: "<d"}


def gguf_fields(data: bytes):
    """[(offset, struct format, role)] of every number in a valid GGUF header, and the header's
    end (the start of the tensor data)."""
    out, pos = [], 8

    def num(fmt, role):
        nonlocal pos
        out.append((pos, fmt, role))
        v = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string(role):
        nonlocal pos
        n = num("<Q", role + ".len")
        pos += n

    n_tensors = num("<Q", "tensor_count")
    n_kv = num("<Q", "kv_count")
    for _ in range(n_kv):
        string("key")
        t = num("<I", "vtype")
        if t == 8:
            string("value")
        elif t == 9:
            it = num("<I", "itype")
            n = num("<Q", "alen")
            if it == 8:
                for _ in range(n):
                    string("item")
            else:
                for _ in range(n):
                    num(_FMT[it], "item")
        else:
            num(_FMT[t], "value")
    for _ in range(n_tensors):
        string("tname")
        nd = num("<I", "ndims")
        for _ in range(nd):
            num("<Q", "dim")
        num("<I", "ttype")
        num("<Q", "toffset")
    return out, -(-pos // 32) * 32


# ---------------------------------------------------------------------------------------------
# Mutations: each returns (label, {relative path: bytes or None (delete)}, touches_data_only)

_INTS = [0, 1, 2, 3, 7, 255, 2 ** 15, 2 ** 16 - 1, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1, 2 ** 32,
         2 ** 53 + 1, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
_FLOATS = [float("nan"), float("inf"), float("-inf"), 0.0, -1.0, 1e-45, 1e30, -0.0]


def _absurd(rng, fmt, old):
    if fmt in ("<f", "<d"):
        return rng.choice(_FLOATS + [old * rng.choice([-1, 10, 1e6, 1e-6])])
    bits = struct.calcsize(fmt) * 8
    signed = fmt[1].islower()
    v = rng.choice(_INTS + [old + 1, old - 1, old * 2, old // 2, old + 2 ** 20,
                            rng.getrandbits(bits)])
    lo, hi = (-(1 << bits - 1), (1 << bits - 1) - 1) if signed else (0, (1 << bits) - 1)
    if signed and v > hi:
        v -= 1 << bits
    return max(lo, min(hi, v))


def _flip(rng, data: bytearray, lo, hi, n):
    for _ in range(n):
        i = rng.randrange(lo, max(lo + 1, hi))
        if i < len(data):
            data[i] ^= 1 << rng.randrange(8)


def mutate_gguf(rng, data: bytes, fields, header_end):
    """A mutated copy of a GGUF (its bytes) and a label."""
    buf = bytearray(data)
    kind = rng.choices(["field", "field", "field", "flip_header", "flip_data", "truncate",
                        "truncate_header", "splice", "garbage"], k=1)[0]
    if kind == "field":
        n = rng.choice([1, 1, 1, 2, 3])
        roles = []
        for _ in range(n):
            off, fmt, role = rng.choice(fields)
            struct.pack_into(fmt, buf, off, _absurd(rng, fmt, struct.unpack_from(fmt, buf, off)[0]))
            roles.append(role)
        return bytes(buf), f"field:{'+'.join(roles)}", False
    if kind == "flip_header":
        _flip(rng, buf, 4, header_end, rng.choice([1, 2, 4, 8, 32]))
        return bytes(buf), "flip_header", False
    if kind == "flip_data":
        _flip(rng, buf, header_end, len(buf), rng.choice([1, 4, 64]))
        return bytes(buf), "flip_data", True
    if kind == "truncate":
        return bytes(buf[:rng.randrange(len(buf))]), "truncate", False
    if kind == "truncate_header":
        return bytes(buf[:rng.randrange(header_end)]), "truncate_header", False
    if kind == "splice":  # delete or duplicate a stretch of the header
        a = rng.randrange(8, header_end)
        b = min(header_end, a + rng.choice([1, 2, 4, 8, 13, 100]))
        out = buf[:a] + buf[b:] if rng.random() < 0.5 else buf[:b] + buf[a:b] + buf[b:]
        return bytes(out), "splice_header", False
    a = rng.randrange(4, header_end)
    b = min(a + 16, header_end)  # the header only: garbage in tensor data may load
    buf[a:b] = bytes(rng.getrandbits(8) for _ in range(b - a))
    return bytes(buf), "garbage_header", False


_VALUES = [None, True, False, 0, -1, 1, 2, 3, 7, 10 ** 12, 2 ** 63, 1.5, 32.0, float("nan"),
           float("inf"), -float("inf"), "32", "", "false", [], {}, [32], {"a": 1}]


def mutate_json(rng, obj, deep_keys=("rope_scaling", "rope_parameters")):
    """A mutated copy of a JSON object (config.json or a safetensors header's entry)."""
    obj = copy.deepcopy(obj)
    kind = rng.choice(["drop", "set", "set", "set", "add", "model_type", "rope", "retype"])
    keys = list(obj) if isinstance(obj, dict) else []
    if kind == "drop" and keys:
        k = rng.choice(keys)
        del obj[k]
        return obj, f"drop:{k}"
    if kind in ("set", "retype") and keys:
        k = rng.choice(keys)
        v = obj[k]
        if kind == "retype" and isinstance(v, (int, float)) and not isinstance(v, bool):
            obj[k] = rng.choice([str(v), float(v), [v], -v, v * 1000, v + 1, None])
        else:
            obj[k] = rng.choice(_VALUES)
        return obj, f"{kind}:{k}"
    if kind == "model_type":
        obj["model_type"] = rng.choice(["gpt2", "opt", "llama", "qwen2", "qwen3", "mamba", None,
                                        1, ["llama"], "LLAMA", ""])
        return obj, "model_type"
    if kind == "rope":
        obj[rng.choice(deep_keys)] = rng.choice([
            {"rope_type": "llama3", "factor": 8.0},
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            {"rope_type": "linear", "factor": 0}, {"rope_type": "linear", "factor": "x"},
            {"type": "yarn"}, {"rope_type": ["linear"]}, [], "linear", 3, {"rope_theta": -1},
            {"rope_type": "linear", "factor": float("nan")}])
        return obj, "rope"
    obj[rng.choice(["hidden_size", "vocab_size", "num_hidden_layers", "n_layer", "n_embd",
                    "head_dim", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                    "tie_word_embeddings", "hidden_act"])] = rng.choice(_VALUES)
    return obj, "add"


def _st_parts(data: bytes):
    (n,) = struct.unpack_from("<Q", data)
    return n, json.loads(data[8:8 + n]), data[8 + n:]


def _st_pack(header, tail: bytes, pad=True) -> bytes:
    blob = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob + tail


def mutate_safetensors(rng, data: bytes):
    n, header, tail = _st_parts(data)
    names = [k for k in header if k != "__metadata__"]
    kind = rng.choice(["entry", "entry", "entry", "swap", "drop", "add", "meta", "toplevel",
                       "length", "flip_header", "flip_data", "truncate", "append", "deep"])
    if kind == "entry":
        name = rng.choice(names)
        e = header[name]
        s, t = e["data_offsets"]
        field = rng.choice(["dtype", "shape", "data_offsets", "extra"])
        if field == "dtype":
            e["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "I32", "I64", "U8", "I8",
                                     "BOOL", "F8_E4M3", "", None, 3, "f32", ["F32"]])
        elif field == "shape":
            sh = e["shape"]
            e["shape"] = rng.choice([[], [0], [-1], [2 ** 32, 2 ** 32], [2 ** 62], [2 ** 64],
                                     [1.5], ["32"], None, 5, sh + [1], sh[::-1], [True] * len(sh),
                                     [x * 2 for x in sh], [sh[0] * 2] + [x // 2 for x in sh[1:]],
                                     [2 ** 31] * 3, [0] * len(sh), [-x for x in sh]])
        elif field == "data_offsets":
            e["data_offsets"] = rng.choice([[s, t + 1], [s - 1, t], [t, s], [-1, t], [0, 0],
                                            [s, 2 ** 64], [s, 2 ** 63], [s], [s, t, 1], None, "0",
                                            [s + 1, t + 1], [0, t - s], [float(s), t],
                                            [s + 2 ** 64, t + 2 ** 64]])
        else:
            e = rng.choice([None, [], "x", 1, {}])
        header[name] = e
        return _st_pack(header, tail), f"entry:{field}", False
    if kind == "swap":  # two entries trade byte ranges: a legitimate file if sizes match
        a, b = rng.sample(names, 2)
        ea, eb = header[a], header[b]
        ea["data_offsets"], eb["data_offsets"] = eb["data_offsets"], ea["data_offsets"]
        # equal sizes: a valid file that stores other values (as a data edit does)
        sa, sb = (e["data_offsets"][1] - e["data_offsets"][0] for e in (ea, eb))
        legit = sa == sb and ea["dtype"] == eb["dtype"]
        return _st_pack(header, tail), "swap_offsets", legit
    if kind == "drop":
        del header[rng.choice(names)]
        return _st_pack(header, tail), "drop_entry", False
    if kind == "add":
        header[rng.choice(["extra.weight", rng.choice(names) + "x", "model.layers.9.x.weight"])] = \
            {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        return _st_pack(header, tail), "add_entry", False
    if kind == "meta":
        header["__metadata__"] = rng.choice([None, [], "pt", 1, {"format": ["pt"]}, {}])
        return _st_pack(header, tail), "metadata", False
    if kind == "toplevel":
        return _st_pack(rng.choice([[], "x", 1, None, [header]]), tail), "toplevel", False
    if kind == "length":
        v = rng.choice(_INTS + [n + 1, n - 1, n + 8, len(data), len(data) - 8, len(data) - 7])
        return struct.pack("<Q", v % 2 ** 64) + data[8:], "header_length", False
    if kind == "flip_header":
        buf = bytearray(data)
        _flip(rng, buf, 8, 8 + n, rng.choice([1, 2, 4, 16]))
        return bytes(buf), "flip_header", False
    if kind == "flip_data":
        buf = bytearray(data)
        _flip(rng, buf, 8 + n, len(buf), rng.choice([1, 4, 64]))
        return bytes(buf), "flip_data", True
    if kind == "truncate":
        return data[:rng.randrange(len(data))], "truncate", False
    if kind == "append":
        return data + bytes(rng.choice([1, 4, 8, 4096])), "append", False
    depth = rng.choice([100, 5000, 100000])
    return struct.pack("<Q", 2 * depth) + b"[" * depth + b"]" * depth + tail, "deep_json", False


def mutate_folder(rng, folder: str):
    """{file name: new bytes or None}, label, data_only for a safetensors folder."""
    files = sorted(os.listdir(folder))
    weights = [f for f in files if f.endswith(".safetensors")]
    kind = rng.choice(["config", "config", "config_bytes", "weights", "weights", "weights",
                       "weights", "index", "missing"])
    if kind == "config":
        cfg = json.load(open(os.path.join(folder, "config.json")))
        new, label = mutate_json(rng, cfg)
        text = json.dumps(new)  # NaN and Infinity as Python writes them
        return {"config.json": text.encode()}, f"config:{label}", False
    if kind == "config_bytes":
        raw = bytearray(open(os.path.join(folder, "config.json"), "rb").read())
        choice = rng.choice(["truncate", "flip", "deep", "list", "huge_int", "bad_utf8"])
        if choice == "truncate":
            raw = raw[:rng.randrange(len(raw))]
        elif choice == "flip":
            _flip(rng, raw, 0, len(raw), rng.choice([1, 3, 10]))
        elif choice == "deep":
            raw = b'{"model_type": "llama", "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"
        elif choice == "list":
            raw = b"[1, 2]"
        elif choice == "huge_int":
            raw = raw.replace(b'"hidden_size": 32', b'"hidden_size": 1' + b"0" * 5000)
            raw = raw.replace(b'"n_embd": 32', b'"n_embd": 1' + b"0" * 5000)
        else:
            raw[rng.randrange(len(raw))] = 0xFF
        return {"config.json": bytes(raw)}, f"config_bytes:{choice}", False
    if kind == "index":
        if "model.safetensors.index.json" not in files:
            return {"model.safetensors.index.json": rng.choice([b"[]", b"{}", b"{",
                    b'{"weight_map": {"lm_head.weight": "/etc/passwd"}}'])}, "index_added", False
        idx = json.load(open(os.path.join(folder, "model.safetensors.index.json")))
        wm = idx["weight_map"]
        choice = rng.choice(["value", "drop", "path", "notdict", "toplevel"])
        if choice == "value":
            wm[rng.choice(list(wm))] = rng.choice([None, 1, [], "", "nope.safetensors",
                                                   "../st-llama/model.safetensors"])
        elif choice == "drop":
            del wm[rng.choice(list(wm))]
        elif choice == "path":
            wm[rng.choice(list(wm))] = rng.choice(["/dev/zero", "/proc/self/mem", ".", "..",
                                                   "config.json"])
        elif choice == "notdict":
            idx["weight_map"] = rng.choice([[], "x", None, 3])
        else:
            idx = rng.choice([[], None, "x"])
        return {"model.safetensors.index.json": json.dumps(idx).encode()}, f"index:{choice}", False
    if kind == "missing":
        return {rng.choice(files): None}, "missing_file", False
    f = rng.choice(weights)
    data, label, data_only = mutate_safetensors(rng, open(os.path.join(folder, f), "rb").read())
    return {f: data}, f"weights:{label}", data_only


# ---------------------------------------------------------------------------------------------
# Generating cases


def generate(n: int, seed: int, seeds: dict[str, str], out: str, shipped: str | None = None,
             n_shipped: int = 0):
    """Yields (case id, format, path, seed name, label, data_only); writes each mutant to `out`
    (a GGUF file or a folder), which the caller deletes after use."""
    rng = random.Random(seed)
    ggufs = {k: v for k, v in seeds.items() if v.endswith(".gguf")}
    folders = {k: v for k, v in seeds.items() if not v.endswith(".gguf")}
    parsed = {}
    for k, v in ggufs.items():
        data = open(v, "rb").read()
        parsed[k] = (data, *gguf_fields(data))
    if shipped:
        with open(shipped, "rb") as fh:
            head = fh.read(8 << 20)
        fields, end = gguf_fields(head)
        parsed["shipped"] = (head[:end], fields, end)
        shipped_size = os.path.getsize(shipped)
    for i in range(n):
        case = f"c{i:05d}"
        if i < n_shipped:
            head, fields, end = parsed["shipped"]
            data, label, data_only = mutate_gguf(rng, head, fields, end)
            data = data[:end + 64]  # never the tensor data: a sparse tail stands for it
            path = os.path.join(out, case + ".gguf")
            with open(path, "wb") as fh:
                fh.write(data)
                if not label.startswith("truncate"):
                    fh.truncate(shipped_size + len(data) - len(head[:end + 64]))
            yield case, "gguf-shipped", path, "shipped", label, data_only
            continue
        name = rng.choice(list(seeds))
        if name in ggufs:
            data, label, data_only = mutate_gguf(rng, *parsed[name])
            path = os.path.join(out, case + ".gguf")
            with open(path, "wb") as fh:
                fh.write(data)
            yield case, "gguf", path, name, label, data_only
        else:
            path = os.path.join(out, case)
            shutil.copytree(folders[name], path)
            edits, label, data_only = mutate_folder(rng, path)
            for fname, data in edits.items():
                target = os.path.join(path, fname)
                if data is None:
                    os.remove(target)
                else:
                    with open(target, "wb") as fh:
                        fh.write(data)
            fmt = "config" if label.startswith("config") else "safetensors"
            yield case, fmt, path, name, label, data_only


# ---------------------------------------------------------------------------------------------
# The worker: loads one file per request, answers one JSON line


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker():
    import jax

    jax.config.update("jax_platforms", "cpu")
    import zo2_jax.models as zm
    from zo2_jax.models.gguf import read_gguf

    ours = (zm.CheckpointError, zm.UnsupportedModelError)
    reference: dict[str, list] = {}

    def leaves(params):
        blocks = [b() if callable(b) else b for b in params["blocks"]]
        return [np.asarray(x) for x in jax.tree.leaves((params["outer"], blocks))]

    def run(job):
        path, fmt, seed_path = job["path"], job["format"], job["seed_path"]
        if fmt == "gguf-shipped":
            ckpt = read_gguf(path)
            ckpt.tokenizer_fields()
            ckpt.get_tensor("model.norm.weight")
            return "loaded"  # not compared: the sparse tail stands for the tensor data
        lazy = job.get("lazy", False)
        if seed_path not in reference:
            reference[seed_path] = leaves(zm.load(seed_path)[1])
        _, params = zm.load(path, lazy_blocks=lazy)
        got = leaves(params)
        if fmt == "gguf":
            zm.load_tokenizer(path)
        ref = reference[seed_path]
        if len(got) != len(ref) or any(a.shape != b.shape for a, b in zip(got, ref)):
            return "changed"
        same = all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, ref))
        return "same" if same else "changed"

    # Warm up (imports, first compile) before measuring memory.
    print(json.dumps({"ready": True, "rss": _peak_rss()}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        before, t0 = _peak_rss(), time.perf_counter()
        try:
            outcome, detail = run(job), ""
        except ours as e:
            name = os.path.basename(job["path"].rstrip("/"))
            outcome = "rejected" if name in str(e) else "unclear"
            detail = f"{type(e).__name__}: {str(e)[:300]}"
        except MemoryError as e:
            outcome, detail = "memory", f"MemoryError: {e}"
        except Exception as e:  # noqa: BLE001 - every other exception is a finding
            tb = traceback.extract_tb(e.__traceback__)[-1]
            outcome = "error"
            detail = f"{type(e).__name__}: {str(e)[:300]} at {tb.filename}:{tb.lineno}"
        grew = _peak_rss() - before
        if grew > MEMORY_GROWTH and outcome != "memory":
            outcome, detail = "memory", f"peak RSS grew by {grew:,} bytes; {detail}"
        print(json.dumps({"outcome": outcome, "detail": detail,
                          "seconds": time.perf_counter() - t0}), flush=True)


class Pool:
    """One worker process, restarted after a crash or a hang."""

    def __init__(self):
        self.proc = None

    def _start(self):
        env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                   OMP_NUM_THREADS="1")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_BOOT], cwd=root, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     stderr=subprocess.DEVNULL)
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fuzz worker failed to start")

    def run(self, job: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        if ready:  # EOF: the worker died
            rc = self.proc.wait()
            self.proc = None
            return {"outcome": "crash", "detail": f"worker exited with {rc}", "seconds": 0}
        self.close()
        return {"outcome": "hang", "detail": f"no answer within {TIMEOUT_S} s",
                "seconds": TIMEOUT_S}

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


# The worker limits its own address space once jax is up (jax reserves a lot of it at start).
_WORKER_BOOT = f"""
import resource, sys
sys.argv = ["fuzz-worker"]
import jax, jax.numpy as jnp
jnp.zeros(1).block_until_ready()
sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
import fuzz_models as fm
vm = int(open("/proc/self/status").read().split("VmSize:")[1].split()[0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + {AS_LIMIT_EXTRA}, resource.RLIM_INFINITY))
fm._worker()
"""


def fuzz(n: int, seed: int = 0, n_shipped: int = 0, workdir: str | None = None,
         log=None) -> dict:
    """Generates and loads `n` mutants; returns {"cases": [...], "counts": ..., "seconds": ...}."""
    t0 = time.perf_counter()
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="zo2-fuzz-")
    try:
        seeds = make_seeds(os.path.join(workdir, "seeds"))
        shipped = None
        if n_shipped:
            from zo2_jax.models.gguf import smollm2_gguf_path
            shipped = smollm2_gguf_path()
        out = os.path.join(workdir, "cases")
        os.makedirs(out, exist_ok=True)
        pool, cases = Pool(), []
        try:
            for case, fmt, path, seed_name, label, data_only in generate(
                    n, seed, seeds, out, shipped, n_shipped):
                job = {"path": path, "format": fmt, "seed_path": seeds.get(seed_name, ""),
                       "lazy": int(case[1:]) % 4 == 1}
                r = pool.run(job)
                r.update(case=case, format=fmt, seed=seed_name, label=label, data_only=data_only)
                if r["outcome"] == "changed" and not data_only:
                    r["outcome"] = "changed_header"
                cases.append(r)
                if log and r["outcome"] in FINDINGS:
                    print(f"{case} {fmt} {seed_name} {label}: {r['outcome']} {r['detail']}",
                          file=log, flush=True)
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
        finally:
            pool.close()
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    counts = collections.Counter((c["format"], c["outcome"]) for c in cases)
    return {"cases": cases, "counts": counts, "seconds": time.perf_counter() - t0}


FINDINGS = ("unclear", "error", "crash", "hang", "memory", "changed_header")


def findings(result) -> list[dict]:
    return [c for c in result["cases"] if c["outcome"] in FINDINGS]


def main(argv):
    n = int(argv[0]) if argv else 1000
    seed = int(argv[1]) if len(argv) > 1 else 0
    n_shipped = int(argv[2]) if len(argv) > 2 else 0
    result = fuzz(n, seed, n_shipped, log=sys.stdout)
    if os.environ.get("ZO2_FUZZ_OUT"):  # every case's outcome, for a closer look
        with open(os.environ["ZO2_FUZZ_OUT"], "w") as fh:
            json.dump(result["cases"], fh, indent=0)
    by_format = collections.Counter(c["format"] for c in result["cases"])
    print(f"\n{n} files in {result['seconds']:.0f} s; by format: {dict(by_format)}")
    for (fmt, outcome), k in sorted(result["counts"].items()):
        print(f"  {fmt:13s} {outcome:15s} {k}")
    bad = findings(result)
    print(f"findings: {len(bad)}")
    for c in bad[:50]:
        print(f"  {c['case']} {c['format']} {c['label']}: {c['outcome']} {c['detail']}")
    slowest = max(result["cases"], key=lambda c: c["seconds"])
    print(f"slowest: {slowest['case']} {slowest['label']} {slowest['seconds']:.2f} s")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main(sys.argv[1:]))
