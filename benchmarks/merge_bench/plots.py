"""The figure: throughput, peak RSS and its growth vs N, and the engine's time split."""

from __future__ import annotations

from pathlib import Path

from merge_bench.common import GB, GiB, MiB, TARGET_GBPS
from merge_bench.profiling import profile_rows
from merge_bench.report import find


def plot(result: dict, agg: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = result["inputs"]["n"]
    budgets = sorted({r["budget_mb"] for r in agg["rss"]}, reverse=True)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    ax = axes[0][0]
    labels, values = ["raw read"], [result["raw_read"]["gbps_median"]]
    for row in sorted(agg["engine"], key=lambda r: (r["ranks"], r["threads"], -r["budget_mb"])):
        if row["n"] == n:
            labels.append(f"{row['ranks']} rank x{row['threads']} thr\n{row['budget_mb']} MiB")
            values.append(row["gbps_median"])
    naive = {r["n"]: r for r in result.get("naive", [])}
    if n in naive:
        labels.append("naive")
        values.append(naive[n]["input_bytes"] / naive[n]["seconds"] / GB)
    ax.bar(range(len(values)), values, color=["#888"] + ["#3a7"] * (len(values) - 1))
    ax.axhline(TARGET_GBPS, color="r", ls="--", lw=1, label=f"target {TARGET_GBPS} GB/s")
    ax.set_xticks(range(len(values)), labels, fontsize=7, rotation=40, ha="right")
    ax.set_ylabel("GB of input / s")
    ax.set_title(f"Throughput, N={n} ({result['inputs']['bytes_total'] / GiB:.2f} GiB), warm cache")
    ax.legend(fontsize=8)
    ax = axes[0][1]
    ns = sorted({r["n"] for r in agg["rss"]})
    width = 0.8 / (len(budgets) + 1)
    for i, b in enumerate(budgets):
        ys = [max(find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b)["per_rank_peak_rss"]) / MiB
              if find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b) else 0 for k in ns]
        ax.bar([x + i * width for x in range(len(ns))], ys, width, label=f"engine, busiest of 2 ranks, budget {b} MiB")
    if naive:
        ax.bar([x + len(budgets) * width for x in range(len(ns))], [naive[k]["peak_rss"] / MiB if k in naive else 0 for k in ns],
               width, label="naive (one process)", color="#c55")
    ax.set_xticks([x + width * len(budgets) / 2 for x in range(len(ns))], [f"N={k}" for k in ns])
    ax.set_ylabel("peak RSS, MiB (whole process)")
    ax.set_title("Peak RSS per rank vs N")
    ax.legend(fontsize=8)
    ax = axes[1][0]
    for i, b in enumerate(budgets):
        ys = [max(find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b)["per_rank_growth"]) / MiB
              if find(agg["rss"], ranks=2, threads=1, n=k, budget_mb=b) else None for k in ns]
        ax.plot(ns, ys, "o-", label=f"engine growth while merging, budget {b} MiB")
        ax.axhline(b, ls=":", color=ax.lines[-1].get_color(), lw=1)
    if naive:
        ax.plot(sorted(naive), [naive[k]["rss_growth"] / MiB for k in sorted(naive)], "s--", color="#c55",
                label="naive (one process), growth")
        ax.set_yscale("log")
    ax.set_xlabel("N")
    ax.set_ylabel("MiB")
    ax.set_title("RSS growth of the busiest rank while merging (dotted: budget)")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    if "profile" in result:
        rows = profile_rows(result["profile"])
        ax.barh([r[0][:48] for r in rows], [r[1] for r in rows], color="#47a")
        ax.invert_yaxis()
        ax.tick_params(axis="y", labelsize=7)
        ax.set_xlabel("seconds")
        ax.set_title(f"Engine time, 1 rank, N={result['profile']['n']} ({result['profile']['read_gbps']:.2f} GB/s)")
    else:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
