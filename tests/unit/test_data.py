"""Tokenizers, loading, tokenisation cache, packing, global-batch sampling, the passkey and domains datasets."""
from __future__ import annotations

import json
import os
import re

import datasets
import numpy as np
import pytest
import torch

from longtrain.config import ConfigError, DataConfig, DomainsConfig, PasskeyConfig
from longtrain.trainer.data import (DOMAIN_NAMES, ROW_ARRAYS, ByteTokenizer, GlobalBatchSampler, PackedData,
                                    PasskeyEval, build_datasets, cache_key, collate, collate_domains,
                                    domain_records, load_records, load_tokenizer, needle_records, pack, pack_cached,
                                    passkey_records, passkey_text, tokenize)
from longtrain.trainer.data.domains import _DNA_PERCENT, _WORDS
from longtrain.trainer.data.packing import _CACHE_VERSION


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


def random_docs(rng, num, max_len, mask_prob=0.0):
    ids, masks = [], []
    for _ in range(num):
        n = int(rng.integers(1, max_len + 1))
        ids.append(rng.integers(0, 250, size=n).astype(np.int32))
        masks.append((rng.random(n) >= mask_prob).astype(np.int8))
    return ids, masks


def doc_spans(doc_row):
    """(start, end) of each run of equal doc ids in one row."""
    edges = np.flatnonzero(np.diff(doc_row)) + 1
    bounds = np.concatenate([[0], edges, [len(doc_row)]])
    return list(zip(bounds[:-1], bounds[1:]))


# ------------------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Grüße, 世界! \n tabs\t"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids) and tok.vocab_size == 259
    assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
    ids, mask = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    trained = bytes(i for i, m in zip(ids, mask) if m).decode()
    assert trained == "yo\n" and tok.decode(ids) == "<|user|>\nhi\n<|assistant|>\nyo\n"


