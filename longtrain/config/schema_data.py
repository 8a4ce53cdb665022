"""Schema of the data keys (``data.*``, with the ``data.passkey.*`` and ``data.domains.*`` groups)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from longtrain.config.domains import DOMAIN_NAMES, domain_probabilities
from longtrain.config.errors import ConfigError, require


@dataclass
class PasskeyConfig:
    num_train: int = 512
    """Number of synthetic training documents."""
    num_eval: int = 64
    """Rows of the passkey evaluation at data.seq_len (spread evenly over the depths); also the number of
    documents of the eval-loss split."""
    min_chars: int = 256
    """Shortest document, in characters of filler text."""
    max_chars: int = 1024
    """Longest document, in characters of filler text."""
    length_power: float = 1.0
    """Skew of the document lengths: min_chars * (max_chars / min_chars) ** (u ** length_power), u uniform;
    1 is log-uniform, larger values make short documents (many keys per token) more common."""
    digits: int = 5
    """Number of digits of the passkey (distinct digits, so at most 10)."""
    key_order: str = "random"
    """Order of the key's digits: `random` (the classic passkey: reading it back needs a copy of what
    follows the marker) or `sorted` (increasing: the key is which digits the needle holds, found by
    content at any depth; a 2-layer model learns it in minutes)."""
    depths: int = 5
    """Needle depths evaluated, evenly spaced from 0% to 100% of the filler (5: 0, 25, 50, 75, 100%)."""
    grid_lengths: List[int] = field(default_factory=lambda: [1])
    """Context lengths of the needle grid evaluated at the end of a run that evaluates, as multiples of
    data.seq_len, e.g. [1, 2, 4] ([] for none)."""
    grid_samples: int = 4
    """Keys per cell (depth x length) of the needle grid."""
    grid_rope_scaling: Dict[str, Any] = field(default_factory=dict)
    """RoPE scaling the grid evaluates lengths beyond 1x with, as model.rope_scaling, e.g. {rope_type: yarn,
    factor: 4, original_max_position_embeddings: 2048}; empty: the model's own RoPE at every length."""


@dataclass
class DomainsConfig:
    num_train: int = 2048
    """Number of synthetic training documents."""
    num_eval: int = 128
    """Number of synthetic evaluation documents."""
    min_chars: int = 128
    """Shortest document, in characters (rounded up to a whole line or sentence)."""
    max_chars: int = 512
    """Longest document, in characters (rounded up to a whole line or sentence)."""
    names: List[str] = field(default_factory=lambda: list(DOMAIN_NAMES))
    """Domains to draw documents from: any of arithmetic, code, dna, prose."""
    mix: Optional[List[float]] = None
    """One weight per entry of names (the chance a document is from that domain); null is uniform."""

    def __post_init__(self) -> None:
        require(0 < self.min_chars <= self.max_chars, "data.domains.min_chars",
                 f"need 0 < min_chars <= max_chars, got {self.min_chars} and {self.max_chars}")
        require(self.num_train >= 1 and self.num_eval >= 0, "data.domains.num_train",
                 "num_train must be >= 1 and num_eval >= 0")
        try:
            domain_probabilities(self.names, self.mix)
        except ValueError as e:
            raise ConfigError(str(e)) from None


