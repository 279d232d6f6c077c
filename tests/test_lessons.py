"""The lessons' saved outputs survive a library update, and a real regression still fails them (STYLE 10).

nbval compares every code cell's saved text output unless the cell says `# NBVAL_IGNORE_OUTPUT`. So:
- a compared cell that prints a decimal number or a percentage must be one whose digits the code proves (a closed
  form, a count, an exact reduction, committed results): each such cell is listed in EXACT with the reason, and a new
  one fails here until someone has looked at it;
- an ignored cell must still check what matters (an `assert`, or `check_band` around the saved run's value), or be
  listed in UNCHECKED with the reason (a timing, or a training call whose results the next cell checks).
A cell is named by its lesson and a line of its source; editing that line means looking at the cell again.
"""
import json
import re
from pathlib import Path

import pytest

LESSONS = sorted((Path(__file__).resolve().parents[1] / "lessons").glob("*.ipynb"))
# The exercise solutions (lessons/solutions/NN_solutions.ipynb) follow the same STYLE 10 rules, so the two output tests
# below cover them too; they need no entry in EXACT or UNCHECKED (their compared cells print counts and booleans, and
# every ignored cell asserts). The time tests deliberately leave them out: the solutions are not rows of the README's
# lesson table, and their prose states no training time (their runs are a few steps, to show the procedure).
SOLUTIONS = sorted((LESSONS[0].parent / "solutions").glob("*_solutions.ipynb"))
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+|\d+(\.\d+)?\s?%")