def test_load_tokenizer_errors(tmp_path):
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"data.tokenizer: .*expected 'byte' or a local Hugging Face"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"data.tokenizer: .* holds no tokenizer files .*expected 'byte'"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"data.tokenizer: cannot load .*expected 'byte'"):
        load_tokenizer(str(tmp_path))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny byte-level BPE tokenizer directory built locally (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(["hello world, the pass key is 12345. user assistant"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(str(path))
    return str(path)


def test_hf_tokenizer(hf_dir, tmp_path):
    tok = load_tokenizer(hf_dir)
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert tok.pad_id == tok.eos_id and tok.bos_id is not None
    assert tok.fingerprint == load_tokenizer(hf_dir).fingerprint != ByteTokenizer().fingerprint
    chat = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"},
            {"role": "user", "content": "pass"}, {"role": "assistant", "content": "key"}]
    ids, mask = tok.apply_chat_template(chat)  # no chat template: the plain <|role|> format
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "world\nkey\n"
    tok._tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                              "{% if add_generation_prompt %}<s>assistant: {% endif %}")
    ids, mask = tok.apply_chat_template(chat)
    # the space after "assistant:" is merged into the first answer token, so it is trained too
    assert tok._tok.decode([i for i, m in zip(ids, mask) if m]) == " world</s> key</s>"
    assert tok._tok.decode(ids) == "<s>user: hello</s><s>assistant: world</s><s>user: pass</s><s>assistant: key</s>"
    row = tokenize(datasets.Dataset.from_list([{"messages": chat}]), tok, "sft", cache_dir=str(tmp_path))[0]
    assert row["input_ids"] == ids and row["loss_mask"] == mask  # template already adds BOS and EOS


# ---------------------------------------------------------------------------------------- packing

@pytest.mark.parametrize("seq_len", [16, 64])
def test_pack_invariants(seq_len):
    rng = np.random.default_rng(0)
    ids, masks = random_docs(rng, 200, seq_len, mask_prob=0.2)
    packed = pack(ids, masks, seq_len, "split", pad_id=258)
    st = packed.stats
    assert packed.input_ids.shape == packed.labels.shape == packed.position_ids.shape == (st.num_rows, seq_len)
    assert st.num_split == st.num_dropped == 0 and st.num_tokens == sum(map(len, ids))
    assert st.num_padding == st.num_rows * seq_len - st.num_tokens
    seen = []
    for r in range(st.num_rows):
        spans = doc_spans(packed.doc_ids[r])
        assert list(packed.doc_ids[r, [s for s, _ in spans]]) == list(range(len(spans)))
        for s, e in spans:
            assert list(packed.position_ids[r, s:e]) == list(range(e - s))
            assert packed.labels[r, e - 1] == -100  # no label crosses a document
            seen.append(tuple(packed.input_ids[r, s:e]))
    # every document appears whole, exactly once
    docs = sorted(tuple(d) for d in ids)
    pads = [s for s in seen if s and all(t == 258 for t in s)]
    assert sorted(s for s in seen if s not in pads) == docs
    # labels are the next token where it carries loss, and -100 elsewhere
    by_doc = {tuple(d): m for d, m in zip(ids, masks)}
    for r in range(st.num_rows):
        for s, e in doc_spans(packed.doc_ids[r]):
            piece = tuple(packed.input_ids[r, s:e])
            if piece not in by_doc:
                assert (packed.labels[r, s:e] == -100).all()  # padding
                continue
            m = by_doc[piece]
            want = np.where(m[1:] != 0, packed.input_ids[r, s + 1:e], -100)
            assert (packed.labels[r, s:e - 1] == want).all()


def test_pack_split_drop_and_errors():
    docs = [np.arange(10), np.arange(3), np.arange(25), np.arange(8)]
    masks = [np.ones(len(d), np.int8) for d in docs]
    split = pack(docs, masks, 8, "split")
    assert (split.stats.num_docs, split.stats.num_split, split.stats.num_dropped) == (4, 2, 0)
    assert split.stats.num_tokens == 46
    drop = pack(docs, masks, 8, "drop")
    assert (drop.stats.num_split, drop.stats.num_dropped, drop.stats.num_tokens) == (0, 2, 11)
    # split pieces are separate documents: positions restart at every piece
    assert (split.position_ids.max(axis=1) <= 7).all() and (split.position_ids[:, 0] == 0).all()
    assert (split.labels[split.position_ids == 7] == -100).all()  # a piece's last label does not cross into the next
    with pytest.raises(ValueError, match=r"no documents left after packing \(all 2 dropped .*data.overlong=split"):
        pack([np.arange(10), np.arange(9)], [np.ones(10), np.ones(9)], 8, "drop")
    with pytest.raises(ValueError, match=r"token id 300 .*vocabulary of size 259.*model.vocab_size"):
        pack([np.array([1, 300, 2])], [np.ones(3)], 8, vocab_size=259)


def test_pack_carries_domains():
    # Document i is made of the token i, so every token names its document; empty documents shift
    # the kept ones, and overlong ones are split (or dropped) into pieces that must keep the domain.
    rng = np.random.default_rng(1)
    lengths = rng.integers(0, 40, size=120)
    lengths[[3, 50]] = 0
    docs = [np.full(n, i, dtype=np.int32) for i, n in enumerate(lengths)]
    doc_domains = rng.integers(0, 3, size=len(docs))
    names = ["a", "b", "c"]
    for overlong in ("split", "drop"):
        packed = pack(docs, [np.ones(len(d)) for d in docs], 16, overlong, pad_id=255, doc_domains=doc_domains,
                      domain_names=names)
        assert packed.domain_names == names and packed.domains.dtype == np.int32
        assert packed.domains.shape == packed.input_ids.shape
        pad = packed.input_ids == 255
        assert pad.any() and (packed.domains[pad] == -1).all()
        assert (packed.domains[~pad] == doc_domains[packed.input_ids[~pad]]).all()
        for r in range(packed.num_rows):  # one domain per document (or piece) of a row
            for s, e in doc_spans(packed.doc_ids[r]):
                assert len(set(packed.domains[r, s:e].tolist())) == 1
        kept = set(np.unique(packed.input_ids[~pad]).tolist())
        assert kept == {i for i, n in enumerate(lengths) if n and (overlong == "split" or n <= 16)}
    assert packed.stats.num_dropped > 0
    split = pack(docs, [np.ones(len(d)) for d in docs], 16, pad_id=255, doc_domains=doc_domains, domain_names=names)
    long_doc = int(np.argmax(lengths))
    assert lengths[long_doc] > 32 and (split.input_ids == long_doc).any(axis=1).sum() >= 3  # in 3+ pieces
    assert (split.domains[split.input_ids == long_doc] == doc_domains[long_doc]).all()
    assert pack(docs, [np.ones(len(d)) for d in docs], 16).domains is None
    with pytest.raises(ValueError, match=r"doc_domains and domain_names together"):
        pack(docs, [np.ones(len(d)) for d in docs], 16, doc_domains=doc_domains)
    with pytest.raises(ValueError, match=r"one id in \[0, 2\) per document \(120 documents\)"):
        pack(docs, [np.ones(len(d)) for d in docs], 16, doc_domains=doc_domains, domain_names=["a", "b"])


def test_packed_cache_round_trip(tmp_path):
    docs = [np.arange(n) for n in (5, 12, 3, 9)]
    masks = [np.ones(len(d), np.int8) for d in docs]
    plain = pack(docs, masks, 8)
    with_domains = pack(docs, masks, 8, doc_domains=[1, 0, 1, 1], domain_names=["code", "dna"])
    for name, packed in (("plain", plain), ("domains", with_domains)):
        packed.save(str(tmp_path / name))
        back = PackedData.load(str(tmp_path / name))
        assert back.stats == packed.stats and back.domain_names == packed.domain_names
        for field in ROW_ARRAYS:
            assert isinstance(getattr(back, field), np.memmap)
            assert np.array_equal(getattr(back, field), getattr(packed, field))
    assert PackedData.load(str(tmp_path / "plain")).domains is None
    back = PackedData.load(str(tmp_path / "domains"))
    assert isinstance(back.domains, np.memmap) and np.array_equal(back.domains, with_domains.domains)
    assert back.domain_names == ["code", "dna"] and sorted(np.unique(back.domains).tolist()) == [-1, 0, 1]
    # A cache folder as written before domains existed: the four arrays and the stats only.
    old = tmp_path / "old"
    old.mkdir()
    for field in ROW_ARRAYS:
        np.save(str(old / f"{field}.npy"), getattr(plain, field))
    np.save(str(old / "stats.npy"), np.asarray([7, 1, 0, 0, plain.stats.num_rows, 29, 3]))
    loaded = PackedData.load(str(old))
    assert loaded.domains is None and loaded.domain_names is None and loaded.stats.num_docs == 7
    assert np.array_equal(loaded.input_ids, plain.input_ids)
    assert collate_domains(loaded, np.array([0])) is None
    batch = collate_domains(back, np.array([1, 0]))
    assert batch.dtype == torch.int64 and batch.tolist() == with_domains.domains[[1, 0]].tolist()


def test_pack_cached_key(tmp_path):
    ds = datasets.Dataset.from_list([{"text": t} for t in ("abc", "defgh", "ij")])
    tokenized = tokenize(ds, ByteTokenizer(), "pretrain", cache_dir=str(tmp_path))
    cache = str(tmp_path / "cache")
    plain = pack_cached(tokenized, 8, "split", 258, cache)
    # Without domains the key is the one used before domains existed, so old caches are still found.
    old_key = cache_key([tokenized._fingerprint, 8, "split", 258, _CACHE_VERSION])
    assert os.listdir(os.path.join(cache, "packed")) == [old_key] and plain.domains is None
    a = pack_cached(tokenized, 8, "split", 258, cache, doc_domains=np.array([0, 1, 0], np.int32),
                    domain_names=["x", "y"])
    b = pack_cached(tokenized, 8, "split", 258, cache, doc_domains=np.array([1, 1, 0], np.int32),
                    domain_names=["x", "y"])
    c = pack_cached(tokenized, 8, "split", 258, cache, doc_domains=np.array([1, 1, 0], np.int32),
                    domain_names=["y", "z"])
    assert len(os.listdir(os.path.join(cache, "packed"))) == 4
    assert a.domain_names == b.domain_names == ["x", "y"] and c.domain_names == ["y", "z"]
    for packed, ids in ((a, [0, 1, 0]), (b, [1, 1, 0])):  # each document's domain, found by its first byte
        for first, domain in zip(b"adi", ids):
            assert (packed.domains[packed.input_ids == first] == domain).all()


def test_pack_is_first_fit_decreasing():
    docs = [np.full(n, n) for n in (5, 3, 4, 2, 2)]
    packed = pack(docs, [np.ones(len(d)) for d in docs], 8, pad_id=0)
    # 5 -> row 0; 4 -> row 1; 3 -> row 0 (fills it); 2 -> row 1; 2 -> row 1 (fills it)
    assert packed.input_ids.tolist() == [[5] * 5 + [3] * 3, [4] * 4 + [2] * 4]
    assert packed.doc_ids.tolist() == [[0] * 5 + [1] * 3, [0] * 4 + [1] * 2 + [2] * 2]


# ---------------------------------------------------------------------------------- tokenisation

def test_sft_masks(tmp_path):
    tok = ByteTokenizer()
    ds = datasets.Dataset.from_list([{"prompt": "Q?", "response": " A."}])
    row = tokenize(ds, tok, "sft", cache_dir=str(tmp_path))[0]
    assert row["input_ids"] == [256] + list(b"Q? A.") + [257]
    assert row["loss_mask"] == [0, 0, 0, 1, 1, 1, 1]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    row = tokenize(datasets.Dataset.from_list([{"messages": chat}]), tok, "sft", cache_dir=str(tmp_path))[0]
    trained = [i for i, m in zip(row["input_ids"], row["loss_mask"]) if m]
    assert trained == list(b"a\n") + [257] and row["input_ids"][0] == 256
    # pack turns the mask into labels: only response tokens are targets
    packed = pack([np.array(row["input_ids"])], [np.array(row["loss_mask"])], 64)
    targets = packed.labels[0][packed.labels[0] != -100]
    assert targets.tolist() == list(b"a\n") + [257]


def test_tokenize_cache_reused(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(50)])
    cache = str(tmp_path / "cache")
    first = tokenize(load_records(src, cache_dir=cache), ByteTokenizer(), "pretrain", cache_dir=cache)

    class Exploding(ByteTokenizer):
        def encode(self, text):
            raise AssertionError("tokenised again instead of loading the cache")

    second = tokenize(load_records(src, cache_dir=cache), Exploding(), "pretrain", cache_dir=cache)
    assert second._fingerprint == first._fingerprint and second.cache_files == first.cache_files
    assert second.cache_files[0]["filename"].startswith(cache)
    assert second["input_ids"] == first["input_ids"]
    other = tokenize(load_records(src, cache_dir=cache), ByteTokenizer(), "pretrain", add_eos=False, cache_dir=cache)
    assert other._fingerprint != first._fingerprint


