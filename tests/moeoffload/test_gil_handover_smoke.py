"""benchmarks/gil_handover.py (the courier's GIL hand-over delay) runs and restores the switch interval."""

import importlib.util
import os
import sys


def test_gil_handover_measures_and_restores_the_interval():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("gil_handover", os.path.join(root, "benchmarks", "gil_handover.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    before = sys.getswitchinterval()
    late = module.handover_delays(1e-3, wakeups=5, nap=1e-4)
    assert len(late) == 5 and late == sorted(late)
    assert sys.getswitchinterval() == before
