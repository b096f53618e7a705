"""The report of a reproduction (tools/reproduce_small.sh, tools/reproduce_real.sh): the per-exit
table of SFT, SFT+ICT and SoFT, and the paper's claims checked against the measured numbers
(`soft-ds eval claims OUT [--goals small|real]`).

    reproduction_report(Path("runs/reproduce_small"))          -> the text of OUT/report.md
    reproduction_report(Path("runs/reproduce_real"), "real")

Reads OUT/eval/lm.json and OUT/eval/kl.json (`soft-ds eval lm` and `kl` of the models named sft,
ict and soft, and optionally base: the model before fine-tuning) and OUT/ict/summary.json (SFT+ICT's
training run). The claims are qualitative in the paper; the thresholds that turn them into
PASS/MISS are ours and printed beside each verdict. "small" judges perplexity ratios (a toy model
from random initialisation); "real" judges the absolute losses in nats a pretrained model must
reach (SmolLM2-135M: exits at 2/3 and 5/6 depth, the full model against SFT's).
"""

from __future__ import annotations

import json
from pathlib import Path

from soft_ds.eval.report import verdict

MUCH_WORSE = 2.0  # claim 1: SFT's intermediate exits' perplexity >= this x SoFT's
CLOSE = 0.10  # claim 2: SoFT's full model within 10% of SFT's perplexity
APPROACHES = 1.25  # claim 3: SoFT's ~80%-depth exit within 25% of SFT's full model

# Goals on a pretrained model, in nats of held-out response-token loss (tools/reproduce_real.sh).
GIBBERISH = 8.0  # SFT's exits up to 5/6 depth stay above this (a uniform guess over 49,152 tokens: 10.8)
READABLE = {2 / 3: 3.5, 5 / 6: 2.8}  # SoFT's exit nearest each depth fraction reaches at most this
FULL_RATIO = 1.05  # SoFT's full model's loss at most this x SFT's


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: {error} (did tools/reproduce_small.sh finish that stage?)") from None


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
                 + f" — **{verdict(all(r >= MUCH_WORSE for r in ratios.values()))}**")
    gap = ppl["soft"][last] / ppl["sft"][last] - 1
    lines.append(f"2. SoFT's full model stays close to SFT's (within {CLOSE:.0%}): perplexity {ppl['soft'][last]:.2f} "
                 f"vs {ppl['sft'][last]:.2f} ({gap:+.1%}) — **{verdict(abs(gap) <= CLOSE)}**")
    ratio = ppl["soft"][deep] / ppl["sft"][last]
    lines.append(f"3. A SoFT exit at ~80% depth approaches SFT's full model (exit {deep} of {last}, perplexity "
                 f"within {APPROACHES}x): {ppl['soft'][deep]:.2f} vs {ppl['sft'][last]:.2f} ({ratio:.2f}x) — "
                 f"**{verdict(ratio <= APPROACHES)}**")
    lines.append(beats_ict("4. SoFT's exits beat SFT+ICT's separate heads, with no extra parameters", ppl, inner,
                           extra_parameters))
    return lines


def beats_ict(claim: str, values: dict[str, dict[int, float]], exits: list[int], extra_parameters: int) -> str:
    """The claim line "SoFT is below SFT+ICT at every one of `exits`" (values: perplexity or loss)."""
    beats = all(values["soft"][n] < values["ict"][n] for n in exits)
    return (f"{claim} (ICT adds {extra_parameters:,}): "
            + ", ".join(f"exit {n}: {values['soft'][n]:.2f} vs {values['ict'][n]:.2f}" for n in exits)
            + f" — **{verdict(beats)}**")


def nearest_exit(exits: list[int], fraction: float) -> int:
    return min(exits, key=lambda n: abs(n / exits[-1] - fraction))


