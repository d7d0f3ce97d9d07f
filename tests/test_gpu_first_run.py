"""The CUDA path's defects that a careful reading found before any GPU run (issue 21), each
caught on a CPU where a CPU can see it; tests/gpu has what only a GPU shows. Every test names
the old behaviour it fails on."""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from chatterbox_accel.api import kv_bucket_for
from chatterbox_accel.precision import installed_precision as _installed_precision
from chatterbox_accel.check import probe_inputs
from chatterbox_accel.config import AccelConfig
from chatterbox_accel.t3.decode import T3Runner, max_positions
from chatterbox_accel.t3.graphs import CudaGraphStep, GuardedStep, install_step, step_candidates
from chatterbox_accel.t3.model import sdpa_attention

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = dict(cfg_weight=0.5, temperature=0.8, repetition_penalty=1.2, min_p=0.05, top_p=1.0)


class FakeGraphStep(CudaGraphStep):
    """CUDA graphs on a CPU: a "capture" runs the step once for its output and keeps the call;
    a replay re-runs it. Records the pool each capture was given."""

    def __init__(self, inner):
        super().__init__(inner)
        self.pools_seen = []

    def _capture(self, state, cache, kv_len):
        self.pools_seen.append(self.pool)
        out = self.inner(state, cache, kv_len).clone()

        def replay():
            out.copy_(self.inner(state, cache, kv_len))

        self.pool = object()  # what graph.pool() hands the next capture
        return types.SimpleNamespace(replay=replay), out


def request(runner, t3, max_new, text_len=None):
    t3_cond, text, _ = probe_inputs(t3, None, 1)
    if text_len:
        text = torch.cat([text[:, :1], torch.randint(1, 600, (2, text_len), generator=torch.Generator().manual_seed(1)),
                          text[:, -1:]], dim=1)
    with torch.inference_mode():
        return runner.request(t3_cond, text, OPTIONS, max_new)


def test_invalidate_drops_the_graph_pool():
    """Old: invalidate() dropped every graph but kept `pool`, and the next capture went into a
    pool whose graphs were gone (torch's use_count assertion; GuardedStep then eager for good)."""
    step = FakeGraphStep(lambda *a: torch.zeros(1))
    state = types.SimpleNamespace(slots=1)
    cache = object()
    step(state, cache, 64)
    step(state, cache, 128)
    assert step.pools_seen[0] is None and step.pools_seen[1] is not None  # one pool shared
    step.invalidate()
    step(state, cache, 64)
    assert step.pools_seen[-1] is None, "a capture after invalidate() must start a fresh pool"


def test_rope_tables_never_change_under_captured_graphs(tiny_t3):
    """Old: FastLlama.new_cache rebuilt cos/sin whenever a longer cache was asked for, and the
    shared-prefill table (2304 positions) and teacher_forced_logits did so without invalidating
    graphs, which then read freed tables. Now the tables cover every position T3 can reach from
    the start; a rebuild beyond that invalidates the graphs."""
    runner = T3Runner(tiny_t3, attention=sdpa_attention)
    step = FakeGraphStep(runner.slot_logits)
    runner.step = GuardedStep(runner, step, "fake graphs")
    cos = runner.llama.cos
    assert cos.shape[0] >= max_positions(tiny_t3.hp) >= tiny_t3.hp.max_speech_tokens
    runner.generate(request(runner, tiny_t3, 6))
    runner.generate(request(runner, tiny_t3, 6, text_len=300))  # the text table grows
    t3_cond, text, forced = probe_inputs(tiny_t3, None, 4)
    embeds = runner.build_prompt(t3_cond, text, 0.5)
    runner.teacher_forced_logits(embeds, forced, 0.5)
    runner.step_forced_logits(embeds, forced, 0.5)
    runner.slot_cache(2, 2000)  # a longer cache: reallocated (graphs dropped for that reason)
    assert runner.llama.cos is cos, "the RoPE table was rebuilt while graphs may read it"
    runner.generate(request(runner, tiny_t3, 6))
    assert step.graphs
    runner.llama.new_cache(1, cos.shape[0] + 256)  # past every reachable position: rebuilt...
    assert runner.llama.cos is not cos and step.graphs == {}  # ... and the graphs invalidated


