"""The report of tools/reproduce_small.sh: the per-exit table of SFT, SFT+ICT and SoFT, and the
paper's four claims checked against the measured numbers (`soft-ds eval claims OUT`).

    reproduction_report(Path("runs/reproduce_small"))   -> the text of runs/reproduce_small/report.md

Reads OUT/eval/lm.json and OUT/eval/kl.json (`soft-ds eval lm` and `kl` of the models named sft,
ict and soft) and OUT/ict/summary.json (SFT+ICT's training run). The claims are qualitative in the
paper; the thresholds that turn them into PASS/MISS are ours and printed beside each verdict.
"""

from __future__ import annotations

import json
from pathlib import Path

MUCH_WORSE = 2.0  # claim 1: SFT's intermediate exits' perplexity >= this x SoFT's
CLOSE = 0.10  # claim 2: SoFT's full model within 10% of SFT's perplexity
APPROACHES = 1.25  # claim 3: SoFT's ~80%-depth exit within 25% of SFT's full model


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error} (did tools/reproduce_small.sh finish that stage?)") from None


def verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def check_claims(ppl: dict[str, dict[int, float]], extra_parameters: int) -> list[str]:
    """The four claims, one line each ending in **PASS** or **MISS**: ppl[model][exit] is the
    held-out perplexity of "sft", "ict" and "soft"; extra_parameters, what SFT+ICT's heads add."""
    exits = sorted(ppl["soft"])
    last, inner = exits[-1], exits[:-1]
    deep = min(exits, key=lambda n: abs(n / last - 0.8))  # the exit nearest 80% depth
    lines = []
    ratios = {n: ppl["sft"][n] / ppl["soft"][n] for n in inner}
    lines.append(f"1. SFT's intermediate exits are much worse than SoFT's (perplexity ratio SFT / SoFT >= "
                 f"{MUCH_WORSE} at every exit below the last): "
                 + ", ".join(f"exit {n}: {r:.2f}x" for n, r in ratios.items())
                 + f" — {verdict(all(r >= MUCH_WORSE for r in ratios.values()))}")
    gap = ppl["soft"][last] / ppl["sft"][last] - 1
    lines.append(f"2. SoFT's full model stays close to SFT's (within {CLOSE:.0%}): perplexity {ppl['soft'][last]:.2f} "
                 f"vs {ppl['sft'][last]:.2f} ({gap:+.1%}) — {verdict(abs(gap) <= CLOSE)}")
    ratio = ppl["soft"][deep] / ppl["sft"][last]
    lines.append(f"3. A SoFT exit at ~80% depth approaches SFT's full model (exit {deep} of {last}, perplexity "
                 f"within {APPROACHES}x): {ppl['soft'][deep]:.2f} vs {ppl['sft'][last]:.2f} ({ratio:.2f}x) — "
                 f"{verdict(ratio <= APPROACHES)}")
    beats = {n: ppl["soft"][n] < ppl["ict"][n] for n in inner}
    lines.append(f"4. SoFT's exits beat SFT+ICT's separate heads, with no extra parameters (ICT adds "
                 f"{extra_parameters:,}): " + ", ".join(
                     f"exit {n}: {ppl['soft'][n]:.2f} vs {ppl['ict'][n]:.2f}" for n in inner)
                 + f" — {verdict(all(beats.values()))}")
    return lines


def reproduction_report(out: Path) -> str:
    """The markdown report of the reproduction in folder `out`; ValueError if a result is missing."""
    lm = read_json(out / "eval" / "lm.json")
    kl = read_json(out / "eval" / "kl.json")
    ict = read_json(out / "ict" / "summary.json")
    names = ["sft", "ict", "soft"]
    missing = [name for name in names if name not in lm["models"]]
    if missing:
        raise ValueError(f"{out / 'eval' / 'lm.json'} lacks model(s) {missing}")
    ppl = {name: {int(n): v["ppl"] for n, v in lm["models"][name]["exits"].items()} for name in names}
    loss = {name: {int(n): v["loss"] for n, v in lm["models"][name]["exits"].items()} for name in names}
    mean_kl = {name: {int(n): v["mean"] for n, v in kl["models"][name]["exits"].items()} for name in names}
    exits = sorted(ppl["soft"])

    header = ("| exit | SFT ppl | SFT+ICT ppl | SoFT ppl | SFT loss | SFT+ICT loss | SoFT loss "
              "| KL to own last layer: SFT | SFT+ICT | SoFT |\n|" + "---:|" * 10)
    rows = [f"| {n} | {ppl['sft'][n]:.2f} | {ppl['ict'][n]:.2f} | {ppl['soft'][n]:.2f} | {loss['sft'][n]:.4f} | "
            f"{loss['ict'][n]:.4f} | {loss['soft'][n]:.4f} | {mean_kl['sft'][n]:.3f} | {mean_kl['ict'][n]:.3f} | "
            f"{mean_kl['soft'][n]:.3f} |" for n in exits]
    report = [
        "# Sorted fine-tuning at small scale: SFT vs SFT+ICT vs SoFT, per exit", "",
        f"Held-out perplexity and loss over the response tokens of {lm['records']} records of {lm['data']} that "
        f"training held out (val_size {lm['val_size']}, seed {lm['seed']}, {lm['max_length']} tokens per record); "
        f"mean KL(last layer || exit) over greedy responses to {kl['prompts']} held-out prompts.", "",
        header, *rows, "", "## The paper's claims", "", *check_claims(ppl, ict["extra_parameters"]), "",
        "Plots: `eval/ppl_vs_exit.png`, `eval/kl_vs_position.png`.", ""]
    return "\n".join(report)