# ---------------------------------------------------------------------------------------- loading

def test_load_formats(tmp_path):
    recs = [{"text": "alpha"}, {"text": "beta"}]
    cache = str(tmp_path / "cache")
    assert load_records(write_jsonl(tmp_path / "a.jsonl", recs), cache_dir=cache)["text"] == ["alpha", "beta"]
    (tmp_path / "a.json").write_text(json.dumps(recs))
    assert load_records(str(tmp_path / "a.json"), cache_dir=cache)["text"] == ["alpha", "beta"]
    datasets.Dataset.from_list(recs).to_parquet(str(tmp_path / "a.parquet"))
    assert load_records(str(tmp_path / "a.parquet"), cache_dir=cache)["text"] == ["alpha", "beta"]
    (tmp_path / "a.txt").write_text("line one\nline two\n", encoding="utf-8")
    assert load_records(str(tmp_path / "a.txt"), cache_dir=cache)["text"] == ["line one\nline two\n"]
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "disk"))
    assert load_records(str(tmp_path / "disk"))["text"] == ["alpha", "beta"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(recs)}).save_to_disk(str(tmp_path / "dict"))
    assert load_records(str(tmp_path / "dict"))["text"] == ["alpha", "beta"]
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "1.jsonl", recs[:1])
    write_jsonl(folder / "2.jsonl", recs[1:])
    assert sorted(load_records(str(folder), cache_dir=cache)["text"]) == ["alpha", "beta"]


