"""Result objects of :class:`Pool` calls.

Subclasses of the stdlib's result objects (they receive results already
opened by the pool's result getter, ``Pool._setup_queues``), keep the call's
:class:`_CallState` alive until the call is over, drive the progress bar, and
can be failed from outside (``_fail``) when a worker dies.
"""

from __future__ import annotations

from typing import Any

from . import _stdlib
from ._arguments import _CallState
from ._stdlib import ApplyResult, IMapIterator, IMapUnorderedIterator, MapResult


class _Tracked:
    """Mixin: a call's state, progress bar and forced failure."""

    _failed = False
    _state: _CallState | None = None
    _bar: Any = None
    _bar_owned = False

    def _track(self, state: _CallState | None, bar: Any, owned: bool) -> None:
        self._state, self._bar, self._bar_owned = state, bar, owned

    def _progress(self, n: int) -> None:
        if self._bar is not None and n:
            try:
                self._bar.update(n)
            except Exception:  # a broken bar must not break the pool
                self._bar = None

    def _finished(self) -> None:
        self._state = None  # drops the call's shared copies and its pins
        bar, self._bar = self._bar, None
        if bar is not None and self._bar_owned:
            try:
                bar.close()
            except Exception:
                pass


class _ApplyResult(_Tracked, ApplyResult):
    def _set(self, i, obj):
        if self._failed:
            return  # opened as it was read (Pool's getter): dropping frees it
        super()._set(i, obj)
        self._progress(1)
        self._finished()

    def _fail(self, exc: BaseException) -> None:
        if self._failed or self.ready():
            return
        self._failed = True
        _stdlib.fail_apply_result(self, exc)
        self._finished()


class _MapResult(_Tracked, MapResult):
    def _set(self, i, success_result):
        if self._failed:
            return
        success, value = success_result
        super()._set(i, success_result)
        self._progress(len(value) if success else 0)
        if _stdlib.is_released(self):
            self._finished()

    def _fail(self, exc: BaseException) -> None:
        if self._failed or self.ready():
            return
        self._failed = True
        _stdlib.fail_map_result(self, exc)
        self._finished()


class _IterMixin(_Tracked):
    _chunked = False

    def __init__(self, pool):
        super().__init__(pool)
        # Reentrant, so the checks below can hold it around the stdlib's code.
        _stdlib.make_iterator_reentrant(self)

    def _set(self, i, obj):
        with _stdlib.iterator_condition(self):
            if self._failed:
                return
            super()._set(i, obj)
        success, value = obj
        self._progress((len(value) if self._chunked else 1) if success else 0)
        if _stdlib.is_released(self):
            self._finished()

    def _set_length(self, length):
        with _stdlib.iterator_condition(self):
            if self._failed:
                return
            super()._set_length(length)
        if _stdlib.is_released(self):
            self._finished()

    def _fail(self, exc: BaseException) -> None:
        with _stdlib.iterator_condition(self):
            if self._failed or _stdlib.is_released(self):
                return
            self._failed = True
            # After the error, iteration ends.
            _stdlib.end_iterator_with(self, exc)
        _stdlib.detach_result(self)
        self._finished()


class _IMapIterator(_IterMixin, IMapIterator):
    pass


class _IMapUnorderedIterator(_IterMixin, IMapUnorderedIterator):
    pass
