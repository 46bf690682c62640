"""V2L-Tokenizer's few-shot classification (zh460045050/V2L-Tokenizer @ 80e50ac3), the LLM-free parts.

An image becomes *words*: its pooled CLIP embedding, L2-normalised, picks the ``k`` nearest
rows of V2L's global codebook (squared distance), and their vocabulary strings are joined
without a separator. A few-shot prompt interleaves such words for the support images with
their labels, then the query's (``eval_understanding.py`` ``MiniImageNetDataset``), and the
LLM decodes 16 steps greedily under a per-position union mask of the class names' tokens
(``llama_inference/llama/generation.py`` ``generate_fewshot``); the answer is the class whose
name the decoded text starts with (the official scorer's prefix match).

Here: the codebook files, the words, the prompt's token ids, the mask and the masked greedy
decoding, over any transformers causal LM; the backend around them loads LLaMA-2.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ComneckInputError, ErrorCode
from ..importers.reading import read_weights
from .sp_tokenizer import SentencePieceTokenizer

#: The decoding length of ``generate_fewshot`` (``max_gen_len=16``) and so the mask's rows.
STEPS = 16
#: Words per image: ``--token_num`` of the Bridging configuration (RunEval.sh also uses 5).
DEFAULT_WORDS = 21
UNK = 0  # what argmax over an all-zero masked row gives (LLaMA's <unk>)


def _bad(path: Path, why: str) -> ComneckInputError:
    return ComneckInputError(f"V2L codebook: {path}: {why}", ErrorCode.BAD_WEIGHTS)


@dataclass(frozen=True)
class Codebook:
    """V2L's global codebook: embedding rows [N, D] and the vocabulary string of each row."""

    embeddings: torch.Tensor
    words: tuple[str, ...]

    @classmethod
    def load(cls, embedding_file: str | Path, vocabulary_file: str | Path) -> "Codebook":
        """``global_codebook_embedding.pth`` (a saved tensor [N, D], or a one-tensor state dict) and
        ``global_vocabulary.npy`` (N strings; numpy's own string array, read without unpickling)."""
        embedding_file, vocabulary_file = Path(embedding_file), Path(vocabulary_file)
        stored = read_weights(embedding_file, "V2L codebook")
        if isinstance(stored, dict) and len(stored) == 1:
            stored = next(iter(stored.values()))
        if not isinstance(stored, torch.Tensor) or stored.ndim != 2 or not stored.is_floating_point():
            raise _bad(embedding_file, "holds no [N, D] float tensor")
        try:
            vocabulary = np.load(vocabulary_file, allow_pickle=False)
        except ValueError:
            raise _bad(vocabulary_file, "a pickled object array; ComNeck reads only numpy string arrays (np.save of a list of str)") from None
        except OSError as exc:
            raise _bad(vocabulary_file, f"not a readable .npy file ({exc})") from None
        if vocabulary.ndim != 1 or vocabulary.dtype.kind != "U":
            raise _bad(vocabulary_file, f"holds a {vocabulary.dtype} array of shape {list(vocabulary.shape)}, not a list of strings")
        if len(vocabulary) != stored.shape[0]:
            raise _bad(vocabulary_file, f"{len(vocabulary)} words for {stored.shape[0]} codebook rows")
        return cls(stored.float(), tuple(str(w) for w in vocabulary))

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
    own sentencepiece call, as the official dataset encodes them."""
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
