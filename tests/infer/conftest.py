import pytest

from tests.eval.tiny_run import trained_tiny


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Run folder of the shared tiny_cpu run (model in <run>/export), trained once per session."""
    return trained_tiny(tmp_path_factory)
