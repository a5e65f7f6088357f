"""The reproduction study's report: ``results.md`` (one table per finding) and the PNG plots, from ``results``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LWR = "LoRA Without Regret (Schulman et al., 2025)"
FULL_COLOR = (0.1, 0.1, 0.1)


# -- verdicts -------------------------------------------------------------------------------------------------


def findings(results: dict[str, Any]) -> list[dict[str, str]]:
    """One row per published claim: the claim, what was measured here, and whether they agree."""
    rows = []
    lr = results["lr"]
    ratio = lr["ratio_geometric_mean"]
    edges = lr["rows_at_grid_edge"]
    edge = f"; {edges} of {len(lr['rows'])} best LRs at a grid edge" if edges else ""
    rows.append({"claim": "optimal LoRA LR ~10x full fine-tuning's (fit over 14 models: 9.8x)",
                 "measured": f"best LoRA LR / best full fine-tuning LR: {_g(ratio)}x (geometric mean over ranks and "
                             f"N; per rank " + ", ".join(f"r{r}: {_g(v)}x" for r, v in lr["ratio_by_rank"].items())
                             + f"){edge}",
                 "agrees": _yes(ratio is not None and 5 <= ratio <= 20)})
    by_rank = {int(r): v for r, v in lr["lora_lr_by_rank"].items() if v}
    upper = [v for r, v in by_rank.items() if r >= 4]
    spread = max(upper) / min(upper) if len(upper) >= 2 else None
    rows.append({"claim": "optimal LoRA LR nearly independent of rank (< 2x from rank 4 up; rank 1 somewhat lower)",
                 "measured": "best LoRA LR by rank (geometric mean over N): "
                             + ", ".join(f"r{r}: {v:.2g}" for r, v in by_rank.items())
                             + (f"; spread from rank 4 up {spread:.2g}x" if spread else ""),
                 "agrees": _yes(spread < 2) if spread else "not measured (fewer than 2 ranks >= 4)"})
    early = results["early"]
    first = {int(r): v[0] for r, v in early["loss"].items() if v and v[0] is not None}
    gap = max(first.values()) - min(first.values()) if len(first) >= 2 else None
    rows.append({"claim": "with 1/r scaling, early learning curves are identical across ranks at the same LR",
                 "measured": f"training loss after one epoch at LR {early['lr']:g}, N = {early['examples']:,}: "
                             + ", ".join(f"r{r}: {v:.2f}" for r, v in first.items())
                             + (f" (full fine-tuning {early['full_loss'][0]:.2f})"
                                if early.get("full_loss") and early["full_loss"][0] is not None else "")
                             + (f"; spread {gap:.2f} nats" if gap is not None else ""),
                 "agrees": _yes(gap is not None and gap <= 0.1)})
    falloff = {int(r): f for r, f in results["falloff"].items()}
    measured = [(r, f["examples"]) for r, f in sorted(falloff.items()) if f["status"] in ("measured", "at_or_below")]
    grows = all(b >= a for (_, a), (_, b) in zip(measured, measured[1:]))
    rows.append({"claim": "low-rank LoRA falls off the full fine-tuning curve, later for higher ranks",
                 "measured": "dataset size where LoRA holds < 90% of full fine-tuning's bits: "
                             + ", ".join(f"r{r}: {_falloff(f)}" for r, f in sorted(falloff.items())),
                 "agrees": _yes(bool(measured) and grows)})
    comp = results["compare"]["comparison"]["loras"]
    never = [c["rank"] for c in comp if c["falloff"]["step"] is not None and c["falloff"]["step"]
             <= results["compare"]["comparison"]["criterion"]["min_points"]]
    xs = [c["falloff"]["x"] for c in comp if c["falloff"]["x"] is not None]
    rows.append({"claim": "per step: LoRA follows the full fine-tuning loss curve, then leaves it after a number "
                          "of examples that grows with rank",
                 "measured": f"lorascope compare at N = {results['compare']['examples']:,}: "
                             + ", ".join(f"r{c['rank']}: {c['falloff']['status']}"
                                         + (f" at {c['falloff']['x']:,.0f} examples seen" if c["falloff"]["x"] else "")
                                         for c in comp)
                             + (f"; never tracked full fine-tuning: {', '.join(f'r{r}' for r in never)}"
                                if never else ""),
                 "agrees": _yes(not never and all(b >= a for a, b in zip(xs, xs[1:])))})
    per_param = kappa_at_falloff(results)
    values = [v for v in per_param.values() if v is not None]
    calibrated = results["predictions"]["calibration"]["bits_per_parameter"]
    rows.append({"claim": "the falloff comes where the bits asked approach ~2 bits x LoRA parameters",
                 "measured": "bits asked at the measured falloff / LoRA parameters: "
                             + (", ".join(f"r{r}: {v:.2f}" for r, v in per_param.items() if v is not None)
                                or "no falloff measured")
                             + f" (calibrate measured {calibrated:.2f}" + _kappa_r(results) + ")",
                 "agrees": _yes(bool(values) and all(0.5 <= v / 2 <= 2 for v in values))
                 + ("" if not values else f" (median {sorted(values)[len(values) // 2]:.2f} bits per parameter)")})
    batch = results["batch"]["rows"]
    by_rank_gap: dict[int, list[tuple[int, float]]] = {}
    for row in batch:
        by_rank_gap.setdefault(row["rank"], []).append((row["batch_size"], row["gap"]))
    monotone = all(all(b[1] >= a[1] for a, b in zip(sorted(v), sorted(v)[1:])) for v in by_rank_gap.values())
    largest = max(row["batch_size"] for row in batch)
    at_largest = [row["gap"] for row in batch if row["batch_size"] == largest]
    rank_free = (max(at_largest) <= 2 * min(at_largest) if min(at_largest) > 0 else False) \
        if len(at_largest) >= 2 else None
    rows.append({"claim": "LoRA's loss penalty vs full fine-tuning grows with batch size, independent of rank",
                 "measured": "final-loss gap LoRA - full fine-tuning by batch size: "
                             + "; ".join(f"r{r}: " + ", ".join(f"{bs}: {g:+.3f}" for bs, g in sorted(v))
                                         for r, v in by_rank_gap.items()),
                 "agrees": f"grows: {_yes(monotone)}; independent of rank (gaps at batch {largest} within 2x): "
                           + ("not measured (one rank)" if rank_free is None else _yes(rank_free))})
    targets = {row["target"]: row for row in results["targets"]["rows"]}
    att, mlp, lin = (targets[t]["final_loss"] for t in ("attention-only", "mlp-only", "all-linear"))
    close = abs(mlp - lin) <= max(0.1, 0.1 * min(mlp, lin))
    rows.append({"claim": "attention-only LoRA < MLP-only ~ all-linear at matched parameter count",
                 "measured": ", ".join(f"{t} r{row['rank']} ({row['lora_parameters']:,} params): loss "
                                       f"{row['final_loss']:.3f}" for t, row in targets.items() if t != "full"),
                 "agrees": f"attention-only worse than MLP-only: {_yes(att > mlp)}; all-linear ~ MLP-only (within "
                           f"0.1 nats or 10%): {_yes(close)}"})
    rows.append({"claim": "RL with a scalar reward: rank 1 ~ full fine-tuning", "measured": "not measured (no RL here)",
                 "agrees": "-"})
    spectra = {int(n): s for n, s in results["predictions"]["full_spectra"].items()}
    sizes = sorted(spectra)
    frac = {n: spectra[n]["energy_rank_fraction_0.9_by_kind"] for n in sizes}
    grows_k = spectra[sizes[-1]]["energy_rank_0.9"] > spectra[sizes[0]]["energy_rank_0.9"]
    mlp_higher = all(f.get("mlp", 0) > f.get("attention", 0) for f in frac.values())
    rows.append({"claim": "full fine-tuning's k_0.9 is a large fraction of the dimension, grows with data, higher for "
                          "MLP than attention",
                 "measured": "k_0.9 / min(d_out, d_in) (attention, MLP): "
                             + ", ".join(f"N={n:,}: {frac[n].get('attention', math.nan):.2f}, "
                                         f"{frac[n].get('mlp', math.nan):.2f}" for n in sizes),
                 "agrees": _yes(grows_k and mlp_higher) + f" (grows: {_yes(grows_k)}, MLP > attention: "
                                                          f"{_yes(mlp_higher)})"})
    rows.append({"claim": "B_simple rises as the loss falls", "measured": "not measured (one backward pass per step)",
                 "agrees": "-"})
    return rows


def kappa_at_falloff(results: dict[str, Any]) -> dict[int, float | None]:
    """Bits the data asks at each rank's measured falloff, per LoRA parameter."""
    params = results["model"]["lora_parameters_per_rank"]["all-linear"]
    out = {}
    for r, f in results["falloff"].items():
        r = int(r)
        out[r] = f["examples"] * results["bits_per_fact"] / (params * r) if f["status"] == "measured" else None
    return out


