"""implementation="compiled": the torch.compile'd packed step, and its fallback to eager.

Only the first test compiles for real (a few seconds); the fallback tests simulate a broken
compiler, the last one with Inductor pointed at a C++ compiler that does not exist.
"""

from __future__ import annotations

import pytest
import torch

from dpmicroadam.optim import MicroAdam, compiled

# Inductor imports torch.jit, which warns about its own deprecation.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# Block 256, bucket 64: full rows only, full rows and a tail, a tail only.
SHAPES = [(2, 256), (640,), (192,)]
HYPER = dict(
    lr=0.02,
    window_size=3,
    density=0.05,
    topk_block_size=256,
    quant_bucket_size=64,
    weight_decay=0.01,
)


def _run(implementation: str, shapes=SHAPES, steps: int = 6):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    opt = MicroAdam(params, implementation=implementation, **HYPER)
    for _ in range(steps):  # past the window: the slot wraps, the unfilled slots are gone
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return params, opt


def _same_state(opt_a, opt_b, params_a, params_b) -> None:
    for a, b in zip(params_a, params_b):
        state_a, state_b = opt_a.state[a], opt_b.state[b]
        assert state_a.keys() == state_b.keys()
        for key in state_a:
            assert torch.equal(state_a[key], state_b[key]), key


@pytest.fixture
def fresh(monkeypatch):
    """No failure or first call remembered from an earlier test; none left behind."""
    monkeypatch.setattr(compiled, "_FAILURE", [])
    monkeypatch.setattr(compiled, "_CALLED", set())


def test_compiled_matches_eager(fresh):
    before = compiled.compile_seconds()
    fast, opt_fast = _run("fast")
    jit, opt_jit = _run("compiled")
    assert compiled.compile_failure() is None
    assert compiled.compile_seconds() > before
    # Decoding, top-k and quantization are bit-identical; the update may differ in the last
    # bit (Inductor's float32 sqrt is correctly rounded, torch's CPU kernel not always).
    _same_state(opt_jit, opt_fast, jit, fast)
    for a, b in zip(jit, fast):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compile_failure_falls_back_to_eager_once(monkeypatch, fresh):
    def broken(fn):
        def call(*args):
            raise RuntimeError("no working C++ compiler (simulated)")

        return call

    monkeypatch.setattr(compiled, "_compiled", broken)
    with pytest.warns(RuntimeWarning, match="torch.compile failed") as record:
        jit, opt_jit = _run("compiled")
    assert sum("torch.compile failed" in str(w.message) for w in record) == 1
    assert "simulated" in compiled.compile_failure()
    fast, opt_fast = _run("fast")
    _same_state(opt_jit, opt_fast, jit, fast)
    for a, b in zip(jit, fast):
        assert torch.equal(a, b)


def test_update_failing_to_compile_falls_back_to_eager(monkeypatch, fresh):
    real = compiled._compiled

    def update_broken(fn):
        if fn is compiled.update:

            def call(*args):
                raise RuntimeError("the update does not compile (simulated)")

            return call
        return real(fn)  # the graphs of test_compiled_matches_eager, cached

    monkeypatch.setattr(compiled, "_compiled", update_broken)
    with pytest.warns(RuntimeWarning, match="simulated"):
        jit, opt_jit = _run("compiled")
    fast, opt_fast = _run("fast")
    _same_state(opt_jit, opt_fast, jit, fast)
    for a, b in zip(jit, fast):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_missing_cxx_compiler_falls_back_to_eager(monkeypatch, fresh):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config.cpp, "cxx", ("/nonexistent/c++",))
    monkeypatch.setattr(inductor_config, "fx_graph_cache", False)
    torch._dynamo.reset()  # forget graphs compiled by earlier tests
    shapes = [(512,), (3, 256)]
    with pytest.warns(RuntimeWarning, match="torch.compile failed"):
        jit, opt_jit = _run("compiled", shapes)
    assert compiled.compile_failure() is not None
    fast, opt_fast = _run("fast", shapes)
    _same_state(opt_jit, opt_fast, jit, fast)
    for a, b in zip(jit, fast):
        assert torch.equal(a, b)
    torch._dynamo.reset()
