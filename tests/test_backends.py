"""The op backends by name: selection, $GPTFAST_BACKEND, a backend that cannot load says why. (Each op's own
tests: tests/test_<op>.py; what every op shares: tests/test_op_contract.py.)"""
import pytest

from gptfast import ops

# ----------------------------------------------------------------------------- interface
def test_backend_selection_and_errors(monkeypatch):
    status = ops.available_backends()
    assert status["reference"].startswith("available") and status["torch"].startswith("available")
    with pytest.raises(ops.BackendError, match=r"unknown op backend 'cuda-magic'; known backends: reference, torch"):
        ops.resolve_backend_name("cuda-magic")
    monkeypatch.setenv("GPTFAST_BACKEND", "reference")
    assert ops.resolve_backend_name(None) == "reference"
    monkeypatch.delenv("GPTFAST_BACKEND")
    assert ops.resolve_backend_name(None) == ops.DEFAULT_BACKEND


def test_unavailable_backend_says_why():
    ops.register_backend("broken", "gptfast.ops.does_not_exist", "a backend whose module is missing")
    try:
        assert ops.available_backends()["broken"].startswith("unavailable: ModuleNotFoundError")
        with pytest.raises(ops.BackendError, match="'broken' is unavailable here"):
            ops.resolve_backend_name("broken")
    finally:
        from gptfast.ops import registry
        registry._BACKENDS.pop("broken")