# -- markdown -------------------------------------------------------------------------------------------------


def markdown(results: dict[str, Any], level: int = 1) -> str:
    """The study's tables (``results.md``); ``level``: the title's heading level, every heading below it shifted
    alike (docs/reproduction.md embeds them at level 3)."""
    tier = results["tier"]
    model = results["model"]
    lines = [f"# Reproduction results ({tier['name']} mode)", "",
             f"Model: Llama, hidden {model['hidden_size']}, {model['num_hidden_layers']} layers, vocabulary "
             f"{model['vocab_size']}, {model['parameters']:,} parameters; LoRA parameters per rank: "
             + ", ".join(f"{t} {p:,}" for t, p in model["lora_parameters_per_rank"].items()) + ".",
             f"Task: N random key -> value facts, {results['bits_per_fact']:.0f} bits each; N in "
             f"{', '.join(f'{n:,}' for n in tier['sizes'])}; ranks {', '.join(map(str, tier['ranks']))}; "
             f"{tier['epochs']} epochs (at least {tier['min_steps']} steps) at batch {tier['batch_size']}; LR grids "
             f"full {_lrs(tier['full_lrs'])}, LoRA {_lrs(tier['lora_lrs'])}.",
             f"Runtime {results['runtime_seconds']:.0f} s ({len(results['runs'])} runs, "
             f"{results['run_seconds']['per_example_ms']:.3f} ms per training example on average).", "",
             "## Findings", "", "| published claim (" + LWR + ") | measured here | agrees? |", "|---|---|---|"]
    lines += [f"| {row['claim']} | {row['measured']} | {row['agrees']} |" for row in findings(results)]
    lines += ["", "## Predicted vs measured falloff", "",
              "Measured: the dataset size N at which the LoRA (best LR) holds less than "
              f"{results['held_fraction_level']:.0%} of the bits full fine-tuning (best LR) holds, log-interpolated "
              "between grid points; the same rule on the final training loss (LoRA's exceeds full fine-tuning's by "
              "more than 0.1 ln V nats) in the next row. Each cell: predicted N (predicted / measured, bits held); "
              "without a measured falloff, whether the prediction agrees with the bound the data give (never: the "
              "signal does not reach the rank).", ""]
    ranks = [int(r) for r in results["falloff"]]
    lines += ["| | " + " | ".join(f"r={r}" for r in ranks) + " |", "|---" * (len(ranks) + 1) + "|",
              "| LoRA parameters | " + " | ".join(
                  f"{results['model']['lora_parameters_per_rank']['all-linear'] * r:,}" for r in ranks) + " |",
              "| **measured** (bits held) | " + " | ".join(_falloff(results["falloff"][_k(results['falloff'], r)])
                                                         for r in ranks) + " |",
              "| measured (final loss) | " + " | ".join(
                  _falloff(results["falloff_loss"][_k(results['falloff_loss'], r)]) for r in ranks) + " |"]
    for name, cells in results["predictors"].items():
        lines.append(f"| {name} | " + " | ".join(_cell(cells[_k(cells, r)]) for r in ranks) + " |")
    info = results["predictions"]["information"]
    lines += ["", "Bits per example used by each information predictor (the truth is "
              f"{results['bits_per_fact']:.0f}): " + ", ".join(
                  f"{name}: {_bits(results, name):.2f}" for name in info) + f"; constants: default "
              f"{_const(results, 'size, default constant'):.3f}, calibrated {_const(results, 'size, calibrated'):.3f} "
              f"bits per LoRA parameter{_kappa_r(results)}.", ""]
    lines += _table_by_n(results, "LoRA bits held / full fine-tuning bits held", lambda b, full: b["bits_held"]
                         / full["bits_held"] if full["bits_held"] > 0 else math.nan, fmt="{:.2f}")
    lines += _table_by_n(results, "Final training loss (nats per value token, best LR)",
                         lambda b, full: b["final_loss"], fmt="{:.3f}", full_value="final_loss")
    lines += _table_by_n(results, "Best learning rate", lambda b, full: b["lr"], fmt="{:g}", full_value="lr")
    spectra = results["predictions"]["full_spectra"]
    lines += ["### Full fine-tuning's update to the linear layers", "",
              "| N | k_0.9 | signal rank | " + " | ".join(f"e_{r}" for r in ranks) + " |",
              "|---" * (3 + len(ranks)) + "|"]
    for n, s in spectra.items():
        lines.append(f"| {int(n):,} | {s['energy_rank_0.9']:.1f} | {s['signal_rank']:.1f} | "
                     + " | ".join(f"{s['rank_residual'][_k(s['rank_residual'], r)]:.2f}" for r in ranks) + " |")
    comp = results["compare"]
    lines += ["", f"## lorascope compare at N = {comp['examples']:,} (per-step training loss vs examples seen)", "",
              "Predicted: examples seen at which full fine-tuning has absorbed the rank's capacity "
              "(kappa x P(r) bits), from its training loss; see docs/reproduction.md.", "",
              "| rank | compare | falloff at (examples seen) | predicted, calibrated | predicted, default constant |"
              " final gap (nats) |", "|---|---|---|---|---|---|"]
    for c in comp["comparison"]["loras"]:
        r = c["rank"]
        tr = comp["translated_predictions"]
        lines.append(f"| {r} | {c['falloff']['status']} | {_num(c['falloff']['x'])} | "
                     f"{_num(tr['size, calibrated'][_k(tr['size, calibrated'], r)])} | "
                     f"{_num(tr['size, default constant'][_k(tr['size, default constant'], r)])} | "
                     f"{_num(c['final_gap'], '{:.3f}')} |")
    if comp["comparison"]["notes"]:
        lines += ["", "compare's notes: " + "; ".join(comp["comparison"]["notes"])]
    early = results["early"]
    lines += ["", f"## Early learning curves (LR {early['lr']:g}, N = {early['examples']:,})", "",
              "| | " + " | ".join(f"{int(x):,} examples" for x in early["at_examples"]) + " |",
              "|---" * (len(early["at_examples"]) + 1) + "|"]
    if early.get("full_loss"):
        lines.append("| full | " + " | ".join(_num(v, "{:.3f}") for v in early["full_loss"]) + " |")
    lines += [f"| r={r} | " + " | ".join(_num(v, "{:.3f}") for v in row) + " |" for r, row in early["loss"].items()]
    batch = results["batch"]
    lines += ["", f"## Batch size (N = {batch['examples']:,}, the same epochs at every batch size)", "",
              "| batch | rank | steps | full loss | LoRA loss | gap | full LR | LoRA LR |", "|---" * 8 + "|"]
    lines += [f"| {row['batch_size']} | {row['rank']} | {row['steps']:,} | {row['full_loss']:.3f} | "
              f"{row['lora_loss']:.3f} | {row['gap']:+.3f} | {row['full_lr']:g} | {row['lora_lr']:g} |"
              for row in batch["rows"]]
    targets = results["targets"]
    lines += ["", f"## Target sets at matched parameter count (N = {targets['examples']:,})", "",
              "| target | rank | trainable parameters | final loss | bits held | LR |", "|---|---|---|---|---|---|"]
    lines += [f"| {row['target']} | {row['rank'] or '-'} | {row['lora_parameters']:,} | {row['final_loss']:.3f} | "
              f"{row['bits_held']:,.0f} | {row['lr']:g} |" for row in targets["rows"]]
    shift = "#" * (level - 1)
    return "\n".join(shift + line if line.startswith("#") else line for line in lines) + "\n"


