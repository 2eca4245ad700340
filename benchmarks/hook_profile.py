"""What tessera's Python hooks cost per unit per step: wall time inside the hooks (microseconds) and the number of
calls from Python into the C++ core they make. Wall time includes waiting for collectives; the hooks' own cost is
the CPU time of the calling thread inside them (gloo moves the bytes on its own threads). Used by train_step_cpu.py --hook-profile.

It wraps the hook methods of tessera.shard.runtime (whichever exist: the names changed when the step's schedule moved
into C++) and every public method and property of the C++ classes they call (`_C.Unit`, `_C.StepSchedule`), so it
measures the same thing on the code before and after that change. Install before any model is sharded: the hooks are
bound when a unit is installed. Nested hooks (end of backward calling post-backward) are timed once, outermost.
"""

from __future__ import annotations

import time

_HOOKS = {
    "UnitRuntime": ["_pre_forward", "_post_forward", "_pre_backward", "post_backward", "_end_of_backward"],
    "_Root": ["end_of_backward"],
}


class HookProfile:
    def __init__(self):
        self.seconds = 0.0  # wall time inside hooks, outermost only (includes waiting for collectives)
        self.cpu_seconds = 0.0  # this thread's CPU time inside hooks: the hooks' own cost
        self.hook_calls = 0
        self.cpp_calls_in_hooks = 0
        self.cpp_calls = 0
        self._depth = 0

    def reset(self) -> None:
        self.seconds = self.cpu_seconds = 0.0
        self.hook_calls = self.cpp_calls_in_hooks = self.cpp_calls = 0

    def install(self, *, count_cpp_calls: bool) -> None:
        """Times the hooks; with count_cpp_calls, also counts C++ calls (a Python wrapper per call, which would
        inflate the hook time: measure the two in separate runs)."""
        from tessera import _C
        from tessera.shard import runtime

        for cls_name, names in _HOOKS.items():
            cls = getattr(runtime, cls_name, None)
            for name in names:
                if cls is not None and name in cls.__dict__:
                    setattr(cls, name, self._timed(cls.__dict__[name]))
        if not count_cpp_calls:
            return
        for cls_name in ("Unit", "StepSchedule"):
            cls = getattr(_C, cls_name, None)
            if cls is None:
                continue
            for name, attr in list(cls.__dict__.items()):
                if name.startswith("_"):
                    continue
                if isinstance(attr, property):
                    setattr(cls, name, property(self._counted(attr.fget),
                                                self._counted(attr.fset) if attr.fset else None))
                elif callable(attr):
                    setattr(cls, name, self._counted(getattr(cls, name)))

    def _timed(self, fn):
        prof = self

        def wrapper(*args, **kwargs):
            if prof._depth:
                return fn(*args, **kwargs)
            prof._depth += 1
            prof.hook_calls += 1
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.cpu_seconds += time.thread_time() - c0
                prof.seconds += time.perf_counter() - t0
                prof._depth -= 1

        return wrapper

    def _counted(self, fn):
        prof = self

        def wrapper(*args, **kwargs):
            prof.cpp_calls += 1
            if prof._depth:
                prof.cpp_calls_in_hooks += 1
            return fn(*args, **kwargs)

        return wrapper