EXACT = {  # (lesson, a line of the cell) → why its printed digits cannot drift
    ("00_vit_anatomy", "print(vit.pretrained_cfg)"): "constants read from config.json",
    ("01_vpt_shallow", "bound = math.sqrt(6 / (3 * p**2 + D))"): "closed form",
    ("01_vpt_shallow", 'print("P·D + head =", P * D + (D * 10 + 10))'): "parameter counts",
    ("01_vpt_shallow", "acc0 = evaluate(untrained, val_loader, cpu, bf16=False)"): "zero head: every logit is exactly 0, "
                                                                                  "the prediction is class 0",
    ("02_vpt_deep", "bound = math.sqrt(6 / (3 * p**2 + D))"): "closed form",
    ("02_vpt_deep", "n_prompts = sum(t.numel() for t in model.generator.parameters())"): "parameter counts",
    ("02_vpt_deep", "mib = 2 ** 20"): "parameter counts × 8 bytes, to two decimals",
    ("02_vpt_deep", "acc0 = evaluate(untrained, val_loader, cpu, bf16=False)"): "zero head",
    ("03_v2apt", 'print(f"L = {L}, D = {D}, p = {p} | P = {cfg.num_prompts}'): "the configuration",
    ("03_v2apt", 'print("same logits:", logits.shape, "| same KL | loss weights:", model.aux_weights())'): "β as set",
    ("03_v2apt", "def v2apt_params(L, D, P=10, K=8):"): "parameter counts and their ratio",
    ("03_v2apt", "n_b = sum(t.numel() for t in VAEPrompts(P, P_inst, 768, 12, 16, latent_dim=K).parameters())"):
        "parameter counts and their ratio",
    ("03_v2apt", "acc0 = evaluate(untrained, val_loader, cpu, bf16=False)"): "zero head",
    ("03_v2apt", "gen6 = VAEPrompts(P, P_inst, D, L, p, latent_dim=K)"): "β as set",
    ("03_v2apt", "names = {id(t): n for n, t in model6.named_parameters()}"): "learning rates as set: 5e-3 and 10× it",
    ("04_viapt", "def grad_through_eigh(cov):"): "float64 closed form 1/δ, printed to one significant digit",
    ("04_viapt", 'print(f"{label}: " + ", ".join(f"m = {mm}: {kept[mm - 1]:.0%}"'):
        "explained variance of the frozen model's tokens in whole percent, far from a rounding edge (96, 99, 100)",
    ("04_viapt", 'groups = {"P^data": gen.prompts.numel()'): "parameter counts",
    ("04_viapt", "acc0 = evaluate(untrained, val_loader, cpu, bf16=False)"): "zero head",
    ("05_davpt", 'print(f"L = {L}, D = {D} | P = {P} prompts per block'): "the configuration",
    ("05_davpt", "proxy_deg = torch.tensor([90.0, 210.0, 330.0])"): "the 90 % is the stated threshold; the pair counts "
                                                                      "come from ten points on a circle",
    ("05_davpt", "print(f\"chance that a batch of 32 CIFAR-10 images misses one given class"): "closed form 0.9^32",
    ("05_davpt", 'print("adjusted Rand index, ours vs scikit-learn:"'): "two identical partitions: 1.0",
    ("05_davpt", 'print(sorted(aux), "| weights:", model.aux_weights()'): "weights as set",
    ("05_davpt", "n_bias = enable_bias_tuning(vit_plus)"): "parameter counts",
    ("05_davpt", "acc0 = evaluate(untrained, val_loader, cpu, bf16=False)"): "zero head",
    ("06_vapt", "assert n_gen == vapt_param_count(P, D, L, (gh, gw), k, r)"): "parameter counts and their ratio",
    ("06_vapt", "acc0 = evaluate(fresh, val_loader, cpu, bf16=False)"): "zero head",
    ("07_full_v2apt", 'print(f"{name:16s} = {src[\'method\']:8s}: max |Δ logit| = {worst:.1f}'):
        "bit-exact reductions: the difference is exactly 0",
    ("07_full_v2apt", 'print(f"before training (zero head): val accuracy'): "zero head",
    ("07_full_v2apt", 'spreads = {"CIFAR-10-1k, 20 epochs, V²APT"'): "committed results (seeds 0-2 of the CSVs) and the "
                                                                      "paired differences, spreads, MDEs computed from them",
    ("07_full_v2apt", "count_table = paired_table(count)"): "committed results and their paired table",
    ("07_full_v2apt", 'after_table = paired_table(after, ["cifar10-1k", "mnist-1k"])'): "committed results and their "
                                                                                       "paired table",
    ("07_full_v2apt", "old_table = paired_table(old)"): "committed results and their paired table",
    ("07_full_v2apt", 'with open(root / "results" / "front" / "paired.csv"'): "the committed front table, printed",
    ("07_full_v2apt", 'sel = front_make.selected_table('): "committed selections and runs, the paired intervals "
                                                             "computed from them",
    ("07_full_v2apt", 'abl = runs("results/issue16/full_v2apt.csv", names, seeds=(0, 1))'): "committed results",
    ("07_full_v2apt", 'v2 = [r for r in count if r["label"].startswith("V²APT")]'): "committed results",
    ("07_full_v2apt", 'pick = {("cifar10-1k", "V²APT, levers"): after_table'): "MDEs at the committed spreads",
}

UNCHECKED = {  # (lesson, a line of the cell) → why an ignored cell asserts nothing itself
    ("00_vit_anatomy", "ms_per_image = (time.perf_counter() - t0) / (3 * len(xb)) * 1000"): "a timing",
    ("02_vpt_deep", "runs = {m: lesson_run(method=m, **{**budget, \"lr\": lr}) for m, lr in lrs.items()}"):
        "training (or loading lesson 01's runs); the next cell checks the runs",
    ("02_vpt_deep", "print({m: f\"{r['train_img_per_s']:.0f} img/s\" for m, r in runs.items()}"):
        "a throughput, a time of the machine",
    ("03_v2apt", "runs = {name: train(Config(out=tempfile.mkdtemp(), **budget, **kw)) for name, kw in recipes.items()}"):
        "training; the next cell checks the runs",
    ("04_viapt", "sweep = {mm: train(Config(method=\"viapt\", pca_dim=mm"): "training; checked after the sweep",
    ("04_viapt", "sweep.update({mm: train(Config(method=\"viapt\", pca_dim=mm"): "training; the next cell checks the sweep",
    ("05_davpt", "runs = {name: train(Config(out=tempfile.mkdtemp(), **budget, **kw)) for name, kw in rows.items()}"):
        "training; the next cell checks the runs",
    ("06_vapt", 'runs = {m: train(Config(method=m, out=tempfile.mkdtemp(), **budget)) for m in ("linear", "vpt-deep", "vapt")}'):
        "training; the next cell checks the runs",
    ("07_full_v2apt", 'run = train(Config(method="full-v2apt", out=tempfile.mkdtemp(), **budget))'):
        "training; the next cell checks the run",
    ("07_full_v2apt", 'deep = train(Config(method="vpt-deep", out=tempfile.mkdtemp(), **budget))'):
        "training; the next cell checks the run",
}


