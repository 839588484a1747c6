"""pma-train's HybridModel in Hugging Face transformers' terms: which class, its config, and where
every output tensor comes from in the checkpoint.

What the trainer builds (pma_train/model/build.py, spec.py) and how it maps:
- The layer pattern pairs an attention layer '*' with an MLP layer '-' (dense) or 'E' (MoE): one
  pair = one HF decoder layer (pre-norm attention, pre-norm MLP, residuals). Other patterns (an
  attention layer without its MLP, Mamba layers, ...) have no HF decoder-layer equivalent.
- RMSNorm (torch's), SwiGLU MLPs with fc1 = [gate; up], no biases unless add_bias_linear, RoPE on
  the whole head (rotary_percent 1, rotate-half / non-interleaved), no qk-norm, GQA with the fused
  qkv weight laid out per query group: [q heads of the group; k; v] for group 0, 1, ...
- Vocabulary padded to make_vocab_size_divisible_by: the padding rows are dropped (config.json
  holds the real vocabulary), or kept with keep_padded_vocab=true.
- MoE (megatron-core defaults, which pma-train does not change): softmax router, top-k on the
  logits then softmax over the k (= softmax over all experts, renormalised over the top k), no
  expert bias / score correction, no capacity (no dropped tokens), shared expert added ungated.

Targets:
- llama  (LlamaForCausalLM): dense models.
- mixtral (MixtralForCausalLM): every MLP layer MoE, no shared expert. Its router (softmax over
  all experts, top-k, renormalise) is megatron's exactly.
- ernie4_5_moe (Ernie4_5_MoeForCausalLM): MoE with a shared expert (added ungated, as in
  megatron) and/or leading dense blocks (the paper's presets). Same router semantics. Its RoPE is
  interleaved: q and k rows are permuted within each head (exact: attention scores are unchanged).
  Qwen2-MoE gates its shared expert with a sigmoid and Qwen3-MoE / OLMoE / dots1 normalise q and k,
  DeepSeek-V2/V3 use MLA: none of them computes what megatron computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pma_train.config import ModelConfig
from pma_train.export.source import Piece
from pma_train.merge.dcp_io import CheckpointIndex

TARGETS = ("auto", "llama", "mixtral", "ernie4_5_moe")
HF_CLASSES = {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM", "ernie4_5_moe": "Ernie4_5_MoeForCausalLM"}


class ExportError(ValueError):
    """A checkpoint / model / request that cannot be exported as asked; the message says why."""


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    # As pma_train.model.padded_vocab_size (not imported: that module imports megatron-core).
    return -(-vocab_size // multiple) * multiple


@dataclass
class Arch:
    """The numbers of the model the checkpoint holds, from its model config."""

    model: ModelConfig
    vocab: int  # rows written (the real vocabulary, or the padded one with keep_padded_vocab)
    padded_vocab: int  # rows in the checkpoint
    mlp_kinds: list[str]  # one per HF layer: "dense" | "moe"
    hidden: int
    heads: int
    groups: int
    head_dim: int
    ffn: int
    experts: int = 0
    topk: int = 0
    moe_ffn: int = 0
    shared: int = 0
    bias: bool = False

    @property
    def layers(self) -> int:
        return len(self.mlp_kinds)

    @property
    def is_moe(self) -> bool:
        return "moe" in self.mlp_kinds


def describe(model: ModelConfig, vocab_size: int, keep_padded_vocab: bool = False) -> Arch:
    """Check the model uses only what an HF decoder computes; raise ExportError naming what does not."""
    m = model
    problems = []
    if m.normalization != "RMSNorm":
        problems.append(f"model.normalization={m.normalization} (the HF targets use RMSNorm)")
    if m.activation != "swiglu":
        problems.append(f"model.activation={m.activation} (the HF targets use SwiGLU MLPs)")
    if m.position_embedding_type != "rope":
        problems.append(f"model.position_embedding_type={m.position_embedding_type} (the HF targets use RoPE)")
    if m.num_experts and m.moe_capacity_factor is not None:
        problems.append(f"model.moe_capacity_factor={m.moe_capacity_factor} (megatron drops tokens over capacity, "
                        "no HF MoE class does)")
    if m.num_experts and m.moe_router_load_balancing_type == "sinkhorn":
        problems.append("model.moe_router_load_balancing_type=sinkhorn (routes differently from a softmax "
                        "top-k router)")
    if m.num_experts and m.add_bias_linear:
        problems.append("model.add_bias_linear=true with MoE (no HF MoE class has biased experts)")
    pattern = m.pattern().replace("|", "")
    pairs = [pattern[i:i + 2] for i in range(0, len(pattern), 2)]
    if len(pattern) % 2 or any(p not in ("*-", "*E") for p in pairs):
        problems.append(f"layer pattern '{pattern}': HF decoder layers are attention + MLP pairs ('*-' or '*E')")
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    head_dim = m.kv_channels or m.hidden_size // heads
    if heads % groups or head_dim % 2:
        problems.append(f"{heads} heads in {groups} query groups of head size {head_dim} (groups must divide the "
                        "heads, RoPE needs an even head size)")
    if problems:
        raise ExportError("cannot be expressed by a transformers model: " + "; ".join(problems))
    padded = padded_vocab_size(vocab_size, m.make_vocab_size_divisible_by)
    arch = Arch(model=m, vocab=padded if keep_padded_vocab else vocab_size, padded_vocab=padded,
                mlp_kinds=["dense" if p == "*-" else "moe" for p in pairs], hidden=m.hidden_size, heads=heads,
                groups=groups, head_dim=head_dim,
                ffn=m.ffn_hidden_size, bias=m.add_bias_linear)
    if arch.is_moe:
        arch.experts, arch.topk = m.num_experts, m.moe_router_topk
        arch.moe_ffn = m.moe_ffn_hidden_size or m.ffn_hidden_size
        arch.shared = m.moe_shared_expert_intermediate_size or 0
    return arch


# The run's args (common state) that describe the architecture, and the model-config value each must equal.
def _args_expectations(arch: Arch) -> dict[str, object]:
    m = arch.model
    return {
        "hybrid_layer_pattern": m.pattern(), "hidden_size": m.hidden_size, "ffn_hidden_size": m.ffn_hidden_size,
        "num_attention_heads": m.num_attention_heads, "num_query_groups": m.num_query_groups,
        "kv_channels": m.kv_channels, "normalization": m.normalization, "swiglu": m.activation == "swiglu",
        "position_embedding_type": m.position_embedding_type, "rotary_base": m.rotary_base,
        "untie_embeddings_and_output_weights": m.untie_embeddings_and_output_weights,
        "add_bias_linear": m.add_bias_linear, "num_experts": m.num_experts,
        "moe_router_topk": m.moe_router_topk if m.num_experts else None, "padded_vocab_size": arch.padded_vocab,
    }


def check_args(arch: Arch, args) -> None:
    """Compare the model config with the architecture the checkpoint's run recorded (if it did)."""
    if args is None:
        return
    wrong = []
    for name, expected in _args_expectations(arch).items():
        if not hasattr(args, name) or expected is None and name == "moe_router_topk":
            continue
        recorded = getattr(args, name)
        if name == "hybrid_layer_pattern":
            recorded, expected = str(recorded).replace("|", ""), str(expected).replace("|", "")
        elif name == "num_query_groups":  # None = one group per head
            if not getattr(args, "group_query_attention", recorded is not None):
                recorded = None
            recorded, expected = recorded or arch.heads, arch.groups
        elif name == "kv_channels":  # None = hidden / heads
            recorded, expected = recorded or arch.hidden // arch.heads, arch.head_dim
        if recorded != expected:
            wrong.append(f"{name}: checkpoint {recorded!r}, model config {expected!r}")
    if wrong:
        hint = ("vocab_size / tokenizer" if all(w.startswith("padded_vocab_size") for w in wrong)
                else f"model=<the preset it was trained with> (model={arch.model.name} now)")
        raise ExportError("the model config does not match the checkpoint's recorded run: " + "; ".join(wrong)
                          + f". Pass {hint}")


