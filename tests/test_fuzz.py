"""Broken pair files in bulk: generated from real pairs, each is fed to `finetune`, `evaluate` and `predict --file`
in one process. Every command either works, or exits non-zero with one line `error: ...`; no traceback, and no
partial output (a half-made run dir, an evaluation folder, a prediction file) is left behind."""
import csv
import json
import os
import random
import traceback

import pytest

from conftest import DEV_PAIRS, SNLI_TXT_COLUMNS
from nli import cli

SEED = 28
FORMATS = (".tsv", ".jsonl", ".txt")  # pair files, and SNLI's own .txt (its 14 columns) and .jsonl
MEGABYTE = 1 << 20
FINETUNE = ["--limit-train", "16", "--limit-test", "16", "--epochs", "1", "--batch-size", "8", "--max-len", "32",
            "--devices", "cpu", "--quiet"]


def real_pairs():
    """The first 200 real SNLI dev pairs: (premise, hypothesis, label), tokenized text."""
    with open(DEV_PAIRS, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [tuple(row) for row in rows[1:201]]


def snli_row(premise, hypothesis, label, rng):
    """One line of SNLI's .txt/.jsonl: a binary parse, a parse and the raw text of both sentences, ids, votes."""
    votes = [label] + [rng.choice(["entailment", "contradiction", "neutral"]) for _ in range(4)]
    pair_id = f"{rng.randrange(10 ** 9)}.jpg#{rng.randrange(5)}"
    return dict(zip(SNLI_TXT_COLUMNS, [label, f"( {premise} )", f"( {hypothesis} )", f"(ROOT (S {premise}))",
                                       f"(ROOT (S {hypothesis}))", premise, hypothesis, pair_id, pair_id + "r1n",
                                       *votes]))


def snli_json(row, rng):
    """An SNLI .jsonl object of `row`: the .txt line's fields, but the votes in one list, annotator_labels."""
    fields = snli_row(*row[:3], rng)
    return {**{k: v for k, v in fields.items() if not k.startswith("label")},
            "annotator_labels": [v for k, v in fields.items() if k.startswith("label")]}


def txt_line(row, rng):
    """An SNLI .txt line of `row`: its fields past the third appended, or as many of the last dropped as it lacks."""
    fields = list(snli_row(*(list(row[:3]) + [""] * (3 - len(row[:3]))), rng).values())
    return "\t".join(fields[:len(fields) - max(3 - len(row), 0)] + list(row[3:]))


def render(ext, rows, rng, header=True):
    """The text of a pair file of `rows` (premise, hypothesis, label, then any extra fields) in format `ext`."""
    if ext == ".jsonl":
        objects = [snli_json(row, rng) if rng.random() < 0.5 else dict(zip(("premise", "hypothesis", "label"), row))
                   for row in rows]
        return "".join(json.dumps(obj, ensure_ascii=rng.random() < 0.5) + "\n" for obj in objects)
    if ext == ".txt":
        lines = [txt_line(row, rng) for row in rows]
        return "\n".join(["\t".join(SNLI_TXT_COLUMNS)] * header + lines) + "\n"
    return "\n".join(["premise\thypothesis\tlabel"] * header + ["\t".join(row) for row in rows]) + "\n"


def mutated(text, rng, damage):
    """`text` with one kind of damage at a random line (after the header)."""
    lines = text.split("\n")
    at = rng.randrange(1, max(len(lines) - 1, 2))
    if damage == "invalid utf-8":
        data = [line.encode("utf-8") for line in lines]
        data[at] = data[at][:5] + rng.choice([b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"]) \
            + data[at][5:]
        return b"\n".join(data)
    if damage == "nul":
        lines[at] = lines[at][:3] + "\0" + lines[at][3:]
    elif damage == "truncated":
        return text[:rng.randrange(1, len(text))].encode("utf-8")
    elif damage == "crlf":
        return text.replace("\n", "\r\n").encode("utf-8")
    elif damage == "cr":
        return text.replace("\n", "\r").encode("utf-8")
    elif damage == "bom":
        return b"\xef\xbb\xbf" + text.encode("utf-8")
    elif damage == "blank lines":
        lines[at:at] = ["", "   ", "\t"]
    elif damage == "header again":
        lines[at:at] = [lines[0]]
    return "\n".join(lines).encode("utf-8")


DAMAGES = ("invalid utf-8", "nul", "truncated", "crlf", "cr", "bom", "blank lines", "header again")
# Files every command must take: nothing is wrong with their pairs, only with how an editor saved them
MUST_WORK = ("valid", "crlf", "cr", "bom", "blank lines", "a raw tab in a string")


def broken_rows(pairs, rng):
    """(name, rows, header) of row-level damage: empty sentences, wrong field counts, labels, unicode, headers."""
    def some(n=6):
        return [list(p) for p in rng.sample(pairs, n)]
    cases = []
    for name, edit in [
        ("empty premise", lambda r: r.__setitem__(0, "")),
        ("empty hypothesis", lambda r: r.__setitem__(1, "")),
        ("blank premise", lambda r: r.__setitem__(0, "   ")),
        ("a megabyte premise", lambda r: r.__setitem__(0, " ".join(rng.choice(["a", "man", "dog", "runs", "."])
                                                                  for _ in range(MEGABYTE // 3)))),
        ("control characters", lambda r: r.__setitem__(0, "".join(
            c + rng.choice(["\x1b[31m", "\x0b", "\x0c", "\x1c", "\u2028", "\x85", "\u200b", "\0", ""]) for c in r[0]))),
        ("parentheses only", lambda r: r.__setitem__(0, "( )")),
        ("extra column", lambda r: r.append("surplus")),
        ("missing column", lambda r: r.pop()),
        ("missing two columns", lambda r: (r.pop(), r.pop())),
        ("unknown label", lambda r: r.__setitem__(2, rng.choice(["Entailment", "maybe", "0", "contradicts", "x"]))),
        ("empty label", lambda r: r.__setitem__(2, "")),
        ("spaced label", lambda r: r.__setitem__(2, f" {r[2]} ")),
        ("emoji and scripts", lambda r: r.__setitem__(0, r[0] + " 🐕‍🦺 مرحبا שלום 漢字 e\u0301")),
        ("quotes", lambda r: r.__setitem__(0, '"' + r[0] + '" \'quoted\' "unclosed')),
        ("backslashes", lambda r: r.__setitem__(1, r[1] + " \\t \\n \\u12 \\")),
        ("a long word", lambda r: r.__setitem__(1, "x" * 5000)),
        ("dash premise", lambda r: r.__setitem__(0, "-")),
        ("a thousand fields", lambda r: r.extend([""] * 1000)),
    ]:
        rows = some()
        edit(rows[rng.randrange(len(rows))])
        cases.append((name, rows, True))
    cases.append(("only unlabelled pairs", [[p, h, "-"] for p, h, _ in rng.sample(pairs, 5)], True))
    cases.append(("header only", [], True))
    cases.append(("no header", some(), False))
    return cases


def generated_cases():
    """(name, file name, bytes) of every case, the same on every run (seeded)."""
    rng = random.Random(SEED)
    pairs = real_pairs()
    cases = []
    for ext in FORMATS:
        for i in range(3):
            cases.append((f"valid {i}", ext, render(ext, rng.sample(pairs, 8), rng).encode("utf-8")))
        for n in (0, 1, 7, 100, 4000, 30000):
            cases.append((f"{n} random bytes", ext, bytes(rng.randrange(256) for _ in range(n))))
        for i in range(3):
            cases.append((f"random text {i}", ext, "".join(rng.choice("ab\t\n {}\":,[]-") for _ in range(500))
                          .encode("utf-8")))
        cases.append(("NUL bytes only", ext, b"\0" * 64))
        cases.append(("one megabyte line of garbage", ext, b"q" * MEGABYTE + b"\n"))
        for damage in DAMAGES:
            for i in range(4):
                cases.append((f"{damage} {i}", ext, mutated(render(ext, rng.sample(pairs, 6), rng), rng, damage)))
        for name, rows, header in broken_rows(pairs, rng):
            if ext == ".jsonl" and not header:
                continue
            if ext == ".jsonl" and any(len(row) != 3 for row in rows):  # fields missing or extra: keys in JSON
                objects = [dict(zip(("premise", "hypothesis", "label", "extra"), row)) for row in rows]
                cases.append((name, ext, "".join(json.dumps(o) + "\n" for o in objects).encode("utf-8")))
                continue
            cases.append((name, ext, render(ext, rows, rng, header).encode("utf-8")))
    for name, line in [("a JSON array", "[1, 2]"), ("a JSON string", '"premise"'), ("null", "null"),
                       ("numbers for text", '{"premise": 1, "hypothesis": 2, "label": "neutral"}'),
                       ("null label", '{"premise": "A man .", "hypothesis": "A person .", "label": null}'),
                       ("nested", '{"premise": {"text": "A man ."}, "hypothesis": "A person .", "label": "neutral"}'),
                       ("other keys", '{"text_a": "A man .", "text_b": "A person .", "label": "neutral"}'),
                       ("a lone surrogate", '{"premise": "A man \\ud800 .", "hypothesis": "A person .", '
                                            '"label": "neutral"}'),
                       ("a raw tab in a string", '{"premise": "A man\t.", "hypothesis": "A person .", '
                                                 '"label": "neutral"}'),
                       ("a trailing comma", '{"premise": "A man .", "hypothesis": "A person .", "label": "neutral",}'),
                       ("duplicate keys", '{"premise": "A man .", "premise": "", "hypothesis": "A person .", '
                                          '"label": "neutral"}')]:
        valid = render(".jsonl", rng.sample(pairs, 4), rng)
        cases.append((name, ".jsonl", (valid + line + "\n" + valid).encode("utf-8")))
    cases.append(("a directory", ".tsv", None))
    for ext in (".csv", ".json", ""):  # not a pair file's name
        cases.append((f"named {ext or 'without extension'}", ext, render(".tsv", rng.sample(pairs, 4), rng)
                      .encode("utf-8")))
    return cases


CASES = generated_cases()


@pytest.fixture(scope="module")
def trained(training_bert_dir, tmp_path_factory):
    """A run fine-tuned on 16 real pairs (to evaluate and predict with) and a valid file of 16 pairs."""
    root = tmp_path_factory.mktemp("fuzz")
    valid = root / "valid.tsv"
    valid.write_text(render(".tsv", real_pairs()[:16], random.Random(SEED)), encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NLI_DATA_DIR", str(root / "data"))  # the encoded-pairs cache
        assert cli.main(["finetune", "--model", training_bert_dir, "--train", str(valid), "--test", str(valid),
                         "--out", str(root / "run"), *FINETUNE]) == 0
        yield training_bert_dir, str(root / "run"), str(valid)


def run(argv, capsys):
    """(exit status, stderr, traceback or None) of `nli ARGV` called in this process."""
    try:
        status, escaped = cli.main(argv), None
    except SystemExit as e:
        status, escaped = e.code, None
    except Exception:  # anything else escaping main is what this test hunts
        status, escaped = None, traceback.format_exc(limit=-4)
    return status, capsys.readouterr().err, escaped


def input_lines(content):
    """The lines `predict --file` answers: every line, the last one even without a newline."""
    return len(content.split(b"\n")) - content.endswith(b"\n")


def unanswered(output, content):
    """What a successful `predict --file` left unanswered: it must answer every line after a header line."""
    with open(output, encoding="utf-8") as f:
        numbers = [json.loads(line)["line"] for line in f]
    first = numbers[0] if numbers else 2
    # No answer at all is right only for a file of one line, its header (\r ends a line too, for splitlines)
    if first in (1, 2) and numbers == list(range(first, input_lines(content) + 1)) and \
            (numbers or len(content.splitlines()) <= 1):
        return []
    return [f"answered lines {numbers[:5]}... of {input_lines(content)}"]


def missing(folder, name):
    """['no NAME'] unless `folder` holds the file `name`, which a successful command writes."""
    return [] if os.path.exists(os.path.join(folder, name)) else [f"no {name}"]


def problems(command, status, err, escaped, output, works, must_work):
    """What is wrong with how one command ended; an empty list when it worked or failed as it should."""
    if escaped:
        return [f"{command}: traceback\n{escaped}"]
    if status == 0:
        return [f"{command}: {why}" for why in works()]
    if must_work:
        return [f"{command}: refused a file it must take: {err.strip()[-300:]}"]
    lines = err.strip().splitlines()
    found = []
    if not lines or not lines[-1].startswith("error: ") or sum(line.startswith("error:") for line in lines) != 1:
        found.append(f"{command}: status {status}, stderr not one `error:` line: {err[-600:]!r}")
    if os.path.lexists(output):
        found.append(f"{command}: failed and left {output}")
    return found


def write_case(folder, ext, content):
    """The path of the case's pair file, written into a new `folder` (a directory of that name if no content)."""
    folder.mkdir()
    path = str(folder / f"pairs{ext}")
    if content is None:
        os.mkdir(path)
    else:
        with open(path, "wb") as f:
            f.write(content)
    return path


def test_broken_pair_files_work_or_fail_in_one_sentence_leaving_nothing(trained, tmp_path, capsys):
    model_dir, run_dir, valid = trained
    assert len(CASES) >= 200
    found, outcomes = [], {"finetune": [0, 0], "evaluate": [0, 0], "predict": [0, 0]}
    for i, (name, ext, content) in enumerate(CASES):
        folder = tmp_path / str(i)
        path = write_case(folder, ext, content)
        train, test = [(path, valid), (valid, path), (path, path)][i % 3]  # the last: the same file given twice
        run_out, eval_out, predicted = (str(folder / file) for file in ("run", "eval", "predicted.jsonl"))
        for command, argv, output, works in [
            ("finetune", ["--model", model_dir, "--train", train, "--test", test, "--out", run_out, *FINETUNE],
             run_out, lambda: missing(run_out, "model.params")),
            ("evaluate", ["--run", run_dir, "--test", path, "--out", eval_out, "--errors", "3", "--quiet"],
             eval_out, lambda: missing(eval_out, "eval.json")),
            ("predict", ["--run", run_dir, "--file", path, "--output", predicted, "--quiet"],
             predicted, lambda: unanswered(predicted, content)),
        ]:
            status, err, escaped = run([command, *argv], capsys)
            found += problems(f"{i} {name} ({ext}): {command}", status, err, escaped, output, works,
                              must_work=name.rstrip(" 0123456789") in MUST_WORK)
            outcomes[command][status != 0] += 1
        leftovers = sorted(set(os.listdir(folder)) - {os.path.basename(p) for p in (path, run_out, eval_out,
                                                                                    predicted)})
        found += [f"{i} {name} ({ext}): left {leftovers}"] if leftovers else []
    assert not found, f"{len(found)} problems:\n" + "\n".join(found)
    # Both ends are exercised: some files work and some are refused, by each command
    assert all(worked and refused for worked, refused in outcomes.values()), outcomes
