"""The replay of one training step over memory.inventory: forward, loss, backward block by
block (with recomputation under checkpointing and FSDP's unshard / reduce-scatter), and the
optimizer step, as allocations and frees on a `Timeline`. See memory.inventory for the what.
"""

from __future__ import annotations

from stalwart.memory.inventory import (
    Step,
    Timeline,
    kept_in_forward,
    layer_params,
    linear_params,
    model_params,
    norm_saved,
    saved_items,
)


def _param_grad(tl: Timeline, s: Step, n: int, first: bool) -> None:
    """A weight gradient of n elements as AccumulateGrad sees it (fp32: the weights are fp32).

    Under autocast the matmul yields it in 16 bits and the cast's backward makes the fp32 copy.
    The first micro-batch's gradient is kept (stolen, no copy); later ones are added in place.
    ZeRO-2 reduce-scatters it at once and keeps this rank's 1/world share; FSDP keeps a unit's
    unsharded gradients until the unit's backward ends (`_reduce_scatter`)."""
    if s.amp:
        tl.alloc("temporaries", n * s.lp)
    keep = n * 4 if s.zero < 2 else n * 4 // s.world
    if _fsdp(s):
        tl.alloc("gradients", n * 4)
    elif first:
        tl.alloc("gradients", n * 4)
        tl.free("gradients", n * 4 - keep)
    else:
        tl.spike("temporaries", n * 4)
    if s.amp:
        tl.free("temporaries", n * s.lp)


def _fsdp(s: Step) -> bool:
    return s.zero == 3 and s.world > 1


def _gather(tl: Timeline, s: Step, elems: int, on: bool) -> None:
    """FSDP2 unshards a unit (16-bit under a mixed-precision policy): all-gather into one flat
    buffer, copy out into the parameters' own unsharded tensors, free the flat buffer; and
    frees those tensors again when the unit reshards."""
    if not _fsdp(s):
        return
    if on:
        tl.alloc("temporaries", elems * s.lp)  # all-gather output
        tl.alloc("fsdp_gathered", elems * s.lp)
        tl.free("temporaries", elems * s.lp)
    else:
        tl.free("fsdp_gathered", elems * s.lp)