def choose_target(arch: Arch, requested: str) -> str:
    if requested not in TARGETS:
        raise ExportError(f"target: '{requested}' is not one of {', '.join(TARGETS)}")
    if not arch.is_moe:
        if requested not in ("auto", "llama"):
            raise ExportError(f"target={requested}: the model is dense; use target=llama (or auto)")
        return "llama"
    if requested == "llama":
        raise ExportError("target=llama: the model has MoE layers; use target=mixtral / ernie4_5_moe (or auto)")
    plain = all(k == "moe" for k in arch.mlp_kinds) and not arch.shared
    if requested == "mixtral" and not plain:
        raise ExportError("target=mixtral: MixtralForCausalLM has no shared expert and no dense layers; "
                          "this model has " + ("a shared expert" if arch.shared else "dense MLP layers")
                          + " (use target=ernie4_5_moe or auto)")
    if requested == "ernie4_5_moe" or not plain:
        _ernie_layout(arch)  # raises if not expressible
        return "ernie4_5_moe"
    return "mixtral"


def _ernie_layout(arch: Arch) -> tuple[int, int, int, int]:
    """(moe_layer_start_index, end_index, interval, shared experts) reproducing the model's MoE layers."""
    moe = [i for i, k in enumerate(arch.mlp_kinds) if k == "moe"]
    for interval in range(1, arch.layers + 1):
        start, end = moe[0], moe[-1]
        chosen = [i for i in range(start, end + 1) if (i + 1) % interval == 0]
        if chosen == moe:
            break
    else:
        raise ExportError(f"layer pattern '{arch.model.pattern()}': Ernie4_5_MoeForCausalLM places MoE layers "
                          "from a start index every `interval` layers; this pattern's MoE layers do not fit that")
    if arch.shared % arch.moe_ffn:
        raise ExportError(f"model.moe_shared_expert_intermediate_size={arch.shared} is not a multiple of the expert "
                          f"FFN size {arch.moe_ffn} (Ernie4_5_MoeForCausalLM sizes its shared expert in experts)")
    return start, end, interval, arch.shared // arch.moe_ffn


