"""Multiple-choice scoring, as lm-evaluation-harness's Hugging Face model does it (lm_eval 0.4.13).

For each choice, the request is (context, delimiter + choice). Tokenization (`encode_pair`, lm-eval's
`_encode_pair` for causal models): trailing whitespace of the context moves to the
continuation, the whole string is encoded, and the continuation's tokens are what follows the
context's own encoding. The input is (context + continuation)[-(block_size + 1):][:-1]: a context
too long for the window is truncated from the left. The score of a choice is the summed
log-probability of its tokens (float32, as lm-eval sums them);
`acc` takes the argmax of the scores, `acc_norm` the argmax of score / len(choice) in characters
(lm-eval's `acc_norm`: the choice text without the delimiter).

Examples are scored in fixed chunks, in file order; rank r of W takes chunks r, r+W, ... Which
process scores a chunk changes nothing (the same padded batch either way), so a sharded run
gives the same per-example results as one process.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from stalwart.errors import UserError
from stalwart.eval.tasks import Example

CHUNK_EXAMPLES = 8  # examples per chunk (the unit of sharding)
LOGIT_BUDGET = 1 << 26  # logits (rows x positions x vocab) held by one forward: 256 MB in fp32


@dataclass
class Scored:
    index: int  # position in the file (0-based)
    lls: list[float]  # summed log-probability of each choice
    pred: int  # argmax lls
    pred_norm: int  # argmax lls / len(choice)
    label: int

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "label": self.label,
            "pred": self.pred,
            "pred_norm": self.pred_norm,
            "acc": float(self.pred == self.label),
            "acc_norm": float(self.pred_norm == self.label),
            "lls": self.lls,
        }


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's request encoding: (context ids, continuation ids)."""
    if context == "":  # lm-eval conditions on the end-of-text token instead
        cont = tok.encode(continuation)
        if tok.eot_id is None:
            raise UserError("an empty context needs an end-of-text token; this tokenizer has none")
        return ([tok.eot_id], cont) if cont[0] != tok.eot_id else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tok.encode(context + continuation)
    ctx = tok.encode(context)
    return ctx, whole[len(ctx) :]


def _argmax(xs) -> int:
    """First index of the maximum (numpy's argmax, which lm-eval uses, breaks ties the same)."""
    best = 0
    for i, x in enumerate(xs):
        if x > xs[best]:
            best = i
    return best


def fit(ctx: list[int], cont: list[int], block_size: int) -> tuple[list[int], list[int]]:
    """A continuation longer than the window keeps its last block_size tokens (the rest joins
    the context). lm-eval asserts instead; with a short window (a byte-level model) we score
    what can be scored rather than stop a run."""
    if not cont:
        raise UserError("a choice encodes to no tokens")
    cut = max(0, len(cont) - block_size)
    return ctx + cont[:cut], cont[cut:]


def _window(ctx: list[int], cont: list[int], block_size: int) -> list[int]:
    return (ctx + cont)[-(block_size + 1) :][:-1]


@torch.no_grad()
def score_requests(model, rows, block_size: int, device, autocast) -> list[float]:
    """Summed log-probability of each (context ids, continuation ids) row."""
    inps = [_window(c, k, block_size) for c, k in rows]
    vocab = model.lm_head.weight.shape[0]  # GPT and Llama alike (the global shape under FSDP)
    per_forward = max(1, LOGIT_BUDGET // (max(len(i) for i in inps) * vocab))
    out: list[float] = []
    for start in range(0, len(rows), per_forward):
        part = range(start, min(start + per_forward, len(rows)))
        width = max(len(inps[i]) for i in part)
        x = torch.zeros((len(part), width), dtype=torch.long)
        for j, i in enumerate(part):  # right padding: a causal model never looks ahead
            x[j, : len(inps[i])] = torch.tensor(inps[i])
        with autocast():
            logits = model(x.to(device))[0]
        sums = []
        for j, i in enumerate(part):
            cont, n = rows[i][1], len(inps[i])
            lp = F.log_softmax(logits[j, n - len(cont) : n].float(), dim=-1)
            picked = lp.gather(1, torch.tensor(cont, device=lp.device).unsqueeze(1))
            sums.append(picked.sum())
        out += torch.stack(sums).tolist()  # host sync: once per forward, an evaluation
    return out


def score_chunk(model, tok, examples: list[Example], first: int, block_size: int, device, autocast):
    """Every choice of every example of one chunk, in one padded batch (or a few)."""
    rows, spans = [], []
    for ex in examples:
        spans.append((len(rows), len(ex.choices)))
        pairs = [encode_pair(tok, ex.context, ex.delimiter + c) for c in ex.choices]
        rows += [fit(c, k, block_size) for c, k in pairs]
    lls = score_requests(model, rows, block_size, device, autocast)
    out = []
    for k, (ex, (s, n)) in enumerate(zip(examples, spans)):
        ll = lls[s : s + n]
        norm = [v / float(len(c)) for v, c in zip(ll, ex.choices)]
        out.append(Scored(first + k, ll, _argmax(ll), _argmax(norm), ex.label))
    return out


def my_chunks(n_examples: int, rank: int = 0, world: int = 1) -> list[range]:
    """The chunks (example index ranges) that rank `rank` of `world` scores."""
    starts = range(0, n_examples, CHUNK_EXAMPLES)
    return [range(s, min(s + CHUNK_EXAMPLES, n_examples)) for s in starts][rank::world]


def n_rounds(n_examples: int, world: int) -> int:
    """Chunks per rank, rounded up: every rank runs this many forwards (FSDP needs equal)."""
    chunks = -(-n_examples // CHUNK_EXAMPLES)
    return -(-chunks // world)


def score_examples(
    model, tok, examples, block_size: int, device="cpu", autocast=None, rank=0, world=1
) -> list[Scored]:
    """This rank's share of the examples, scored (all of them for one process)."""
    autocast = autocast or _no_autocast
    out: list[Scored] = []
    for r in my_chunks(len(examples), rank, world):
        out += score_chunk(model, tok, examples[r.start : r.stop], r.start, block_size, device,
                           autocast)  # fmt: skip
    return out


def summarize(scored: list[Scored]) -> dict:
    n = len(scored)
    return {
        "n": n,
        "acc": sum(s.pred == s.label for s in scored) / max(n, 1),
        "acc_norm": sum(s.pred_norm == s.label for s in scored) / max(n, 1),
    }


class _NoAutocast:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _no_autocast():
    return _NoAutocast()