def _table_by_n(results: dict[str, Any], title: str, value: Any, fmt: str, full_value: str | None = None
                ) -> list[str]:
    ranks = [int(r) for r in results["lora"]]
    head = ["N"] + (["full"] if full_value else []) + [f"r={r}" for r in ranks]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for n, full in results["full"].items():
        cells = [f"{int(n):,}"] + ([fmt.format(full[full_value])] if full_value else [])
        cells += [fmt.format(value(results["lora"][_k(results["lora"], r)][n], full)) for r in ranks]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _k(mapping: dict, key: int) -> Any:
    """``key`` or its string (results read back from JSON have string keys)."""
    return key if key in mapping else str(key)


def _cell(cell: dict[str, Any]) -> str:
    if cell["predicted"] is None:
        text = "never"
    else:
        text = ("<= " if cell.get("status") == "at_or_below" else "") + f"{cell['predicted']:,.0f}"
    if cell["ratio"] is not None:
        return f"{text} ({cell['ratio']:.2f}x)"
    if cell["consistent"] is not None:
        return f"{text} ({'consistent' if cell['consistent'] else 'inconsistent'})"
    return text


def _falloff(f: dict[str, Any]) -> str:
    if f["status"] == "measured":
        return f"{f['examples']:,.0f}"
    if f["status"] == "at_or_below":
        return f"<= {f['examples']:,.0f}"
    if f["status"] == "beyond":
        return f"> {f['examples']:,.0f}"
    return "-"


