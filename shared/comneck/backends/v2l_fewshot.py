"""V2L-Tokenizer's few-shot classification (zh460045050/V2L-Tokenizer @ 80e50ac3), the LLM-free parts.

An image becomes *words*: its pooled CLIP embedding, L2-normalised, picks the ``k`` nearest
rows of V2L's global codebook (squared distance), and their vocabulary strings are joined
without a separator. A few-shot prompt interleaves such words for the support images with
their labels, then the query's (``eval_understanding.py`` ``MiniImageNetDataset``), and the
LLM decodes 16 steps greedily under a per-position union mask of the class names' tokens
(``llama_inference/llama/generation.py`` ``generate_fewshot``); the answer is the class whose
name the decoded text starts with (the official scorer's prefix match). The official episode
also shows the query itself, labelled, as the last example before asking for it (the evaluation
knows its label); a served query's label is unknown, so the prompt here is the official one
without that labelled repeat of the query.

Here: the codebook files, the words, the prompt's token ids, the mask and the masked greedy
decoding, over any transformers causal LM; the backend around them loads LLaMA-2.
"""

from __future__ import annotations

import copy
import inspect
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib import format as npy_format
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..importers.reading import load_torch_file, read_weights
from .sp_tokenizer import SentencePieceTokenizer

#: The decoding length of ``generate_fewshot`` (``max_gen_len=16``) and so the mask's rows.
STEPS = 16
#: Words per image: ``--token_num`` of the Bridging configuration (RunEval.sh also uses 5).
DEFAULT_WORDS = 21
UNK = 0  # what argmax over an all-zero masked row gives (LLaMA's <unk>)
#: Where ``v2l-decode.pth`` keeps the global codebook (``VQModel_LLaMA.tok_embeddings_global``).
CHECKPOINT_CODEBOOK = "tok_embeddings_global.weight"
#: The globals an object array's pickle names (``ndarray.__reduce__``: NumPy 1's and 2's module
#: names for ``_reconstruct``), each mapped to the object itself; nothing else may be unpickled.
_RECONSTRUCT = np.ndarray((0,)).__reduce__()[0]
_ARRAY_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}
_NPY_HEADERS = {(1, 0): npy_format.read_array_header_1_0, (2, 0): npy_format.read_array_header_2_0}


def _bad(path: Path, why: str) -> ComneckInputError:
    return ComneckInputError(f"V2L codebook: {path}: {why}", ErrorCode.BAD_WEIGHTS)


class _ArrayUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays of builtin objects and imports nothing else, so a
    pickle naming any other callable (``os.system``, ...) is refused before anything runs."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ARRAY_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"it names {module}.{name}, which is no part of a NumPy array") from None


def read_vocabulary(path: Path) -> tuple[str, ...]:
    """``global_vocabulary.npy``: N strings, stored as NumPy's unicode array (``np.save`` of a list
    of str) or as an object array of str (the official reader passes ``allow_pickle=True``), whose
    pickle after the .npy header is read by :class:`_ArrayUnpickler`. Anything else is refused."""
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version not in _NPY_HEADERS:
                raise ValueError(f".npy format version {version}, not 1.0 or 2.0")
            shape, _, dtype = _NPY_HEADERS[version](f)
            if dtype.kind == "U":
                f.seek(0)
                array = np.load(f, allow_pickle=False)
            else:
                array = _ArrayUnpickler(f).load() if dtype == np.dtype(object) else None
    except OSError as exc:
        raise _bad(path, f"not a readable .npy file ({exc})") from None
    except Exception as exc:  # whatever a malformed header or pickle provokes is refused alike
        reason = (str(exc).splitlines() or [""])[0]
        raise _bad(path, f"refused: not a .npy array of strings ({type(exc).__name__}: {reason})") from None
    if array is None:
        raise _bad(path, f"holds a {dtype} array; expected strings (a unicode array, or an object array of str)")
    if not isinstance(array, np.ndarray) or array.ndim != 1 or array.shape != shape:
        raise _bad(path, f"holds no 1-D array of the header's shape {list(shape)}; expected a list of strings")
    strange = [w for w in array.tolist() if not isinstance(w, str)]
    if strange:
        raise _bad(path, f"holds {type(strange[0]).__name__} {strange[0]!r} among the words; expected strings only")
    return tuple(array.tolist())