def code_cells(nb: Path):
    for i, c in enumerate(json.loads(nb.read_text())["cells"]):
        if c["cell_type"] == "code":
            text = "".join("".join(o.get("text", "")) + "".join(o.get("data", {}).get("text/plain", ""))
                           for o in c.get("outputs", []))
            yield i, "".join(c["source"]), text


def listed(table: dict, lesson: str, src: str):
    return [key for key in table if key[0] == lesson and key[1] in src]


@pytest.mark.parametrize("nb", LESSONS + SOLUTIONS, ids=lambda p: p.stem)
def test_compared_cells_print_only_digits_the_code_proves(nb):
    unexplained = [(i, src.splitlines()[0], NUMBER.search(out)[0]) for i, src, out in code_cells(nb)
                   if "NBVAL_IGNORE_OUTPUT" not in src and NUMBER.search(out) and not listed(EXACT, nb.stem, src)]
    assert not unexplained, (f"{nb.name}: compared cells print numbers that may come out of training, sampling or a "
                             "long float reduction: guard them (check_band + # NBVAL_IGNORE_OUTPUT) or, if the code "
                             f"proves their digits, list them in EXACT with the reason: {unexplained}")


@pytest.mark.parametrize("nb", LESSONS + SOLUTIONS, ids=lambda p: p.stem)
def test_ignored_cells_still_check_something(nb):
    silent = [(i, src.splitlines()[1] if "\n" in src else src) for i, src, _ in code_cells(nb)
              if "NBVAL_IGNORE_OUTPUT" in src and not re.search(r"\bassert\b|assert_close|check_band\(", src)
              and not listed(UNCHECKED, nb.stem, src)]
    assert not silent, (f"{nb.name}: cells whose output nbval ignores and that check nothing, so a regression there "
                        f"passes unseen: add an assert or check_band, or list them in UNCHECKED with the reason: {silent}")


@pytest.mark.parametrize("nb", LESSONS + SOLUTIONS, ids=lambda p: p.stem)
def test_cells_with_saved_outputs_carry_an_execution_count(nb):
    """nbval refuses a code cell whose saved outputs have no execution count ("Unrun reference cell has outputs"): a
    cell written or edited outside Jupyter can land that way and fail only in CI's hour-long notebook run."""
    cells = json.loads(nb.read_text())["cells"]
    unrun = [(i, "".join(c["source"]).splitlines()[0]) for i, c in enumerate(cells)
             if c["cell_type"] == "code" and c.get("outputs") and c.get("execution_count") is None]
    assert not unrun, (f"{nb.name}: code cells with saved outputs but no execution count, which nbval fails as "
                       f"'Unrun reference cell has outputs': re-run them in Jupyter, or set their execution_count: {unrun}")


def test_every_listed_cell_exists():
    """A stale entry would hide nothing today but allow anything tomorrow."""
    sources = {nb.stem: [src for _, src, _ in code_cells(nb)] for nb in LESSONS}
    for table in (EXACT, UNCHECKED):
        for lesson, line in table:
            hits = [s for s in sources.get(lesson, []) if line in s]
            assert len(hits) == 1, f"{lesson}: {len(hits)} cells contain {line!r}"