def _bits(results: dict[str, Any], name: str) -> float:
    return next(iter(results["predictions"]["information"][name].values()))["capacity_bits"] / next(
        iter(results["predictions"]["information"][name].values()))["examples"]


def _const(results: dict[str, Any], name: str) -> float:
    first = next(iter(results["predictions"]["information"][name].values()))
    return first["capacity_bits"] / first["lora_parameters"]


def _kappa_r(results: dict[str, Any]) -> str:
    """", kappa(r) at each rank ..." from the kappa(r) calibration's predictor, or nothing without one."""
    table = results["predictions"]["information"].get("size, calibrated kappa(r)")
    if not table:
        return ""
    return "; kappa(r) calibrated at each rank: " + ", ".join(
        f"r{r}: {p['capacity_bits'] / p['lora_parameters']:.3f}" for r, p in table.items())


def _num(value: Any, fmt: str = "{:,.0f}") -> str:
    return "-" if value is None else fmt.format(value)


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.2g}"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _lrs(values: Sequence[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


# -- plots ----------------------------------------------------------------------------------------------------


def plots(results: dict[str, Any], folder: Path) -> list[Path]:
    """``falloff.png``, ``predicted_vs_measured.png``, ``lr.png``, ``batch.png``, ``targets.png``."""
    import matplotlib as mpl

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    with mpl.rc_context({"font.size": 10, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 100}):
        for name, draw in (("falloff", _falloff_plot), ("predicted_vs_measured", _prediction_plot),
                           ("lr", _lr_plot), ("batch", _batch_plot), ("targets", _targets_plot)):
            fig = draw(results)
            path = folder / f"{name}.png"
            fig.savefig(path, format="png")
            paths.append(path)
    return paths