def checkpoint_codebook(path: Path, shape: tuple[int, int]) -> torch.Tensor | None:
    """The global codebook ``v2l-decode.pth`` holds (``tok_embeddings_global.weight``), which the
    official loader lets replace the codebook file's rows (``load_state_dict(strict=False)``), or
    None when it holds none. The state dict is under ``model`` when the file's name holds "last",
    else under ``state_dict``, as the official loader picks; ``shape`` is the one it must have."""
    stored = load_torch_file(path, "V2L checkpoint", mmap=True)
    section = "model" if "last" in path.name else "state_dict"
    state = stored.get(section) if isinstance(stored, dict) else None
    if not isinstance(state, dict):
        raise _bad(path, f"holds no {section!r} dict (the official loader reads the state dict from there)")
    rows = state.get(CHECKPOINT_CODEBOOK)
    if rows is None:
        return None
    if not isinstance(rows, torch.Tensor) or not rows.is_floating_point() or tuple(rows.shape) != shape:
        found = list(rows.shape) if isinstance(rows, torch.Tensor) else type(rows).__name__
        raise _bad(path, f"{CHECKPOINT_CODEBOOK} is {found}; expected a float tensor of shape {list(shape)} "
                         "(one row per vocabulary word, CLIP's embedding width)")
    return rows.float().clone()  # off the mapped file


@dataclass(frozen=True)
class Codebook:
    """V2L's global codebook: embedding rows [N, D] and the vocabulary string of each row."""

    embeddings: torch.Tensor
    words: tuple[str, ...]

    @classmethod
    def load(cls, embedding_file: str | Path, vocabulary_file: str | Path) -> "Codebook":
        """``global_codebook_embedding.pth`` (a saved tensor [N, D], or a one-tensor state dict) and
        ``global_vocabulary.npy`` (N strings, :func:`read_vocabulary`)."""
        embedding_file, vocabulary_file = Path(embedding_file), Path(vocabulary_file)
        stored = read_weights(embedding_file, "V2L codebook")
        if isinstance(stored, dict) and len(stored) == 1:
            stored = next(iter(stored.values()))
        if not isinstance(stored, torch.Tensor) or stored.ndim != 2 or not stored.is_floating_point():
            raise _bad(embedding_file, "holds no [N, D] float tensor")
        vocabulary = read_vocabulary(vocabulary_file)
        if len(vocabulary) != stored.shape[0]:
            raise _bad(vocabulary_file, f"{len(vocabulary)} words for {stored.shape[0]} codebook rows")
        return cls(stored.float(), vocabulary)

    def with_checkpoint(self, checkpoint: str | Path) -> "Codebook":
        """This codebook with its rows replaced by those ``v2l-decode.pth`` holds, as the official
        load does (:func:`checkpoint_codebook`; they must have this codebook's shape); unchanged
        when the checkpoint holds none."""
        rows = checkpoint_codebook(Path(checkpoint), tuple(self.embeddings.shape))
        return self if rows is None else Codebook(rows, self.words)

    @property
    def width(self) -> int:
        return int(self.embeddings.shape[1])

    def nearest(self, embeddings: torch.Tensor, k: int) -> torch.Tensor:
        """The indices [B, k] of the ``k`` rows nearest to each L2-normalised embedding [B, D],
        nearest first, by ||g||² + ||e||² - 2 g·e as the official code ranks them (the rows are
        means of normalised vectors, not normalised themselves, so this is not cosine order)."""
        g = nn.functional.normalize(embeddings.float(), dim=-1)
        rows = self.embeddings.to(g.device)
        distance = (g**2).sum(-1, keepdim=True) + (rows**2).sum(-1) - 2 * g @ rows.T
        return distance.topk(k, dim=-1, largest=False).indices

    def describe(self, embeddings: torch.Tensor, k: int = DEFAULT_WORDS) -> list[str]:
        """Each image's words: its ``k`` nearest vocabulary strings joined without a separator."""
        return ["".join(self.words[i] for i in row) for row in self.nearest(embeddings, k).tolist()]


def classes_of(labels: Sequence[str]) -> list[str]:
    """The episode's classes as the official code lists them: ``np.unique`` (distinct, sorted by code point)."""
    return sorted(set(labels))


def instruction(classes: Sequence[str]) -> str:
    """``For each of the following input output pairs, output is one of ['a' or ['b']`` and a new
    line (the official string, its unbalanced brackets included)."""
    return "For each of the following input output pairs, output is one of " + " or ".join(f"['{c}'" for c in classes) + "]\n"


