"""The plan as a plain-text table (the JSON form is the dict make_plan returns)."""

from __future__ import annotations

from typing import Any

_KINDS = {"*": "attention", "-": "MLP", "E": "MoE"}


def count(n: float) -> str:
    """1,234,567,890 (1.23B)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n:,.0f} ({n / scale:.3g}{unit})"
    return f"{n:,.0f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def flops(n: float) -> str:
    return f"{n:.3e}"


def short_pattern(pattern: str, limit: int = 24) -> str:
    """'*-*E*E*E' -> '*- + *E x 3': a short head, then a repeated block."""
    for head in range(0, min(len(pattern), 9)):
        rest = pattern[head:]
        for size in (1, 2, 3, 4):
            if len(rest) >= 2 * size and rest == rest[:size] * (len(rest) // size):
                repeated = f"{rest[:size]} x {len(rest) // size}"
                return f"{pattern[:head]} + {repeated}" if head else repeated
    return pattern if len(pattern) <= limit else pattern[:limit - 3] + "..."


def segments_label(segments: list[str]) -> str:
    """The layers of a stage's chunk(s), short."""
    labels = [s if len(s) <= 12 else short_pattern(s) for s in segments]
    if len(labels) > 1 and len(set(labels)) == 1:
        return f"{len(labels)} chunks of {labels[0]}"
    return " | ".join(labels)


def render(plan: dict[str, Any]) -> str:
    p, lay, par, mem, fl, batch = (plan["shape"], plan["layout"], plan["parameters"], plan["memory"],
                                   plan["flops"], plan["batch"])
    lines = []
    add = lines.append
    vpp = f" x vpp {lay['vpp']}" if lay["vpp"] else ""
    add(f"pma-plan: {plan['model']} on {lay['gpus']} GPUs: tp {lay['tp']} x pp {lay['pp']}{vpp} x dp {lay['dp']}"
        + (f"; ep {lay['ep']}, expert tp {lay['expert_tp']}, expert dp {lay['expert_dp']}" if p["num_experts"] else "")
        + f"; sequence parallel {'on' if lay['sequence_parallel'] else 'off'}; "
        + f"{'distributed' if lay['distributed_optimizer'] else 'replicated'} optimizer")
    layers = plan["layers"]
    kinds = ", ".join(f"{n} {k}" for k, n in (("attention", layers["attention"]), ("MLP", layers["mlp"]),
                                             ("MoE", layers["moe"])) if n)
    add("")
    add(f"  model       {short_pattern(plan['pattern'])} ({kinds} layers); hidden {p['hidden_size']}, "
        f"{p['num_attention_heads']} heads x {p['kv_channels']} / {p['num_query_groups']} KV groups, "
        f"FFN {p['ffn_hidden_size']}"
        + (f"; {p['num_experts']} experts top-{p['moe_router_topk']}, expert FFN {p['moe_ffn_hidden_size']}"
           + (f", shared {p['moe_shared_expert_intermediate_size']}"
              if p["moe_shared_expert_intermediate_size"] else "")
           if p["num_experts"] else "")
        + ("; tied embeddings" if p["tied_embeddings"] else ""))
    add(f"  vocab       {plan['vocab_size']:,} ({plan['vocab_source']}), padded to {plan['padded_vocab_size']:,}")
    add(f"  parameters  total {count(par['total'])}; activated per token {count(par['activated'])}")
    for symbol, c in par["per_layer"].items():
        act = f", activated {count(c['activated'])}" if c["activated"] != c["total"] else ""
        add(f"              one {_KINDS.get(symbol, symbol)} layer {count(c['total'])}{act}")
    add(f"              embedding {count(par['embedding'])}; final norm + output layer {count(par['output'])}")
    add(f"  batch       {batch['global_batch_size']} sequences x {batch['seq_length']} tokens = "
        f"{batch['tokens_per_step']:,} tokens per step; micro-batch {batch['micro_batch_size']}, "
        f"{batch['microbatches_per_step']} micro-batches per step on each DP rank")
    pt = fl["per_token"]
    add(f"  FLOPs       per token {flops(pt['total'])} = 6 x {count(fl['matmul_params_activated'])} matmul weights "
        f"{flops(pt['matmul'])} + causal attention 6 x L_attn x s x h_q {flops(pt['attention'])}")
    add(f"              per step {flops(fl['per_step'])}; per GPU per step {flops(fl['per_gpu_per_step'])}")
    add("")
    opt = ("fp32 main params + Adam m, v" if mem["precision"] != "fp32" else "Adam m, v")
    shard = (f"sharded over DP {lay['dp']}" + (f" (experts: expert DP {lay['expert_dp']})" if p["num_experts"] else "")
             if lay["distributed_optimizer"] else "not sharded")
    add(f"  memory per GPU, GiB (estimate: {mem['precision']} weights, fp32 grads, optimizer {opt} {shard}; "
        "activations without recomputation, flash attention)")
    header = ("stage", "layers", "params/GPU", "weights", "grads", "optimizer", "activations", "in flight", "total")
    rows = []
    for r in mem["ranks"]:
        segs = segments_label(r["segments"])
        rows.append((str(r["pp_rank"]), segs, f"{r['params']:,}", gib(r["weights_bytes"]), gib(r["grads_bytes"]),
                     gib(r["optimizer_bytes"]), gib(r["activation_bytes"]), str(r["microbatches_in_flight"]),
                     gib(r["total_bytes"])))
    add(_table(header, rows, text_columns=2))
    add(f"  peak: stage {mem['peak_pp_rank']}, {gib(mem['peak_bytes'])} GiB per GPU "
        "(not counted: communication buffers, CUDA context, fragmentation)")
    add("")
    tracker = (f"; tracker: track.n={mem['tracker_n']} {mem['tracker_dtype']} snapshots, sharded over DP, "
               f"in {'files (track.storage=disk)' if mem['tracker_storage'] == 'disk' else 'host memory'}"
               if mem["tracker_n"] else "")
    add(f"  host memory per rank, GiB ({mem['host_device']} job, checkpoint.optimizer_format="
        f"{mem['optimizer_format']}{tracker}; estimate.py says what each holds)")
    host_rows = [(str(r["pp_rank"]), *(gib(r["host_bytes"][k]) for k in ("training", "save", "resume", "tracker")))
                 for r in mem["ranks"]]
    add(_table(("stage", "training", "with a save", "on resume", "+ tracker"), host_rows, text_columns=1))
    if mem["tracker_n"] and mem["tracker_storage"] == "disk":
        add("  tracker files per rank (track.dir, with the live share during an evaluation), GiB: "
            + ", ".join(f"stage {r['pp_rank']} {gib(r['tracker_disk_bytes'])}" for r in mem["ranks"]))
    return "\n".join(lines)


def _table(header: tuple, rows: list[tuple], text_columns: int) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    fmt = lambda row: "  " + "  ".join(c.ljust(w) if i < text_columns else c.rjust(w)  # noqa: E731
                                       for i, (c, w) in enumerate(zip(row, widths)))
    return "\n".join(fmt(row) for row in (header, *rows))