def _rank_colors(ranks: Sequence[int]) -> dict[int, Any]:
    import seaborn as sns

    palette = sns.color_palette("flare", max(len(ranks), 1))  # as lorascope compare: lowest rank lightest
    return dict(zip(sorted(ranks), palette))


def _falloff_plot(results: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    ranks = [int(r) for r in results["lora"]]
    colors = _rank_colors(ranks)
    sizes = [int(n) for n in results["full"]]
    predicted = results["predictors"]
    for r in ranks:
        lora = results["lora"][_k(results["lora"], r)]
        held = [lora[_k(lora, n)]["bits_held"] / max(results["full"][_k(results["full"], n)]["bits_held"], 1e-9)
                for n in sizes]
        top.plot(sizes, held, "o-", color=colors[r], label=f"r={r}")
        bottom.plot(sizes, [lora[_k(lora, n)]["final_loss"] for n in sizes], "o-", color=colors[r], label=f"r={r}")
        for name, marker in (("information (probe, calibrated)", "v"), ("information (size, default constant)", "x")):
            cell = predicted.get(name, {}).get(_k(predicted.get(name, {}), r))
            if cell and cell["predicted"] and min(sizes) / 2 <= cell["predicted"] <= max(sizes) * 2:
                top.plot([cell["predicted"]], [1.08], marker, color=colors[r], markersize=9, clip_on=False)
    bottom.plot(sizes, [results["full"][_k(results["full"], n)]["final_loss"] for n in sizes], "o-",
                color=FULL_COLOR, linewidth=2.2, label="full fine-tuning")
    top.axhline(results["held_fraction_level"], color="0.4", linestyle="--", linewidth=1)
    top.set_ylabel("bits held: LoRA / full fine-tuning")
    top.set_ylim(0, 1.12)
    top.set_title("LoRA against full fine-tuning by dataset size (v: predicted, probe + calibrate; "
                  "x: predicted, size only)")
    top.legend(loc="lower left", ncol=len(ranks))
    bottom.set_xscale("log")
    bottom.set_xlabel("dataset size N (facts)")
    bottom.set_ylabel("final training loss (nats)")
    bottom.legend(loc="upper left", ncol=4)
    return fig


def _prediction_plot(results: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    markers = "ovsD^P*X"
    lows, highs = [], []
    for (name, cells), marker in zip(results["predictors"].items(), markers):
        pts = [(results["falloff"][_k(results["falloff"], int(r))]["examples"], c["predicted"])
               for r, c in cells.items() if c["ratio"] is not None]
        if pts:
            ax.plot(*zip(*pts), marker, label=name, markersize=7, alpha=0.8)
            lows += [min(p) for p in pts]
            highs += [max(p) for p in pts]
    if lows:
        span = [min(lows) / 2, max(highs) * 2]
        ax.plot(span, span, color="0.5", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no falloff measured within the data", ha="center", transform=ax.transAxes)
    ax.set_xlabel("measured falloff N")
    ax.set_ylabel("predicted falloff N")
    ax.set_title("Predicted vs measured falloff (ranks with a measured falloff)")
    return fig


def _lr_plot(results: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.subplots()
    n = max(int(k) for k in results["full"])
    runs = [r for r in results["runs"] if r["experiment"] in ("sweep", "probe") and r["examples"] == n]
    ranks = sorted({r["rank"] for r in runs if r["target"] != "full"})
    colors = _rank_colors(ranks)
    for rank in [0, *ranks]:
        pts = sorted((r["lr"], r["final_loss"]) for r in runs if r["rank"] == rank)
        if pts:
            ax.plot(*zip(*pts), "o-", color=FULL_COLOR if rank == 0 else colors[rank],
                    label="full fine-tuning" if rank == 0 else f"r={rank}", linewidth=2.2 if rank == 0 else 1.5)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final training loss (nats)")
    ax.set_title(f"Learning-rate sweep at N = {n:,}")
    ax.legend()
    return fig


def _batch_plot(results: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    rows = results["batch"]["rows"]
    ranks = sorted({row["rank"] for row in rows})
    colors = _rank_colors(ranks)
    for rank in ranks:
        pts = sorted((row["batch_size"], row["gap"]) for row in rows if row["rank"] == rank)
        ax.plot(*zip(*pts), "o-", color=colors[rank], label=f"r={rank}")
    ax.axhline(0, color="0.4", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (same epochs)")
    ax.set_ylabel("final loss gap, LoRA - full (nats)")
    ax.set_title(f"LoRA's penalty by batch size (N = {results['batch']['examples']:,})")
    ax.legend()
    return fig


def _targets_plot(results: dict[str, Any]) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5), layout="constrained")
    ax = fig.subplots()
    rows = results["targets"]["rows"]
    labels = [f"{row['target']}" + (f"\nr={row['rank']}, {row['lora_parameters']:,}" if row["rank"] else "")
              for row in rows]
    ax.bar(labels, [row["final_loss"] for row in rows], color=["0.2", "#4c72b0", "#dd8452", "#55a868"][:len(rows)])
    ax.set_ylabel("final training loss (nats)")
    ax.set_title(f"Target sets at matched LoRA parameter count (N = {results['targets']['examples']:,})")
    return fig