# ----------------------------------------------------------------------------- the tensor plan


@dataclass
class OutTensor:
    """One tensor of the HF model, assembled from pieces of checkpoint tensors (none: filled with `fill`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    pieces: list[Piece] = field(default_factory=list)
    fill: float = 0.0

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.shape:
            n *= s
        return n


class _Planner:
    def __init__(self, arch: Arch, index: CheckpointIndex, dtype: torch.dtype | None):
        self.arch, self.index, self.dtype = arch, index, dtype
        self.expected: dict[str, tuple[int, ...]] = {}
        self.out: list[OutTensor] = []

    def need(self, key: str, shape: tuple[int, ...]) -> str:
        self.expected[key] = shape
        return key

    def add(self, name: str, key: str, shape: tuple[int, ...], pieces: list[Piece] | None = None) -> None:
        """Output `name` of `shape`; pieces default to the whole source key (rows 0..shape[0])."""
        pieces = pieces if pieces is not None else [Piece(key, 0, shape[0], 0)]
        dtype = self.dtype or (self.index.tensors[key].dtype if key in self.index.tensors else torch.float32)
        self.out.append(OutTensor(name, shape, dtype, pieces))

    def rows(self, name: str, key: str, start: int, stop: int, rest: tuple[int, ...], prefix: tuple[int, ...] = ()):
        self.add(name, key, (stop - start, *rest), [Piece(key, start, stop, 0, prefix=prefix)])


def plan_tensors(arch: Arch, target: str, index: CheckpointIndex, dtype: torch.dtype | None) -> list[OutTensor]:
    """Every output tensor with its sources; raises ExportError on missing / unexpected keys or shapes."""
    a, p = arch, _Planner(arch, index, dtype)
    H, d, hpg = a.hidden, a.head_dim, a.heads // a.groups
    per_group = (hpg + 2) * d
    moe_prefix = "block_sparse_moe" if target == "mixtral" else "mlp"
    embedding = p.need("embedding.word_embeddings.weight", (a.padded_vocab, H))
    p.rows("model.embed_tokens.weight", embedding, 0, a.vocab, (H,))
    for i, kind in enumerate(a.mlp_kinds):
        att, mlp, hf = f"decoder.layers.{2 * i}.", f"decoder.layers.{2 * i + 1}.", f"model.layers.{i}."
        p.add(hf + "input_layernorm.weight", p.need(att + "self_attention.linear_qkv.layer_norm_weight", (H,)), (H,))
        names = ["weight", "bias"] if a.bias else ["weight"]
        for suffix in names:
            rest = (H,) if suffix == "weight" else ()
            qkv = p.need(att + f"self_attention.linear_qkv.{suffix}", (a.groups * per_group, *rest))
            q, k, v = [], [], []
            for g in range(a.groups):
                base = g * per_group
                for j in range(hpg):
                    q += _head(qkv, base + j * d, (g * hpg + j) * d, d, target)
                k += _head(qkv, base + hpg * d, g * d, d, target)
                v.append(Piece(qkv, base + (hpg + 1) * d, base + per_group, g * d))
            p.add(hf + f"self_attn.q_proj.{suffix}", qkv, (a.heads * d, *rest), q)
            p.add(hf + f"self_attn.k_proj.{suffix}", qkv, (a.groups * d, *rest), k)
            p.add(hf + f"self_attn.v_proj.{suffix}", qkv, (a.groups * d, *rest), v)
        p.add(hf + "self_attn.o_proj.weight", p.need(att + "self_attention.linear_proj.weight", (H, a.heads * d)),
              (H, a.heads * d))
        if a.bias:
            p.add(hf + "self_attn.o_proj.bias", p.need(att + "self_attention.linear_proj.bias", (H,)), (H,))
        if kind == "dense":
            p.add(hf + "post_attention_layernorm.weight", p.need(mlp + "mlp.linear_fc1.layer_norm_weight", (H,)), (H,))
            _swiglu(p, mlp + "mlp.", hf + "mlp.", a.ffn, H, a.bias)
            continue
        p.add(hf + "post_attention_layernorm.weight", p.need(mlp + "pre_mlp_layernorm.weight", (H,)), (H,))
        p.add(hf + f"{moe_prefix}.gate.weight", p.need(mlp + "mlp.router.weight", (a.experts, H)), (a.experts, H))
        fc1 = p.need(mlp + "mlp.experts.experts.linear_fc1.weight", (a.experts, 2 * a.moe_ffn, H))
        fc2 = p.need(mlp + "mlp.experts.experts.linear_fc2.weight", (a.experts, H, a.moe_ffn))
        gate, up, down = ("w1", "w3", "w2") if target == "mixtral" else ("gate_proj", "up_proj", "down_proj")
        for e in range(a.experts):
            ex = hf + f"{moe_prefix}.experts.{e}."
            p.rows(ex + f"{gate}.weight", fc1, 0, a.moe_ffn, (H,), prefix=(e,))
            p.rows(ex + f"{up}.weight", fc1, a.moe_ffn, 2 * a.moe_ffn, (H,), prefix=(e,))
            p.rows(ex + f"{down}.weight", fc2, 0, H, (a.moe_ffn,), prefix=(e,))
        if target == "ernie4_5_moe":
            p.out.append(OutTensor(hf + "mlp.moe_statics.e_score_correction_bias", (1, a.experts), torch.float32))
        if a.shared:
            _swiglu(p, mlp + "mlp.shared_experts.", hf + "mlp.shared_experts.", a.shared, H, False)
    p.add("model.norm.weight", p.need("decoder.final_norm.weight", (H,)), (H,))
    if a.model.untie_embeddings_and_output_weights:
        p.rows("lm_head.weight", p.need("output_layer.weight", (a.padded_vocab, H)), 0, a.vocab, (H,))
    _check_keys(p)
    return p.out


def _head(key: str, src: int, dst: int, d: int, target: str) -> list[Piece]:
    """One q or k head. Ernie's interleaved RoPE rotates pairs (2i, 2i+1) where megatron rotates
    (i, i + d/2): put row i at 2i and row i + d/2 at 2i + 1, in q and k alike."""
    if target != "ernie4_5_moe":
        return [Piece(key, src, src + d, dst)]
    half = d // 2
    return [Piece(key, src, src + half, dst, 2), Piece(key, src + half, src + d, dst + 1, 2)]


def _swiglu(p: _Planner, src: str, hf: str, ffn: int, H: int, bias: bool) -> None:
    fc1 = p.need(src + "linear_fc1.weight", (2 * ffn, H))
    p.rows(hf + "gate_proj.weight", fc1, 0, ffn, (H,))
    p.rows(hf + "up_proj.weight", fc1, ffn, 2 * ffn, (H,))
    p.add(hf + "down_proj.weight", p.need(src + "linear_fc2.weight", (H, ffn)), (H, ffn))
    if bias:
        b1 = p.need(src + "linear_fc1.bias", (2 * ffn,))
        p.rows(hf + "gate_proj.bias", b1, 0, ffn, ())
        p.rows(hf + "up_proj.bias", b1, ffn, 2 * ffn, ())
        p.add(hf + "down_proj.bias", p.need(src + "linear_fc2.bias", (H,)), (H,))


def _check_keys(p: _Planner) -> None:
    have = set(p.index.model_keys())
    missing = [k for k in p.expected if k not in have]
    # Tied embeddings: PP checkpoints may also store the last stage's copy of the output layer.
    ignorable = {"output_layer.weight"} if not p.arch.model.untie_embeddings_and_output_weights else set()
    unexpected = sorted(have - set(p.expected) - ignorable)
    wrong = [f"{k}: checkpoint {tuple(p.index.tensors[k].shape)}, model config {shape}"
             for k, shape in p.expected.items() if k in have and tuple(p.index.tensors[k].shape) != shape]
    problems = []
    if wrong:
        problems.append("shape mismatch: " + _few(wrong, "; "))
    if missing:
        problems.append("missing tensors: " + _few(missing))
    if unexpected:
        problems.append("tensors the export does not know (a setting the HF targets lack, e.g. qk-norm, "
                        "expert bias, a shared-expert gate): " + _few(unexpected))
    if problems:
        raise ExportError(f"checkpoint {p.index.dir} does not hold model={p.arch.model.name}: " + "; ".join(problems))
    floating = {p.index.tensors[k].dtype for k in p.expected}
    if any(not dt.is_floating_point for dt in floating):
        raise ExportError(f"checkpoint {p.index.dir}: non-floating model weights {sorted(map(str, floating))}")


def _few(items: list[str], sep: str = ", ", shown: int = 6) -> str:
    return sep.join(items[:shown]) + (f" (+{len(items) - shown} more)" if len(items) > shown else "")


# ----------------------------------------------------------------------------- config.json


def hf_config(arch: Arch, target: str, dtype: torch.dtype, eos_token_id: int | None, pad_token_id: int | None):
    """The transformers config object of the target (built before anything is written)."""
    import transformers

    m = arch.model
    common = dict(
        vocab_size=arch.vocab, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
        num_attention_heads=arch.heads, num_key_value_heads=arch.groups, head_dim=arch.head_dim,
        hidden_act="silu", max_position_embeddings=m.max_position_embeddings, initializer_range=m.init_method_std,
        rms_norm_eps=m.norm_epsilon, tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        rope_parameters={"rope_type": "default", "rope_theta": float(m.rotary_base)},
        attention_dropout=m.attention_dropout, bos_token_id=None, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, dtype=str(dtype).removeprefix("torch."), use_cache=True,
    )
    if target == "llama":
        config = transformers.LlamaConfig(intermediate_size=arch.ffn, attention_bias=arch.bias, mlp_bias=arch.bias,
                                          **common)
    elif target == "mixtral":
        config = transformers.MixtralConfig(intermediate_size=arch.moe_ffn, num_local_experts=arch.experts,
                                            num_experts_per_tok=arch.topk, router_aux_loss_coef=m.moe_aux_loss_coeff,
                                            router_jitter_noise=0.0, sliding_window=None, **common)
    else:
        start, end, interval, shared = _ernie_layout(arch)
        config = transformers.Ernie4_5_MoeConfig(
            intermediate_size=arch.ffn, moe_intermediate_size=arch.moe_ffn, moe_num_experts=arch.experts,
            moe_k=arch.topk, moe_num_shared_experts=shared, moe_layer_start_index=start, moe_layer_end_index=end,
            moe_layer_interval=interval, use_bias=False, router_aux_loss_coef=m.moe_aux_loss_coeff, **common)
    config.architectures = [HF_CLASSES[target]]
    return config
