"""The `T3.inference` replacement: a wrapt wrapper that routes supported calls to `T3Runner`.

Calls the fast path cannot serve exactly (options it does not implement) go to the original
method untouched; a fast-path failure at run time is logged, disables the fast path for this
model, and the call is answered by the original method.
"""
from __future__ import annotations

import logging

import torch


logger = logging.getLogger(__name__)

# T3.inference's keyword defaults in chatterbox-tts 0.1.7.
INFERENCE_DEFAULTS = dict(
    initial_speech_tokens=None, prepend_prompt_speech_tokens=None, num_return_sequences=1,
    max_new_tokens=None, stop_on_eos=True, do_sample=True, temperature=0.8, top_p=0.95,
    min_p=0.05, length_penalty=1.0, repetition_penalty=1.2, cfg_weight=0.5,
)


def unsupported_reason(t3, args, opts) -> str | None:
    """Why the fast path can't serve this call exactly (None when it can)."""
    if args:
        return "positional arguments"
    unknown = set(opts) - set(INFERENCE_DEFAULTS) - {"t3_cond", "text_tokens"}
    if unknown:
        return f"unknown arguments {sorted(unknown)}"
    if opts["initial_speech_tokens"] is not None or opts["prepend_prompt_speech_tokens"] is not None:
        return "initial/prepended speech tokens"
    if opts["num_return_sequences"] != 1 or not opts["stop_on_eos"]:
        return "num_return_sequences != 1 or stop_on_eos=False"
    return None


def check_lengths(hp, text_tokens, max_new_tokens) -> None:
    """T3's learned position tables end at max_text_tokens + 2 text and max_speech_tokens + 4
    speech positions; past them the original fails with an IndexError inside an embedding.
    `text_tokens` None: check `max_new_tokens` only."""
    n_text = 0 if text_tokens is None else int(torch.atleast_2d(text_tokens).shape[-1])
    if n_text > hp.max_text_tokens + 2:
        raise ValueError(f"the text is {n_text - 2} tokens long; chatterbox's T3 reads at most "
                         f"{hp.max_text_tokens}: split it into sentences and generate them one by one")
    if not 1 <= int(max_new_tokens) <= hp.max_speech_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} is outside 1..{hp.max_speech_tokens} "
                         f"(T3's speech position table); generate long audio in several calls")


def is_transient(exc: Exception) -> bool:
    """Out of memory (CUDA's error type, or a backend's message): worth trying again later."""
    oom = getattr(torch.cuda, "OutOfMemoryError", None) or getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc).lower()


class FastInference:
    """wrapt wrapper for `T3.inference`."""

    method = "T3.inference"  # what the wrapper replaces, for the log

    max_transient = 3  # consecutive transient failures (out of memory) before the fast path is switched off

    def __init__(self, runner):
        self.runner = runner
        self.disabled: str | None = None  # reason, once a run-time failure switched us off
        self.calls = {"fast": 0, "original": 0}
        self.transient = 0  # consecutive transient failures

    def unsupported(self, args, kwargs) -> str | None:
        return unsupported_reason(self.runner.t3, args, {**INFERENCE_DEFAULTS, **kwargs})

    def __call__(self, wrapped, instance, args, kwargs):
        reason = self.disabled or self.unsupported(args, kwargs)
        if reason is None:
            try:
                tokens = self.run(kwargs)
                self.calls["fast"] += 1
                self.transient = 0
                return tokens
            except ValueError:
                raise  # bad sampling options: the user's error, not a fast-path failure
            except Exception as exc:
                self.failed(exc)
        else:
            logger.debug("chatterbox_accel: original %s for this call (%s)", self.method, reason)
        self.calls["original"] += 1
        return wrapped(*args, **kwargs)

    def failed(self, exc: Exception) -> None:
        """A fast call raised: this call goes to the original. A transient failure (out of
        memory) leaves the fast path on for the next call, up to `max_transient` in a row; any
        other switches it off for this model. Both are recorded in the model's report."""
        error = f"{type(exc).__name__}: {exc}"
        events = getattr(self.runner, "events", None)
        if is_transient(exc) and self.transient + 1 < self.max_transient:
            self.transient += 1
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            logger.warning("chatterbox_accel: fast T3 decode failed (%s); this call uses the original %s, "
                           "the next one tries the fast path again", error, self.method)
            if events is not None:
                events.append(f"{self.method}: one call answered by the original ({error})")
            return
        self.disabled = error
        logger.warning("chatterbox_accel: fast T3 decode failed (%s); this model now uses "
                       "the original %s. Call restore(model) to remove the patches.", error, self.method)
        if events is not None:
            events.append(f"{self.method}: fast path switched off ({error})")

    def run(self, kwargs) -> torch.Tensor:
        return torch.cat([ids for ids, _ in self.stream(kwargs)])[None]

    def stream(self, opts, first_block: int | None = None, block: int | None = None, generator=None):
        """`(ids, finished)` blocks of one fast decode (see `T3Runner.token_blocks`); a
        generator: this decode's own sampling draws (else the global RNG)."""
        opts = {**INFERENCE_DEFAULTS, **opts}
        runner = self.runner
        max_new = opts["max_new_tokens"] or runner.hp.max_speech_tokens
        check_lengths(runner.hp, opts["text_tokens"], max_new)
        with torch.inference_mode():
            request = runner.request(opts["t3_cond"], opts["text_tokens"], opts, int(max_new), generator=generator)
        return runner.token_blocks(request, first_block, block)