def prompt_ids(tokenizer: SentencePieceTokenizer, classes: Sequence[str], support: Sequence[tuple[str, str]], query: str) -> list[int]:
    """The few-shot prompt's ids: BOS and the instruction, then per support ``(words, label)``
    ``###\\nInput: < `` words `` >\\nOutput: `` label, then the query's words; every piece its
    own sentencepiece call, as the official dataset encodes them. The official episode differs in
    one place: before the unlabelled query it shows the query once more with its label, which a
    served request does not know; this is the official prompt without that one example."""
    ids = tokenizer.encode(instruction(classes), bos=True)
    opening, closing = tokenizer.encode("###\nInput: < ", bos=False), tokenizer.encode(" >\nOutput: ", bos=False)
    for words, label in support:
        ids += opening + tokenizer.encode(words, bos=False) + closing + tokenizer.encode(label, bos=False)
    return ids + opening + tokenizer.encode(query, bos=False) + closing


def class_tokens(tokenizer: SentencePieceTokenizer, label: str) -> list[int]:
    """A class name's ids as the mask sees them: its own sentencepiece call, then EOS."""
    return tokenizer.encode(label, bos=False) + [tokenizer.eos_token_id]


def class_mask(tokenizer: SentencePieceTokenizer, classes: Sequence[str], vocab_size: int) -> torch.Tensor:
    """The official [16, V] mask: row j allows token j of every class name (plus EOS). A name of
    more than 15 tokens does not fit and is refused (``bad_support``)."""
    mask = torch.zeros(STEPS, vocab_size, dtype=torch.bool)
    for label in classes:
        tokens = class_tokens(tokenizer, label)
        if len(tokens) > STEPS:
            raise ComneckInputError(f"the label {label!r} takes {len(tokens) - 1} tokens; V2L decodes {STEPS} (EOS included)",
                                    ErrorCode.BAD_SUPPORT)
        mask[torch.arange(len(tokens)), torch.tensor(tokens)] = True
    return mask


class PromptState:
    """The LLM having read the prompt once: its KV cache and the next token's logits. Masked
    decoding and the class scores both continue from it, each on its own copy of the cache (a
    transformers cache grows in place), so the prompt is encoded once per query, not 1 + C times."""

    @torch.inference_mode()
    def __init__(self, model: nn.Module, embeds: torch.Tensor) -> None:
        # transformers 5 renamed the cache argument and field (past_key_values -> cache); use this version's
        self._name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.model = model
        result = model(inputs_embeds=embeds[None], use_cache=True)
        self._cache, self.logits = getattr(result, self._name), result.logits[0, -1]

    def fork(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A continuation of the prompt: call it with embeddings [n, H] for their logits [n, V];
        successive calls extend the same continuation, never the prompt's own cache."""
        cache = copy.deepcopy(self._cache)

        def extend(embeds: torch.Tensor) -> torch.Tensor:
            return self.model(inputs_embeds=embeds[None], use_cache=True, **{self._name: cache}).logits[0]

        return extend


@torch.inference_mode()
def masked_greedy(state: PromptState, mask: torch.Tensor) -> list[int]:
    """16 greedy steps after the prompt: each step the most likely token among those its mask row
    allows (``argmax(softmax(logits) * mask)``; an empty row gives ``<unk>``, as argmax over zeros
    does). No early stop: the official loop sets ``eos_id = -1``."""
    table = state.model.get_input_embeddings()
    extend, logits, out = state.fork(), state.logits, []
    for step, row in enumerate(mask.to(logits.device)):
        token = int(logits.masked_fill(~row, float("-inf")).argmax()) if row.any() else UNK
        out.append(token)
        if step + 1 < len(mask):  # the last token's logits are never read
            logits = extend(table(torch.tensor([token], device=logits.device)))[-1]
    return out


def predicted_class(text: str, classes: Sequence[str]) -> str | None:
    """The class the decoded text names by the official scorer's prefix match; the longest such
    name when one is a prefix of another; None when none matches."""
    matches = [c for c in classes if text[: len(c)] == c]
    return max(matches, key=len) if matches else None


@torch.inference_mode()
def class_logprobs(state: PromptState, tokenizer: SentencePieceTokenizer, classes: Sequence[str]) -> dict[str, float]:
    """Each class's sequence log-probability after the prompt (its name's tokens and EOS, teacher
    forced, unmasked): a ranking of every class, not only the decoded one."""
    table = state.model.get_input_embeddings()
    scores = {}
    for label in classes:
        tokens = torch.tensor(class_tokens(tokenizer, label), device=state.logits.device)
        logits = torch.cat([state.logits[None], state.fork()(table(tokens[:-1]))]) if len(tokens) > 1 else state.logits[None]
        logp = torch.log_softmax(logits.float(), dim=-1)
        scores[label] = float(logp.gather(-1, tokens[:, None]).sum())
    return scores
