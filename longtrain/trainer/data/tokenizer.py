"""Tokenizers and the tokenisation of records.

``ByteTokenizer`` (no files) and ``HFTokenizer`` (a local Hugging Face directory) expose the same
small interface: ``vocab_size``, ``bos_id``, ``eos_id``, ``pad_id``, ``encode``, ``decode``,
``apply_chat_template`` (ids and loss mask of a chat, for SFT) and ``fingerprint`` (a stable string
that changes when the tokenizer changes, part of the cache key). ``encode_example`` turns one
record into ids and a loss mask; ``tokenize`` maps it over a ``datasets.Dataset`` with a cache
shared by every run and rank.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import datasets

Messages = Sequence[Dict[str, str]]

_EXPECTED = "(expected 'byte' or a local Hugging Face tokenizer directory)"
# Files never read by a tokenizer; skipped when hashing a model directory for the fingerprint.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx", ".ckpt")
_MAX_HASHED_FILE_BYTES = 64 << 20
_CACHE_VERSION = "1"  # bump when the tokenisation output changes, to invalidate old caches


def _plain_chat(encode, messages: Messages) -> Tuple[List[int], List[int]]:
    """Render ``messages`` as ``<|role|>\\ncontent\\n`` blocks; assistant content (and its newline) is trained."""
    ids: List[int] = []
    mask: List[int] = []
    for i, message in enumerate(messages):
        role, content = _role_content(message, i)
        header = encode(f"<|{role}|>\n")
        body = encode(content + "\n")
        ids += header + body
        mask += [0] * len(header) + [int(role == "assistant")] * len(body)
    return ids, mask


def _role_content(message, index: int) -> Tuple[str, str]:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
            or not isinstance(message.get("content"), str):
        raise ValueError(f"messages[{index}] must be a {{'role': str, 'content': str}} dict, got {message!r}")
    return message["role"], message["content"]


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255 are bytes, then BOS (256), EOS (257) and PAD (258)."""

    vocab_size = 259
    bos_id: Optional[int] = 256
    eos_id: Optional[int] = 257
    pad_id: int = 258
    fingerprint = "byte-v1"

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids are skipped and invalid UTF-8 is replaced."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Messages) -> Tuple[List[int], List[int]]:
        """Ids and loss mask (1 on assistant content) of a chat in the plain ``<|role|>`` format."""
        return _plain_chat(self.encode, messages)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A local Hugging Face tokenizer directory behind the same interface as :class:`ByteTokenizer`.

    Args:
        path: directory holding ``tokenizer.json`` / ``tokenizer_config.json`` (a model directory works).
    """

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        self.path = os.path.abspath(path)
        self._tok = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.vocab_size: int = len(self._tok)
        self.bos_id: Optional[int] = self._tok.bos_token_id
        self.eos_id: Optional[int] = self._tok.eos_token_id
        pad = self._tok.pad_token_id
        self.pad_id: int = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.fingerprint: str = "hf-" + _hash_dir(self.path)

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` with special tokens skipped."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: Messages) -> Tuple[List[int], List[int]]:
        """Ids and loss mask of a chat rendered with the tokenizer's chat template.

        The mask is 1 on the tokens each assistant turn adds to the rendered text (its content and
        end-of-turn marker, not the role header). Turn boundaries are found by rendering prefixes of
        the chat and taking the common prefix with the full rendering, which also works for
        templates that rewrite earlier turns. Without a chat template the plain ``<|role|>`` format
        of :class:`ByteTokenizer` is used.
        """
        for i, message in enumerate(messages):
            _role_content(message, i)
        if not getattr(self._tok, "chat_template", None):
            return _plain_chat(self.encode, messages)
        messages = [dict(m) for m in messages]
        full = self._render(messages, False)
        spans: List[Tuple[int, int]] = []
        prev_end = 0
        for i, message in enumerate(messages):
            end = _common_prefix_len(self._render(messages[: i + 1], False), full)
            if message["role"] == "assistant":
                try:
                    start = _common_prefix_len(self._render(messages[:i], True), full) if i else 0
                except Exception:  # some templates refuse partial chats; fall back to the turn start
                    start = prev_end
                spans.append((max(start, prev_end), end))
            prev_end = end
        if getattr(self._tok, "is_fast", False):
            enc = self._tok(full, add_special_tokens=False, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            # A token is trained when it overlaps an assistant span ("Ġworld" starts at the space
            # that ends the role header but belongs to the answer).
            mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
            return ids, mask
        # Slow tokenizers have no offsets: encode the text piecewise at the span boundaries.
        ids, mask, pos = [], [], 0
        for s, e in spans + [(len(full), len(full))]:
            for text, m in ((full[pos:s], 0), (full[s:e], 1)):
                piece = self.encode(text) if text else []
                ids += piece
                mask += [m] * len(piece)
            pos = e
        return ids, mask

    def _render(self, messages: List[Dict[str, str]], add_generation_prompt: bool) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.path!r})"


def _common_prefix_len(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i, block = 0, 4096  # compare blocks first: chats can be hundreds of thousands of characters
    while i + block <= n and a[i:i + block] == b[i:i + block]:
        i += block
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _hash_dir(path: str) -> str:
    """Hash of the names and contents of the tokenizer files of ``path`` (weights are skipped)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.endswith(_WEIGHT_SUFFIXES) \
                or os.path.getsize(full) > _MAX_HASHED_FILE_BYTES:
            continue
        h.update(name.encode())
        with open(full, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def encode_example(tokenizer, example: Dict, mode: str, text_field: str = "text", add_bos: bool = True,
                   add_eos: bool = True) -> Tuple[List[int], List[int]]:
    """Token ids and loss mask (1: the token is a training target) of one record.

    pretrain: ``example[text_field]``, every token trained. sft: a ``messages`` chat (assistant
    turns trained; BOS/EOS added only when the chat template did not add them) or
    ``prompt``/``response`` (response and EOS trained).

    Raises:
        ValueError: a field is not text (the caller adds which record and file).
    """
    bos = [tokenizer.bos_id] if add_bos and tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if add_eos and tokenizer.eos_id is not None else []
    if mode == "pretrain":
        ids = bos + tokenizer.encode(_text(example, text_field)) + eos
        return ids, [1] * len(ids)
    if "messages" in example:
        messages = example["messages"]
        if not isinstance(messages, list):
            raise ValueError(f"field 'messages' is {type(messages).__name__}, not a list of {{role, content}}")
        ids, mask = tokenizer.apply_chat_template(messages)
        head = bos if not ids or ids[0] != tokenizer.bos_id else []
        tail = eos if not ids or ids[-1] != tokenizer.eos_id else []
        last = int(bool(messages) and messages[-1].get("role") == "assistant")
        return head + list(ids) + tail, [0] * len(head) + list(mask) + [last] * len(tail)
    prompt = bos + tokenizer.encode(_text(example, "prompt"))
    response = tokenizer.encode(_text(example, "response")) + eos
    return prompt + response, [0] * len(prompt) + [1] * len(response)


def _text(example: Dict, field: str) -> str:
    value = example[field]
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is {type(value).__name__}, not text")
    return value


def load_tokenizer(spec: str):
    """Build the tokenizer named by ``data.tokenizer``.

    Args:
        spec: ``"byte"`` or a local Hugging Face tokenizer (or model) directory.

    Returns:
        A :class:`ByteTokenizer` or :class:`HFTokenizer`.

    Raises:
        ValueError: ``spec`` is neither ``byte`` nor a readable tokenizer directory.
    """
    if spec == "byte":
        return ByteTokenizer()
    path = os.path.expanduser(str(spec))
    if not os.path.isdir(path):
        raise ValueError(f"data.tokenizer: {spec!r} is not 'byte' and not a directory {_EXPECTED}")
    try:
        return HFTokenizer(path)
    except Exception as e:  # transformers raises many types for unreadable directories
        known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "vocab.txt")
        if not any(os.path.isfile(os.path.join(path, f)) for f in known):
            raise ValueError(f"data.tokenizer: {spec!r} holds no tokenizer files (none of {', '.join(known)}) "
                             f"{_EXPECTED}") from e
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"data.tokenizer: cannot load a tokenizer from {spec!r}: {msg} {_EXPECTED}") from e


