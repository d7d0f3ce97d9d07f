"""Multilingual T3: chatterbox's own `AlignmentStreamAnalyzer`, fed by the fast loop.

Upstream's analyzer reads the attention maps of three heads (layers 9, 12, 13) at every step
to suppress EOS until the text has been spoken and to force EOS on a long tail or a
repetition. To get those maps it registers forward hooks on the layers (a new set on every
`inference()` call, never removed) and switches the whole transformer to eager attention with
`output_attentions=True`, for good.

Here the analyzer is upstream's class, built by its own `__init__` (so its state starts exactly
as upstream's), but handed a stand-in for the transformer, so no hook is registered and the
model's attention setting is untouched. The fast loop computes just those three heads' maps
(`FastLlama.spy_heads`) and puts them where the hooks would have: `last_aligned_attns`. Its
`step()` then runs unchanged: the heuristics, the EOS suppression and the forced EOS are
upstream's code.
"""
from __future__ import annotations

import types


def aligned_heads():
    """[(layer, head), ...] the analyzer reads, from chatterbox itself."""
    from chatterbox.models.t3.inference.alignment_stream_analyzer import LLAMA_ALIGNED_HEADS

    return list(LLAMA_ALIGNED_HEADS)


class _NoHooks:
    """Stands in for a layer's `self_attn`: takes the analyzer's hook and drops it."""

    def register_forward_hook(self, hook):
        return None


class _TransformerStandIn:
    """What `AlignmentStreamAnalyzer.__init__` reads of the transformer: `layers[i].self_attn`.
    No `config`, so upstream leaves the attention implementation alone."""

    def __init__(self):
        self.layers = _Layers()


class _Layers:
    def __getitem__(self, index):
        return types.SimpleNamespace(self_attn=_NoHooks())


def new_analyzer(t3, text_slice: tuple[int, int]):
    """A fresh upstream `AlignmentStreamAnalyzer` for one decode (no hooks, no eager switch).

    text_slice: (first, end) prompt positions of the text tokens, as `T3.inference` passes it.
    """
    from chatterbox.models.t3.inference.alignment_stream_analyzer import AlignmentStreamAnalyzer

    return AlignmentStreamAnalyzer(
        _TransformerStandIn(), None, text_tokens_slice=text_slice, alignment_layer_idx=9,
        eos_idx=t3.hp.stop_speech_token,
    )


class AnalyzerFeed:
    """Runs the analyzer between CFG and the logits processors, as `T3.inference` does.

    `__call__(logits)` is given the CFG-combined logits (1, V) of one step, after the forward
    that left the spied maps in `llama.spied`; it returns the logits the analyzer hands back.
    `last_token` is the id fed to that forward (BOS for the prefill).
    """

    def __init__(self, analyzer, llama, heads, first_token: int):
        self.analyzer, self.llama, self.heads = analyzer, llama, heads
        self.last_token = first_token

    def __call__(self, logits):
        self.analyzer.last_aligned_attns = [self.llama.spied[layer] for layer, _ in self.heads]
        return self.analyzer.step(logits, next_token=self.last_token)
