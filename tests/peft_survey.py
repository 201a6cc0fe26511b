"""The session's PEFT survey (fixtures.peft_models.PeftSurvey), read by both the docs' PEFT table
(tests/test_readme.py) and the PEFT ground truth (tests/integrations/test_peft_integration.py):
each case's loads through fastkeys.peft.load_adapter are done once per session.

Those modules load this one as a plugin (`pytest_plugins`). Under pytest-xdist the workers share
the cases through the session's base temporary directory: the first worker to ask for a case
surveys it while holding the case's lock and leaves it there pickled; a worker asking later waits
for the lock and reads it. So the tests that read the survey run on any worker, and the survey's
cases are spread over the workers. It imports torch only when a test asks for the fixture: the
torch-free run imports this module too.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import fastkeys

if TYPE_CHECKING:
    from fixtures.peft_models import PeftSurvey, Survey


@pytest.fixture(scope="session")
def peft_survey(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> PeftSurvey:
    from fixtures.peft_models import PeftSurvey

    root = tmp_path_factory.mktemp("peft-survey")
    # Asked of this session's config, not of the environment, which a child pytest inherits.
    if not hasattr(request.config, "workerinput"):
        return PeftSurvey(root)
    # A worker's base temporary directory is `popen-gwN` in the session's, fresh for each session;
    # the engine in the name too, so no answer of one engine can ever be read under the other.
    shared = tmp_path_factory.getbasetemp().parent / f"peft-survey-{fastkeys.IMPLEMENTATION}"
    shared.mkdir(exist_ok=True)
    return PeftSurvey(root, functools.partial(shared_case, shared))


def shared_case(shared: Path, case: str, survey: Callable[[], Survey]) -> Survey:
    """The case as the first worker to ask for it surveyed it (its pickle under `shared`)."""
    from filelock import FileLock

    file = shared / f"{case}.pickle"
    with FileLock(f"{file}.lock"):
        if file.exists():
            surveyed: Survey = pickle.loads(file.read_bytes())
            return surveyed
        surveyed = survey()
        partial = file.with_suffix(".partial")
        partial.write_bytes(pickle.dumps(surveyed))
        os.replace(partial, file)  # a worker that dies mid-write leaves no half pickle behind
        return surveyed
