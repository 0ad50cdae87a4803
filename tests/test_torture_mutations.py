"""The mutation check of the torture test (`benchmarks.torture_mutations`) stays runnable:
each mutation's edits match the current code exactly once (a revert that no longer applies
would say so only when someone runs the check), and applying one changes the tree."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from benchmarks.torture_mutations import MUTATIONS, REPO, NoLongerApplies, apply


@pytest.mark.parametrize("name", [name for name in MUTATIONS if name != "none"])
def test_each_mutation_applies_to_the_current_code(name: str, tmp_path: Path) -> None:
    mutation = MUTATIONS[name]
    for rel in {rel for rel, _, _ in mutation.edits}:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO / rel, tmp_path / rel)
    apply(tmp_path, mutation)
    changed = [rel for rel, _, _ in mutation.edits
               if (tmp_path / rel).read_text() != (REPO / rel).read_text()]
    assert changed


def test_a_mutation_that_no_longer_matches_says_so(tmp_path: Path) -> None:
    (tmp_path / "client" / "transport").mkdir(parents=True)
    (tmp_path / "client" / "transport" / "liveness.py").write_text("# the code moved on\n")
    with pytest.raises(NoLongerApplies):
        apply(tmp_path, MUTATIONS["3"])
