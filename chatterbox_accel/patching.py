"""The patch registry: every change `accelerate()` makes to a live model, and how to undo it.

Patches are instance-level: a `wrapt.FunctionWrapper` around the bound method is stored in
the object's own `__dict__`, so other instances and chatterbox's classes stay untouched.
`PatchRegistry.revert()` puts back exactly what was there before (or removes the instance
attribute when there was none), newest patch first.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Callable

import wrapt

logger = logging.getLogger(__name__)

_MISSING = object()
REGISTRY_ATTR = "_chatterbox_accel_registry"


@contextlib.contextmanager
def shadowed(obj, attr: str, value):
    """`obj.attr` is `value` for the block (an instance attribute; whatever the instance held
    there before, an accelerate() patch included, is put back). For one call's instrumentation:
    capturing the tokens `generate()` hands S3Gen, timing a stage."""
    previous = obj.__dict__.get(attr, _MISSING)
    obj.__dict__[attr] = value
    try:
        yield
    finally:
        if previous is _MISSING:
            obj.__dict__.pop(attr, None)
        else:
            obj.__dict__[attr] = previous


@dataclass
class _Patch:
    obj: Any
    attr: str
    previous: Any  # the instance-dict value before patching, or _MISSING


class PatchRegistry:
    """Records patches on one model so they can all be reverted."""

    def __init__(self):
        self._patches: list[_Patch] = []
        self.state: dict[str, Any] = {}  # runtime state owned by the patches (caches, runners)

    def __len__(self):
        return len(self._patches)

    def wrap_method(self, obj, attr: str, wrapper: Callable) -> None:
        """Wrap `obj.attr` (a method) with `wrapper(wrapped, instance, args, kwargs)`."""
        original = getattr(obj, attr)
        self.set_attr(obj, attr, wrapt.FunctionWrapper(original, wrapper))

    def set_attr(self, obj, attr: str, value) -> None:
        """Set an instance attribute, remembering what to put back."""
        previous = obj.__dict__.get(attr, _MISSING)
        self._patches.append(_Patch(obj, attr, previous))
        # Straight into the instance dict: nn.Module.__setattr__ is bypassed on purpose, and
        # an instance attribute shadows the class's method for this object only.
        obj.__dict__[attr] = value

    @contextlib.contextmanager
    def suspended(self):
        """Run the original code inside the block, keeping the patches' state (caches,
        compiled steps) for when they are put back on exit. Yields the number of patches."""
        current = [patch.obj.__dict__.get(patch.attr, _MISSING) for patch in self._patches]
        for patch in reversed(self._patches):
            _put(patch.obj, patch.attr, patch.previous)
        try:
            yield len(self._patches)
        finally:
            for patch, value in zip(self._patches, current):
                _put(patch.obj, patch.attr, value)

    def revert(self) -> None:
        """Undo every patch, newest first. Safe to call twice."""
        while self._patches:
            patch = self._patches.pop()
            _put(patch.obj, patch.attr, patch.previous)
        self.state.clear()


def _put(obj, attr, value) -> None:
    if value is _MISSING:
        obj.__dict__.pop(attr, None)
    else:
        obj.__dict__[attr] = value


def get_registry(model, create: bool = False) -> PatchRegistry | None:
    registry = model.__dict__.get(REGISTRY_ATTR)
    if registry is None and create:
        registry = PatchRegistry()
        model.__dict__[REGISTRY_ATTR] = registry
    return registry


def drop_registry(model) -> None:
    registry = model.__dict__.pop(REGISTRY_ATTR, None)
    if registry is not None:
        registry.revert()


def is_patched(method) -> bool:
    return isinstance(method, wrapt.FunctionWrapper)


def state_of(model, key: str, default=None):
    """What `accelerate()` keeps for `model` under `key` (e.g. "t3_inference", "t3_runner",
    "report"); `default` when the model is not accelerated. Lower layers (stream, engine) read
    the installed fast path through this, never by importing api."""
    registry = get_registry(model)
    return default if registry is None else registry.state.get(key, default)