@dataclass
class DataConfig:
    source: str = "passkey"
    """`passkey` or `domains` (the embedded synthetic datasets), or a local jsonl/json/parquet/txt
    file, a folder of such files, or a folder written by datasets' save_to_disk."""
    eval_source: Optional[str] = None
    """Evaluation data in the same forms; null uses the passkey or domains eval split, or no eval data."""
    tokenizer: str = "byte"
    """`byte` (byte-level, no files needed) or a local Hugging Face tokenizer directory."""
    mode: str = "pretrain"
    """`pretrain` (loss on every token) or `sft` (loss on responses only)."""
    text_field: str = "text"
    """Field holding the document text in pretrain mode."""
    domain_field: Optional[str] = None
    """Field holding each record's domain name (text), carried to every token of the packed data;
    null means no domains, or `domain` when data.source or data.eval_source is `domains`."""
    seq_len: int = 1024
    """Tokens per packed training sequence."""
    micro_batch_size: int = 1
    """Sequences per rank per forward/backward."""
    global_batch_size: Optional[int] = None
    """Sequences per optimizer step over all ranks and accumulation steps; null means
    micro_batch_size * grad_accum * data-parallel degree. Fixing it makes runs with different
    layouts see the same tokens at every step."""
    overlong: str = "split"
    """What to do with documents longer than seq_len: `split` into seq_len pieces or `drop`."""
    add_bos: bool = True
    """Prepend the tokenizer's BOS token to each document (when it has one)."""
    add_eos: bool = True
    """Append the tokenizer's EOS token to each document (when it has one)."""
    cache_dir: Optional[str] = None
    """Cache for tokenised and packed data; null means ~/.cache/longtrain."""
    passkey: PasskeyConfig = field(default_factory=PasskeyConfig)
    """Settings of the embedded passkey dataset."""
    domains: DomainsConfig = field(default_factory=DomainsConfig)
    """Settings of the embedded mixed-domain dataset."""

    def __post_init__(self) -> None:
        require(self.seq_len >= 2, "data.seq_len", f"must be at least 2, got {self.seq_len}")
        require(self.micro_batch_size >= 1, "data.micro_batch_size",
                 f"must be at least 1, got {self.micro_batch_size}")
        require(self.global_batch_size is None or self.global_batch_size >= 1, "data.global_batch_size",
                 f"must be null or at least 1, got {self.global_batch_size}")
        require(self.mode in ("pretrain", "sft"), "data.mode", f"must be pretrain or sft, got {self.mode!r}")
        require(self.overlong in ("split", "drop"), "data.overlong",
                 f"must be split or drop, got {self.overlong!r}")
        pk = self.passkey
        require(0 < pk.min_chars <= pk.max_chars, "data.passkey.min_chars",
                 f"need 0 < min_chars <= max_chars, got {pk.min_chars} and {pk.max_chars}")
        require(pk.num_train >= 1 and pk.num_eval >= 0, "data.passkey.num_train",
                 "num_train must be >= 1 and num_eval >= 0")
        require(1 <= pk.digits <= 10, "data.passkey.digits",
                 f"must be in 1..10 (the digits of a key are distinct), got {pk.digits}")
        require(pk.key_order in ("random", "sorted"), "data.passkey.key_order",
                 f"must be random or sorted, got {pk.key_order!r}")
        require(pk.key_order == "random" or pk.digits <= 9, "data.passkey.digits",
                 f"a sorted key has at most 9 digits (1-9, no leading zero), got {pk.digits}")
        require(pk.length_power > 0, "data.passkey.length_power", f"must be positive, got {pk.length_power}")
        require(pk.depths >= 1, "data.passkey.depths", f"must be at least 1, got {pk.depths}")
        require(pk.grid_samples >= 1, "data.passkey.grid_samples", f"must be at least 1, got {pk.grid_samples}")
        require(all(isinstance(m, int) and m >= 1 for m in pk.grid_lengths), "data.passkey.grid_lengths",
                 f"must be whole multiples of data.seq_len (1, 2, 4, ...), got {list(pk.grid_lengths)}")
        used = {self.source, self.eval_source or self.source}  # a null eval_source means the source's eval split
        if "domains" in used:
            require(self.domain_field in (None, "domain"), "data.domain_field",
                     f"the domains source labels records in the field 'domain', got {self.domain_field!r}; "
                     "set data.domain_field=null")
            require(self.mode == "pretrain", "data.mode",
                     "the domains source is pretraining text; set data.mode=pretrain")
        require("passkey" not in used or (self.domain_field is None and "domains" not in used),
                 "data.source" if self.source == "passkey" else "data.eval_source",
                 "passkey records carry no domain, but domains are used (data.domain_field or the domains source); "
                 "use another source here, or set data.domain_field=null and use no domains source")

