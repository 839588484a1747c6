"""The paper's qualitative findings (docs/pma.md), each tested against the experiment's numbers.

Every finding states its criterion, the numbers it used and whether it holds here; one that cannot
be tested with the stages that ran says so (holds = None). Nothing is assumed to hold.
"""

from __future__ import annotations

from statistics import mean


class Results:
    """Look-ups into the collected results."""

    def __init__(self, result: dict):
        self.r, self.cfg = result, result["config"]
        self.rows = {(m["run"], m["point"], m.get("spec", "live"), m.get("n"), m.get("v_tokens")): m["val_loss"]
                     for m in result["merges"]}

    def live(self, run: str, point: int):
        return self.rows.get((run, point, "live", None, None))

    def merged(self, run: str, point: int, spec: str, n: int, v: int):
        return self.rows.get((run, point, spec, n, v))

    def headline(self, run: str, point: int):
        c = self.cfg
        return self.merged(run, point, c["headline_method"], c["headline_n"], c["headline_v_tokens"])

    def annealed(self, point: int):
        return next((a["val_loss"] for a in self.r["anneal"] if a["point"] == point), None)

    def best_merge(self, run: str, point: int):
        losses = [(v, k) for k, v in self.rows.items() if k[:2] == (run, point) and k[2] != "live" and v is not None]
        return min(losses) if losses else (None, None)


def _finding(fid: str, claim: str, criterion: str, holds, detail: str, numbers: dict) -> dict:
    return {"id": fid, "claim": claim, "criterion": criterion, "holds": holds, "detail": detail, "numbers": numbers}


def _untested(fid: str, claim: str, criterion: str, why: str) -> dict:
    return _finding(fid, claim, criterion, None, f"not tested: {why}", {})


def merged_beats_live(res: Results) -> dict:
    claim = "In the constant-LR phase the merged model has a lower validation loss than the live model."
    criterion = ("headline merge < live at every comparison point, and in >= 80% of the evaluations "
                 "after the tracked merge's window is full")
    points = res.cfg["points"]
    pairs = {p: (res.live("main", p), res.headline("main", p)) for p in points}
    curve = [row for row in res.r["curves"].get("main", []) if row["merged"] is not None]
    if any(None in pair for pair in pairs.values()) or not curve:
        return _untested("merged_beats_live", claim, criterion, "needs the main run and the merges stage")
    wins = sum(row["merged"] < row["live"] for row in curve)
    at_points = all(m < l for l, m in pairs.values())
    holds = at_points and wins >= 0.8 * len(curve)
    detail = "; ".join(f"iteration {p}: live {l:.4f}, merged {m:.4f} ({m - l:+.4f})" for p, (l, m) in pairs.items())
    detail += f"; tracked merge below live in {wins} of {len(curve)} evaluations"
    return _finding("merged_beats_live", claim, criterion, holds, detail,
                    {"points": {p: {"live": l, "merged": m} for p, (l, m) in pairs.items()},
                     "curve_wins": wins, "curve_evals": len(curve)})


def merged_close_to_annealed(res: Results) -> dict:
    claim = "The merged model lands close to (or below) the annealed model at the same token count."
    criterion = "at every point the best merge closes >= 75% of the gap from live to the annealed branch (or is below it)"
    numbers, parts, holds = {}, [], True
    for p in res.cfg["points"]:
        live, annealed = res.live("main", p), res.annealed(p)
        best, key = res.best_merge("main", p)
        if None in (live, annealed, best):
            return _untested("merged_close_to_annealed", claim, criterion, "needs the anneal and merges stages")
        closed = (live - best) / (live - annealed) if live != annealed else float("inf")
        holds &= best <= annealed or closed >= 0.75
        numbers[p] = {"live": live, "annealed": annealed, "best_merge": best, "best": key[2:], "gap_closed": closed}
        where = (f"{best - annealed:+.4f} vs the annealed branch" if best <= annealed or annealed >= live
                 else f"closes {100 * closed:.0f}% of the live-to-annealed gap")
        parts.append(f"iteration {p}: live {live:.4f}, annealed {annealed:.4f}, best merge {best:.4f} "
                     f"({key[2]} N={key[3]} V={key[4]:,}), {where}")
    return _finding("merged_close_to_annealed", claim, criterion, holds, "; ".join(parts), numbers)


def window_size_effect(res: Results) -> dict:
    claim = "A large merge window (N x V) hurts early in training and helps late."
    criterion = ("SMA: the largest window that exists at both points is worse than the smallest early, "
                 "and better than it late")
    early, late = res.cfg["points"][0], res.cfg["points"][-1]
    windows = sorted(((n - 1) * v, n, v) for n in res.cfg["ns"] for v in res.cfg["v_tokens"]
                     if res.merged("main", early, "sma", n, v) is not None
                     and res.merged("main", late, "sma", n, v) is not None)
    if len(windows) < 2 or early == late:
        return _untested("window_size_effect", claim, criterion, "needs two points and SMA merges of >= 2 window sizes")
    (_, n_s, v_s), (_, n_l, v_l) = windows[0], windows[-1]
    e_small, e_large = res.merged("main", early, "sma", n_s, v_s), res.merged("main", early, "sma", n_l, v_l)
    l_small, l_large = res.merged("main", late, "sma", n_s, v_s), res.merged("main", late, "sma", n_l, v_l)
    holds = e_large > e_small and l_large < l_small
    detail = (f"small window N={n_s} V={v_s:,} vs large N={n_l} V={v_l:,}: iteration {early}: {e_small:.4f} vs "
              f"{e_large:.4f} ({e_large - e_small:+.4f}); iteration {late}: {l_small:.4f} vs {l_large:.4f} "
              f"({l_large - l_small:+.4f})")
    return _finding("window_size_effect", claim, criterion, holds, detail,
                    {"small": [n_s, v_s], "large": [n_l, v_l], "early": [e_small, e_large], "late": [l_small, l_large]})


