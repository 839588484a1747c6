"""The markdown report: medians over rounds, the headline table and one section per phase."""

from __future__ import annotations

import merge_startup  # benchmarks/: the lean path's start-up and memory figures
from merge_bench import megatron_lm
from merge_bench.common import GB, GiB, MiB, TARGET_GBPS, median
from merge_bench.profiling import profile_rows


def aggregate(result: dict) -> dict:
    """Medians over rounds per (ranks, threads, n, budget)."""
    groups: dict[tuple, list[dict]] = {}
    for row in result["engine_runs"]:
        groups.setdefault((row["phase"], row["ranks"], row["threads"], row["n"], row["budget_mb"]), []).append(row)
    table = []
    for (phase, ranks, threads, n, budget), rows in sorted(groups.items()):
        gbps = [r["read_gbps"] for r in rows]
        per_rank_growth = [max(r["per_rank"][k]["rss_growth"] for r in rows) for k in range(ranks)]
        per_rank_peak = [max(r["per_rank"][k]["peak_rss"] for r in rows) for k in range(ranks)]
        table.append({"phase": phase, "ranks": ranks, "threads": threads, "n": n, "budget_mb": budget, "runs": len(rows),
                      "bytes_read": rows[0]["bytes_read"], "pieces": rows[0]["pieces"],
                      "seconds_median": median([r["seconds"] for r in rows]),
                      "gbps_median": median(gbps), "gbps_min": min(gbps), "gbps_max": max(gbps),
                      "peak_rss_max": max(r["peak_rss_bytes"] for r in rows),
                      "growth_max": max(r["peak_rss_above_start_bytes"] for r in rows),
                      "per_rank_peak_rss": per_rank_peak, "per_rank_growth": per_rank_growth})
    cli: dict[str, list[dict]] = {}
    for row in result["cli_runs"]:
        cli.setdefault(row["label"], []).append(row)
    cli_table = [{"label": label, "command": rows[0]["command"], "runs": len(rows),
                  "wall_median": median([r["wall_s"] for r in rows]),
                  "engine_median": median([r["summary"]["seconds"] for r in rows]),
                  "gbps_median": median([r["summary"]["read_gbps"] for r in rows]),
                  "peak_rss_max": max(r["summary"]["peak_rss_bytes"] for r in rows),
                  "growth_max": max(r["summary"]["peak_rss_above_start_bytes"] for r in rows)} for label, rows in cli.items()]
    return {"engine": [r for r in table if r["phase"] == "rounds"], "rss": [r for r in table if r["phase"] == "rss"],
            "cli": cli_table}


def find(table, **match):
    return next((row for row in table if all(row[k] == v for k, v in match.items())), None)