def test_load_errors(tmp_path):
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match=r"data.source: .*nope.jsonl.* does not exist"):
        load_records(str(tmp_path / "nope.jsonl"))
    (tmp_path / "a.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match=r"data.source: unsupported extension '.csv'.*\.jsonl, \.json, \.parquet"):
        load_records(str(tmp_path / "a.csv"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"data.eval_source: .*empty.jsonl.* is empty"):
        load_records(str(tmp_path / "empty.jsonl"), key="data.eval_source")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank.jsonl.* is empty"):
        load_records(str(tmp_path / "blank.jsonl"))
    (tmp_path / "none.json").write_text("[]")
    with pytest.raises(ValueError, match=r"none.json.* holds no records"):
        load_records(str(tmp_path / "none.json"), cache_dir=cache)
    (tmp_path / "torn.json").write_text('[{"text": "a"},\n {"text": ')
    with pytest.raises(ValueError, match=r"data.source: .*torn.json' is not valid JSON \(Expecting value at line 2"):
        load_records(str(tmp_path / "torn.json"), cache_dir=cache)
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": b}\n')  # JSON lines under a .json name
    with pytest.raises(ValueError, match=r"data.source: line 2 of .*lines.json' is not valid JSON"):
        load_records(str(tmp_path / "lines.json"), cache_dir=cache)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(ValueError, match=r"data.source: .*latin1.txt.* is not UTF-8"):
        load_records(str(tmp_path / "latin1.txt"), cache_dir=cache)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"latin1.jsonl.* is not UTF-8"):
        load_records(str(tmp_path / "latin1.jsonl"), cache_dir=cache)
    src = write_jsonl(tmp_path / "b.jsonl", [{"body": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"data.source: records of .*b.jsonl.* no field 'text' \(fields: body, id\)"):
        tokenize(load_records(src, cache_dir=cache), ByteTokenizer(), "pretrain", source=repr(src))
    with pytest.raises(ValueError, match=r"sft records .* no field 'messages' \(fields: body, id\)"):
        tokenize(load_records(src, cache_dir=cache), ByteTokenizer(), "sft", source=repr(src))


# ---------------------------------------------------------------------------------------- batches

def test_global_batch_layout_independent():
    sampler = GlobalBatchSampler(num_rows=37, global_batch_size=8, seed=3)

    def assembled(step, dp, accum, mbs):
        blocks = {}
        for r in range(dp):
            for m, rows in enumerate(sampler.local_micro_batches(step, r, dp, mbs, accum)):
                assert len(rows) == mbs
                blocks[m * dp + r] = rows
        return np.concatenate([blocks[b] for b in sorted(blocks)])

    for step in (0, 1, 9):
        for dp, accum, mbs in [(1, 4, 2), (2, 2, 2), (4, 1, 2), (8, 1, 1)]:
            rows = assembled(step, dp, accum, mbs)
            assert rows.tolist() == sampler.global_indices(step).tolist()
    assert sampler.global_indices(0).tolist() != sampler.global_indices(1).tolist()
    assert GlobalBatchSampler(37, 8, 3).global_indices(5).tolist() == sampler.global_indices(5).tolist()
    assert GlobalBatchSampler(37, 8, 4).global_indices(5).tolist() != sampler.global_indices(5).tolist()
    with pytest.raises(ValueError, match=r"data.global_batch_size=8 .*data.micro_batch_size \(1\).*trainer.grad_accum "
                                         r"\(2\).*data-parallel degree \(2\) = 4; set data.global_batch_size=4 or "
                                         r"trainer.grad_accum=4"):
        sampler.local_micro_batches(0, 0, 2, 1, 2)


def test_global_batch_epochs_wrap():
    n, g = 12, 5
    sampler = GlobalBatchSampler(n, g, seed=0)
    stream = np.concatenate([sampler.global_indices(k) for k in range(12)])  # 60 rows = 5 epochs
    epochs = stream.reshape(5, n)
    for e in range(5):
        assert sorted(epochs[e].tolist()) == list(range(n))  # each epoch is a permutation
    assert epochs[0].tolist() != epochs[1].tolist()
    big = GlobalBatchSampler(3, 7, seed=1).global_indices(0)  # a step longer than an epoch
    assert sorted(big[:3].tolist()) == [0, 1, 2] and sorted(big[3:6].tolist()) == [0, 1, 2]


# ---------------------------------------------------------------------------------------- passkey

def test_passkey_records():
    a = passkey_records(200, 7, 200, 600, 5)
    assert a == passkey_records(200, 7, 200, 600, 5)
    assert a != passkey_records(200, 8, 200, 600, 5) and a != passkey_records(200, 7, 200, 600, 5, split="eval")
    for r in a:
        key = r["response"]
        assert len(key) == 5 and key.isdigit() and key[0] != "0" and len(set(key)) == 5  # distinct digits
        assert r["prompt"].count(f"<<KEY={key}>>") == 1 and r["prompt"].endswith("What is the key? <<KEY=")
        filler = r["prompt"].replace(f"<<KEY={key}>>", "").replace("What is the key? <<KEY=", "")
        assert 190 <= len(filler) <= 700 and not any(c.isdigit() or c in "<=>" for c in filler)
        assert passkey_text(r) == r["prompt"] + r["response"]
    depths = np.array([r["depth"] for r in a])
    assert depths.min() < 0.05 and depths.max() > 0.95
    assert np.histogram(depths, bins=5, range=(0, 1))[0].min() >= 20  # roughly uniform
    sorted_keys = [r["response"] for r in passkey_records(50, 7, 20, 60, 5, key_order="sorted")]
    assert all(list(k) == sorted(set(k)) and "0" not in k for k in sorted_keys) and len(set(sorted_keys)) > 30
    # The filler never repeats across documents (nothing to memorise).
    sentences = [s for r in a for s in r["prompt"].split(". ")[:-1]]
    assert len(set(sentences)) > 0.95 * len(sentences)


def test_needle_records_fill_the_length():
    tok = ByteTokenizer()
    recs = needle_records([0.0, 0.5, 1.0], 3, 1024, tok, seed=0, digits=4)
    assert len(recs) == 9 and [r["depth"] for r in recs] == [0.0] * 3 + [0.5] * 3 + [1.0] * 3
    for r in recs:
        n = len(tok.encode(passkey_text(r))) + 2  # bos, eos
        assert 900 <= n <= 1024 and len(r["response"]) == 4
    assert recs[0]["prompt"].startswith("<<KEY=") and recs[-1]["prompt"].endswith(f"<<KEY={recs[-1]['response']}>> "
                                                                                 "What is the key? <<KEY=")
    assert needle_records([0.5], 3, 1024, tok, seed=0, digits=4) != needle_records([0.5], 3, 2048, tok, 0, 4)[:3]
    with pytest.raises(ValueError, match="data.seq_len: 30 tokens cannot hold a passkey record"):
        needle_records([0.5], 1, 30, tok, seed=0, digits=5)


def test_passkey_eval_and_accuracy():
    tok = ByteTokenizer()
    recs = passkey_records(6, 0, 50, 120, 4, split="eval")
    ev = PasskeyEval.from_records(recs, tok, seq_len=256)
    batch, answer, depth = ev.batch(np.arange(6))
    assert ev.num_rows == 6 and batch["input_ids"].shape == (6, 256) and answer.dtype == torch.bool
    for r, rec in enumerate(recs):
        assert tok.decode(batch["labels"][r][answer[r]].tolist()) == rec["response"]
    assert torch.allclose(depth, torch.tensor([r["depth"] for r in recs], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"data.passkey.max_chars.*data.seq_len=64"):
        PasskeyEval.from_records(recs, tok, seq_len=64)
    acc = PasskeyEval.accuracy_by_depth([True, False, True, True, False], [0.05, 0.1, 0.5, 0.99, 1.0])
    assert acc == {"passkey_acc": 0.6, "passkey_acc_depth_0-20": 0.5, "passkey_acc_depth_40-60": 1.0,
                   "passkey_acc_depth_80-100": 0.5}


# ---------------------------------------------------------------------------------------- domains

def test_domain_records_content():
    recs = domain_records(400, 3, 100, 300)
    assert recs == domain_records(400, 3, 100, 300)
    assert recs != domain_records(400, 4, 100, 300)
    evals = domain_records(400, 3, 100, 300, split="eval")
    assert not {r["text"] for r in recs} & {r["text"] for r in evals}
    assert {r["domain"] for r in recs} == set(DOMAIN_NAMES) == {"arithmetic", "code", "dna", "prose"}
    by_domain = {name: [r["text"] for r in recs if r["domain"] == name] for name in DOMAIN_NAMES}
    for text in sum(by_domain.values(), []):
        assert 100 <= len(text) <= 300 + 100 and text.isascii()  # rounded up to a whole line or sentence
    for text in by_domain["arithmetic"]:
        for line in text.split("\n"):
            a, op, b, c = re.fullmatch(r"(\d+)([-+*])(\d+)=(-?\d+)", line).groups()
            assert int(c) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] >= 0
    pairs = np.zeros((4, 4))
    for text in by_domain["dna"]:
        lines = text.split("\n")
        assert set("".join(lines)) <= set("ACGT") and all(len(line) == 60 for line in lines)
        bases = ["ACGT".index(ch) for ch in "".join(lines)]
        np.add.at(pairs, (bases[:-1], bases[1:]), 1)
    # transition frequencies follow the fixed chain (over ~25k pairs: within 0.03 is > 5 standard errors)
    assert np.abs(pairs / pairs.sum(axis=1, keepdims=True) - np.asarray(_DNA_PERCENT) / 100).max() < 0.03
    words = [w.strip(".,").lower() for text in by_domain["prose"] for w in text.split()]
    assert set(words) <= set(_WORDS) and len(_WORDS) >= 200
    assert 6 < words.count("the") / words.count(_WORDS[9]) < 16  # Zipf: rank 1 about 10 times rank 10
    assert all(text.endswith(".") and text[0].isupper() for text in by_domain["prose"])
    for text in by_domain["code"]:
        lines = text.split("\n")
        assert lines[0].startswith("def ") and lines[0].endswith("):")
        assert all((len(line) - len(line.lstrip(" "))) % 4 == 0 for line in lines)
        assert any(line.startswith("    ") for line in lines)
    # clearly distinct byte statistics: the character sets barely overlap
    chars = {name: set("".join(texts)) for name, texts in by_domain.items()}
    assert chars["dna"] == set("ACGT\n") and chars["arithmetic"] == set("0123456789+-*=\n")
    assert "(" in chars["code"] and "(" not in chars["prose"] and "=" not in chars["prose"]


def test_domain_records_mix():
    recs = domain_records(4000, 0, 20, 40, names=["dna", "arithmetic"], mix=[1, 3])
    share = np.mean([r["domain"] == "arithmetic" for r in recs])
    assert abs(share - 0.75) < 0.03  # 4000 draws: the standard error is 0.007
    recs = domain_records(500, 0, 20, 40, names=["prose", "code", "dna"], mix=[1, 0, 1])
    assert {r["domain"] for r in recs} == {"prose", "dna"}
    uniform = domain_records(4000, 1, 20, 40)
    counts = [sum(r["domain"] == name for r in uniform) for name in DOMAIN_NAMES]
    assert max(counts) - min(counts) < 150  # each about 1000


def test_domains_config_errors():
    with pytest.raises(ConfigError, match=r"data.domains.names: unknown domain 'poetry'; choose from arithmetic, "
                                          r"code, dna, prose"):
        DomainsConfig(names=["dna", "poetry"])
    with pytest.raises(ConfigError, match=r"data.domains.mix: has 2 weights but data.domains.names has 4"):
        DomainsConfig(mix=[1.0, 2.0])
    with pytest.raises(ConfigError, match=r"data.domains.mix: .*non-negative"):
        DomainsConfig(names=["dna", "code"], mix=[1.0, -1.0])
    with pytest.raises(ConfigError, match=r"data.domains.names: repeats a domain"):
        DomainsConfig(names=["dna", "dna"])
    with pytest.raises(ConfigError, match=r"data.domain_field: .*field 'domain', got 'topic'"):
        DataConfig(source="domains", domain_field="topic")
    with pytest.raises(ConfigError, match=r"data.mode: the domains source is pretraining text"):
        DataConfig(source="domains", mode="sft")
    with pytest.raises(ConfigError, match=r"data.eval_source: passkey records carry no domain"):
        DataConfig(source="domains", eval_source="passkey")
    with pytest.raises(ConfigError, match=r"data.source: passkey records carry no domain"):
        DataConfig(domain_field="domain")


# ----------------------------------------------------------------------------------------- bundle

def test_build_datasets_passkey(tmp_path):
    cfg = DataConfig(seq_len=512, cache_dir=str(tmp_path / "cache"),
                     passkey=PasskeyConfig(num_train=40, num_eval=8, min_chars=100, max_chars=300))
    lines, calls = [], []
    bundle = build_datasets(cfg, vocab_size=259, seed=0, barrier=lambda: calls.append(1), log=lines.append)
    assert calls == [1] and len(lines) == 1 and "40 docs" in lines[0] and "padding" in lines[0]
    assert bundle.train.stats.num_docs == 40 and bundle.eval.stats.num_docs == 8
    assert bundle.passkey_eval.num_rows == 8
    batch = collate(bundle.train, np.array([0, 1]))
    assert set(batch) == {"input_ids", "labels", "position_ids", "doc_ids"}
    assert all(t.dtype == torch.int64 and t.shape == (2, 512) for t in batch.values())
    packed_files = os.listdir(tmp_path / "cache" / "packed")
    again = build_datasets(cfg, vocab_size=259, seed=0, rank=1, barrier=lambda: None, log=lines.append)
    assert len(lines) == 1 and os.listdir(tmp_path / "cache" / "packed") == packed_files
    assert np.array_equal(again.train.input_ids, bundle.train.input_ids)
    with pytest.raises(ValueError, match=r"data.source: token id 258 .*size 100.*model.vocab_size to at least 259"):
        build_datasets(cfg, vocab_size=100, seed=0)
    sft = build_datasets(DataConfig(seq_len=512, mode="sft", cache_dir=cfg.cache_dir, passkey=cfg.passkey),
                         vocab_size=259, seed=0, log=lambda _m: None)
    assert (sft.train.labels != -100).sum() < (bundle.train.labels != -100).sum() / 10


def test_build_datasets_file_source(tmp_path):
    src = write_jsonl(tmp_path / "train.jsonl", [{"content": "x" * n} for n in (5, 50, 500)])
    cfg = DataConfig(source=src, eval_source=src, text_field="content", seq_len=64, overlong="drop",
                     cache_dir=str(tmp_path / "cache"))
    bundle = build_datasets(cfg, vocab_size=259, seed=0, log=lambda _m: None)
    assert bundle.train.stats.num_dropped == 1 and bundle.passkey_eval is None and bundle.eval is not None
    assert bundle.train.domains is None and collate_domains(bundle.train, np.array([0])) is None
    with pytest.raises(ValueError, match=r"no field 'text' \(fields: content\).*data.text_field"):
        build_datasets(DataConfig(source=src, cache_dir=cfg.cache_dir), vocab_size=259, seed=0)


def test_build_datasets_domains(tmp_path):
    cfg = DataConfig(source="domains", seq_len=512, cache_dir=str(tmp_path / "cache"),
                     domains=DomainsConfig(num_train=60, num_eval=12, min_chars=64, max_chars=200))
    lines = []
    bundle = build_datasets(cfg, vocab_size=259, seed=5, log=lines.append)
    assert lines[0].endswith("; domains arithmetic, code, dna, prose") and bundle.passkey_eval is None
    tok = bundle.tokenizer
    for split, packed in (("train", bundle.train), ("eval", bundle.eval)):
        assert packed.domain_names == ["arithmetic", "code", "dna", "prose"]
        recs = domain_records(60 if split == "train" else 12, 5, 64, 200, split=split)
        domain_of = {r["text"]: r["domain"] for r in recs}
        seen = []
        for r in range(packed.num_rows):
            for s, e in doc_spans(packed.doc_ids[r]):
                ids = packed.input_ids[r, s:e]
                if ids[0] == tok.pad_id:
                    assert (packed.domains[r, s:e] == -1).all()
                    continue
                text = tok.decode(ids)
                assert (packed.domains[r, s:e] == packed.domain_names.index(domain_of[text])).all()
                seen.append(text)
        assert sorted(seen) == sorted(domain_of)  # every document once, none split at 512 tokens
    rows = np.array([2, 0])
    assert set(collate(bundle.train, rows)) == {"input_ids", "labels", "position_ids", "doc_ids"}
    domains = collate_domains(bundle.train, rows)
    assert domains.dtype == torch.int64 and domains.tolist() == bundle.train.domains[rows].tolist()
    again = build_datasets(cfg, vocab_size=259, seed=5, log=lambda _m: None)  # from the cache
    assert isinstance(again.train.domains, np.memmap) and np.array_equal(again.train.domains, bundle.train.domains)
    other = build_datasets(DataConfig(source="domains", seq_len=512, cache_dir=cfg.cache_dir, domains=DomainsConfig(
        num_train=60, num_eval=0, min_chars=64, max_chars=200, names=["prose", "dna"])), 259, 5, log=lambda _m: None)
    assert other.eval is None and other.train.domain_names == ["dna", "prose"]


def test_build_datasets_domain_field(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "bb one", "topic": "b"}, {"text": "aa two", "topic": "a"},
                                                   {"text": "bb three", "topic": "b"}])
    evals = write_jsonl(tmp_path / "eval.jsonl", [{"text": "cc four", "topic": "c"}, {"text": "aa five", "topic": "a"}])
    cache = str(tmp_path / "cache")
    cfg = DataConfig(source=train, eval_source=evals, domain_field="topic", seq_len=64, cache_dir=cache)
    bundle = build_datasets(cfg, vocab_size=259, seed=0, log=lambda _m: None)
    # ids from the names of both splits: "c" only occurs in eval and still has its own id there
    for packed in (bundle.train, bundle.eval):
        assert packed.domain_names == ["a", "b", "c"]
        for first, domain in ((ord("a"), 0), (ord("b"), 1), (ord("c"), 2)):
            starts = packed.input_ids[packed.position_ids == 1] == first  # the byte after BOS
            assert (packed.domains[packed.position_ids == 1][starts] == domain).all()
    assert sorted(np.unique(bundle.eval.domains).tolist()) == [-1, 0, 2]
    assert sorted(np.unique(bundle.train.domains).tolist()) == [-1, 0, 1]

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "topic": "a"}, {"text": "y"}])
    with pytest.raises(ValueError, match=r"data.source: record 1 of '.*bad.jsonl' has no domain field 'topic'; "
                                         r"add it to every record, or set data.domain_field"):
        build_datasets(DataConfig(source=bad, domain_field="topic", cache_dir=str(tmp_path / "c1")), 259, 0)
    assert not (tmp_path / "c1" / "packed").exists()  # refused before packing
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"text": "x", "id": 1}])
    with pytest.raises(ValueError, match=r"data.eval_source: records of '.*plain.jsonl' have no domain field 'topic' "
                                         r"\(fields: text, id\)"):
        build_datasets(DataConfig(source=train, eval_source=plain, domain_field="topic", cache_dir=cache), 259, 0)
    numbers = write_jsonl(tmp_path / "numbers.jsonl", [{"text": "x", "topic": 3}])
    with pytest.raises(ValueError, match=r"domain field 'topic' of '.*numbers.jsonl' holds int64, not text"):
        build_datasets(DataConfig(source=numbers, domain_field="topic", cache_dir=cache), 259, 0)
    with pytest.raises(ValueError, match=r"data.source: records of '.*train.jsonl' have no domain field 'domain'"):
        build_datasets(DataConfig(source=train, eval_source="domains", cache_dir=cache), 259, 0)