def tokenize(ds: datasets.Dataset, tokenizer, mode: str, text_field: str = "text", add_bos: bool = True,
             add_eos: bool = True, cache_dir: Optional[str] = None, key: str = "data.source",
             source: str = "the dataset") -> datasets.Dataset:
    """Tokenise records into ``input_ids`` (int32 lists) and ``loss_mask`` (int8 lists).

    pretrain: ``text_field`` is the document, every token carries loss. sft: a ``messages`` list of
    ``{role, content}`` (assistant turns carry loss) or ``prompt``/``response`` fields (the response
    and EOS carry loss). The result is cached under ``cache_dir/tokenized`` keyed by the input's
    fingerprint, the tokenizer's fingerprint and these options, so every run and rank reuses it.

    Raises:
        ValueError: a needed field is missing or is not text.
    """
    cols = list(ds.column_names)
    if mode == "pretrain":
        if text_field not in cols:
            raise ValueError(f"{key}: records of {source} have no field {text_field!r} (fields: "
                             f"{', '.join(cols)}); set data.text_field to the field holding the text")
    elif "messages" not in cols and not {"prompt", "response"} <= set(cols):
        missing = "response" if "prompt" in cols else "prompt" if "response" in cols else "messages"
        raise ValueError(f"{key}: sft records of {source} have no field {missing!r} (fields: {', '.join(cols)}); "
                         "sft needs a 'messages' field or 'prompt' and 'response' fields")

    def encode_batch(batch, indices):
        out = {"input_ids": [], "loss_mask": []}
        for j, index in enumerate(indices):
            try:
                ids, mask = encode_example(tokenizer, {k: v[j] for k, v in batch.items()}, mode, text_field,
                                           add_bos, add_eos)
            except ValueError as e:
                raise ValueError(f"{key}: record {index} of {source}: {e}") from None
            out["input_ids"].append(ids)
            out["loss_mask"].append(mask)
        return out

    fingerprint = cache_key([ds._fingerprint, tokenizer.fingerprint, mode, text_field, add_bos, add_eos,
                             _CACHE_VERSION])
    cache_file = os.path.join(cache_dir, "tokenized", f"{fingerprint}.arrow") if cache_dir else None
    features = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32")),
                                  "loss_mask": datasets.Sequence(datasets.Value("int8"))})
    try:
        return ds.map(encode_batch, batched=True, with_indices=True, remove_columns=cols, features=features,
                      new_fingerprint=fingerprint, cache_file_name=cache_file, load_from_cache_file=True,
                      desc=f"tokenize {key}")
    except UnicodeDecodeError as e:
        raise ValueError(f"{key}: {source} is not UTF-8 text ({e.reason}); re-encode it as UTF-8") from None


def cache_key(parts) -> str:
    """Stable hex digest of JSON-able ``parts`` (cache file names, ``datasets`` fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]