def test_each_lesson_states_the_time_the_readme_measured():
    """One figure per lesson, stated twice: the lesson's first cell and the README's lesson table (the sum of the
    lesson's cell durations in a CI run, `PYTEST_ADDOPTS=--durations=0`). Re-measure, then change both."""
    readme = (LESSONS[0].parents[1] / "README.md").read_text()
    for nb in LESSONS:
        table = re.search(rf"^\| `{nb.stem}` \|.*\| ([\d.]+) min \|$", readme, re.M)
        assert table, f"README's lesson table has no row for {nb.stem}"
        first = "".join(json.loads(nb.read_text())["cells"][0]["source"])
        stated = re.findall(r"CPU time: about ([\d.]+) minutes on 2 quiet cores", first)
        assert stated == [table.group(1)], f"{nb.stem}: the first cell says {stated}, the README {table.group(1)} min"


# Times that are true. `train` prints each run's wall time (its table's `wall s` column, and seconds per
# epoch): a time of the machine that executed the notebook and of its load, which nbval ignores. So the prose never
# estimates a training time of its own: next to each training cell it states what the saved outputs below print,
# "the saved outputs below took about N s of training", and this test holds the two together. The only other time in a
# lesson is its first cell's, the README's measurement on 2 quiet cores (the test above), which the prose may quote as
# "the whole lesson's N minutes on 2 quiet cores".
SAVED_TIME = re.compile(r"saved outputs below took about ([\d.]+) (s|min) of training")
STATED_TIME = re.compile(r"CPU time: about ([\d.]+) minutes on 2 quiet cores")
QUOTED_TIME = re.compile(r"the whole\s+lesson's ([\d.]+) minutes on 2 quiet cores")
TIME_CLAIM = re.compile(r"(?i)\b(?:\d[\d.,]*|an?|one|two|three|few|several)\s+(?:minutes?|min|seconds?|s)\b")
OTHER_TIMES = {  # (lesson, the claim) → why it is not a time of this notebook's cells
    ("01_vpt_shallow", "several\n   minutes"): "exercise 4: a 20-epoch run the lesson does not execute",
}


def printed_wall_s(out: str) -> list[float]:
    """The `wall s` column of every results table that `train` printed (runs.results_table)."""
    walls, lines = [], out.splitlines()
    for k, line in enumerate(lines):
        if line.startswith("|") and line.rstrip().endswith("| wall s |"):
            for row in lines[k + 2:]:
                if not row.startswith("|"):
                    break
                walls.append(float(row.rstrip(" |").rsplit("|", 1)[1]))
    return walls


def training_sections(nb: Path):
    """(index, markdown text, the seconds of training its code cells print) for each markdown cell and the code cells
    up to the next markdown cell."""
    sections = []
    for i, c in enumerate(json.loads(nb.read_text())["cells"]):
        if c["cell_type"] == "markdown":
            sections.append([i, "".join(c["source"]), 0.0])
        elif sections:
            sections[-1][2] += sum(printed_wall_s("".join("".join(o.get("text", "")) for o in c.get("outputs", []))))
    return sections


@pytest.mark.parametrize("nb", LESSONS, ids=lambda p: p.stem)
def test_prose_states_the_training_time_the_saved_outputs_print(nb):
    wrong, sections = [], training_sections(nb)
    stated_lesson = STATED_TIME.findall(sections[0][1])
    for i, md, printed in sections:
        stated = [float(v) * (60 if unit == "min" else 1) for v, unit in SAVED_TIME.findall(md)]
        if printed and not stated:
            wrong.append(f"cell {i}: the cells after it print {printed:.0f} s of training; say so there, "
                         f"'the saved outputs below took about {printed:.0f} s of training'")
        elif stated and abs(stated[0] - printed) > 0.05 * printed + 3:
            wrong.append(f"cell {i} says {stated[0]:.0f} s of training, the cells after it print {printed:.0f} s")
        wrong += [f"cell {i} quotes the whole lesson's {q} minutes, the first cell says {stated_lesson}"
                  for q in QUOTED_TIME.findall(md) if [q] != stated_lesson]
        prose = QUOTED_TIME.sub("", SAVED_TIME.sub("", STATED_TIME.sub("", md)))
        wrong += [f"cell {i}: {m[0]!r} is a time no test checks: state the saved outputs' time, or list it in "
                  "OTHER_TIMES with the reason" for m in TIME_CLAIM.finditer(prose)
                  if (nb.stem, m[0]) not in OTHER_TIMES]
    assert not wrong, f"{nb.name}: " + "; ".join(wrong)


