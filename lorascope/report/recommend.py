"""Terminal rendering of a recommendation (:meth:`lorascope.workflows.recommend.Recommendation.to_dict`) and of a
calibration (:meth:`lorascope.workflows.calibrate.Calibration.to_dict`)."""

from __future__ import annotations

from typing import Any

from lorascope.report.format import MISSING, count, number, significant, table
from lorascope.workflows.calibration import LORA_PROBES

_KIND_COLUMNS = (("attention", "attn"), ("mlp", "mlp"), ("moe_expert", "experts"))


def format_recommendation(summary: dict[str, Any]) -> str:
    """Plain text: the inputs, the table per rank, the recommendation and its advice, probe evidence, notes."""
    bits, constant = summary["bits"], summary["constant"]
    model = summary["model"]
    name = model.get("model_type", model.get("class", "model"))
    lines = [
        f"model: {name} ({count(model.get('parameters'))} parameters); task {summary['task']}; "
        f"{count(summary['examples'])} examples"
        + (f" x {count(summary['trained_tokens_per_example'])} trained tokens"
           if summary["trained_tokens_per_example"] else ""),
        f"bits to learn: {count(summary['bits_to_learn'])} ({bits['explanation']})",
        *([f"  growth with the dataset size: {bits['growth_source']}"
           + (f"; standard error +-{bits['relative_error']:.0%}" if bits.get("relative_error") else "")]
          if bits["source"] == "recording" else []),
        f"capacity: {significant(constant['bits_per_parameter'], 3)} bits per LoRA parameter, known to "
        f"x/{significant(constant['uncertainty'], 3)} ({constant['source']})",
        "",
    ]
    kinds = [(k, label) for k, label in _KIND_COLUMNS
             if any(k in p["ranks_by_kind"] for p in summary["predictions"])]
    tinker = summary["trained_tokens_per_example"] is not None
    header = ["rank", *(label for _, label in kinds), "LoRA params", "runway (examples)", "range"]
    header += ["Tinker rule"] if tinker else []
    header += ["verdict", ""]
    rows = []
    for p in summary["predictions"]:
        low, high = p["runway_range"]
        row = [str(p["rank"]), *(str(p["ranks_by_kind"].get(k, MISSING)) for k, _ in kinds),
               count(p["lora_parameters"]), count(p["runway_examples"]), f"{count(low)}..{count(high)}"]
        row += [count(p["tinker_runway_examples"])] if tinker else []
        row += [_verdict(p), "<" if p["rank"] == summary["rank"] else ""]
        rows.append(row)
    lines += [line.rstrip() for line in table(header, rows)]
    by_kind = ", ".join(f"{k} {r}" for k, r in summary["ranks_by_kind"].items())
    lines += [
        "",
        f"recommended: rank {summary['rank']} ({by_kind}) on {summary['target']}, lora_alpha "
        f"{summary['lora_alpha']}, scaling {summary['scaling']}; {count(summary['lora_parameters'])} LoRA parameters",
        *(f"  why: {p['reason']}" for p in summary["predictions"] if p["rank"] == summary["rank"]),
        "  attention-only LoRA is never recommended: it underperforms MLP-only at matched parameter count "
        "(LoRA Without Regret, 2025)",
        f"learning rate: {summary['lr_multiplier']:g}x your full fine-tuning LR ({summary['lr_reason']})",
        f"batch size: {summary['batch_advice']}",
    ]
    for probe in summary["probes"]:
        lines += ["", f"probe {probe['path']}" + (" (a LoRA run)" if probe["lora"] else "")]
        info = probe["information"]
        lines.append(f"  first-epoch description length {count(info['description_length_bits'])} bits, absorbed "
                     f"{count(info['absorbed_bits'])} bits over {count(info['epoch_examples'])} examples "
                     f"({info['token_basis']})")
        planned = probe.get("planned_recipe")
        if planned:
            curve = ", ".join(f"{e:g}: {significant(a, 3)}" for e, a in planned["per_epoch"])
            lines.append(f"  under the planned {planned['planned']['epochs']:g} epoch(s): "
                         f"{significant(planned['absorbed_per_example'], 3)} bits per example absorbed, "
                         f"{count(planned['one_time_bits'])} paid once; its {planned['probe']['epochs']:.3g} epochs "
                         f"absorbed per example by epoch: {curve or 'no whole epoch'}")
        spectral = probe["spectral"]
        if spectral:
            residual = ", ".join(f"e_{r}={number(v, 2)}" for r, v in spectral["rank_residual"].items() if v is not None)
            lines.append(f"  spectral evidence (not used in the verdict): k_0.9 = "
                         f"{count(spectral['energy_rank_0.9'])}, signal rank {count(spectral['signal_rank'])}, "
                         f"{residual}")
    if summary["notes"]:
        lines += ["", "notes:", *(f"  - {n}" for n in summary["notes"])]
    return "\n".join(lines)