PAPER_METHODS = ("sma", "ema:0.1", "ema:0.2", "wma")


def method_effect(res: Results) -> dict:
    claim = "WMA leads early in training; the merging methods converge later."
    criterion = ("early: WMA is the best of SMA / EMA 0.1 / EMA 0.2 / WMA for most (N, V); the mean spread "
                 "(max - min over these methods) is smaller late than early")
    early, late = res.cfg["points"][0], res.cfg["points"][-1]
    methods = [m for m in PAPER_METHODS if m in res.cfg["methods"]]
    if "wma" not in methods or len(methods) < 2 or early == late:
        return _untested("method_effect", claim, criterion, "needs WMA and another method at two points")

    def table(point):
        out = {}
        for n in res.cfg["ns"]:
            for v in res.cfg["v_tokens"]:
                losses = {m: res.merged("main", point, m, n, v) for m in methods}
                if None not in losses.values():
                    out[(n, v)] = losses
        return out

    t_early, t_late = table(early), table(late)
    if not t_early or not t_late:
        return _untested("method_effect", claim, criterion, "no (N, V) with every method at both points")
    wma_best = sum(min(losses, key=losses.get) == "wma" for losses in t_early.values())
    spread = {p: mean(max(l.values()) - min(l.values()) for l in t.values()) for p, t in ((early, t_early), (late, t_late))}
    holds = wma_best > len(t_early) / 2 and spread[late] < spread[early]
    detail = (f"WMA best at iteration {early} for {wma_best} of {len(t_early)} (N, V); mean spread across methods "
              f"{spread[early]:.4f} at {early} vs {spread[late]:.4f} at {late}")
    return _finding("method_effect", claim, criterion, holds, detail,
                    {"wma_best_early": wma_best, "configs_early": len(t_early), "spread": spread})


def lower_lr_smaller_gain(res: Results) -> dict:
    claim = "The merge's gain over the live model shrinks with a lower learning rate."
    criterion = "at the late point, live - merged (headline merge) is smaller for the low-LR run"
    late = res.cfg["points"][-1]
    gains = {}
    for run in ("main", "low_lr"):
        live, merged = res.live(run, late), res.headline(run, late)
        if None in (live, merged):
            return _untested("lower_lr_smaller_gain", claim, criterion, "needs the low_lr run merged at the late point")
        gains[run] = {"live": live, "merged": merged, "gain": live - merged}
    holds = gains["low_lr"]["gain"] < gains["main"]["gain"]
    detail = (f"lr {res.cfg['lr']}: gain {gains['main']['gain']:.4f} (live {gains['main']['live']:.4f}); "
              f"lr {res.cfg['low_lr']}: gain {gains['low_lr']['gain']:.4f} (live {gains['low_lr']['live']:.4f})")
    return _finding("lower_lr_smaller_gain", claim, criterion, holds, detail, gains)


def pma_init_helps(res: Results) -> dict:
    claim = "Continued training initialised from the merged weights (PMA-init) does at least as well as from the live weights."
    criterion = "validation loss from the merged start <= from the live start, at the start and at the end"
    arms = res.r["pma_init"]
    if set(arms) != {"live", "merged"}:
        return _untested("pma_init_helps", claim, criterion, "needs the pma_init stage")
    start = {a: arms[a][0]["val_loss"] for a in arms}
    end = {a: arms[a][-1]["val_loss"] for a in arms}
    holds = start["merged"] <= start["live"] and end["merged"] <= end["live"]
    detail = (f"start: merged {start['merged']:.4f} vs live {start['live']:.4f}; after {arms['live'][-1]['iteration']} "
              f"iterations: merged {end['merged']:.4f} vs live {end['live']:.4f} ({end['merged'] - end['live']:+.4f})")
    return _finding("pma_init_helps", claim, criterion, holds, detail, {"start": start, "end": end})


def spike_recovery(res: Results) -> dict:
    claim = "After a loss spike, restoring the merge of the checkpoints before it puts training back on track."
    criterion = ("the recovered run ends within 5% of the spike-free run's validation loss, and the run "
                 "without recovery ends worse than the recovered one")
    s = res.r["spike"]
    if set(s) != {"clean", "unrecovered", "recovered"}:
        return _untested("spike_recovery", claim, criterion, "needs the spike stage")
    clean, bad, good = (s[a]["val_loss"] for a in ("clean", "unrecovered", "recovered"))
    holds = good <= 1.05 * clean and bad > good and bool(s["recovered"]["recoveries"])
    detail = (f"spike-free {clean:.4f}, spiked without recovery {bad:.4f}, spiked with recovery {good:.4f} "
              f"(recoveries: {len(s['recovered']['recoveries'])})")
    return _finding("spike_recovery", claim, criterion, holds, detail, {"clean": clean, "unrecovered": bad, "recovered": good})


ALL = (merged_beats_live, merged_close_to_annealed, window_size_effect, method_effect, lower_lr_smaller_gain,
       pma_init_helps, spike_recovery)


def evaluate_findings(result: dict) -> list[dict]:
    res = Results(result)
    return [finding(res) for finding in ALL]
