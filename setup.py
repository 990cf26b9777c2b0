"""What pyproject.toml cannot say: the install also writes `silo-lm-eval.pth` beside the packages, so that the
`lm_eval` command finds SILO's `silo` model (lm-eval 0.4 has no plugin entry points; the line imports
silo.workflows.lm_eval_plugin only in an lm_eval process, which registers the model lazily). Both a wheel
(build_py) and an editable install (editable_wheel) carry it. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "silo-lm-eval.pth"
# one line, run by `site` at every interpreter start: it must stay cheap and quiet (a string test on argv)
PTH_LINE = ('import sys; any("lm_eval" in a or "lm-eval" in a for a in getattr(sys, "orig_argv", sys.argv)[:4]) '
            'and __import__("silo.workflows.lm_eval_plugin")\n')


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        Path(self.build_lib).mkdir(parents=True, exist_ok=True)
        (Path(self.build_lib) / PTH).write_text(PTH_LINE, encoding="utf-8")

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    def _select_strategy(self, name, tag, build_lib):
        return _WithPth(super()._select_strategy(name, tag, build_lib))


class _WithPth:
    """An editable-install strategy that also writes the .pth file into the wheel."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, wheel, files, mapping):
        self.inner(wheel, files, mapping)
        wheel.writestr(PTH, PTH_LINE.encode("utf-8"))

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self.inner.__exit__(*exc)


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
