"""Test lanes. `make test` runs everything; `make test-fast` runs the unit tests only
(`-m "not slow and not dist and not integration"`).

`slow` and `dist` are set on the tests themselves. `integration` is set here, in one place: the tests
that run osp end to end (the CLI or a launcher in a subprocess, real processes killed and restarted,
real-width dry runs). A name listed here that no longer exists in its module stops the run, so the
list cannot silently drift from the tests.
"""

from __future__ import annotations

import pytest

# whole modules
INTEGRATION_MODULES = {
    "test_dryrun.py",  # real-width dry runs (93x480p, 93x720p) and one real CPU run
    "test_faults.py",  # real processes: kills, stalls, busy ports, corrupt caches
    "test_faults_encode.py",  # the encoder CLI on bad inputs
}
# single tests (by function name; every parametrization)
INTEGRATION_TESTS = {
    "test_sample.py": {
        "test_cli_writes_mp4_and_sidecar",
        "test_cli_prompt_file_errors_and_untrained_size_warning",
        "test_tp2_sample_matches_single_process",
    },
    "test_train.py": {
        "test_stage2_imports_no_encoder",
        "test_init_and_checks",
        "test_corrupt_and_nonfinite_handling",
        "test_wrong_master_addr_fails_fast_with_a_clear_message",
    },
    "test_device.py": {"test_shim_not_applied_with_accelerator"},
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    checked: set[str] = set()
    for item in items:
        module = item.path.name
        listed = INTEGRATION_TESTS.get(module, set())
        if module not in checked and isinstance(item, pytest.Function):
            checked.add(module)
            missing = sorted(n for n in listed if not hasattr(item.module, n))
            if missing:
                raise pytest.UsageError(f"tests/conftest.py: INTEGRATION_TESTS names {missing}, absent from {module}")
        if module in INTEGRATION_MODULES or getattr(item, "originalname", item.name) in listed:
            item.add_marker(pytest.mark.integration)
