"""A real torch.compile of the decode step (Inductor on CPU): same tokens as the eager path."""
import shutil

import pytest

from chatterbox_accel import accelerate, restore
from conftest import fresh, holder, probe

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="Inductor on CPU needs a C compiler")


def test_compiled_step_gives_the_eager_tokens():
    # One layer: Inductor's cold code generation is most of this test's time (~70 s with two).
    from chatterbox_accel.checkpoints import tiny_t3 as make_tiny_t3

    tiny_t3 = make_tiny_t3(seed=0, layers=1)
    t3_cond, text, _ = probe(tiny_t3)
    kwargs = dict(text_tokens=text, max_new_tokens=24, temperature=1e-6, cfg_weight=0.5)
    model = holder(tiny_t3)
    accelerate(model, check=False)
    eager = tiny_t3.inference(t3_cond=fresh(t3_cond), **kwargs)
    report = accelerate(model, compile=True)
    assert "t3.compile[default]" in report.applied, str(report)
    assert report.check.passed
    compiled = tiny_t3.inference(t3_cond=fresh(t3_cond), **kwargs)
    restore(model)
    assert compiled.tolist() == eager.tolist()
