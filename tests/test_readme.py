"""The README's figures come from results files in the repo, never from a hand.

scripts/readme_tables.py writes the recipes table from src/nnlab/recipes/curves/*.json and the benchmark
summary from benchmarks/results-<kind>.json; these tests hold README.md to what it writes, and
every number in any table of README.md to a number some results file holds.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme_tables.py"
CURVES = ROOT / "src" / "nnlab" / "recipes" / "curves"
# A number not glued to a word (fp32, B1, avx512f hold none): 2,870  88.49  0.54  1024.
NUMBER = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)(?![\w,]*\d)")


def results_files() -> list[Path]:
    # results-<kind>.json (the benchmark suite) and <study>-<kind>.json (the attack and privacy studies)
    return sorted(CURVES.glob("*.json")) + sorted((ROOT / "benchmarks").glob("*.json"))


def numbers_in(value) -> list[float]:
    """Every number a JSON document holds: its numeric values and the numbers written in its strings."""
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [float(value)]
    if isinstance(value, str):
        return [float(n.replace(",", "")) for n in NUMBER.findall(value)]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [n for item in items for n in numbers_in(item)]


def table_numbers(readme: str) -> list[str]:
    """The numbers written in README.md's tables (rows starting with '|'), as written."""
    rows = [line for line in readme.splitlines() if line.startswith("|") and not set(line) <= set("|-: ")]
    return [n for row in rows for n in NUMBER.findall(row)]


def unbacked(written: list[str], known: list[float]) -> list[str]:
    """The written numbers that no known number rounds to, as it is or as a percentage."""
    forms: dict[int, set[str]] = {}  # decimal places -> every known number written with that many
    missing = []
    for text in written:
        places = len(text.partition(".")[2])
        if places not in forms:
            forms[places] = {f"{x * scale:.{places}f}" for x in known for scale in (1, 100)}
        if f"{float(text.replace(',', '')):.{places}f}" not in forms[places]:
            missing.append(text)
    return missing


def test_readme_tables_are_what_the_script_writes_from_the_results_files():
    r = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


def test_every_number_in_the_readme_tables_is_in_a_results_file():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    written = table_numbers(readme)
    assert len(written) > 50  # the recipes table and the benchmark summary are there, with figures
    known = [n for path in results_files() for n in numbers_in(json.loads(path.read_text()))]
    assert unbacked(written, known) == []


def test_a_figure_no_file_holds_is_caught():
    """The check above can fail: a hand-typed figure is reported, one a file holds is not."""
    known = numbers_in({"final": {"test_accuracy": {"mean": 0.884933}}, "cpu": "AMD EPYC 9654 96-Core"})
    row = "| `seed-cnn` | test accuracy 88.49% and 88.51% | 12,345.6 | fp32 | AMD EPYC 9654 96-Core |"
    assert table_numbers(row) == ["88.49", "88.51", "12,345.6", "9654", "96"]
    assert unbacked(table_numbers(row), known) == ["88.51", "12,345.6"]


def copy_repo(tmp_path: Path) -> Path:
    """README.md and the files the script reads, in a folder of their own."""
    shutil.copy(ROOT / "README.md", tmp_path / "README.md")
    (tmp_path / "benchmarks").mkdir()
    for path in (ROOT / "benchmarks").glob("*.json"):
        shutil.copy(path, tmp_path / "benchmarks" / path.name)
    shutil.copytree(ROOT / "src" / "nnlab" / "recipes", tmp_path / "src" / "nnlab" / "recipes")  # with curves/
    return tmp_path


def check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--check", "--root", str(root)], capture_output=True,
                          text=True, timeout=120)


def test_a_hand_edited_figure_fails_the_check_and_the_script_puts_it_back(tmp_path):
    root = copy_repo(tmp_path)
    readme = (root / "README.md").read_text(encoding="utf-8")
    curve = json.loads((CURVES / "seed-cnn.json").read_text())
    shown = f"{100 * curve['final']['test_accuracy']['mean']:.2f}%"
    assert shown in readme
    (root / "README.md").write_text(readme.replace(shown, "90.00%"), encoding="utf-8")
    r = check(root)
    assert r.returncode == 1 and "differ from the results files" in r.stderr
    assert "90.00%" in r.stdout  # the diff shows the figure that would go
    subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)], check=True, capture_output=True, timeout=120)
    assert (root / "README.md").read_text(encoding="utf-8") == readme


def test_a_new_results_file_adds_a_column_and_a_quick_run_is_refused(tmp_path):
    root = copy_repo(tmp_path)
    doc = json.loads((ROOT / "benchmarks" / "results-xeon-amx.json").read_text())
    doc["machine"]["processor"] = "Some AVX2 Processor"
    (root / "benchmarks" / "results-avx2.json").write_text(json.dumps(doc))
    assert check(root).returncode == 1  # the README lacks the new column
    subprocess.run([sys.executable, str(SCRIPT), "--root", str(root)], check=True, capture_output=True, timeout=120)
    readme = (root / "README.md").read_text(encoding="utf-8")
    header = next(line for line in readme.splitlines() if line.startswith("| benchmark"))
    assert header.count("|") == 4 and "`xeon-amx`" in header and "`avx2`" in header
    assert "Some AVX2 Processor" in readme and check(root).returncode == 0

    doc["quick"] = True
    (root / "benchmarks" / "results-avx2.json").write_text(json.dumps(doc))
    r = check(root)
    assert r.returncode == 2 and "--quick" in r.stderr and "Traceback" not in r.stderr
