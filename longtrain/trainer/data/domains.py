"""Synthetic mixed-domain corpus: documents from domains with clearly distinct byte statistics.

Used to see which experts of a Mixture-of-Experts model each domain is routed to. Every domain is
generated from fixed rules that a small model can learn, in plain ASCII (one byte per character
under the byte tokenizer):

- ``arithmetic``: lines ``a+b=c``, ``a-b=c``, ``a*b=c`` with correct results;
- ``code``: Python-like functions (keywords, identifiers, brackets, four-space indentation);
- ``dna``: 60-base lines of ``ACGT`` drawn from a fixed first-order Markov chain;
- ``prose``: sentences of English words drawn Zipf-like from a fixed list of a few hundred words.

Generation is deterministic in ``(seed, split)``, and the train and eval splits draw separate streams.
The domain names and the check of a mix live in ``longtrain.config.domains``, where the config
validates ``data.domains`` with them.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from longtrain.config.domains import DOMAIN_NAMES, domain_probabilities

_SPLITS = {"train": 0, "eval": 1}
_STREAM = 2  # keeps these streams apart from the passkey generator's, which seeds with (split, seed) alone

# Next-base probabilities in percent, rows: current base, columns: A C G T. Skewed so that the
# chain is far from uniform (about 1.6 bits per base) and the same in every document.
_DNA_BASES = "ACGT"
_DNA_PERCENT = ((10, 20, 60, 10), (30, 10, 10, 50), (20, 50, 10, 20), (60, 10, 20, 10))
_DNA_LINE = 60

# Common English words, roughly by frequency: word k is drawn with probability proportional to 1 / (k + 1).
_WORDS = """
the of and to in is it you that he was for on are with as his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two has
look more day could go come did number sound no most people my over know water than call first who may down
side been now find any new work part take get place made live where after back little only round man year
came show every good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air well also play
small end put home read hand port large spell add even land here must big high such follow act why ask men
change went light kind off need house picture try us again animal point mother world near build self earth
father head stand own page should country found answer school grow study still learn plant cover food sun
four between state keep eye never last let thought city tree cross farm hard start might story saw far sea
draw left late run while press close night real life few north
""".split()
_ZIPF_CDF = np.cumsum(1.0 / np.arange(1, len(_WORDS) + 1))
_ZIPF_CDF /= _ZIPF_CDF[-1]

_NAMES = ("x", "y", "n", "i", "j", "k", "total", "count", "items", "value", "result", "data", "index", "size",
          "left", "right", "node", "key", "acc", "buf")
_FUNCS = ("compute", "update", "merge", "parse", "load", "scan", "build", "check", "reduce", "split", "walk",
          "emit")


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _arithmetic(rng: np.random.Generator) -> Iterator[str]:
    """Lines ``a+b=c``, ``a-b=c`` (a >= b) with operands below 100, and ``a*b=c`` with b below 10."""
    while True:
        op = _pick(rng, "+-*")
        a, b = int(rng.integers(100)), int(rng.integers(10 if op == "*" else 100))
        if op == "-" and b > a:
            a, b = b, a
        yield f"{a}{op}{b}={a + b if op == '+' else a - b if op == '-' else a * b}"


def _dna(rng: np.random.Generator) -> Iterator[str]:
    """Lines of ``_DNA_LINE`` bases from the Markov chain ``_DNA_PERCENT``, the state carried across lines."""
    # next_base[state][u] for a uniform percentile u: the chain's step as a table lookup
    next_base = [[b for b, pct in enumerate(row) for _ in range(pct)] for row in _DNA_PERCENT]
    state = int(rng.integers(4))
    while True:
        line = []
        for u in rng.integers(100, size=_DNA_LINE).tolist():
            state = next_base[state][u]
            line.append(_DNA_BASES[state])
        yield "".join(line)


def _prose(rng: np.random.Generator) -> Iterator[str]:
    """Sentences of 4 to 14 Zipf-drawn words, capitalised, sometimes with a comma, ending with a full stop."""
    while True:
        draws = np.searchsorted(_ZIPF_CDF, rng.random(int(rng.integers(4, 15))), side="right")
        words = [_WORDS[k] for k in draws.tolist()]
        if len(words) > 6 and rng.random() < 0.5:
            words[int(rng.integers(2, len(words) - 2))] += ","
        yield " ".join([words[0].capitalize()] + words[1:]) + "."


def _code(rng: np.random.Generator) -> Iterator[str]:
    """Lines of Python-like functions: 2 to 5 statements (``if``/``for`` blocks nest once), a return, a blank line."""

    def expr() -> str:
        kind = int(rng.integers(5))
        if kind == 0:
            return str(int(rng.integers(10)))
        if kind == 1:
            return f"{_pick(rng, _NAMES)} + {int(rng.integers(1, 10))}"
        if kind == 2:
            return f"len({_pick(rng, _NAMES)})"
        if kind == 3:
            return f"{_pick(rng, _NAMES)} * {_pick(rng, _NAMES)}"
        return _pick(rng, _NAMES)

    def cond() -> str:
        name = _pick(rng, _NAMES)
        return _pick(rng, (f"{name} > {int(rng.integers(10))}", f"{name} == {int(rng.integers(10))}",
                           f"{name} % 2 == 0", f"{name} in {_pick(rng, _NAMES)}", f"not {name}"))

    def statements(depth: int) -> List[str]:
        pad = "    " * depth
        lines = []
        for _ in range(int(rng.integers(2, 6)) if depth == 1 else int(rng.integers(1, 3))):
            kind = int(rng.integers(6 if depth == 1 else 4))
            name = _pick(rng, _NAMES)
            if kind == 0:
                lines.append(f"{pad}{name} = {expr()}")
            elif kind == 1:
                lines.append(f"{pad}{name} += {expr()}")
            elif kind == 2:
                lines.append(f"{pad}{name}.append({expr()})")
            elif kind == 3:
                lines.append(f"{pad}{name} = [{expr()}, {expr()}]")
            elif kind == 4:
                lines += [f"{pad}if {cond()}:"] + statements(depth + 1)
            else:
                lines += [f"{pad}for {name} in range({expr()}):"] + statements(depth + 1)
        return lines

    while True:
        args = ", ".join(_pick(rng, _NAMES) for _ in range(int(rng.integers(1, 4))))
        yield f"def {_pick(rng, _FUNCS)}_{_pick(rng, _NAMES)}({args}):"
        yield from statements(1)
        yield f"    return {expr()}"
        yield ""


# name -> (endless generator of lines, or sentences, and the separator joining them)
_DOMAINS: Dict[str, Tuple[Callable[[np.random.Generator], Iterator[str]], str]] = {
    "arithmetic": (_arithmetic, "\n"), "code": (_code, "\n"), "dna": (_dna, "\n"), "prose": (_prose, " ")}
assert tuple(sorted(_DOMAINS)) == DOMAIN_NAMES, "every domain has a generator and a name in longtrain.config.domains"


def domain_records(num: int, seed: int, min_chars: int, max_chars: int, names: Sequence[str] = DOMAIN_NAMES,
                   mix: Optional[Sequence[float]] = None, split: str = "train") -> List[Dict[str, str]]:
    """Generate ``num`` documents, each from one domain drawn with the probabilities of ``mix``.

    Args:
        num: number of documents.
        seed: base seed; each split draws from its own stream, so train and eval never coincide.
        min_chars, max_chars: range of the document length in characters (rounded up to a whole
            line, or a sentence for ``prose``).
        names: domains to draw from (see ``DOMAIN_NAMES``).
        mix: one weight per name (null: uniform).
        split: ``"train"`` or ``"eval"``.

    Returns:
        Dicts with ``text`` (the document) and ``domain`` (its domain's name).

    Raises:
        ValueError: see :func:`domain_probabilities`.
    """
    probs = domain_probabilities(names, mix)
    rng = np.random.default_rng([_SPLITS[split], abs(int(seed)), _STREAM])
    records = []
    for _ in range(num):
        name = names[int(rng.choice(len(names), p=probs))]
        target = int(rng.integers(min_chars, max_chars + 1))
        make, sep = _DOMAINS[name]
        units, parts, length = make(rng), [], -len(sep)
        while length < target:
            parts.append(next(units))
            length += len(parts[-1]) + len(sep)
        records.append({"text": sep.join(parts), "domain": name})
    return records
