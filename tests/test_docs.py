"""The user-facing docs tell the truth: docs/results.md and the README's headline are what
`python -m bench.report` makes from the JSON in bench/results, the README fits one screen
of headings with its two set-up commands, its Python quick starts run as written, and every
local link points at a file (and a results section) that exists."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_results_doc_and_headline_are_generated_from_the_json():
    from bench import report

    assert report.main(["--check"]) == 0, "run python -m bench.report"
    assert "<!-- headline" in README.read_text()


def test_report_check_fails_on_a_changed_number(tmp_path, monkeypatch):
    from bench import report

    doc = tmp_path / "results.md"
    doc.write_text(report.document().replace("e-05", "e-06", 1))
    monkeypatch.setattr(report, "DOC", doc)
    assert report.main(["--check"]) == 1


def test_readme_is_one_screen_with_the_two_set_up_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 150
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.*?)```", setup, re.S)
    assert len(commands) == 2
    assert "pip install torch==2.13.0 -e ." in commands[0] and "gqa-lut fit" in commands[0]
    assert 'pip install torch==2.13.0 -e ".[test]"' in commands[1] and "pytest" in commands[1]


def test_readme_replace_ops_quick_start_runs(capsys):
    code = next(b for b in _python_blocks(README) if "replace_ops" in b)
    exec(code, {})
    assert "through tables" in capsys.readouterr().out


@pytest.mark.slow
def test_readme_fit_quick_start_runs(tmp_path, monkeypatch):
    code = next(b for b in _python_blocks(README) if "fit(" in b)
    monkeypatch.chdir(tmp_path)
    exec(code, {})
    assert (tmp_path / "gelu.json").is_file()


def _anchor(title: str) -> str:
    return "".join(c for c in title.strip().lower().replace(" ", "-") if c.isalnum() or c in "-_")


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_local_links_resolve(path):
    bad = []
    for target in re.findall(r"\]\(([^)#\s]+)?(#[^)\s]+)?\)", path.read_text()):
        file, anchor = target
        if file.startswith(("http://", "https://")):
            continue
        dest = (path.parent / file) if file else path
        if not dest.exists():
            bad.append(file)
        elif anchor and dest.suffix == ".md":
            anchors = {_anchor(h) for h in re.findall(r"^#+ (.*)$", dest.read_text(), re.M)}
            if anchor[1:] not in anchors:
                bad.append(f"{file}{anchor}")
    assert bad == []


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_words_about_how_the_team_works(path):
    words = re.findall(r"\b(this session|device tool|the issue|issue #\d+|our team)\b", path.read_text(), re.I)
    assert words == []
