"""The kill-and-resume check of tests/test_kill_resume.py against the shipped `ci` profile (minutes)."""

from __future__ import annotations

import sys

import pytest

from loopscope.profiles.loader import builtin_profiles
from tests.test_kill_resume import check_kill_resume


@pytest.mark.benchmark_heavy
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_at_ten_moments_of_a_ci_run_then_resume_equals_a_clean_run(tmp_path):
    check_kill_resume(tmp_path, builtin_profiles()["ci"], timeout_s=1800)