def _verdict(prediction: dict[str, Any]) -> str:
    if prediction["verdict"] == "exceeded":
        return f"exceeded at ~{count(prediction['runway_examples'])}"
    return prediction["verdict"]


def format_calibration(summary: dict[str, Any]) -> str:
    """Plain text of a calibration: one row per rank, the constant, the fit kappa(P) and the capacity bracket."""
    rows = [[str(p["rank"]), count(p["lora_parameters"]), count(p["facts"]), count(p["bits_offered"]),
             count(p["bits_stored"]), number(p["bits_per_parameter"], 3)] for p in summary["points"]]
    training, probes = summary.get("training", {}), summary.get("task", {}).get("kind") == LORA_PROBES
    if probes:
        lines = table(["rank", "LoRA params", "examples", "full FT absorbed", "LoRA absorbed", "bits/param"], rows)
        lines += ["", f"LoRA probes on your data at a step budget of {count(training['steps'])} steps (bits: what "
                  "each run absorbed on its slice; full FT: the full fine-tuning run of the same slice)"]
    else:
        lines = table(["rank", "LoRA params", "facts", "bits offered", "bits stored", "bits/param"], rows)
    if training.get("steps") and not probes:
        lines += ["", f"at a step budget: {count(training['steps'])} steps of {count(training['batch_size'])} facts "
                  "per adapter; each rank at the load (bits offered/param) where it held the most: " + ", ".join(
                      f"rank {p['rank']} {significant(p['load'], 3)}" for p in summary["points"])]
    lines += ["", f"bits per LoRA parameter: {number(summary['bits_per_parameter'], 3)} (median; spread over ranks "
              f"{number(summary['spread'], 2)}x, uncertainty x/{number(summary['uncertainty'], 2)}) on "
              f"{summary['target']}"]
    fit = summary.get("fit")
    if fit:
        low, high = fit["parameters_range"]
        lines.append(f"kappa(P) = exp({number(fit['intercept'], 3)}) x P^{number(fit['exponent'], 3)} over "
                     f"{count(low)} to {count(high)} LoRA parameters ({fit['points']} ranks; held at the nearest end "
                     "outside)")
    else:
        lines.append("kappa(P): flat (fewer than three learned ranks spanning 4x in parameters)")
    bracket = summary.get("bracket")
    if bracket:
        lines += ["", f"bracket at rank {bracket['rank']} ({count(bracket['lora_parameters'])} LoRA parameters):"]
        lines += ["  " + line for line in table(
            ["load (bits offered/param)", "bits held", "held/param", "x capacity"],
            [[significant(load, 3), count(held), number(held / bracket["lora_parameters"], 3),
              number(load / bracket["bits_per_parameter"], 2) if bracket["bits_per_parameter"] else MISSING]
             for load, held in zip(bracket["loads"], bracket["held_bits"])])]
        lines.append(f"  {_bracket_finding(bracket)}")
    lines += [f"  - {n}" for n in summary["notes"]]
    return "\n".join(lines)


def _bracket_finding(bracket: dict[str, Any]) -> str:
    finding = bracket["finding"]
    if finding == "not learned":
        return "the adapter held nothing at any load: capacity not measured"
    largest = significant(bracket["loads"][-1], 3)
    if finding == "growing":
        return (f"capacity not reached: held bits still grew at the largest load, {largest} (not bracketed: offer "
                "larger loads, or more epochs)")
    head = f"capacity: held bits stop growing at load {significant(bracket['capacity_load'], 3)}"
    share = f"{bracket['examined_share']:.0%}"
    if finding == "collapse":
        return (f"{head}; collapse at load {significant(bracket['collapse_load'], 3)} "
                f"(~{significant(bracket['collapse'], 2)}x capacity): held {share} of its most")
    return (f"{head}; a plateau: at load {significant(bracket['examined_load'], 3)} "
            f"(~{significant(bracket['examined_multiple'], 2)}x capacity) it still held {share} of its most")
