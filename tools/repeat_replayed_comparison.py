"""Repeat one sharded comparison that replays the run's whole-matrix results (tests/test_sharded.py ``reference``):

    python tools/repeat_replayed_comparison.py [RUNS] [LAYOUT] [OPTIM] [MAX_GRAD_NORM]

(defaults: 20, 2d, apollo_svd, 1.0: the case of ``test_tensor_parallel_layouts_equal_one_process[2d-apollo_svd-1.0]``
that failed on one machine under a measured tolerance). Each repeat launches the run afresh (4 processes under 2-D),
builds the replaying reference and asserts what the test asserts (1e-5); it also builds the reference with its loss
scaled by 1 -/+ 1e-7, every gradient rounded otherwise, as another machine's kernels would round them, and prints how
far each ends from the run. Prints one line per repeat and the largest figures; exits non-zero on the first failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_sharded import (  # noqa: E402
    SCRIPT,
    TP_LAYOUTS,
    _name,
    _reference_option,
    assert_equals_one_process,
    reference,
    weights,
)

PROCESSES = {**TP_LAYOUTS, "fsdp2": 2, "hsdp": 4}


def main(runs: int = 20, layout: str = "2d", optim: str = "apollo_svd", norm: str = "1.0") -> None:
    processes = PROCESSES[layout]
    name = ("" if layout == "fsdp2" else f"{layout}-") + _name(optim, norm)
    worst = {"run": 0.0, "scaled": 0.0}
    for repeat in range(runs):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder)
            env = {**os.environ, "SHARDED_TEST_PROCESSES": str(processes), "SHARDED_TEST_LAYOUT": layout}
            launched = subprocess.run(
                [sys.executable, str(SCRIPT), str(out), "sharded", f"{name}:{optim}:{norm}"],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
            )
            assert launched.returncode == 0, launched.stderr[-3000:]
            run = weights(out, name)
            figures = {}
            for kind, scale in (("run", "1"), ("scaled", "0.9999999"), ("scaled", "1.0000001")):
                ref = out / f"reference-{scale}"
                ref.mkdir()
                with mock.patch.dict(os.environ, {"SHARDED_TEST_LOSS_SCALE": scale}):
                    single = reference(optim, norm, ref, _reference_option(optim), processes, layout, out, name)
                if kind == "run":
                    assert_equals_one_process(out, name, single, ref)
                gap = max(float((single[k] - run[k]).abs().max()) for k in single)
                figures[kind] = max(figures.get(kind, 0.0), gap)
            worst = {k: max(worst[k], figures[k]) for k in worst}
            print(
                f"repeat {repeat + 1}/{runs}: passed; the reference ends {figures['run']:.3g} from the run, "
                f"{figures['scaled']:.3g} with its loss scaled by 1 -/+ 1e-7",
                flush=True,
            )
    print(f"{runs} of {runs} passed; largest: {worst['run']:.3g} (allowed 1e-5), scaled {worst['scaled']:.3g}")


if __name__ == "__main__":
    main(*[int(a) if i == 0 else a for i, a in enumerate(sys.argv[1:])])
