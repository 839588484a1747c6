"""report.md and the PNG plots, written from results.json alone (every figure comes from it)."""

from __future__ import annotations

import json
from pathlib import Path

from pma_train.repro.findings import Results

_VERDICT = {True: "holds", False: "does not hold", None: "not tested"}


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def markdown(result: dict) -> str:
    c, res = result["config"], Results(result)
    tpi = result.get("tokens_per_iter")
    lines = ["# PMA findings at this scale", "",
             f"Model `{c['model']}`, constant LR {c['lr']} for {c['iters']} iterations"
             + (f" ({tpi:,} tokens each)" if tpi else "") + f", a checkpoint every {c['grid_iters']} iterations; "
             f"annealing branches decay the LR ({c['anneal_shape']}) to 0 over the {c['anneal_iters']} iterations "
             f"before each point; headline merge {c['headline_method']} N={c['headline_n']} V={c['headline_v_tokens']:,} "
             "tokens. Every number below is read from results.json.", "",
             "## Findings", "", "| finding | verdict | criterion | measured |", "|---|---|---|---|"]
    for f in result["findings"]:
        lines.append(f"| {f['claim']} | **{_VERDICT[f['holds']]}** | {f['criterion']} | {f['detail']} |")
    lines += ["", "## Live, merged and annealed at the comparison points", "",
              "| run | iteration | live | headline merge | best merge (method, N, V) | annealed |", "|---|---|---|---|---|---|"]
    for run in ("main", "low_lr"):
        for p in c["points"]:
            live = res.live(run, p)
            if live is None:
                continue
            best, key = res.best_merge(run, p)
            best_s = f"{best:.4f} ({key[2]}, {key[3]}, {key[4]:,})" if best is not None else "-"
            annealed = res.annealed(p) if run == "main" else None
            lines.append(f"| {run} | {p} | {_fmt(live)} | {_fmt(res.headline(run, p))} | {best_s} | {_fmt(annealed)} |")
    for p in c["points"]:
        lines += ["", f"## Merge grid at iteration {p} (main run; validation loss, '-' = window reaches before the run)", "",
                  "| method | " + " | ".join(f"N={n} V={v:,}" for n in c["ns"] for v in c["v_tokens"]) + " |",
                  "|---|" + "---|" * (len(c["ns"]) * len(c["v_tokens"]))]
        for spec in c["methods"]:
            cells = [_fmt(res.merged("main", p, spec, n, v)) for n in c["ns"] for v in c["v_tokens"]]
            lines.append(f"| {spec} | " + " | ".join(cells) + " |")
    if result.get("wall_seconds"):
        lines += ["", "## Wall time", "", "| stage | seconds |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in result["wall_seconds"].items()]
    lines += ["", "Plots: repro_loss.png (validation loss over tokens), repro_ablation.png (N, V and method at the "
              "early and late points), repro_pma_init_spike.png (PMA-init and the spike example)."]
    return "\n".join(lines) + "\n"


def plots(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, res, written = result["config"], Results(result), []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run, style in (("main", "-"), ("low_lr", "--")):
        curve = result["curves"].get(run, [])
        lr = c["lr"] if run == "main" else c["low_lr"]
        ax.plot([r["tokens"] for r in curve], [r["live"] for r in curve], style, color="C0", label=f"live (lr {lr})")
        merged = [r for r in curve if r["merged"] is not None]
        ax.plot([r["tokens"] for r in merged], [r["merged"] for r in merged], style, color="C1",
                label=f"merged {c['headline_method']} N={c['headline_n']} (lr {lr})")
    anneal = result["anneal"]
    ax.scatter([a["tokens"] for a in anneal], [a["val_loss"] for a in anneal], marker="*", s=160, color="C3",
               zorder=3, label="annealed branch")
    ax.set(xlabel="tokens", ylabel="validation loss", title="PMA: live vs merged vs annealed")
    lows = [r["live"] for curve in result["curves"].values() for r in curve]
    if lows:
        ax.set_ylim(min(lows + [a["val_loss"] for a in anneal]) - 0.05, sorted(lows)[len(lows) // 4] + 0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "repro_loss.png", dpi=110)
    written.append(out / "repro_loss.png")
    plt.close(fig)

    points = c["points"]
    fig, axes = plt.subplots(len(points), 3, figsize=(14, 3.6 * len(points)), squeeze=False)
    for row, p in zip(axes, points):
        for v in c["v_tokens"]:
            row[0].plot(c["ns"], [res.merged("main", p, "sma", n, v) for n in c["ns"]], "o-", label=f"V={v:,}")
        for n in c["ns"]:
            row[1].plot(c["v_tokens"], [res.merged("main", p, "sma", n, v) for v in c["v_tokens"]], "o-", label=f"N={n}")
        row[0].set_xticks(c["ns"])
        row[1].set_xticks(c["v_tokens"], [f"{v:,}" for v in c["v_tokens"]], fontsize=8)
        losses = [res.merged("main", p, s, c["headline_n"], c["headline_v_tokens"]) for s in c["methods"]]
        row[2].bar(range(len(losses)), [x if x is not None else 0 for x in losses], color="C2")
        row[2].set_xticks(range(len(losses)), c["methods"], rotation=30, fontsize=8)
        valid = [x for x in losses + [res.live("main", p), res.annealed(p)] if x is not None]
        if valid:
            row[2].set_ylim(min(valid) - 0.01, max(valid) + 0.01)
        for ax, title in zip(row, ("SMA: N", "SMA: V (tokens)", f"methods, N={c['headline_n']} V={c['headline_v_tokens']:,}")):
            for value, label, color in ((res.live("main", p), "live", "C0"), (res.annealed(p), "annealed", "C3")):
                if value is not None:
                    ax.axhline(value, color=color, ls=":", label=label)
            ax.set_title(f"iteration {p}: {title}", fontsize=10)
            ax.set_ylabel("validation loss")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "repro_ablation.png", dpi=100)
    written.append(out / "repro_ablation.png")
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for arm, arm_rows in result["pma_init"].items():
        left.plot([r["iteration"] for r in arm_rows], [r["val_loss"] for r in arm_rows], "o-", label=f"from {arm} weights")
    left.set(xlabel="iterations of continued training", ylabel="validation loss", title="PMA-init")
    for arm, data in result["spike"].items():
        right.plot([r["iteration"] for r in data["train"]], [r["loss"] for r in data["train"]], label=arm, lw=1)
    right.set(xlabel="iteration", ylabel="training loss", title="spike: recovery from the merge of earlier checkpoints",
              yscale="log")
    for ax in (left, right):
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "repro_pma_init_spike.png", dpi=100)
    written.append(out / "repro_pma_init_spike.png")
    plt.close(fig)
    return written


def write_report(results_json: Path) -> Path:
    result = json.loads(results_json.read_text())
    out = results_json.parent
    (out / "report.md").write_text(markdown(result))
    plots(result, out)
    return out / "report.md"
