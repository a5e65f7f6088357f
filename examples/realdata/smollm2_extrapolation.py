"""The SmolLM2 study's 2-epoch probes extrapolated to an 8-epoch plan by today's rule, against what the 8-epoch probes
of the same recipe measured.

``smollm2_recipe.py`` ran when a probe with one epoch past the first was held flat (it returned 0.19-0.36x of the
measured bits); the rule is now proportional to the epochs in that case (``extrapolate_epochs``). The rule needs
only each probe's per-epoch curve, which ``docs/information/smollm2_recipe.json`` holds, so this re-reads it with
the library's function instead of training again (50 minutes on 2 cores).

    python examples/realdata/smollm2_extrapolation.py   # seconds; writes docs/information/smollm2_extrapolation.json
"""

from __future__ import annotations

import json
from pathlib import Path

from lorascope.analysis.recipe import extrapolate_epochs

DOCS = Path(__file__).resolve().parents[2] / "docs" / "information"


def main() -> None:
    study = json.loads((DOCS / "smollm2_recipe.json").read_text())
    rows = study["rows"]
    out = []
    for short in (r for r in rows if r["epochs"] == 2):
        long = next(r for r in rows if r["epochs"] == 8 and r["lr"] == short["lr"]
                    and r["schedule"] == short["schedule"])
        plan = short["planned"]["8"]
        curve = [tuple(p) for p in plan["per_epoch"]]
        now = extrapolate_epochs(curve, curve[-1][1], 2.0, 8.0, plan["code_length_per_example"])
        measured = long["planned"]["8"]["bits_per_example"]
        out.append({"lr": short["lr"], "schedule": short["schedule"], "per_epoch": curve,
                    "before": plan["bits_per_example"], "now": now, "measured_by_8_epoch_probe": measured,
                    "before_over_measured": plan["bits_per_example"] / measured, "now_over_measured": now / measured})
        print(f"lr {short['lr']:g} {short['schedule']:8s}: before {plan['bits_per_example']:6.1f}, now {now:6.1f}, "
              f"measured {measured:6.1f} (now / measured {now / measured:.2f})")
    (DOCS / "smollm2_extrapolation.json").write_text(json.dumps(
        {"command": "python examples/realdata/smollm2_extrapolation.py", "source": "smollm2_recipe.json",
         "rows": out}, indent=1) + "\n")


if __name__ == "__main__":
    main()
