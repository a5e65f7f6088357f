"""Terminal rendering of a recommendation (:meth:`lorascope.workflows.recommend.Recommendation.to_dict`) and of a
calibration (:meth:`lorascope.workflows.calibrate.Calibration.to_dict`)."""

from __future__ import annotations

from typing import Any

from lorascope.report.terminal import _count, _table

_KIND_COLUMNS = (("attention", "attn"), ("mlp", "mlp"), ("moe_expert", "experts"))


def format_recommendation(summary: dict[str, Any]) -> str:
    """Plain text: the inputs, the table per rank, the recommendation and its advice, probe evidence, notes."""
    bits, constant = summary["bits"], summary["constant"]
    model = summary["model"]
    name = model.get("model_type", model.get("class", "model"))
    lines = [
        f"model: {name} ({_count(model.get('parameters'))} parameters); task {summary['task']}; "
        f"{_count(summary['examples'])} examples"
        + (f" x {_count(summary['trained_tokens_per_example'])} trained tokens"
           if summary["trained_tokens_per_example"] else ""),
        f"bits to learn: {_count(summary['bits_to_learn'])} ({bits['explanation']})",
        f"capacity: {constant['bits_per_parameter']:.3g} bits per LoRA parameter, known to "
        f"x/{constant['uncertainty']:.3g} ({constant['source']})",
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
        row = [str(p["rank"]), *(str(p["ranks_by_kind"].get(k, "-")) for k, _ in kinds), _count(p["lora_parameters"]),
               _count(p["runway_examples"]), f"{_count(low)}..{_count(high)}"]
        row += [_count(p["tinker_runway_examples"])] if tinker else []
        row += [_verdict(p), "<" if p["rank"] == summary["rank"] else ""]
        rows.append(row)
    lines += [line.rstrip() for line in _table(header, rows)]
    by_kind = ", ".join(f"{k} {r}" for k, r in summary["ranks_by_kind"].items())
    lines += [
        "",
        f"recommended: rank {summary['rank']} ({by_kind}) on {summary['target']}, lora_alpha "
        f"{summary['lora_alpha']}, scaling {summary['scaling']}; {_count(summary['lora_parameters'])} LoRA parameters",
        *(f"  why: {p['reason']}" for p in summary["predictions"] if p["rank"] == summary["rank"]),
        "  attention-only LoRA is never recommended: it underperforms MLP-only at matched parameter count "
        "(LoRA Without Regret, 2025)",
        f"learning rate: {summary['lr_multiplier']:g}x your full fine-tuning LR ({summary['lr_reason']})",
        f"batch size: {summary['batch_advice']}",
    ]
    for probe in summary["probes"]:
        lines += ["", f"probe {probe['path']}" + (" (a LoRA run)" if probe["lora"] else "")]
        info = probe["information"]
        absorbed = "-" if info["absorbed_bits"] is None else _count(info["absorbed_bits"])
        lines.append(f"  first-epoch description length {_count(info['description_length_bits'])} bits, absorbed "
                     f"{absorbed} bits over {_count(info['epoch_examples'])} examples ({info['token_basis']})")
        spectral = probe["spectral"]
        if spectral:
            residual = ", ".join(f"e_{r}={v:.2f}" for r, v in spectral["rank_residual"].items() if v is not None)
            lines.append(f"  spectral evidence (not used in the verdict): k_0.9 = "
                         f"{_count(spectral['energy_rank_0.9'])}, signal rank {_count(spectral['signal_rank'])}, "
                         f"{residual}")
    if summary["notes"]:
        lines += ["", "notes:", *(f"  - {n}" for n in summary["notes"])]
    return "\n".join(lines)


def _verdict(prediction: dict[str, Any]) -> str:
    if prediction["verdict"] == "exceeded":
        return f"exceeded at ~{_count(prediction['runway_examples'])}"
    return prediction["verdict"]


def format_calibration(summary: dict[str, Any]) -> str:
    """Plain text of a calibration: one row per rank and the constant."""
    rows = [[str(p["rank"]), _count(p["lora_parameters"]), _count(p["facts"]), _count(p["bits_offered"]),
             _count(p["bits_stored"]), f"{p['bits_per_parameter']:.3f}"] for p in summary["points"]]
    lines = _table(["rank", "LoRA params", "facts", "bits offered", "bits stored", "bits/param"], rows)
    lines += ["", f"bits per LoRA parameter: {summary['bits_per_parameter']:.3f} (spread over ranks "
              f"{summary['spread']:.2f}x, uncertainty x/{summary['uncertainty']:.2f}) on {summary['target']}"]
    lines += [f"  - {n}" for n in summary["notes"]]
    return "\n".join(lines)