def markdown(result: dict, agg: dict) -> str:
    inp, m, cond = result["inputs"], result["machine"], result["conditions"]
    n, budgets = inp["n"], sorted({r["budget_mb"] for r in agg["engine"]}, reverse=True)
    head = budgets[0] if 256 not in budgets else 256
    e2 = find(agg["engine"], ranks=2, threads=1, n=n, budget_mb=head)
    e1 = find(agg["engine"], ranks=1, threads=1, n=n, budget_mb=head)
    cli2 = find(agg["cli"], label="torchrun 2 ranks")
    fmt_g = lambda row: "-" if row is None else f"{row['gbps_median']:.2f} GB/s"  # noqa: E731
    lines = [f"# pma-merge throughput and memory{' (quick run)' if result['quick'] else ''}", "",
             "Written by `benchmarks/merge_throughput.py`" + (" --quick" if result["quick"] else "") +
             ". GB = 1e9 bytes (throughput), MiB/GiB = 2^20/2^30 bytes (sizes, RSS).", "",
             "## Machine and conditions", "",
             f"- {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, Linux {m['kernel']}; work dir {m['work_dir']} "
             f"({m['filesystem']}); Python {m['python']}, torch {m['torch']}, megatron-core {m['megatron_core']}.",
             f"- Page cache **warm**: every input file is read once before each phase (raw read, every engine job, "
             f"every CLI run, each naive run, the profile). One OpenMP thread per process unless stated.",
             f"- Load average (1/5/15 min) at start {cond['loadavg_start']}, at end {cond.get('loadavg_end')}: the machine "
             f"is shared, so other jobs took CPU during the run; figures are medians over {max(r['runs'] for r in agg['engine'])} "
             f"round(s) that alternate 1-rank and 2-rank jobs.",
             f"- `uptime` at start: `{cond.get('uptime_start', '?')}`; at end: `{cond.get('uptime_end', '?')}`.",
             f"- Whole benchmark: {result['total_benchmark_s']:.0f} s.", "",
             "## Inputs", "",
             f"- {inp['n']} checkpoints of pma-train's HybridModel ({inp['params'] / 1e6:.1f}M parameters, fp32; "
             f"hidden {inp['model']['hidden_size']}, {inp['model']['num_layers']} blocks, ffn {inp['model']['ffn_hidden_size']}, "
             f"vocabulary {inp['model']['vocab_size']} padded to a multiple of {inp['model']['make_vocab_size_divisible_by']}), "
             f"saved by megatron-core dist_checkpointing (torch_dist) at TP=2 from 2 ranks, model only, weights perturbed "
             f"between saves, {inp['files_per_checkpoint']} .distcp files each; selected by tokens (`n={inp['n']} "
             f"v_tokens={inp['v_tokens']}`).",
             f"- {inp['bytes_per_checkpoint'] / MiB:.0f} MiB per checkpoint, **{inp['bytes_total'] / GiB:.2f} GiB "
             f"({inp['bytes_total'] / GB:.2f} GB) in all** (the .distcp files).", "",
             "## Headline", "",
             "| figure | value | target |", "|---|---|---|",
             f"| engine throughput, 2 ranks, N={n}, budget {head} MiB (GB of input / engine seconds) | {fmt_g(e2)} "
             f"({e2['gbps_min']:.2f}-{e2['gbps_max']:.2f}) | >= {TARGET_GBPS} GB/s |" if e2 else "| engine 2 ranks | - | |",
             f"| engine throughput, 1 rank | {fmt_g(e1)} ({e1['gbps_min']:.2f}-{e1['gbps_max']:.2f}) | |" if e1 else "| engine 1 rank | - | |",
             f"| raw read of the same files (16 MiB preadv, reused buffer, 1 process) | "
             f"{result['raw_read']['gbps_median']:.2f} GB/s | |"]
    if cli2:
        lines.append(f"| whole command `torchrun --nproc-per-node 2 -m pma_train.cli.merge ...` wall time | "
                     f"{cli2['wall_median']:.1f} s (engine {cli2['engine_median']:.2f} s) | |")
    lines += _issue_headline(result)
    for b in budgets:
        r = find(agg["rss"], ranks=2, threads=1, n=n, budget_mb=b)
        if r:
            lines.append(f"| RSS growth while merging, busiest of 2 ranks, N={n}, budget {b} MiB (fresh job) | "
                         f"{r['growth_max'] / MiB:.0f} MiB (whole process {r['peak_rss_max'] / MiB:.0f} MiB) | <= {b} MiB |")
    naive = {r["n"]: r for r in result.get("naive", [])}
    if n in naive:
        lines.append(f"| naive load-everything baseline, N={n} | {naive[n]['seconds']:.1f} s, peak RSS "
                     f"{naive[n]['peak_rss'] / MiB:.0f} MiB | |")
    lines += ["", "## Engine: 1 vs 2 merge ranks, memory budgets, N", "",
              "In-process `run_merge` under torchrun (one job per row group and round; outputs deleted after each merge). "
              "*GB/s* = bytes read / the engine's timed loop (`summary.seconds`: read, accumulate, write, fsync; not "
              "planning or publishing), median (min-max) over rounds. RSS: the engine's own sampler, max over rounds; "
              "*growth* = peak minus RSS at the start of the merge (here the second merge of a job may reuse heap the "
              "first one freed: see the fresh-job sweep below for memory).", "",
              "| ranks x threads | N | budget MiB | GiB read | pieces | engine s | GB/s | busiest rank: peak RSS / growth MiB | per-rank growth MiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(agg["engine"], key=lambda r: (r["n"] != n, r["budget_mb"] != head, r["ranks"], r["threads"], r["n"], -r["budget_mb"])):
        lines.append(f"| {row['ranks']} x {row['threads']} | {row['n']} | {row['budget_mb']} | {row['bytes_read'] / GiB:.2f} | "
                     f"{row['pieces']} | {row['seconds_median']:.2f} | {row['gbps_median']:.2f} ({row['gbps_min']:.2f}-"
                     f"{row['gbps_max']:.2f}) | {row['peak_rss_max'] / MiB:.0f} / {row['growth_max'] / MiB:.0f} | "
                     f"{', '.join(f'{g / MiB:.0f}' for g in row['per_rank_growth'])} |")
    lines += ["", "## Peak RSS per rank vs N (2 ranks; naive: one process)", "",
              "One fresh 2-rank job per cell (`run_merge` in-process under torchrun). Cells: RSS growth while merging "
              "(peak RSS of the whole process) per rank, MiB. The whole process includes ~0.5 GiB of torch / "
              "megatron imports.", "",
              "| N | " + " | ".join(f"engine {b} MiB: growth (peak) per rank" for b in budgets) + " | naive: growth (peak) |",
              "|---|" + "---|" * (len(budgets) + 1)]
    for k in sorted({r["n"] for r in agg["rss"]} | set(naive)):
        cells = []
        for b in budgets:
            row = find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b)
            cells.append("-" if row is None else ", ".join(f"{g / MiB:.0f} ({p / MiB:.0f})" for g, p in
                                                           zip(row["per_rank_growth"], row["per_rank_peak_rss"])))
        nv = naive.get(k)
        cells.append("-" if nv is None else f"{nv['rss_growth'] / MiB:.0f} ({nv['peak_rss'] / MiB:.0f})")
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += ["", "## Whole command", "",
              "Wall time from launch to exit (torchrun, interpreter start, imports, process group, selection, planning, "
              "the merge, metadata, publish), median over rounds; *engine* is the timed loop from `pma_merge.json`.", "",
              "| command | wall s | engine s | GB/s (engine) | rest s | busiest rank peak RSS / growth MiB |", "|---|---|---|---|---|---|"]
    for row in agg["cli"]:
        lines.append(f"| `{row['label']}`: `{row['command'][:90]}...` | {row['wall_median']:.1f} | {row['engine_median']:.2f} | "
                     f"{row['gbps_median']:.2f} | {row['wall_median'] - row['engine_median']:.1f} | "
                     f"{row['peak_rss_max'] / MiB:.0f} / {row['growth_max'] / MiB:.0f} |")
    st = result["startup"]
    lines += ["", f"Start-up parts, measured alone: bare `python -c pass` {st['bare_interpreter_s']:.2f} s; importing "
              f"`pma_train.cli.merge` (hydra, omegaconf, config) {st['imports']['cli_s']:.2f} s, then "
              f"`pma_train.merge.engine` (torch, torch.distributed.checkpoint) {st['imports']['engine_s']:.2f} s; "
              f"`pma-merge ... dry_run=true` (1 process: imports, hydra, selection; no merge) "
              f"{st.get('pma_merge_dry_run_s', float('nan')):.1f} s; `torchrun --nproc-per-node 2` of a worker that only "
              f"imports the engine, joins the gloo group and leaves {st.get('torchrun_2_noop_s', float('nan')):.1f} s."]
    if "lean" in result:
        lines += [""] + merge_startup.markdown_lines(result["lean"])
    if "megatron_lm" in result:
        lines += [""] + megatron_lm.markdown_lines(result["megatron_lm"])
    if result["cli_runs"]:
        lines += ["", "stdout line of the last 2-rank run:", "", "```",
                  next((r["stdout_line"] for r in reversed(result["cli_runs"]) if r["label"] == "torchrun 2 ranks"), ""), "```"]
    if naive:
        lines += ["", "## Naive baseline (one process, loads everything)", "",
                  "`dcp_to_torch_save` per input into a temporary .pt, `torch.load`, all N state dicts kept, weighted fp32 "
                  "sum per tensor, `torch.save` of the result. Peak RSS: psutil sampling every 5 ms (and ru_maxrss).", "",
                  "| N | total s | dcp_to_torch_save s | torch.load s | average s | torch.save s | GB/s of input | "
                  "process wall s | peak RSS MiB | growth MiB | ru_maxrss MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, row in sorted(naive.items()):
            t = row["times"]
            lines.append(f"| {k} | {row['seconds']:.1f} | {t['dcp_to_torch_save']:.1f} | {t['torch_load']:.1f} | "
                         f"{t['average']:.1f} | {t['torch_save_output']:.1f} | {row['input_bytes'] / row['seconds'] / GB:.2f} | "
                         f"{row.get('wall_s', float('nan')):.1f} | "
                         f"{row['peak_rss'] / MiB:.0f} | {row['rss_growth'] / MiB:.0f} | {row['ru_maxrss'] / MiB:.0f} |")
    if "profile" in result:
        prof = result["profile"]
        lines += ["", "## Where the engine's time goes", "",
                  f"One rank, one thread, N={prof['n']}, budget {prof['budget_mb']} MiB, {prof['pieces']} pieces, "
                  f"{prof['bytes_read'] / GiB:.2f} GiB read, {prof['bytes_written'] / MiB:.0f} MiB written: timers around "
                  f"the engine's own functions (exclusive times; the timed loop took {prof['seconds']:.2f} s = "
                  f"{prof['read_gbps']:.2f} GB/s, the whole `run_merge` call {prof['call_s']:.2f} s).", "",
                  "| part | seconds | share of the loop | GB of input per second of this part |", "|---|---|---|---|"]
        for label, seconds in profile_rows(prof):
            share = seconds / prof["seconds"] if prof["seconds"] else 0
            rate = f"{prof['bytes_read'] / seconds / GB:.1f}" if seconds > 1e-6 else "-"
            lines.append(f"| {label} | {seconds:.2f} | {share:.0%} | {rate} |")
        lines.append(f"| outside the loop (selection done before; planning, token broadcast, barriers, "
                     f"metadata, publish) | {prof['call_s'] - prof['seconds']:.2f} | | |")
        prim = prof.get("primitives")
        if prim:
            lines += ["", f"Primitive costs ({prim['threads']} thread, one {prim['block_mb']} MiB fp32 block, median of 5):", "",
                      "| operation | GB/s | ms per 64 MiB |", "|---|---|---|"]
            for name, v in prim["ops"].items():
                lines.append(f"| {name} | {v['gbps']:.2f} | {v['ms_per_64MB']:.1f} |")
    if "py_spy" in result:
        spy = result["py_spy"]
        lines += ["", f"py-spy ({spy['rate_hz']} Hz, native stacks, {spy['samples']} samples inside `run_merge`, a plain 1-rank run at "
                  f"{spy['plain_run']['read_gbps']:.2f} GB/s, slowed by the sampling), innermost engine frame -> native frame:", "",
                  "| frame | share |", "|---|---|"]
        for row in spy["top"]:
            lines.append(f"| `{row['frame']}` | {row['share']:.0%} |")
    return "\n".join(lines) + "\n"


def _issue_headline(result: dict) -> list[str]:
    """The lean-path goals: dry-run wall, whole command vs Megatron-LM's tool, whole-process RSS per rank, cold cache."""
    lines = []
    lean = result.get("lean")
    if lean:
        lines.append(f"| `pma-merge ... dry_run=true`, one process, wall (median of 3) | {lean['dry_run_s_median']:.2f} s "
                     f"| < 1.5 s |")
        peak = max(r["VmHWM"] for r in lean["ranks"])
        uss = max(r.get("smaps", {}).get("Uss", 0) for r in lean["ranks"])
        pss = max(r.get("smaps", {}).get("Pss", 0) for r in lean["ranks"])
        lines.append(f"| peak RSS per rank, `torchrun --nproc-per-node 2 pma-merge`, N={result['inputs']['n']}, budget 256 MiB "
                     f"(whole process, VmHWM; at exit PSS / USS) | {peak / MiB:.0f} MiB ({pss / MiB:.0f} / {uss / MiB:.0f} MiB); "
                     f"`import torch` alone {lean['import_torch_only']['VmHWM'] / MiB:.0f} MiB | <= 300 MB |")
    cmp = result.get("megatron_lm")
    if cmp:
        s = megatron_lm.summary(cmp)
        ours, theirs = s["pma-merge"], s["weighted_merge.py"]
        lines.append(f"| whole `torchrun --nproc-per-node 2` merge, warm cache: pma-merge vs Megatron-LM weighted_merge.py "
                     f"(same inputs) | {ours['warm_wall_s']:.1f} s vs {theirs['warm_wall_s']:.1f} s "
                     f"({ours['warm_wall_s'] / theirs['warm_wall_s']:.2f}x) | <= 0.5x |")
        cold = cmp["cold"]
        lines.append(f"| the same, cold cache (inputs evicted with posix_fadvise) | {ours['cold_wall_s']:.1f} s vs "
                     f"{theirs['cold_wall_s']:.1f} s; raw read cold {cold['data_bytes'] / cold['raw_read_cold_s'] / GB:.2f} "
                     f"GB/s, warm {cold['data_bytes'] / cold['raw_read_warm_s'] / GB:.2f} GB/s | |")
    return lines
