"""The README is part of the product: its set-up commands, its tables and the
CI script must stay true to the code."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from services.cli.main import build_parser
from shared.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _quick_start_commands() -> list[str]:
    section = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def test_quick_start_has_exactly_two_commands_demo_and_tests() -> None:
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    demo, tests = commands
    assert demo.endswith("convlog demo")
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_and_fails_on_no_tests() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    _, tests = _quick_start_commands()
    assert tests in ci, "the CI script must run the README's test command verbatim"
    assert '"$rc" -eq 5' in ci and "exit 1" in ci


def test_commands_in_the_readme_exist() -> None:
    """Every `convlog VERB` the README shows is a real subcommand."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    verbs = set(sub.choices)  # type: ignore[union-attr]
    shown = set(re.findall(r"^convlog (\w+)", README, flags=re.M))
    shown |= set(re.findall(r"`convlog (\w+)", README))
    assert shown, "the README names no convlog commands"
    assert shown <= verbs, f"README shows commands that do not exist: {shown - verbs}"


def test_configuration_table_matches_settings() -> None:
    """Each CONVLOG_* variable in the README is a Settings field, and vice versa."""
    documented = set(re.findall(r"`CONVLOG_([A-Z_]+)`", README))
    real = {f.name.upper() for f in fields(Settings)} | {"DATA_DIR"}
    assert documented <= real, f"documented but not real: {documented - real}"
    assert real <= documented, f"real but undocumented: {real - documented}"


def test_documented_defaults_match_settings() -> None:
    from shared.config import DEFAULT_NATS_URL

    defaults = Settings()
    assert f"| `CONVLOG_NATS_URL` | `{DEFAULT_NATS_URL}` |" in README
    assert f"| `CONVLOG_PREFIX` | `{defaults.prefix}` |" in README
    assert f"| `CONVLOG_MAX_ITEM_BYTES` | `{defaults.max_item_bytes}` |" in README
    assert f"| `CONVLOG_COMMIT_BATCH` | `{defaults.commit_batch}` |" in README


def test_readme_has_no_placeholders() -> None:
    assert "SDK_SECTION" not in README and "PERF_SECTION" not in README


def test_lint_is_clean() -> None:
    """ruff (from the test extra) with the rules in pyproject.toml."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--quiet", str(ROOT)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
