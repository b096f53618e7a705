"""soft_ds.eval.triviaqa (both released formats, normalisation, EM/F1, prompts) on fixtures written here,
and `soft-ds eval triviaqa` on a tiny checkpoint."""

import json

import datasets
import pytest
from _eval_checkpoints import REPO, assert_cli_refuses, one_thread, save_checkpoint  # noqa: F401
from conftest import run_cli

from soft_ds.data.records import DataError
from soft_ds.data.templates import encode_prompt
from soft_ds.data.tokenizer import load_tokenizer
from soft_ds.eval import triviaqa
from soft_ds.eval.triviaqa import Question, exact_match, f1_score, normalize_answer

# Three questions as the Hugging Face `trivia_qa` (rc.nocontext) records hold them...
HF_RECORDS = [
    {"question": "Which Lloyd Webber musical premiered in the US on 10th December 1993?",
     "question_id": "tc_33", "question_source": "http://www.triviacountry.com/",
     "answer": {"aliases": ["Sunset Blvd", "Sunset Boulevard", "Sunset Bulevard"], "value": "Sunset Boulevard",
                "normalized_aliases": ["sunset boulevard", "sunset bulevard", "sunset blvd"],
                "normalized_value": "sunset boulevard", "type": "WikipediaEntity",
                "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": ""}},
    {"question": "Who was the man behind The Chipmunks?", "question_id": "tc_2",
     "question_source": "http://www.triviacountry.com/",
     "answer": {"aliases": ["David Seville"], "value": "David Seville", "normalized_aliases": ["david seville"],
                "normalized_value": "david seville", "type": "WikipediaEntity",
                "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": ""}},
    {"question": "In which year did the Beatles' 'Abbey Road' come out?", "question_id": "qb_7",
     "question_source": "http://www.quizballs.com/",
     "answer": {"aliases": ["1969", "one thousand, nine hundred and sixty-nine"], "value": "1969",
                "normalized_aliases": ["1969", "one thousand nine hundred and sixty nine"],
                "normalized_value": "1969", "type": "Numerical",
                "matched_wiki_entity_name": "", "normalized_matched_wiki_entity_name": ""}},
]
# ...and as the original release's qa/*.json holds them.
ORIGINAL = {"Data": [{"Question": r["question"], "QuestionId": r["question_id"],
                      "QuestionSource": r["question_source"],
                      "Answer": {"Aliases": r["answer"]["aliases"], "Value": r["answer"]["value"],
                                 "NormalizedAliases": r["answer"]["normalized_aliases"],
                                 "NormalizedValue": r["answer"]["normalized_value"], "Type": r["answer"]["type"]}}
                     for r in HF_RECORDS],
            "Domain": "Web", "Split": "dev", "Version": 1.0, "VerifiedEval": False}
EXPECTED = [Question("tc_33", HF_RECORDS[0]["question"], ("Sunset Boulevard", "Sunset Blvd", "Sunset Bulevard",
                                                          "sunset boulevard", "sunset bulevard", "sunset blvd")),
            Question("tc_2", "Who was the man behind The Chipmunks?", ("David Seville", "david seville")),
            Question("qb_7", HF_RECORDS[2]["question"], ("1969", "one thousand, nine hundred and sixty-nine",
                                                          "one thousand nine hundred and sixty nine"))]


# --- normalisation and scores --------------------------------------------------------------------


@pytest.mark.parametrize("text,normalized", [
    ("The Beatles!", "beatles"),
    ("  Sunset   BOULEVARD. ", "sunset boulevard"),
    ("rock_and_roll", "rock and roll"),
    ("Rock\u2019n\u2019roll", "rock n roll"),  # punctuation becomes a space (TriviaQA), not nothing (SQuAD)
    ("an apple a day", "apple day"),
    ("Theatre", "theatre"),  # 'the' only as a word
    ("U.S.A.", "u s"),  # "u s a" loses the article-shaped "a": the official script does the same
    ("", ""),
])
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_and_f1_take_the_best_gold_answer():
    gold = ["Sunset Boulevard", "Sunset Blvd"]
    assert exact_match("sunset blvd.", gold) == 1.0
    assert exact_match("Sunset Boulevard (musical)", gold) == 0.0
    # Token F1 by hand: prediction {sunset, boulevard, musical} vs {sunset, boulevard}: P 2/3, R 1, F1 0.8;
    # vs {sunset, blvd}: P 1/3, R 1/2, F1 0.4. The best is kept.
    assert f1_score("Sunset Boulevard (musical)", gold) == pytest.approx(0.8)
    assert f1_score("the Paris", ["Paris, France"]) == pytest.approx(2 * 1 * 0.5 / 1.5)
    assert f1_score("London", gold) == 0.0 and f1_score("", gold) == 0.0
    scores = triviaqa.score_predictions(EXPECTED, ["Sunset Blvd", "Alvin", "It was 1969"])
    assert [s["em"] for s in scores["per_question"]] == [1.0, 0.0, 0.0]
    assert scores["em"] == pytest.approx(1 / 3) and scores["n"] == 3
    assert scores["f1"] == pytest.approx((1.0 + 0.0 + 2 * (1 / 3) * 1 / (1 / 3 + 1)) / 3)


# --- loading every released format -----------------------------------------------------------------


def write_formats(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "list.json").write_text(json.dumps(HF_RECORDS))
    (root / "lines.jsonl").write_text("\n".join(json.dumps(r) for r in HF_RECORDS) + "\n")
    (root / "original.json").write_text(json.dumps(ORIGINAL))
    dataset = datasets.Dataset.from_list(HF_RECORDS)
    dataset.to_json(root / "to_json.json")  # one object per line, in a .json file
    dataset.to_parquet(root / "validation.parquet")
    dataset.save_to_disk(root / "dataset")
    datasets.DatasetDict({"validation": dataset, "train": dataset.select([0])}).save_to_disk(root / "dataset_dict")
    return root