def check_real_goals(loss: dict[str, dict[int, float]], extra_parameters: int) -> list[str]:
    """The paper's claims on a pretrained model as goals in nats, one line each ending in **PASS**
    or **MISS**: loss[model][exit] is the held-out loss of "sft", "ict" and "soft"."""
    exits = sorted(loss["soft"])
    last, inner = exits[-1], exits[:-1]
    deep = nearest_exit(exits, 5 / 6)
    shallow = [n for n in exits if n <= deep]
    lines = [f"1. SFT's exits stay gibberish (loss above {GIBBERISH} nats at every exit up to {deep}; a uniform guess "
             f"is ln V): " + ", ".join(f"exit {n}: {loss['sft'][n]:.2f}" for n in shallow)
             + f" — **{verdict(all(loss['sft'][n] > GIBBERISH for n in shallow))}**"]
    for fraction, limit in READABLE.items():
        n = nearest_exit(exits, fraction)
        lines.append(f"{len(lines) + 1}. A SoFT exit at ~{fraction:.0%} depth gives readable answers (exit {n} of "
                     f"{last}, loss at most {limit} nats): {loss['soft'][n]:.2f} (SFT's exit {n}: "
                     f"{loss['sft'][n]:.2f}) — **{verdict(loss['soft'][n] <= limit)}**")
    ratio = loss["soft"][last] / loss["sft"][last]
    lines.append(f"{len(lines) + 1}. SoFT's full model stays within {FULL_RATIO - 1:.0%} of SFT's loss: "
                 f"{loss['soft'][last]:.3f} vs {loss['sft'][last]:.3f} nats ({ratio:.3f}x) — "
                 f"**{verdict(ratio <= FULL_RATIO)}**")
    lines.append(beats_ict(f"{len(lines) + 1}. SoFT beats SFT+ICT at every exit, adding no parameters", loss, inner,
                           extra_parameters))
    return lines


LABELS = {"base": "before", "sft": "SFT", "ict": "SFT+ICT", "soft": "SoFT"}
TITLES = {"small": "Sorted fine-tuning at small scale: SFT vs SFT+ICT vs SoFT, per exit",
          "real": "Sorted fine-tuning of a pretrained model: SFT vs SFT+ICT vs SoFT, per exit"}


def reproduction_report(out: Path, goals: str = "small") -> str:
    """The markdown report of the reproduction in folder `out`, its claims judged by `goals`
    ("small" or "real"); ValueError if a result is missing."""
    if goals not in TITLES:
        raise ValueError(f"goals must be one of {sorted(TITLES)}, got {goals!r}")
    lm = read_json(out / "eval" / "lm.json")
    kl = read_json(out / "eval" / "kl.json")
    ict = read_json(out / "ict" / "summary.json")
    names = ["sft", "ict", "soft"]
    missing = [name for name in names if name not in lm["models"]]
    if missing:
        raise ValueError(f"{out / 'eval' / 'lm.json'} lacks model(s) {missing}")
    scored = (["base"] if "base" in lm["models"] else []) + names  # the model before fine-tuning, when scored
    ppl = {name: {int(n): v["ppl"] for n, v in lm["models"][name]["exits"].items()} for name in scored}
    loss = {name: {int(n): v["loss"] for n, v in lm["models"][name]["exits"].items()} for name in scored}
    mean_kl = {name: {int(n): v["mean"] for n, v in kl["models"][name]["exits"].items()} for name in names}
    exits = sorted(ppl["soft"])

    def fmt(value: float, digits: int) -> str:
        return f"{value:.{digits}f}" if value < 1e5 else f"{value:.3g}"
    columns = len(scored) * 2 + len(names)
    header = ("| exit | " + " | ".join(f"{LABELS[m]} ppl" for m in scored) + " | "
              + " | ".join(f"{LABELS[m]} loss" for m in scored) + " | KL to own last layer: "
              + " | ".join(LABELS[m] for m in names) + " |\n|" + "---:|" * (columns + 1))
    rows = ["| " + " | ".join([str(n)] + [fmt(ppl[m][n], 2) for m in scored] + [fmt(loss[m][n], 4) for m in scored]
                              + [f"{mean_kl[m][n]:.3f}" for m in names]) + " |" for n in exits]
    verdicts = (check_claims(ppl, ict["extra_parameters"]) if goals == "small"
                else check_real_goals(loss, ict["extra_parameters"]))
    extras = ["Side-by-side answers of every exit: `eval/answers.md`."] if (out / "eval" / "answers.md").is_file() else []
    report = [
        f"# {TITLES[goals]}", "",
        f"Held-out perplexity and loss over the response tokens of {lm['records']} records of {lm['data']} that "
        f"training held out (val_size {lm['val_size']}, seed {lm['seed']}, {lm['seq_len']} tokens per record); "
        f"mean KL(last layer || exit) over greedy responses to {kl['prompts']} held-out prompts.", "",
        header, *rows, "", "## The paper's claims", "", *verdicts, "",
        "Plots: `eval/ppl_vs_exit.png`, `eval/kl_vs_position.png`.", *extras, ""]
    return "\n".join(report)