def test_every_listed_time_exists():
    for lesson, claim in OTHER_TIMES:
        md = [c for c in json.loads((LESSONS[0].parent / f"{lesson}.ipynb").read_text())["cells"]
              if c["cell_type"] == "markdown" and claim in "".join(c["source"])]
        assert len(md) == 1, f"{lesson}: {len(md)} markdown cells contain {claim!r}"


def exercise_numbers(path) -> list[int]:
    """The numbers of a lesson's exercises: the `N. ` items of its `## [k. ]Exercises` section, up to the next heading."""
    cells = json.loads(path.read_text())["cells"]
    src = next("".join(c["source"]) for c in cells if c["cell_type"] == "markdown"
               and re.search(r"^## (\d+\. )?Exercises", "".join(c["source"]), flags=re.M))
    section = re.split(r"^## (?:\d+\. )?Exercises.*$", src, flags=re.M)[1]
    section = re.split(r"^#{1,2} ", section, flags=re.M)[0]
    return [int(n) for n in re.findall(r"^(\d+)\. ", section, flags=re.M)]


@pytest.mark.parametrize("nb", LESSONS, ids=lambda p: p.stem)
def test_every_exercise_has_a_solution_that_runs(nb):
    """Issue 18: each exercise of a lesson has a `## Exercise N` section in lessons/solutions/NN_solutions.ipynb with
    at least one code cell, which `pytest --nbval` executes."""
    want = exercise_numbers(nb)
    assert want and want == list(range(1, len(want) + 1)), (nb.stem, want)
    (sol,) = [p for p in SOLUTIONS if p.name.startswith(nb.stem[:2] + "_")]
    code_under = {}
    current = None
    for c in json.loads(sol.read_text())["cells"]:
        heading = re.search(r"^## Exercise (\d+)", "".join(c["source"]), flags=re.M)
        if c["cell_type"] == "markdown" and heading:
            current = int(heading[1])
            code_under[current] = 0
        elif c["cell_type"] == "code" and current is not None and "".join(c["source"]).strip():
            code_under[current] += 1
    assert sorted(code_under) == want, (sol.name, sorted(code_under), want)
    assert all(code_under[k] for k in want), (sol.name, code_under)


def test_lesson_02_retrains_nothing_from_lesson_01(monkeypatch):
    """Issue 18: lesson 02's linear probe and VPT-Shallow are lesson 01's runs. Both lessons' budgets and learning
    rates, read from their cells, give the same scale.run_key, so scale.lesson_run (tests/test_scale.py: one training
    per key) loads them in whichever lesson runs second; full fine-tuning is trained in lesson 02 only."""
    from vapt_min import scale
    monkeypatch.delenv(scale.ENV, raising=False)

    def code(stem):
        path = next(p for p in LESSONS if p.stem.startswith(stem))
        return "\n".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")

    def line(src, start):
        (hit,) = re.findall(rf"^{re.escape(start)}.*$", src, flags=re.M)
        return hit

    one, two = code("01_"), code("02_")
    ns1, ns2 = {"lesson_budget": scale.lesson_budget}, {"lesson_budget": scale.lesson_budget}
    exec(line(one, "budget = lesson_budget("), ns1)
    exec(line(two, "budget = lesson_budget("), ns2)
    exec(line(two, "lrs = {"), ns2)
    assert re.findall(r'\brun\("([\w-]+)"\)', one) == ["linear", "vpt-shallow"]    # lesson 01: no other options
    for m in ("linear", "vpt-shallow"):
        assert scale.run_key({"method": m, **ns1["budget"]}) == \
            scale.run_key({"method": m, **{**ns2["budget"], "lr": ns2["lrs"][m]}}), m
    assert "full" in ns2["lrs"]
