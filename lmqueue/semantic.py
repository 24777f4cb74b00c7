"""The semantic cache's rules, readable without torch: what text is embedded, which cached
prompts are comparable (the scope), and the guards a near neighbour must pass.

Embeddings alone do not tell "Is X safe?" from "Is X not safe?": with MiniLM they score 0.99,
above most paraphrases (bench/RESULTS.md). So a neighbour above the model's threshold is only
used when both prompts carry the same numbers, the same negations (including un-/in-/non-
prefixed words) and the same capitalised names. The vector search itself is in the embedding
worker (worker/semantic.py); the API only decides whether a request takes this path.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from lmqueue.registry import ModelSpec
from lmqueue.revision import model_revision
from lmqueue.schemas import CHAT, COMPLETIONS

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*")
_NEGATIONS = {
    "not", "no", "never", "none", "nobody", "nothing", "neither", "nor", "cannot", "without",
}  # fmt: skip
_NEG_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non")


def enabled(spec: ModelSpec, endpoint: str) -> bool:
    return bool(spec.semantic_cache) and endpoint in (COMPLETIONS, CHAT)


def prompt_text(endpoint: str, body: dict[str, Any]) -> str:
    """The text compared: the prompt, or a chat's last message."""
    if endpoint == CHAT:
        return str(body["messages"][-1]["content"])
    prompt = body["prompt"]
    return str(prompt[0] if isinstance(prompt, list) else prompt)


def scope(owner: str, spec: ModelSpec, endpoint: str, canonical_body: dict[str, Any]) -> str:
    """Everything but the compared text must match exactly: tenant, model revision, endpoint,
    every parameter, and a chat's earlier messages."""
    rest = dict(canonical_body)
    if endpoint == CHAT:
        rest["messages"] = [*rest["messages"][:-1], {**rest["messages"][-1], "content": None}]
    else:
        rest["prompt"] = None
    text = json.dumps([owner, spec.name, model_revision(spec), endpoint, rest], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _words(text: str) -> list[str]:
    return [w.lower().removesuffix("'s") for w in _WORD.findall(text.replace("n't", " not"))]


def _names(text: str) -> set[str]:
    """Capitalised words that do not start a sentence: names, places, products."""
    out = set()
    for sentence in re.split(r"[.!?]\s+", text):
        words = _WORD.findall(sentence)
        out |= {w.removesuffix("'s") for w in words[1:] if w[0].isupper() and w != "I"}
    return out


def _negated(words: list[str], others: set[str]) -> bool:
    """A word that is another prompt's word with a negating prefix (unsafe / safe)."""
    return any(w.startswith(p) and w[len(p) :] in others for w in words for p in _NEG_PREFIXES)


def guards_pass(a: str, b: str) -> bool:
    """Same numbers, same negations, same names: the differences embeddings blur."""
    if _NUMBER.findall(a) != _NUMBER.findall(b):
        return False
    wa, wb = _words(a), _words(b)
    if {w for w in wa if w in _NEGATIONS} != {w for w in wb if w in _NEGATIONS}:
        return False
    if _negated(wa, set(wb)) or _negated(wb, set(wa)):
        return False
    return _names(a) == _names(b)