def _reduce_scatter(tl: Timeline, s: Step, elems: int, first: bool) -> None:
    """FSDP2's post-backward: the unit's unsharded gradients are copied into one flat fp32
    reduce-scatter input and freed; this rank's 1/world comes out (added in on later
    micro-batches)."""
    if not _fsdp(s):
        return
    tl.alloc("temporaries", elems * 4)
    tl.free("gradients", elems * 4)
    tl.alloc("gradients", elems * 4 // s.world)
    if not first:
        tl.free("gradients", elems * 4 // s.world)
    tl.free("temporaries", elems * 4)


def _root_elems(s: Step) -> int:
    """FSDP's root unit: wte (= lm_head), wpe, ln_f (llama: embed_tokens, lm_head, norm);
    gathered for the whole step."""
    if s.arch == "llama":
        return s.V * s.C * (1 if s.tied else 2) + s.C
    return s.V * s.C + s.block_size * s.C + s.C * (2 if s.bias else 1)


def _forward(tl: Timeline, s: Step) -> None:
    N, C, lp = s.N, s.C, s.lp
    bp = sum(layer_params(s))
    tl.phase = "forward"
    tl.alloc("activations", _ids(s))  # position ids (gpt2); the targets' reshape copy
    tl.spike("temporaries", N * C * 4 + (s.T * C * 4 if s.arch != "llama" else 0))  # embeddings
    tl.alloc("activations", N * C * 4)  # their sum: the first block's input
    if s.p_drop > 0:
        tl.alloc("activations", N * C * s.mask)
    for kind in s.ckpt:
        _gather(tl, s, bp, True)
        if s.amp and s.zero < 3:
            tl.alloc("weight_copies", linear_params(s) * lp)  # autocast's cast cache
        inner = sum(b for _, b, k in saved_items(s) if k != "input")
        tl.alloc("activations", inner)
        tl.spike("temporaries", N * C * lp)  # a c_proj output before the residual add
        tl.alloc("activations", N * C * 4)  # the block's output
        tl.free("activations", inner - kept_in_forward(s, kind))
        _gather(tl, s, bp, False)
    tl.phase = "forward: loss"
    tl.alloc("activations", norm_saved(s))  # ln_f: mean, rstd, output (llama: see inventory)
    if s.amp and s.zero < 3:
        tl.alloc("weight_copies", s.V * C * lp)
    tl.alloc("logits", N * s.V * lp)
    if s.amp:
        tl.alloc("logits", N * s.V * 4)  # .float() before the loss
    tl.alloc("logits", N * s.V * 4)  # log_softmax's output, kept for backward
    tl.free("logits", N * s.V * (lp + (4 if s.amp else 0)))  # the logits are not kept
    # the autocast cache dies with the autocast region: only casts the graph saved stay
    if s.amp and s.zero < 3:
        tl.free("weight_copies", sum(k != "none" for k in s.ckpt) * linear_params(s) * lp)


def _head_backward(tl: Timeline, s: Step, first: bool) -> None:
    N, C, V, lp = s.N, s.C, s.V, s.lp
    tl.phase = "backward: loss"
    tl.alloc("logits", N * V * 4)  # d loss / d log_softmax (dense zeros, then the targets)
    tl.alloc("logits", N * V * 4)  # d loss / d logits
    tl.free("logits", 2 * N * V * 4)  # the first, and the saved log_softmax output
    if s.amp:
        tl.alloc("logits", N * V * lp)
        tl.free("logits", N * V * 4)
    tl.phase = "backward: lm_head"
    tl.alloc("temporaries", N * C * lp)
    _param_grad(tl, s, V * C, first)
    tl.free("logits", N * V * lp)
    if s.amp and s.zero < 3:
        tl.free("weight_copies", V * C * lp)
    _to_fp32(tl, s)
    _layernorm_backward(tl, s, first)
    tl.free("activations", N * C * 4)  # the last block's output, ln_f's input


def _to_fp32(tl: Timeline, s: Step) -> None:
    """Under autocast a gradient entering the fp32 residual stream is cast back up."""
    if s.amp:
        tl.alloc("temporaries", s.N * s.C * 4)
        tl.free("temporaries", s.N * s.C * s.lp)


def _layernorm_backward(tl: Timeline, s: Step, first: bool) -> None:
    """d input of a layer norm; then its input-gradient buffer and its saved tensors go."""
    N, C = s.N, s.C
    tl.alloc("temporaries", N * C * 4)
    for n in [C, C] if s.bias and s.arch != "llama" else [C]:
        _param_grad(tl, s, n, first)
    tl.free("temporaries", N * C * 4)  # (the incoming gradient of the LN's output)
    tl.free("activations", norm_saved(s))


def _linear_backward(tl: Timeline, s: Step, d_in: int, w: int, b: int, first: bool) -> None:
    """Allocate d input (d_in elements, 16-bit under autocast); the weight and bias grads."""
    tl.alloc("temporaries", d_in * s.lp)
    _param_grad(tl, s, w, first)
    if s.bias:
        _param_grad(tl, s, b, first)
    if s.amp and s.zero < 3:
        tl.free("weight_copies", (w + (b if s.bias else 0)) * s.lp)


def _recompute(tl: Timeline, s: Step, kind: str) -> None:
    """Checkpointed blocks rebuild what their forward dropped before their backward starts."""
    if kind == "none":
        return
    N, C, lp = s.N, s.C, s.lp
    inner = sum(b for _, b, k in saved_items(s) if k != "input")
    kept = kept_in_forward(s, kind)
    cproj = 2 * N * C * lp if kind == "selective" else 0
    if s.amp and s.zero < 3:
        tl.alloc("weight_copies", linear_params(s) * lp)
    tl.alloc("activations", inner - (kept - cproj))
    tl.spike("temporaries", N * C * lp)  # c_proj output (full) / the cached one's add
    # selective: the recomputed residual add consumes the cached attention c_proj output; the
    # MLP's is never asked for (recomputation stops at GELU) and waits for the block's end
    tl.free("activations", cproj // 2)


def _block_backward(tl: Timeline, s: Step, kind: str, first: bool) -> None:
    """The MLP branch, then the attention branch; the residual gradient (fp32) is held
    throughout, and each branch's layer-norm gradient is added into it in place."""
    if s.arch == "llama":
        return _llama_layer_backward(tl, s, kind, first)
    N, C, lp = s.N, s.C, s.lp
    item = {n: b for n, b, _ in saved_items(s)}
    _recompute(tl, s, kind)
    for branch in ("mlp", "attn"):
        if s.p_drop > 0:  # d (dropout input)
            tl.alloc("temporaries", N * C * 4)
            tl.free("activations", item["drop2" if branch == "mlp" else "drop1"])
        if s.amp:
            tl.alloc("temporaries", N * C * lp)  # cast down to the c_proj output's dtype
        grad_out = N * C * (4 * (s.p_drop > 0) + lp * s.amp)
        if branch == "mlp":
            _linear_backward(tl, s, 4 * N * C, 4 * C * C, C, first)  # c_proj: d GELU output
            tl.free("temporaries", grad_out)
            tl.free("activations", item["gelu"])
            tl.alloc("temporaries", 4 * N * C * lp)  # d c_fc output
            tl.free("temporaries", 4 * N * C * lp)
            tl.free("activations", item["fc"])
            _linear_backward(tl, s, N * C, 4 * C * C, 4 * C, first)  # c_fc: d ln_2 output
            tl.free("temporaries", 4 * N * C * lp)
        else:
            _linear_backward(tl, s, N * C, C * C, C, first)  # c_proj: d attention output
            tl.free("temporaries", grad_out)
            _attention_backward(tl, s, item)
            _linear_backward(tl, s, N * C, 3 * C * C, 3 * C, first)  # c_attn: d ln_1 output
            tl.free("temporaries", 3 * N * C * lp)
        _to_fp32(tl, s)
        _layernorm_backward(tl, s, first)
        tl.free("activations", item["x_mid"] if branch == "mlp" else item["x_in"])
        tl.free("temporaries", N * C * 4)  # added into the residual gradient in place
    if kind == "selective":
        tl.free("activations", N * C * lp)


def _attention_backward(tl: Timeline, s: Step, item: dict[str, int]) -> None:
    N, C, lp = s.N, s.C, s.lp
    tl.alloc("temporaries", 3 * N * C * lp)  # d q, d k, d v
    tl.free("temporaries", N * C * lp)  # d attention output
    if s.math_attention:
        att = s.B * s.h * s.T * s.T
        tl.spike("temporaries", 2 * att * 4)  # d probabilities, d scores
        tl.free("activations", item["qkv_copies"] + item["att_probs"] + item["att_mask"])
    else:
        tl.free("activations", item["qkv"])
    tl.free("activations", item["att_out"])
    tl.alloc("temporaries", 3 * N * C * lp)  # the split's backward: one d qkv
    tl.free("temporaries", 3 * N * C * lp)


def _embedding_backward(tl: Timeline, s: Step, first: bool) -> None:
    N, C = s.N, s.C
    tl.phase = "backward: embeddings"
    if s.p_drop > 0:
        tl.alloc("temporaries", N * C * 4)
        tl.free("activations", N * C * s.mask)
        tl.free("temporaries", N * C * 4)
    if s.arch != "llama":
        tl.alloc("temporaries", s.T * C * 4)  # d position embeddings, summed over the batch
        _param_grad(tl, s, s.block_size * C, first)
        tl.free("temporaries", s.T * C * 4)
    if s.tied:
        tl.spike("temporaries", s.V * C * 4)  # dense d wte, added into the lm_head's gradient
    else:
        _param_grad(tl, s, s.V * C, first)  # an untied embedding: a gradient of its own
    tl.free("activations", _ids(s))
    tl.free("temporaries", N * C * 4)  # the residual gradient


def _ids(s: Step) -> int:
    """Position ids (gpt2; llama has none: RoPE's tables are buffers) and the targets' copy."""
    return (s.T * 8 if s.arch != "llama" else 0) + s.N * 8


def _llama_layer_backward(tl: Timeline, s: Step, kind: str, first: bool) -> None:
    """A llama layer's backward: SwiGLU, then attention (RoPE, GQA's sums), each followed by
    its RMSNorm, like GPT-2's block (the residual gradient held throughout)."""
    N, C, lp, F = s.N, s.C, s.lp, s.ffn
    item = {n: b for n, b, _ in saved_items(s)}
    _recompute(tl, s, kind)
    if s.amp:
        tl.alloc("temporaries", N * C * lp)  # the residual gradient cast down
    _linear_backward(tl, s, N * F, F * C, 0, first)  # down_proj: d (silu(gate) * up)
    tl.free("temporaries", N * C * lp * s.amp)
    tl.alloc("temporaries", 2 * N * F * lp)  # d silu(gate), d up
    tl.free("temporaries", N * F * lp)
    tl.free("activations", item["silu_prod"])
    tl.spike("temporaries", N * F * lp)  # d gate (SiLU's backward), then gate_proj's
    tl.free("activations", item["gate_up"])
    for _ in range(2):  # up_proj, gate_proj: d input into one buffer
        _linear_backward(tl, s, N * C, C * F, 0, first)
    tl.free("temporaries", 2 * N * C * lp + 2 * N * F * lp)
    tl.alloc("temporaries", N * C * lp)
    _to_fp32(tl, s)
    _layernorm_backward(tl, s, first)
    tl.free("activations", item["x_mid"])
    tl.free("temporaries", N * C * 4)
    if s.amp:
        tl.alloc("temporaries", N * C * lp)
    _linear_backward(tl, s, N * C, C * C, 0, first)  # o_proj: d attention output
    tl.free("temporaries", N * C * lp * s.amp)
    tl.alloc("temporaries", 3 * N * C * lp)  # d q, d k, d v (full width)
    tl.free("temporaries", N * C * lp)
    tl.free("activations", item["qkv"] + item["att_out"])
    kv = s.kv * N * lp
    tl.spike("temporaries", 2 * kv + N * C * lp)  # GQA's sums, RoPE's backward
    for w in (C * C, C * s.kv, C * s.kv):  # q, k, v projections: d input summed
        _linear_backward(tl, s, N * C, w, 0, first)
    tl.free("temporaries", 3 * N * C * lp + 2 * N * C * lp)
    _to_fp32(tl, s)
    _layernorm_backward(tl, s, first)
    tl.free("activations", item["x_in"])
    tl.free("temporaries", N * C * 4)
    if kind == "selective":
        tl.free("activations", N * C * lp)


def replay(s: Step) -> Timeline:
    """One optimizer step at steady state (the optimizer state already exists)."""
    tl = Timeline()
    P = model_params(s)
    shard = s.world if s.zero == 3 else 1
    tl.alloc("weights", P * 4 // shard)
    tl.alloc("optimizer", s.opt_state_bytes // (s.world if s.zero >= 1 else 1))
    if s.world > 1 and s.zero <= 1:
        tl.alloc("ddp_buckets", P * 4)
    tl.alloc("batch", s.grad_accum * s.B * (s.T + 1) * 8)
    for micro in range(min(s.grad_accum, 2)):  # later micro-batches repeat the second
        first = micro == 0
        _gather(tl, s, _root_elems(s), True)
        _forward(tl, s)
        _head_backward(tl, s, first)
        bp = sum(layer_params(s))
        _gather(tl, s, bp, True)  # FSDP: the last block, unsharded again for its backward
        for i in reversed(range(s.L)):
            tl.phase = f"backward: block {i}"
            if i > 0:
                _gather(tl, s, bp, True)  # FSDP2 prefetches the next unit's all-gather
            _block_backward(tl, s, s.ckpt[i], first)
            _reduce_scatter(tl, s, bp, first)
            _gather(tl, s, bp, False)
        _embedding_backward(tl, s, first)
        _reduce_scatter(tl, s, _root_elems(s), first)  # the root unit's post-backward
        _gather(tl, s, _root_elems(s), False)
    tl.phase = "optimizer step"
    tl.spike("temporaries", 0)
    return tl