def test_compile_failure_falls_back_to_graphs_of_the_eager_step(tiny_t3, monkeypatch):
    """Old: when the compiled step failed, the chain went compile+graphs -> compile -> eager,
    never trying CUDA graphs of the eager step (most of the gain at batch 1-2)."""
    def broken(*args, **kwargs):
        raise RuntimeError("injected: inductor failed")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    runner = T3Runner(tiny_t3, attention=sdpa_attention)

    def warmup():
        runner.generate(request(runner, tiny_t3, 4))

    result = install_step(runner, compile_step=True, mode="default", cuda_graphs=True, warmup=warmup,
                          graph_step=FakeGraphStep)
    assert result["applied"] == ["t3.cuda_graphs"], result
    assert "injected" in result["fallbacks"]["t3.compile+cuda_graphs"]
    assert isinstance(runner.step, GuardedStep) and runner.step.captures > 0


def test_compile_modes_under_our_graphs_capture_nothing_of_their_own(monkeypatch):
    """Old: max-autotune (which captures CUDA graphs itself) was wrapped in our graphs (nested
    captures); reduce-overhead was reported beside graphs it does not use. And every compile
    was dynamic=False: one compile per (slot count, kv bucket), past Dynamo's recompile limit."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(kw) or fn)
    runner = types.SimpleNamespace(backbone=types.SimpleNamespace(device=torch.device("cuda")),
                                   slot_logits=lambda *a: None)
    notes = {}
    names = [n for n, _ in step_candidates(runner, compile_step=True, mode="max-autotune", cuda_graphs=True,
                                           fallbacks=notes, graph_step=FakeGraphStep)]
    assert names == ["t3.compile+cuda_graphs", "t3.cuda_graphs", "t3.compile[max-autotune]"]
    assert [kw["mode"] for kw in compiled] == ["max-autotune", "max-autotune-no-cudagraphs"]
    assert all(kw["dynamic"] is None for kw in compiled)
    names = [n for n, _ in step_candidates(runner, compile_step=True, mode="reduce-overhead", cuda_graphs=True,
                                           fallbacks=notes, graph_step=FakeGraphStep)]
    assert names == ["t3.compile[reduce-overhead]"] and "its own" in notes["t3.cuda_graphs"]


def test_the_default_cuda_path_reads_a_kv_bucket_and_captures_at_warm_up(tiny_t3):
    """Old: with compile on (CUDA's default) kv_bucket was None: attention read the whole cache
    every step and warm() captured nothing, so each slot count compiled and captured inside
    its first real request."""
    cfg = AccelConfig()
    assert cfg.compiles_t3("cuda") and kv_bucket_for(cfg, "cuda") == cfg.kv_bucket
    runner = T3Runner(tiny_t3, attention=sdpa_attention, kv_bucket=kv_bucket_for(cfg, "cuda"))
    step = FakeGraphStep(runner.slot_logits)
    runner.step = GuardedStep(runner, step, "fake graphs")
    runner.warm(4, 1000)
    assert {k for s, k in step.graphs if s == 4} == {256, 512, 768, 1024}
    cache = runner.slot_cache(4, 1000)
    assert runner.kv_len_for(40, cache) == 256 < cache.max_len


class HostCopies(TorchDispatchMode):
    """Records ops that copy a host value to the device or read a device value to the host:
    `lift_fresh` (a Python value made a tensor, then copied) and `_local_scalar_dense` (.item())."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten._local_scalar_dense.default):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_steady_state_decode_steps_make_no_host_copies(tiny_t3):
    """Old: `presence[arange(S), nxt] = True` made a host tensor of True and copied it to the
    device every step (a sync per step on CUDA, undoing eos_check_every=16). Between host reads
    a step now only launches work."""
    runner = T3Runner(tiny_t3, attention=sdpa_attention, sync_every=16)
    decoder = runner.decoder(2)
    with torch.inference_mode():
        decoder.submit(request(runner, tiny_t3, 40))
        decoder.submit(request(runner, tiny_t3, 40))
        decoder.step()  # admissions and the first step (a host read after prefill is allowed)
        with HostCopies() as mode:
            for _ in range(10):
                assert decoder.step() == []  # no host read yet
    assert mode.seen == [], mode.seen


def test_bf16_compute_on_a_float32_t3_is_judged_as_reduced_precision(tiny_t3):
    """Old: a GPU's dtype="bfloat16" (a bf16 copy of a float32 T3) was judged by the 5e-2
    max-logit bound, not by the argmax/KL limits the CPU's bf16 weights are held to."""
    assert _installed_precision(T3Runner(tiny_t3, attention=sdpa_attention, dtype=torch.bfloat16), tiny_t3) == "bfloat16"
    bf16_loaded = tiny_t3.to(torch.bfloat16)  # computes in its own dtype: judged against itself
    assert _installed_precision(T3Runner(bf16_loaded, attention=sdpa_attention), bf16_loaded) == "float32"


def test_preflight_stops_where_pkg_resources_is_missing(tmp_path):
    """setuptools >= 82 has no pkg_resources: perth's watermarker is then None and every model
    constructor raises TypeError. The preflight names it and the fix, in one JSON line."""
    stub = tmp_path / "pkg_resources"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('no pkg_resources (setuptools >= 82)')\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    out = subprocess.run([sys.executable, str(ROOT / "scripts/gpu_preflight.py"), "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300)
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert out.returncode == 1 and not line["ok"]
    assert line["failed"] == "pkg_resources" and "setuptools<81" in line["fix"]


def run_part(tmp_path, script: str) -> list[dict]:
    body = f"OUT={tmp_path} GPU_CHECK_LIB=1 GPU_CHECK_BUDGET=60 source {ROOT}/scripts/gpu_check.sh\n{script}\n"
    subprocess.run(["bash", "-c", body], check=True, capture_output=True, timeout=60)
    return [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]


def test_gpu_check_parts_leave_a_json_line_whatever_happens(tmp_path):
    """Old: no per-part timeout, so the device's 600 s limit killed the whole check and the part
    left no line; merging used `python` while parts ran with `$PY`."""
    ok = "python3 -c 'print(\"{\\\"benchmark\\\": \\\"x\\\", \\\"v\\\": 1}\")'"
    lines = run_part(tmp_path, f"part fast 30 {ok}\npart slow 2 sleep 30\npart bad 30 false\n"
                               "BUDGET=0\npart late 30 true")
    fast, slow, bad, late = lines
    assert fast["ok"] and fast["v"] == 1 and fast["part"] == "fast"
    assert slow["timed_out"] and not slow["ok"] and slow["part_seconds"] < 20
    assert not bad["ok"] and bad["rc"] == 1
    assert "no time left" in late["skipped"]


def test_gpu_check_first_dry_run_lists_its_parts():
    out = subprocess.run(["bash", str(ROOT / "scripts/gpu_check.sh"), "--first", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for name in ("preflight", "cuda_tests", "t3_english", "batch_english"):
        assert f"] {name} (limit" in out.stderr
    assert "--variants graphs,eager,default,bf16" in out.stderr


def test_benchmark_lines_record_what_ran(tiny_t3):
    """Old: bench_t3's JSON line carried no applied/fallbacks/run-time events, so a silent
    fallback read as a slow device."""
    from chatterbox_accel.benchmark import bench_t3

    result = bench_t3(tiny_t3, tokens=3, repeats=1, warmup=0,
                      variants={"eager": {"cuda_graphs": True}})  # asked for graphs on a CPU
    ran = result.summary()["paths"]["eager"]
    assert "t3.device_sampler" in ran["applied"] and "need a CUDA device" in ran["fallbacks"]["t3.cuda_graphs"]
    assert ran["runtime"] == [] and ran["captures"] == 0 and ran["step"] == "eager"