@pytest.fixture(scope="module")
def formats(tmp_path_factory):
    return write_formats(tmp_path_factory.mktemp("triviaqa"))


@pytest.mark.parametrize("name,split", [("list.json", None), ("lines.jsonl", None), ("original.json", None),
                                        ("to_json.json", None), ("validation.parquet", None), ("dataset", None),
                                        ("dataset_dict", "validation")])
def test_every_format_loads_the_same_questions(formats, name, split):
    assert triviaqa.load_triviaqa(formats / name, split) == EXPECTED


def test_bad_files_name_the_problem(formats, tmp_path):
    def fails(path, message, split=None):
        with pytest.raises(DataError, match=message):
            triviaqa.load_triviaqa(path, split)

    fails(tmp_path / "missing.json", "no such file or directory")
    fails(formats / "dataset_dict", r"holds splits \['train', 'validation'\]; choose one")
    fails(formats / "dataset_dict", "no split 'test'", split="test")
    (tmp_path / "data.csv").write_text("question,answer\n")
    fails(tmp_path / "data.csv", "expected .json, .jsonl, .parquet or a `save_to_disk` folder")
    (tmp_path / "broken.json").write_text('{"Data": [')
    fails(tmp_path / "broken.json", "malformed JSON")
    (tmp_path / "object.json").write_text(json.dumps({"data": []}))
    fails(tmp_path / "object.json", "an object with a 'Data' list")
    (tmp_path / "alpaca.json").write_text(json.dumps([{"instruction": "x", "output": "y"}]))
    fails(tmp_path / "alpaca.json", "record 0 has neither 'question'")
    (tmp_path / "no_answer.json").write_text(json.dumps([{"question": "Q?", "answer": {"value": "", "aliases": []}}]))
    fails(tmp_path / "no_answer.json", "record 0: no gold answer")
    (tmp_path / "empty.jsonl").write_text("\n")
    fails(tmp_path / "empty.jsonl", "file is empty")
    (tmp_path / "none.json").write_text("[]")
    fails(tmp_path / "none.json", "holds no questions")
    (tmp_path / "bad_line.jsonl").write_text(json.dumps(HF_RECORDS[0]) + "\n{oops\n")
    fails(tmp_path / "bad_line.jsonl", "malformed JSON at line 2")
    (tmp_path / "folder").mkdir()
    fails(tmp_path / "folder", "not a `datasets` save_to_disk folder")


# --- prompts ---------------------------------------------------------------------------------------


def test_prompts_and_answer_extraction():
    tokenizer = load_tokenizer(REPO / "data" / "tokenizer")
    ids = triviaqa.prompt_ids("Who wrote Hamlet?", tokenizer, "qa")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids[1:]) == "Answer these questions:\nQ: Who wrote Hamlet?\nA:"
    assert triviaqa.prompt_ids("Who wrote Hamlet?", tokenizer, "alpaca") == \
        encode_prompt({"instruction": "Who wrote Hamlet?"}, tokenizer)
    with pytest.raises(ValueError, match="prompt style 'chat'"):
        triviaqa.prompt_ids("Q", tokenizer, "chat")
    assert triviaqa.extract_answer(" William Shakespeare\nQ: Who wrote Macbeth?\nA: ...") == "William Shakespeare"
    assert triviaqa.extract_answer("\n\n  Paris \n") == "Paris" and triviaqa.extract_answer("  ") == ""


# --- the CLI -------------------------------------------------------------------------------------


def test_triviaqa_cli(formats, tmp_path, capsys):
    checkpoint = save_checkpoint(tmp_path / "soft", seed=8)
    out = tmp_path / "out"
    result = run_cli(capsys, "eval", "triviaqa", "--model", f"soft={checkpoint}", "--exits", "2,4", "--data",
                     formats / "dataset_dict", "--split", "validation", "--limit", "2", "--max-new-tokens", "3",
                     "--prompt-style", "alpaca", "--out", out)
    assert result.returncode == 0, result.stderr
    written = json.loads((out / "triviaqa.json").read_text())
    assert written["questions"] == 2 and set(written["models"]["soft"]["exits"]) == {"2", "4"}
    predictions = json.loads((out / "triviaqa_predictions.json").read_text())["soft"]
    for n in ("2", "4"):
        rows = predictions[n]
        assert [row["id"] for row in rows] == ["tc_33", "tc_2"]
        # The written scores are the scoring of the written predictions.
        rescored = triviaqa.score_predictions(EXPECTED[:2], [row["prediction"] for row in rows])
        assert written["models"]["soft"]["exits"][n] == {"em": rescored["em"], "f1": rescored["f1"], "n": 2}
    table = (out / "triviaqa.md").read_text()
    assert table in result.stdout and "| exit | soft EM | soft F1 |" in table
    assert (out / "triviaqa_vs_exit.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("extra,message", [
    (["--exits", "9"], "exit(s) [9] out of range for soft: it has 4 layers"),
    (["--data", "/nonexistent.json"], "no such file or directory"),
    (["--split", "test"], "no split 'test'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be a positive integer"),
])
def test_triviaqa_cli_bad_input(formats, tmp_path, capsys, extra, message):
    checkpoint = save_checkpoint(tmp_path / "soft", seed=8)
    out = tmp_path / "out"
    args = ["triviaqa", "--model", f"soft={checkpoint}", "--data", str(formats / "dataset_dict"), "--out", str(out)]
    assert_cli_refuses(args + extra, capsys, out, message)  # a second --data replaces the first
